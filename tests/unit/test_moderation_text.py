"""Text checks: abuse lists, hidden characters, length limits, which fields are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.moderation.text import AbuseLists, bad_characters, text_fields, text_findings
from schemas.events import Severity
from tests.integration.db_fixtures import render_request

LISTS = AbuseLists.load()


def kinds(findings: list) -> dict[str, Severity]:  # type: ignore[type-arg]
    return {f.kind: f.severity for f in findings}


@pytest.mark.parametrize(
    "text",
    ["You shit", "FUCKING great", "ｆｕｃｋ", "傻逼", "去 死吧", "去-死", "死ね", "仆街", "kill   yourself"],
)
def test_abuse_terms_are_found_in_any_script_and_width(text: str) -> None:
    found = text_findings({"recipient.name": text}, LISTS)
    assert kinds(found)["text_abuse"] == Severity.WARN, text


@pytest.mark.parametrize("text", ["Scunthorpe", "陳大文", "Alice Wong", "Dickens", "Matsushita", "新年快樂"])
def test_innocent_names_pass(text: str) -> None:
    found = text_findings({"recipient.name": text}, LISTS)
    assert "text_abuse" not in kinds(found), text


def test_kill_yourself_needs_word_start() -> None:
    # whitespace runs are normalised by NFKC only partly; the phrase matches as typed
    assert LISTS.hits("please kill yourself") and not LISTS.hits("skill yourselves up")


@pytest.mark.parametrize(
    ("text", "codepoint"),
    [("Ali\u202ece", "U+202E"), ("A\u200bB", "U+200B"), ("x\x07y", "U+0007"), ("\ufeffBOM", "U+FEFF")],
)
def test_bidi_zero_width_and_control_characters_block(text: str, codepoint: str) -> None:
    found = text_findings({"prompt": text}, LISTS)
    bad = [f for f in found if f.kind == "text_bad_characters"]
    assert bad and bad[0].severity == Severity.BLOCK
    assert codepoint in bad[0].message
    assert bad_characters("line one\nline two") == []  # prompts may be multi-line


def test_length_limits_per_field() -> None:
    found = text_findings({"recipient.name": "x" * 41, "prompt": "y" * 400}, LISTS, max_chars=300)
    too_long = {f.evidence["field"]: f for f in found if f.kind == "text_too_long"}
    assert set(too_long) == {"recipient.name", "prompt"}
    assert too_long["recipient.name"].evidence["limit"] == 40
    assert all(f.severity == Severity.BLOCK for f in too_long.values())


def test_operator_lists_extend_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "en.txt").write_text("# campaign-specific\nrival-brand\n", encoding="utf-8")
    (tmp_path / "yue.txt").write_text("黐線\n", encoding="utf-8")
    lists = AbuseLists.load(tmp_path)
    assert lists.hits("Buy Rival-Brand now") == [("en", "rival-brand")]
    assert lists.hits("你黐線") == [("yue", "黐線")]
    assert lists.hits("傻逼")  # defaults still there
    with pytest.raises(ConfigError):
        AbuseLists.load(tmp_path / "missing")


def test_every_free_text_field_of_a_request_is_checked() -> None:
    req = render_request(name="陳大文")
    fields = text_fields(req)
    assert fields == {"recipient.name": "陳大文"}  # ids, keys, locale and template are not text
