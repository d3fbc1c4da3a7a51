"""Text: real glyphs (no tofu), CJK line breaking, auto-fit inside the safe area."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from pipeline.render.compose import box_px, draw_text
from pipeline.render.draw import safe_area
from pipeline.render.fonts import find_font_face, missing_glyphs
from pipeline.render.layout import fit_block, tokens
from pipeline.render.media import RenderError
from schemas.common import Locale
from schemas.template import Box as FracBox
from schemas.template import TextStyle


def test_every_character_of_the_greeting_has_a_glyph() -> None:
    text = "恭喜發財 陳大文"
    face = find_font_face(text, Locale.ZH_HANT_HK)
    for ch in text.replace(" ", ""):
        assert missing_glyphs(face.path, ch, face.index) == [], ch
    font = ImageFont.truetype(str(face.path), 96, index=face.index)

    def mask(ch: str) -> np.ndarray:
        img = Image.new("L", (140, 140), 0)
        ImageDraw.Draw(img).text((70, 70), ch, font=font, fill=255, anchor="mm")
        return np.asarray(img)

    tofu = mask("\ue000")
    for ch in "恭喜發財陳大文":
        assert mask(ch).any() and not np.array_equal(mask(ch), tofu), ch


def test_kinsoku_tokens() -> None:
    assert tokens("陳大文，新年快樂！") == ["陳", "大", "文，", "新", "年", "快", "樂！"]
    assert tokens("「山田」さん") == ["「山", "田」", "さ", "ん"]
    assert tokens("Happy New Year") == ["Happy ", "New ", "Year"]
    assert tokens("ちょっと") == ["ちょっ", "と"]  # small kana never start a line


@pytest.mark.parametrize(
    ("text", "locale"),
    [
        ("陳大文，新年快樂，恭喜發財！身體健康，萬事如意", Locale.ZH_HANT_HK),
        ("李小明，新年快乐，恭喜发财！", Locale.ZH_HANS_CN),
        ("山田花子さん、あけましておめでとうございます！", Locale.JA),
        ("Maximilian Alexander, happy Lunar New Year! Wishing you luck and prosperity.", Locale.EN),
    ],
)
def test_fit_block_wraps_cjk_and_latin_inside_the_box(text: str, locale: Locale) -> None:
    face = find_font_face(text, locale)
    fitted = fit_block(text, face, max_width=700, max_height=220, max_size=80, min_size=20, max_lines=2)
    assert 1 <= len(fitted.lines) <= 2
    assert "".join(fitted.lines).replace(" ", "") == text.replace(" ", "")
    assert fitted.width <= 700 and fitted.height <= 220
    for line in fitted.lines[1:]:
        assert line[0] not in "，。！、」"  # no closing punctuation at a line start
    with pytest.raises(RenderError, match="does not fit"):
        fit_block(text * 4, face, max_width=200, max_height=40, max_size=40, min_size=30, max_lines=1)


def test_fit_block_keeps_short_text_on_one_line_and_wraps_long_text_in_balance() -> None:
    face = find_font_face("To Alexandra Papadopoulou", Locale.EN)
    one = fit_block("To Bob", face, max_width=900, max_height=400, max_size=150, min_size=70)
    assert one.lines == ("To Bob",) and one.size == 150
    two = fit_block(
        "To Alexandra Papadopoulou", face, max_width=900, max_height=400, max_size=150, min_size=70
    )
    assert two.lines == ("To Alexandra", "Papadopoulou")
    cjk = find_font_face("給 歐陽諸葛司馬", Locale.ZH_HANT_HK)
    assert fit_block(
        "給 歐陽諸葛司馬", cjk, max_width=500, max_height=400, max_size=150, min_size=70
    ).lines == ("給 歐陽", "諸葛司馬")
    with pytest.raises(RenderError):
        fit_block("W" * 40, face, max_width=100, max_height=50, max_size=150, min_size=70)


@pytest.mark.parametrize(
    ("text", "locale"),
    [
        ("給 歐陽諸葛司馬上官慕容夏侯長孫端木皇甫", Locale.ZH_HANT_HK),
        ("给 陈大文", Locale.ZH_HANS_CN),
        ("山田 花子 さんへ", Locale.JA),
        ("To Maximilian Alexander von Hohenstein-Berg", Locale.EN),
    ],
)
def test_drawn_text_stays_in_its_box_and_the_safe_area(text: str, locale: Locale) -> None:
    w, h = 1080, 1920
    area = safe_area(w, h)
    assert area.y0 >= 0.10 * h and area.y1 <= 0.80 * h
    box = box_px(area, FracBox(x=0.0, y=0.1, w=1.0, h=0.3))
    style = TextStyle(
        fill=("#ffeeaa", "#f2be50"), stroke="#6e2806", glow="#ffaa3c", max_size=150, min_size=56
    )
    dt = draw_text(text, locale, box, style, 1.0, ornament=True)
    # (2 px: antialiased ink reaches a pixel beyond the font's measured box)
    assert box.x0 - 2 <= dt.ink.x0 < dt.ink.x1 <= box.x1 + 2
    assert box.y0 - 2 <= dt.ink.y0 < dt.ink.y1 <= box.y1 + 2
    assert area.y0 <= dt.y and dt.y + dt.image.height <= area.y1 + 80  # glow margin only
    assert dt.face.missing(text) == []
