"""Template files: the shipped ones validate; bad ones fail with clear messages; merge
fields are substituted safely; a brief that does not fit its template is refused."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.campaigns import BriefError, check_template_fields, sample_brief
from pipeline.cli import main
from pipeline.render.fonts import installed_faces, missing_glyphs_everywhere
from pipeline.render.templates import (
    TemplateError,
    catalog,
    check_recipients,
    get_template,
    load_template_file,
    parse_template,
    shipped_templates_dir,
    substitute,
)
from schemas.brief import Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.export import all_schemas
from schemas.template import merge_fields_in, split_merge
from tests.fonts_util import name_without_font

LNY = shipped_templates_dir() / "lunar-new-year.yaml"


def _lny() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(LNY.read_text(encoding="utf-8"))
    return data


def test_shipped_templates_validate() -> None:
    cat = catalog()
    assert {n for n, _ in cat} >= {"lunar-new-year", "mid-autumn", "season-greetings"}
    for lt in cat.values():
        t = lt.template
        assert t.duration_s <= 15
        assert {Locale.ZH_HANT_HK, Locale.ZH_HANS_CN, Locale.EN} <= set(t.locales)
        assert {"9x16", "1x1", "16x9"} <= set(t.canvas.variants)
        assert t.canvas.variants["9x16"].width == 1080 and t.canvas.variants["9x16"].height == 1920
        assert t.fields_used() == {"recipient.name"}
        assert [la.id for la in t.layers if t.is_personal(la)] == ["name", "photo", "captions"]
        assert len(lt.content_hash) == 64
    # the sample brief's template
    assert get_template(TemplateRef(name="lunar-new-year", version="1")).template.name == "lunar-new-year"
    lny = get_template("lunar-new-year").template
    assert lny.strings[Locale.ZH_HANT_HK]["wish"].startswith("恭喜發財")
    assert lny.strings[Locale.ZH_HANT_HK]["title"] == "新年快樂"


def test_unknown_template_names_the_known_ones() -> None:
    with pytest.raises(TemplateError, match=r"known templates: .*lunar-new-year@1"):
        get_template(TemplateRef(name="lunar-new-year", version="9"))


def test_merge_fields_are_replaced_never_evaluated() -> None:
    tricky = "{recipient.name}"
    assert substitute("給 {recipient.name}", {"recipient.name": "陳大文"}) == "給 陳大文"
    # a value that looks like a field, a format spec or code stays literal text
    for value in (tricky, "{0.__class__}", "{{x}}", "${HOME}", "__import__('os')", "%(x)s"):
        assert substitute("To {recipient.name}!", {"recipient.name": value}) == f"To {value}!"
    assert substitute("{{literal}} {recipient.name}", {"recipient.name": "A"}) == "{literal} A"
    assert split_merge("a{recipient.name}b") == [("a", False), ("recipient.name", True), ("b", False)]
    with pytest.raises(ValueError, match="unknown merge field"):
        merge_fields_in("hi {recipient.__class__}")
    with pytest.raises(ValueError, match="unknown merge field"):
        merge_fields_in("{sender.name}")
    with pytest.raises(ValueError, match="unbalanced"):
        merge_fields_in("hi {recipient.name")


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(TemplateError) as exc:
        parse_template(data, source="t.yaml")
    return str(exc.value)


def test_personal_layer_outside_the_personal_window_is_refused() -> None:
    data = _lny()
    name = next(la for la in data["layers"] if la["id"] == "name")
    name["start"] = 1.0
    msg = _error(data)
    assert "changes per recipient" in msg and "personal window" in msg


def test_label_is_required_for_the_whole_clip() -> None:
    data = _lny()
    data["layers"] = [la for la in data["layers"] if la["type"] != "label"]
    assert "exactly one label layer" in _error(data)
    data = _lny()
    next(la for la in data["layers"] if la["type"] == "label")["start"] = 1.0
    assert "AI label must show for the whole clip" in _error(data)


def test_other_template_errors_are_clear() -> None:
    data = _lny()
    data["duration_s"] = 20
    assert "duration_s" in _error(data)
    data = _lny()
    del data["strings"]["ja"]["wish"]
    assert "strings.ja lacks wish" in _error(data)
    data = _lny()
    data["strings"]["en"]["name"] = "To {recipient.nam}"
    assert "unknown merge field {recipient.nam}" in _error(data)
    data = _lny()
    next(la for la in data["layers"] if la["id"] == "name")["box"]["y"] = 0.0
    assert "label band" in _error(data)
    data = _lny()
    layers = data["layers"]
    near = next(la for la in layers if la["id"] == "near-lights")
    layers.remove(near)
    layers.insert(len(layers) - 1, near)  # after the personal layers, overlapping the window
    assert "list it before them" in _error(data)
    data = _lny()
    data["audio"]["voice"]["end"] = 7.0
    assert "audio.voice" in _error(data)
    data = _lny()
    data["strings"]["ja"]["voice"] = "{recipient.name}さん、新年《しんねん》》おめでとう"
    assert "strings.ja.voice: malformed reading annotation" in _error(data)
    data = copy.deepcopy(_lny())
    data["layers"][1]["type"] = "hologram"
    assert "layers.1" in _error(data)


def test_template_json_schema_is_exported() -> None:
    schemas = all_schemas()
    assert "Template" in schemas
    assert "layers" in schemas["Template"]["properties"]
    json.dumps(schemas["Template"])


def test_cli_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["template", "validate", str(LNY)]) == 0
    out = capsys.readouterr().out
    assert "ok: lunar-new-year@1" in out and "zh-Hant-HK" in out
    bad = tmp_path / "bad.yaml"
    data = _lny()
    data["personal"] = {"start": 0, "end": 9}
    bad.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    assert main(["template", "validate", str(bad)]) == 1
    assert "must leave a shared intro or outro" in capsys.readouterr().err


def test_templates_dir_overrides_and_adds(tmp_path: Path) -> None:
    data = _lny()
    data["name"] = "lny-en-only"
    data["strings"] = {"en": data["strings"]["en"]}
    next(la for la in data["layers"] if la["type"] == "photo")["required"] = True
    (tmp_path / "en.yaml").write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    lt = load_template_file(tmp_path / "en.yaml")
    assert lt.template.locales == (Locale.EN,)
    ref = TemplateRef(name="lny-en-only")
    ok = Recipient(
        id="a",
        name="Alice",
        locale=Locale.EN,
        photo_key="p/a.jpg",
        subjects=(SubjectUse(subject_id="alice", scopes=frozenset({Scope.FACE})),),
    )
    assert check_recipients(ref, [ok], extra_dir=tmp_path) == []
    problems = check_recipients(
        ref,
        [
            Recipient(id="b", name="陳大文", locale=Locale.ZH_HANT_HK),
            Recipient(id="c", name="Carol", locale=Locale.EN),
        ],
        extra_dir=tmp_path,
    )
    assert any("recipient b" in p and "has no zh-Hant-HK strings" in p for p in problems)
    assert any("recipient c" in p and "needs a subject photo" in p for p in problems)


def test_brief_is_checked_against_its_template_when_accepted() -> None:
    brief = sample_brief()
    check_template_fields(brief, list(brief.recipients))  # the sample fits
    with pytest.raises(BriefError, match="no template nope@1"):
        check_template_fields(
            brief.model_copy(update={"template": TemplateRef(name="nope")}), list(brief.recipients)
        )
    thai, code = name_without_font()
    with pytest.raises(
        BriefError, match=rf"recipient x: name '{thai}' cannot be drawn: no font has .*{re.escape(code)}"
    ):
        check_template_fields(brief, [Recipient(id="x", name=thai, locale=Locale.EN)])
