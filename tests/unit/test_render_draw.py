"""The drawing library: safe area, backgrounds, bokeh, text blocks, the visible AI label,
ornaments and lanterns."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.render.compose import label_still
from pipeline.render.draw import (
    LANTERN_CHAR,
    Box,
    background,
    bokeh,
    divider,
    draw_label,
    draw_text_block,
    lantern,
    safe_area,
    seigaiha,
    smoothstep,
    to_u8,
)
from pipeline.render.fonts import find_font_face
from pipeline.render.layout import FittedText, fit_block
from pipeline.render.media import RenderError
from schemas.common import Locale
from schemas.provenance import VISIBLE_AI_LABEL

CUSTOM_LABEL = "本片由AI生成 / Made with AI"


@pytest.mark.parametrize(("w", "h"), [(1080, 1920), (360, 640), (1920, 1080)])
def test_safe_area_is_clear_of_the_apps_ui(w: int, h: int) -> None:
    area = safe_area(w, h)
    assert area.y0 >= 0.10 * h and area.y1 <= 0.80 * h
    assert area.x0 == round(w * 0.07) and area.x1 == w - area.x0
    assert (area.width, area.height) == (area.x1 - area.x0, area.y1 - area.y0)


def test_smoothstep_and_dithered_quantization() -> None:
    x = np.linspace(-1.0, 2.0, 7, dtype=np.float32)
    s = smoothstep(0.0, 1.0, x)
    assert s[0] == 0.0 and s[-1] == 1.0 and np.all(np.diff(s) >= 0)
    flat = np.full((4, 4, 3), 10.4, np.float32)
    assert np.all(to_u8(flat) == 10)
    dithered = to_u8(flat, np.random.default_rng(0))
    assert set(np.unique(dithered)) <= {10, 11}


def test_background_and_waves_are_deterministic() -> None:
    a, b, c = background(90, 160, seed=1), background(90, 160, seed=1), background(90, 160, seed=2)
    assert a.shape == (160, 90, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    r, g, bl = a[:40].reshape(-1, 3).mean(axis=0)
    assert r > 1.8 * g and r > 1.8 * bl  # red, not grey
    waves = seigaiha(120, 60, 20.0)
    assert waves.shape == (60, 120) and waves.min() >= 0.0 and waves.max() <= 1.0 and waves.std() > 0.1


def test_bokeh_is_a_transparent_layer_of_soft_discs() -> None:
    def layer(seed: int) -> np.ndarray:
        return bokeh(100, 120, count=12, radius=(4.0, 10.0), opacity=(0.3, 0.7), softness=0.35, seed=seed)

    a = layer(3)
    assert a.shape == (120, 100, 4) and a.dtype == np.uint8
    assert np.array_equal(a, layer(3)) and not np.array_equal(a, layer(4))
    assert 0 < (a[..., 3] > 0).mean() < 0.9  # transparent between the discs
    assert 0 < a[..., 3].max() < 255  # translucent


def test_text_block_draws_inside_its_ink_box() -> None:
    face = find_font_face("給 陳大文", Locale.ZH_HANT_HK, weight="bold")
    fitted = fit_block("給 陳大文", face, max_width=500, max_height=200, max_size=90, min_size=40)
    layer = Image.new("RGBA", (700, 400), (0, 0, 0, 0))
    ink = draw_text_block(
        layer,
        fitted,
        face,
        center_x=350,
        top=100,
        fill=((255, 238, 170), (196, 128, 30)),
        stroke=(110, 40, 6),
    )
    assert 0 < ink.x0 < 350 < ink.x1 < 700 and 100 <= ink.y0 < ink.y1 < 400
    alpha = np.asarray(layer)[..., 3]
    assert alpha[ink.y0 : ink.y1, ink.x0 : ink.x1].max() == 255
    with pytest.raises(RenderError):  # nothing to draw
        blank = FittedText((" ",), 40, 50, (1,), 0, 1)
        draw_text_block(layer, blank, face, center_x=0, top=0, fill=((0, 0, 0),))


def _light_text(img: Image.Image, box: Box) -> np.ndarray:
    a = np.asarray(img.convert("RGB"))[box.y0 : box.y1, box.x0 : box.x1]
    return np.asarray(a.min(axis=2) > 200)


def test_label_draws_the_default_text_or_the_given_one() -> None:
    face = find_font_face(VISIBLE_AI_LABEL + CUSTOM_LABEL, Locale.ZH_HANS_CN, weight="regular")
    plain = Image.new("RGBA", (600, 120), (150, 18, 30, 255))
    default = plain.copy()
    box = draw_label(default, face, x=10, y=20, size=34)
    assert 10 == box.x0 < box.x1 < 600 and 20 == box.y0 < box.y1 < 120
    assert _light_text(default, box).mean() > 0.05
    explicit = plain.copy()
    assert draw_label(explicit, face, x=10, y=20, size=34, text=VISIBLE_AI_LABEL) == box
    assert explicit.tobytes() == default.tobytes()
    custom = plain.copy()
    cbox = draw_label(custom, face, x=10, y=20, size=34, text=CUSTOM_LABEL)
    assert cbox != box and custom.tobytes() != default.tobytes()


def test_label_still_draws_the_templates_text() -> None:
    default, x, y = label_still(VISIBLE_AI_LABEL, Locale.EN, 1080, 1920)
    custom, cx, cy = label_still(CUSTOM_LABEL, Locale.EN, 1080, 1920)
    area = safe_area(1080, 1920)
    assert (x, y) == (cx, cy) == (area.x0, area.y0 + 22)
    assert custom.size != default.size
    # the same pixels as drawing the label text directly
    face = find_font_face(CUSTOM_LABEL, Locale.EN, weight="regular")
    direct = Image.new("RGBA", (area.width, 34 * 3), (0, 0, 0, 0))
    draw_label(direct, face, x=0, y=0, size=34, text=CUSTOM_LABEL)
    assert direct.crop((0, 0, custom.width, custom.height)).tobytes() == custom.tobytes()


def test_divider_and_lantern() -> None:
    d = divider(300, 1.0)
    assert d.size == (300, 30) and d.mode == "RGBA"
    alpha = np.asarray(d)[..., 3]
    assert alpha[:, 150].max() == 255 and alpha[:, 0].max() <= 2  # solid centre, faded ends
    face = find_font_face(LANTERN_CHAR, Locale.ZH_HANT_HK, weight="bold")
    with_char, without = lantern(100, 30, face), lantern(100, 30, None)
    assert with_char.size == without.size and with_char.mode == "RGBA"
    assert with_char.tobytes() != without.tobytes()
    assert np.asarray(without)[..., 3].max() == 255
