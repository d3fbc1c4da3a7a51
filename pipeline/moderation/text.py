"""Text checks: merge-field values and generation prompts of a job.

- abuse: per-language term lists (built-in defaults plus `<dir>/<language>.txt` files
  from settings.text_abuse_lists_dir). Latin-script terms match at the start of a word
  (so 'Scunthorpe' is not a hit); CJK terms match anywhere once spaces and punctuation
  are removed (so '去 死' and '去-死' are hits).
- characters: control, bidi-override, zero-width and other format characters, which can
  hide or reorder what a viewer sees.
- length: names and other fields have limits.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from schemas.events import DrawnTexts, Finding, RenderRequested, Severity

# Small seed lists; operators extend them with files (docs/consent-and-provenance.md).
DEFAULT_ABUSE_TERMS: dict[str, tuple[str, ...]] = {
    "en": ("fuck", "motherfucker", "shit", "bitch", "cunt", "nigger", "faggot", "retard", "kill yourself",
           "kys", "go die"),
    "zh": ("傻逼", "傻屄", "煞笔", "操你", "肏你", "草泥马", "他妈的", "去死", "死全家", "贱人", "婊子",
           "仆街", "屌你", "冚家鏟", "賤人"),
    "ja": ("死ね", "殺す", "くたばれ", "クソ野郎", "きもい"),
}  # fmt: skip

# Characters never allowed in text drawn on a clip (Unicode general categories).
_FORBIDDEN_CATEGORIES = {"Cc": "control", "Cf": "format (bidi / zero-width)", "Cs": "surrogate",
                         "Co": "private use", "Cn": "unassigned", "Zl": "line separator",
                         "Zp": "paragraph separator"}  # fmt: skip
_ALLOWED_CONTROLS = {"\n"}  # prompts may be multi-line

# Request keys that are ids, keys or enums, never free text.
_NOT_TEXT_KEYS = frozenset(
    {"job_id", "campaign_id", "id", "subject_id", "photo_key", "locale", "version", "requested_at",
     "scopes", "audience_key", "webhook_url", "template"}
)  # fmt: skip


def _is_cjk(ch: str) -> bool:
    name = unicodedata.name(ch, "")
    return any(k in name for k in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPH"))


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _squash(text: str) -> str:
    """Letters and digits only (spaces, punctuation and symbols removed)."""
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in ("L", "N"))


@dataclass(frozen=True)
class AbuseLists:
    terms: Mapping[str, tuple[str, ...]]  # language -> terms

    @classmethod
    def load(cls, directory: Path | None = None, *, include_defaults: bool = True) -> AbuseLists:
        merged: dict[str, list[str]] = {}
        if include_defaults:
            for lang, terms in DEFAULT_ABUSE_TERMS.items():
                merged.setdefault(lang, []).extend(terms)
        if directory is not None:
            d = Path(directory)
            if not d.is_dir():
                raise ConfigError(f"GREETFLOW_TEXT_ABUSE_LISTS_DIR {d} is not a directory")
            for f in sorted(d.glob("*.txt")):
                lang = f.stem
                for line in f.read_text(encoding="utf-8").splitlines():
                    term = line.split("#", 1)[0].strip()
                    if term:
                        merged.setdefault(lang, []).append(term)
        return cls({lang: tuple(dict.fromkeys(_normalise(t) for t in ts)) for lang, ts in merged.items()})

    def hits(self, text: str) -> list[tuple[str, str]]:
        """(language, term) pairs found in `text`. Every list applies to every text: a
        name in one script often sits in a clip of another locale."""
        norm = _normalise(text)
        squashed = _squash(norm)
        found: list[tuple[str, str]] = []
        for lang, terms in self.terms.items():
            for term in terms:
                if any(_is_cjk(c) for c in term):
                    if _squash(term) in squashed:
                        found.append((lang, term))
                elif re.search(r"(?<![^\W\d_])" + re.escape(term), norm):
                    found.append((lang, term))
        return found


def text_fields(req: RenderRequested) -> dict[str, str]:
    """Every free-text value of a render request (merge fields, prompts), by JSON path.

    Walks the request, so fields that templates add later are checked too.
    """
    out: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str):
            out[path] = value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                if str(k) not in _NOT_TEXT_KEYS:
                    walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(req.model_dump(mode="json"), "")
    return out


def bad_characters(text: str) -> list[str]:
    """'U+202E (format (bidi / zero-width))' for each distinct forbidden character."""
    out: dict[str, str] = {}
    for ch in text:
        if ch in _ALLOWED_CONTROLS:
            continue
        cat = unicodedata.category(ch)
        if cat in _FORBIDDEN_CATEGORIES:
            out.setdefault(f"U+{ord(ch):04X}", _FORBIDDEN_CATEGORIES[cat])
    return [f"{cp} ({what})" for cp, what in out.items()]


def text_findings(
    fields: Mapping[str, str],
    lists: AbuseLists,
    *,
    max_chars: int = 500,
    name_max_chars: int = 40,
    name_fields: Iterable[str] = ("recipient.name",),
) -> list[Finding]:
    names = set(name_fields)
    findings: list[Finding] = []
    for path, value in fields.items():
        bad = bad_characters(value)
        if bad:
            findings.append(
                Finding(
                    kind="text_bad_characters",
                    severity=Severity.BLOCK,
                    message=f"{path} contains characters that hide or reorder text: {', '.join(bad[:5])}",
                    evidence={"field": path, "characters": bad},
                )
            )
        limit = name_max_chars if path in names else max_chars
        length = len(unicodedata.normalize("NFC", value))
        if length > limit:
            findings.append(
                Finding(
                    kind="text_too_long",
                    severity=Severity.BLOCK,
                    message=f"{path} is {length} characters long (limit {limit})",
                    evidence={"field": path, "length": length, "limit": limit},
                )
            )
        hits = lists.hits(value)
        if hits:
            langs = sorted({lang for lang, _ in hits})
            findings.append(
                Finding(
                    kind="text_abuse",
                    severity=Severity.WARN,
                    message=f"{path} contains terms from the abuse list(s) {', '.join(langs)}",
                    # The terms themselves are evidence for a reviewer, not for the log line.
                    evidence={"field": path, "terms": [t for _, t in hits], "lists": langs},
                )
            )
    findings.append(
        Finding(
            kind="text_checked",
            severity=Severity.INFO,
            message=f"{len(fields)} text field(s) checked",
            evidence={"fields": sorted(fields)},
        )
    )
    return findings


# --------------------------------------------------------------------------- what was drawn


@dataclass(frozen=True)
class ExpectedTexts:
    """What a clip should show for a job row: each personal text layer's text, and the
    captions layers (whose cues together show `captions`)."""

    layers: Mapping[str, str]
    captions_layers: tuple[str, ...]
    captions: str | None


def expected_drawn_texts(req: RenderRequested, templates_dir: Path | None = None) -> ExpectedTexts:
    """The personal texts the job's template draws with the row's merge values."""
    from pipeline.render.templates import get_template, localized, merge_values, substitute
    from schemas.template import CaptionsLayer, TextLayer, ruby_text

    t = get_template(req.template, templates_dir).template
    values = merge_values(req.recipient.name)
    layers: dict[str, str] = {}
    captions_layers: list[str] = []
    for layer in t.layers:
        if isinstance(layer, TextLayer) and t.is_personal(layer):
            layers[layer.id] = substitute(localized(t, req.locale, layer.text), values)
        elif isinstance(layer, CaptionsLayer):
            captions_layers.append(layer.id)
    captions = None
    if captions_layers and t.audio.voice is not None:
        shown = ruby_text(localized(t, req.locale, t.audio.voice.text), req.locale, spoken=False)
        captions = substitute(shown, values)
    return ExpectedTexts(layers, tuple(captions_layers), captions)


def _no_space(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _mismatch(message: str, **evidence: Any) -> Finding:
    return Finding(kind="drawn_text_mismatch", severity=Severity.BLOCK, message=message, evidence=evidence)


def drawn_text_findings(
    record: DrawnTexts | None,
    req: RenderRequested,
    *,
    clip_sha256: str,
    expected: ExpectedTexts | None,
    lists: AbuseLists,
    max_chars: int = 500,
) -> list[Finding]:
    """Compare what the renderer drew (its staging record) with the job row, and run the
    text checks over the drawn texts. A missing record, a record of another clip, or a
    drawn text that is not the row's blocks the clip, naming the field or layer."""
    from pipeline.render.templates import merge_values

    if record is None:
        return [
            Finding(
                kind="drawn_texts_missing",
                severity=Severity.BLOCK,
                message="the renderer left no record of the texts it drew on the clip",
            )
        ]
    if record.job_id != req.job_id or record.sha256 != clip_sha256:
        return [_mismatch("the drawn-text record belongs to another clip", field="sha256")]
    findings: list[Finding] = []
    want_values = merge_values(req.recipient.name)
    for name in sorted(set(record.merge_values) | set(want_values)):
        if record.merge_values.get(name) != want_values.get(name):
            findings.append(_mismatch(f"{name} differs from job row (drawn on the clip)", field=name))
    if expected is not None:
        drawn: dict[str, str] = {}
        captions: list[str] = []
        for item in record.texts:
            base, _, index = item.layer.rpartition("-")
            if base in expected.captions_layers and index.isdigit():
                captions.append(item.text)
            else:
                drawn[item.layer] = item.text
        for layer in sorted(set(drawn) | set(expected.layers)):
            if drawn.get(layer) != expected.layers.get(layer):
                findings.append(_mismatch(f"text layer {layer} differs from job row", layer=layer))
        if expected.captions is not None and _no_space("".join(captions)) != _no_space(expected.captions):
            findings.append(
                _mismatch("the captions differ from job row", layer=",".join(expected.captions_layers))
            )
    fields = {f"drawn.{item.layer}": item.text for item in record.texts}
    findings.extend(
        f
        for f in text_findings(fields, lists, max_chars=max_chars, name_fields=())
        if f.kind != "text_checked"
    )
    findings.append(
        Finding(
            kind="drawn_texts_checked",
            severity=Severity.INFO,
            message=f"{len(record.texts)} drawn text(s) compared with the job row",
            evidence={"layers": [item.layer for item in record.texts]},
        )
    )
    return findings
