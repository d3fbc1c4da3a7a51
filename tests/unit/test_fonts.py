"""Font choice: every drawn character has a real glyph (no tofu), per locale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.render import fonts
from pipeline.render.fonts import (
    FontFace,
    FontNotFoundError,
    find_font,
    find_font_face,
    installed_faces,
    missing_glyphs,
)
from schemas.common import Locale

SAMPLES = [
    (Locale.ZH_HANT_HK, "恭喜發財 陳大文", ("Noto Sans CJK HK", "Noto Sans CJK TC")),
    (Locale.ZH_HANS_CN, "新年快乐 恭喜发财 陈大文", ("Noto Sans CJK SC",)),
    (Locale.JA, "あけましておめでとう 山田太郎さんへ", ("Noto Sans CJK JP",)),
    (Locale.EN, "Happy Lunar New Year, To Alice", None),
    (Locale.EN, "AI生成 / AI-generated", None),
]


def _mask(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    img = Image.new("L", (200, 200), 0)
    ImageDraw.Draw(img).text((100, 100), ch, font=font, fill=255, anchor="mm")
    return np.asarray(img)


@pytest.mark.parametrize(("locale", "text", "families"), SAMPLES)
def test_chosen_font_has_every_glyph(locale: Locale, text: str, families: tuple[str, ...] | None) -> None:
    face = find_font_face(text, locale)
    assert face.path.is_file()
    assert find_font(text, locale) == face.path
    if families is not None:
        assert face.family in families, face
    # every character, one by one, is in the face's cmap
    for ch in text:
        assert missing_glyphs(face.path, ch, face.index) == [], (ch, face)
    assert face.missing(text) == []

    # and it really renders as a glyph, not as the .notdef box (tofu)
    font = ImageFont.truetype(str(face.path), 120, index=face.index)
    tofu = _mask(font, "\ue000")  # private use: every font draws .notdef for it
    for ch in set(text) - {" "}:
        drawn = _mask(font, ch)
        assert drawn.any(), f"{ch!r} drew nothing"
        assert not np.array_equal(drawn, tofu), f"{ch!r} drew the tofu box"


def test_cjk_locales_pick_the_regional_face_of_the_collection() -> None:
    faces = {loc: find_font_face("新年", loc) for loc in (Locale.ZH_HANT_HK, Locale.ZH_HANS_CN, Locale.JA)}
    assert faces[Locale.ZH_HANT_HK].family.endswith(("HK", "TC"))
    assert faces[Locale.ZH_HANS_CN].family.endswith("SC")
    assert faces[Locale.JA].family.endswith("JP")
    # same .ttc, different faces: chosen by family name, not by a fixed index
    assert len({(f.path, f.index) for f in faces.values()}) == 3


def test_weight_choice() -> None:
    assert find_font_face("陳", Locale.ZH_HANT_HK, weight="bold").is_bold
    assert not find_font_face("陳", Locale.ZH_HANT_HK, weight="regular").is_bold


def test_character_that_no_font_has_raises_naming_it() -> None:
    with pytest.raises(FontNotFoundError) as exc:
        find_font_face("陳大文\ue000", Locale.ZH_HANT_HK)
    assert exc.value.missing == ("\ue000",)
    msg = str(exc.value)
    assert "U+E000" in msg
    assert "fonts-noto-cjk" in msg
    assert "make deps" in msg


def test_missing_glyphs_lists_distinct_missing_characters_in_order() -> None:
    face = find_font_face("a", Locale.EN)
    assert missing_glyphs(face.path, "a\ue001b\ue000\ue001\n", face.index) == ["\ue001", "\ue000"]


def test_no_cjk_font_installed_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(fonts, "DEFAULT_FONT_DIRS", ())
    with pytest.raises(FontNotFoundError) as exc:
        find_font_face("恭喜發財", Locale.ZH_HANT_HK, extra_dirs=[tmp_path])
    assert "'恭' (U+606D)" in str(exc.value)
    assert "apt-get install fonts-noto-cjk" in str(exc.value)


def test_extra_font_dir_is_searched(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    system = find_font_face("陳大文", Locale.ZH_HANT_HK)
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / system.path.name
    link.symlink_to(system.path)
    monkeypatch.setattr(fonts, "DEFAULT_FONT_DIRS", ())
    face = find_font_face("陳大文", Locale.ZH_HANT_HK, extra_dirs=[tmp_path])
    assert face.path == link
    assert face.family == system.family
    assert any(f.path == link for f in installed_faces([tmp_path]))


def test_fontface_missing_matches_function() -> None:
    face = find_font_face("abc", Locale.EN)
    assert isinstance(face, FontFace)
    assert face.missing("ab\ue000") == ["\ue000"]
