"""Decision policy: findings -> decision, with configurable severities."""

from __future__ import annotations

import pytest

from pipeline.errors import ConfigError
from pipeline.moderation.policy import ModerationPolicy, summarize
from schemas.events import Decision, Finding, Severity


def f(kind: str, sev: Severity) -> Finding:
    return Finding(kind=kind, severity=sev, message=f"{kind} happened")


def test_default_decisions() -> None:
    p = ModerationPolicy()
    assert p.decide([]) == Decision.APPROVED
    assert p.decide([f("face_consented", Severity.INFO)]) == Decision.APPROVED
    assert p.decide([f("unknown_face", Severity.WARN), f("x", Severity.INFO)]) == Decision.NEEDS_REVIEW
    assert (
        p.decide([f("unknown_face", Severity.WARN), f("protected_person", Severity.BLOCK)])
        == Decision.REJECTED
    )


def test_overrides_change_the_decision() -> None:
    p = ModerationPolicy.parse('{"text_abuse": "block", "unknown_face": "info"}')
    assert p.decide([f("text_abuse", Severity.WARN)]) == Decision.REJECTED
    assert p.decide([f("unknown_face", Severity.WARN)]) == Decision.APPROVED
    applied = p.apply([f("text_abuse", Severity.WARN)])
    assert applied[0].severity == Severity.BLOCK


@pytest.mark.parametrize(
    "rules",
    [
        '{"consent_missing": "warn"}',
        '{"protected_person": "info"}',
        '{"label_missing": "warn"}',
        '{"x": "fatal"}',
        "[1, 2]",
        "{not json",
    ],
)
def test_bad_or_unsafe_rules_are_refused(rules: str) -> None:
    with pytest.raises(ConfigError):
        ModerationPolicy.parse(rules)


def test_summary_names_blocks_and_warnings_only() -> None:
    s = summarize([f("a", Severity.INFO), f("b", Severity.WARN), f("c", Severity.BLOCK)])
    assert s == "b happened; c happened"
