"""The decision policy: findings -> approved / rejected / needs_review.

Each check reports findings with a default severity. The policy may override the
severity per finding kind (settings.moderation_rules, JSON), e.g. to send abusive text
straight to rejection or to let unknown faces through review:

    GREETFLOW_MODERATION_RULES='{"text_abuse": "block", "subject_face_not_seen": "warn"}'

Then: any block -> rejected; else any warn -> needs_review; else approved.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pipeline.errors import ConfigError
from schemas.events import Decision, Finding, Severity

# Kinds whose severity can never be lowered: publishing without consent or with a
# protected person's face is what this whole step exists to prevent.
NON_NEGOTIABLE: frozenset[str] = frozenset({"consent_missing", "protected_person", "label_missing"})


@dataclass(frozen=True)
class ModerationPolicy:
    overrides: Mapping[str, Severity] = field(default_factory=dict)

    @classmethod
    def parse(cls, rules: str | Mapping[str, str]) -> ModerationPolicy:
        if isinstance(rules, str):
            if not rules.strip():
                return cls()
            try:
                data = json.loads(rules)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"GREETFLOW_MODERATION_RULES is not JSON: {exc}") from exc
        else:
            data = dict(rules)
        if not isinstance(data, dict):
            raise ConfigError('GREETFLOW_MODERATION_RULES must be a JSON object {"kind": "info|warn|block"}')
        out: dict[str, Severity] = {}
        for kind, value in data.items():
            try:
                sev = Severity(str(value))
            except ValueError as exc:
                raise ConfigError(
                    f"moderation rule {kind!r}: severity {value!r} is not one of info, warn, block"
                ) from exc
            if kind in NON_NEGOTIABLE and sev != Severity.BLOCK:
                raise ConfigError(f"moderation rule {kind!r} cannot be lowered below block")
            out[str(kind)] = sev
        return cls(out)

    def apply(self, findings: Sequence[Finding]) -> list[Finding]:
        """The findings with the configured severities."""
        out = []
        for f in findings:
            sev = self.overrides.get(f.kind)
            out.append(f if sev is None or sev == f.severity else f.model_copy(update={"severity": sev}))
        return out

    def decide(self, findings: Sequence[Finding]) -> Decision:
        severities = {f.severity for f in self.apply(findings)}
        if Severity.BLOCK in severities:
            return Decision.REJECTED
        if Severity.WARN in severities:
            return Decision.NEEDS_REVIEW
        return Decision.APPROVED


def summarize(findings: Sequence[Finding]) -> str:
    """The job's reason line: every block and warn message."""
    return "; ".join(f.message for f in findings if f.severity != Severity.INFO)
