"""The first real renderer: one festive greeting clip per RenderRequested.

How it stays fast: every visual layer is drawn ONCE as a still with numpy/Pillow
(background + visible AI label, two bokeh layers, a lantern cluster, the text block).
ffmpeg animates them with cheap filters (overlay positions that drift or bob, an alpha
fade on the text) and encodes with x264. No Python code runs per frame.

The building blocks (background, bokeh, lanterns, text fitting, music bed, encoder
settings) are small public functions so the template engine can render shared
segments once and reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import tempfile
import unicodedata
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from pipeline.errors import PermanentError
from pipeline.render.fonts import FontFace, find_font_face, require_glyphs
from pipeline.render.media import RenderError, probe, run_ffmpeg
from schemas.common import Locale
from schemas.events import RenderRequested

# --------------------------------------------------------------------------- text content

GREETINGS: dict[Locale, str] = {
    Locale.ZH_HANT_HK: "新年快樂 恭喜發財",
    Locale.ZH_HANS_CN: "新年快乐 恭喜发财",
    Locale.EN: "Happy Lunar New Year",
    Locale.JA: "あけましておめでとう",
}

# How each greeting is laid out on screen (two balanced lines).
GREETING_LINES: dict[Locale, tuple[str, ...]] = {
    Locale.ZH_HANT_HK: ("新年快樂", "恭喜發財"),
    Locale.ZH_HANS_CN: ("新年快乐", "恭喜发财"),
    Locale.EN: ("Happy Lunar", "New Year"),
    Locale.JA: ("あけまして", "おめでとう"),
}

NAME_FORMATS: dict[Locale, str] = {
    Locale.ZH_HANT_HK: "給 {name}",
    Locale.ZH_HANS_CN: "给 {name}",
    Locale.EN: "To {name}",
    Locale.JA: "{name} さんへ",
}

AI_LABEL = "AI生成 / AI-generated"
LANTERN_CHAR = "福"


def greeting_text(locale: Locale) -> str:
    """The greeting as one line ('新年快樂 恭喜發財', 'Happy Lunar New Year')."""
    return GREETINGS[locale]


def name_line(name: str, locale: Locale) -> str:
    return NAME_FORMATS[locale].format(name=name)


# --------------------------------------------------------------------------- look

RGB = tuple[int, int, int]

RED_TOP: RGB = (196, 22, 34)
RED_BOTTOM: RGB = (88, 4, 14)
GOLD_LIGHT: RGB = (255, 238, 170)
GOLD: RGB = (242, 190, 80)
GOLD_DEEP: RGB = (196, 128, 30)
CREAM: RGB = (255, 246, 226)
SHADOW: RGB = (46, 0, 6)

SAMPLE_RATE = 48_000
BASE_HEIGHT = 1920  # sizes below are given for 1920 px tall frames and scaled


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def safe_area(width: int, height: int) -> Box:
    """Where text may go on a vertical short video: clear of the top 10 % (status bar,
    search) and the bottom 20 % (caption, buttons), with side margins of 7 %."""
    mx = round(width * 0.07)
    return Box(mx, math.ceil(height * 0.10), width - mx, math.floor(height * 0.80))


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _to_u8(a: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Quantize floats (0..255) to uint8; with rng, dithered against banding."""
    if rng is None:
        return np.clip(a + np.float32(0.5), 0, 255).astype(np.uint8)
    noise = rng.random(size=a.shape[:2], dtype=np.float32)
    return np.clip(a + noise[(...,) + (None,) * (a.ndim - 2)], 0, 255).astype(np.uint8)


def seigaiha(width: int, height: int, radius: float, *, rings: int = 4) -> np.ndarray:
    """Coverage (0..1, float32, (height, width)) of a wave pattern: staggered rows of
    concentric arcs, each row in front of the one above it."""
    cover = np.zeros((height, width), np.float32)
    step_y = radius / 2
    rows = math.ceil(height / step_y) + 2
    line = max(1.0, radius / 28)
    for row in range(rows):
        cy = row * step_y
        shift = radius if row % 2 else 0.0
        y0, y1 = max(0, int(cy - radius) - 1), min(height, int(cy) + 1)
        if y0 >= y1:
            continue
        for cx in np.arange(-radius + shift, width + radius * 2, radius * 2):
            x0, x1 = max(0, int(cx - radius) - 1), min(width, int(cx + radius) + 2)
            if x0 >= x1:
                continue
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
            inside = d <= radius
            ring = d / radius * rings
            dist = np.abs(ring - np.rint(ring)) * radius / rings
            value = 1.0 - _smoothstep(line * 0.5, line * 1.5, dist)
            region = cover[y0:y1, x0:x1]
            region[inside] = value[inside]
    return cover


def background(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Red-to-deep-red vertical gradient, warm glow behind the text, a faint gold wave
    pattern along the bottom, dark vignette. Returns uint8 RGB, shape (height, width, 3).
    """
    f32 = np.float32
    y = np.linspace(0.0, 1.0, height, dtype=f32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=f32)[None, :]
    t = (y ** f32(1.15))[..., None]
    img = np.array(RED_TOP, f32) * (1 - t) + np.array(RED_BOTTOM, f32) * t  # (h, 1, 3)
    img = np.repeat(img, width, axis=1)
    aspect = f32(width / height)
    # warm golden glow centred where the name sits
    d2 = ((x - f32(0.5)) * aspect) ** 2 + (y - f32(0.40)) ** 2
    glow = np.exp(-d2 / f32(0.26**2))
    img += glow[..., None] * np.array([70.0, 38.0, 6.0], f32)
    # faint gold waves along the bottom, fading in towards the bottom edge
    band_top = round(height * 0.78)
    scale = height / BASE_HEIGHT
    waves = seigaiha(width, height - band_top, 64 * scale)
    fade = _smoothstep(0.0, 1.0, np.linspace(0.0, 1.0, height - band_top, dtype=f32))[:, None]
    wa = (waves * fade * f32(0.16))[..., None]
    img[band_top:] = img[band_top:] * (1 - wa) + np.array(GOLD, f32) * wa
    # vignette
    v = np.sqrt(((x - f32(0.5)) * f32(1.2)) ** 2 + (y - f32(0.45)) ** 2)
    img *= (1.0 - f32(0.45) * _smoothstep(0.35, 0.95, v))[..., None]
    return _to_u8(img, np.random.default_rng(seed))


def _paint_disc(
    premul: np.ndarray,
    alpha: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    color: RGB,
    a: float,
    softness: float,
    rim: float = 0.0,
) -> None:
    """Composite one soft disc ('over') into premultiplied float buffers, in place."""
    h, w = alpha.shape
    x0, x1 = max(0, int(cx - r - 2)), min(w, int(cx + r + 3))
    y0, y1 = max(0, int(cy - r - 2)), min(h, int(cy + r + 3))
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    cover = 1.0 - _smoothstep(1.0 - softness, 1.0, d)
    if rim > 0:  # lens bokeh: slightly brighter edge
        cover = cover * (1.0 - rim + rim * _smoothstep(0.35, 0.9, d))
    src_a = cover * a
    inv = 1.0 - src_a
    premul[y0:y1, x0:x1] = premul[y0:y1, x0:x1] * inv[..., None] + src_a[..., None] * np.array(
        color, np.float32
    )
    alpha[y0:y1, x0:x1] = alpha[y0:y1, x0:x1] * inv + src_a


def _unpremultiply(premul: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = np.empty((*alpha.shape, 4), np.uint8)
    rgb = premul / np.maximum(alpha, np.float32(1e-4))[..., None]
    np.clip(rgb, 0, 255, out=rgb)
    out[..., :3] = rgb
    out[..., 3] = np.clip(alpha * np.float32(255.0) + np.float32(0.5), 0, 255)
    return out


BOKEH_COLORS: tuple[RGB, ...] = ((255, 214, 120), (255, 186, 80), (255, 236, 190), (255, 160, 70))
WARM_BOKEH_COLORS: tuple[RGB, ...] = ((255, 170, 60), (255, 150, 50), (255, 196, 90))


def bokeh(
    width: int,
    height: int,
    *,
    count: int,
    radius: tuple[float, float],
    opacity: tuple[float, float],
    softness: float,
    rim: float = 0.0,
    colors: Sequence[RGB] = BOKEH_COLORS,
    seed: int = 0,
) -> np.ndarray:
    """A transparent layer of soft gold light circles. uint8 RGBA (height, width, 4)."""
    rng = np.random.default_rng(seed)
    premul = np.zeros((height, width, 3), np.float32)
    alpha = np.zeros((height, width), np.float32)
    for _ in range(count):
        r = float(rng.uniform(*radius))
        _paint_disc(
            premul,
            alpha,
            float(rng.uniform(-0.05, 1.05) * width),
            float(rng.uniform(0, 1) * height),
            r,
            colors[int(rng.integers(len(colors)))],
            float(rng.uniform(*opacity)),
            softness,
            rim,
        )
    return _unpremultiply(premul, alpha)


# --------------------------------------------------------------------------- text


def load_font(face: FontFace, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(face.path), size=size, index=face.index)


@dataclass(frozen=True)
class FittedText:
    lines: tuple[str, ...]
    size: int
    line_height: int
    widths: tuple[int, ...]
    ink_top: int  # first ink row, relative to the block's top (anchor) row
    ink_bottom: int  # last ink row + 1, relative to the block's top row

    @property
    def width(self) -> int:
        return max(self.widths)

    @property
    def height(self) -> int:
        return self.ink_bottom - self.ink_top


def _ink_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return math.ceil(right - left)


def _measure(face: FontFace, lines: Sequence[str], size: int, leading: float) -> FittedText:
    font = load_font(face, size)
    tops = [font.getbbox(ln, anchor="ma")[1] for ln in lines]
    bottoms = [font.getbbox(ln, anchor="ma")[3] for ln in lines]
    line_height = round(size * leading)
    return FittedText(
        lines=tuple(lines),
        size=size,
        line_height=line_height,
        widths=tuple(_ink_width(font, ln) for ln in lines),
        ink_top=math.floor(min(t + i * line_height for i, t in enumerate(tops))),
        ink_bottom=math.ceil(max(b + i * line_height for i, b in enumerate(bottoms))),
    )


def _cell_width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def split_two(text: str) -> tuple[str, str]:
    """Split text into two balanced lines.

    Breaks at a space, or between two wide (CJK) characters; among those, the break
    that balances the lines best (counting CJK characters double) wins. Text without
    any such break point is split mid-string.
    """
    widths = [_cell_width(c) for c in text]
    total = sum(widths)
    best: tuple[float, int, int] | None = None  # (imbalance, is-not-space, index)
    left = 0
    for i in range(1, len(text)):
        left += widths[i - 1]
        if text[i] == " ":
            cand = (abs(total - widths[i] - 2 * left), 0, i)
        elif widths[i - 1] == 2 and widths[i] == 2 and text[i - 1] != " ":
            cand = (abs(total - 2 * left), 1, i)
        else:
            continue
        if best is None or cand < best:
            best = cand
    if best is None:
        i = math.ceil(len(text) / 2)
        return text[:i], text[i:]
    i = best[2]
    return text[:i].rstrip(), text[i:].lstrip()


def _largest_fitting(
    face: FontFace,
    lines: tuple[str, ...],
    *,
    lo: int,
    hi: int,
    max_width: int,
    max_height: int,
    leading: float,
) -> FittedText | None:
    """Binary search for the largest size in [lo, hi] at which `lines` fit."""

    def fits(size: int) -> bool:
        m = _measure(face, lines, size, leading)
        return m.width <= max_width and m.height <= max_height

    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return _measure(face, lines, lo, leading)


# A wrapped layout must be this much larger than the one-line layout to be chosen.
WRAP_GAIN = 1.3


def fit_text(
    text_or_lines: str | Sequence[str],
    face: FontFace,
    *,
    max_width: int,
    max_height: int,
    max_size: int,
    min_size: int,
    leading: float = 1.25,
) -> FittedText:
    """The largest size (<= max_size) at which the text fits the box.

    Given lines are kept as they are. A single string stays on one line (shrinking down
    to min_size) unless two balanced lines give a font at least WRAP_GAIN times larger,
    or one line does not fit at all; two lines may shrink to 60 % of min_size.
    Raises RenderError if nothing fits.
    """
    require_glyphs(face, "".join(text_or_lines))
    largest = functools.partial(
        _largest_fitting, face, max_width=max_width, max_height=max_height, leading=leading
    )
    if not isinstance(text_or_lines, str):
        fitted = largest(tuple(text_or_lines), lo=min_size, hi=max_size)
    else:
        text = text_or_lines
        one = largest((text,), lo=min_size, hi=max_size)
        fitted = one
        if (one is None or one.size < max_size) and len(text) > 1:
            floor2 = max(8, round(min_size * 0.6))
            natural = split_two(text)
            mid = math.ceil(len(text) / 2)
            hard = (text[:mid].rstrip(), text[mid:].lstrip())
            two = largest(natural, lo=floor2, hi=max_size)
            if two is None and hard != natural and all(hard):
                two = largest(hard, lo=floor2, hi=max_size)
            if two is not None and (one is None or two.size >= one.size * WRAP_GAIN):
                fitted = two
    if fitted is None:
        raise RenderError(
            f"text {''.join(text_or_lines)!r} does not fit in {max_width}x{max_height} px "
            f"even at {min_size} px"
        )
    return fitted


def _gradient_fill(size: tuple[int, int], y0: int, y1: int, stops: Sequence[RGB]) -> Image.Image:
    """RGB image whose rows run through `stops` between rows y0 and y1."""
    w, h = size
    ys = np.clip((np.arange(h, dtype=np.float32) - y0) / max(1, y1 - y0), 0.0, 1.0)
    pos = np.linspace(0.0, 1.0, len(stops))
    cols = np.stack([np.interp(ys, pos, [s[c] for s in stops]) for c in range(3)], axis=-1)
    rows = np.clip(np.rint(cols), 0, 255).astype(np.uint8)[:, None, :]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows, (h, w, 3))))


def _solid(size: tuple[int, int], color: RGB) -> Image.Image:
    return Image.new("RGB", size, color)


def _with_alpha(rgb: Image.Image, mask: Image.Image, opacity: float = 1.0) -> Image.Image:
    if opacity < 1.0:
        mask = mask.point(lambda v: round(v * opacity))
    out = rgb.convert("RGBA")
    out.putalpha(mask)
    return out


def draw_text_block(
    layer: Image.Image,
    fitted: FittedText,
    face: FontFace,
    *,
    center_x: int,
    top: int,
    fill: Sequence[RGB],
    stroke: RGB | None = None,
    glow: RGB | None = None,
    scale: float = 1.0,
) -> Box:
    """Draw centred lines onto an RGBA layer with a soft drop shadow (and an optional
    stroke and glow). `fill` is one colour or gradient stops running down each line.
    Returns the ink box of the text."""
    require_glyphs(face, "".join(fitted.lines))  # never draw tofu
    font = load_font(face, fitted.size)
    w, h = layer.size
    mask = Image.new("L", (w, h), 0)
    stroke_mask = Image.new("L", (w, h), 0)
    md, sd = ImageDraw.Draw(mask), ImageDraw.Draw(stroke_mask)
    stroke_w = max(1, round(fitted.size * 0.035)) if stroke else 0
    for i, line in enumerate(fitted.lines):
        y = top + i * fitted.line_height
        md.text((center_x, y), line, font=font, fill=255, anchor="ma")
        if stroke:
            sd.text((center_x, y), line, font=font, fill=255, anchor="ma", stroke_width=stroke_w)
    if not stroke:
        stroke_mask = mask
    bbox = stroke_mask.getbbox()
    if bbox is None:
        raise RenderError(f"text {fitted.lines!r} drew nothing")
    ink = Box(*bbox)

    off = max(2, round(7 * scale))
    shadow = Image.new("L", (w, h), 0)
    shadow.paste(stroke_mask.filter(ImageFilter.GaussianBlur(max(1.0, 9 * scale))), (0, off))
    layer.alpha_composite(_with_alpha(_solid((w, h), SHADOW), shadow, 0.75))
    if glow:
        halo = stroke_mask.filter(ImageFilter.GaussianBlur(max(2.0, 22 * scale)))
        layer.alpha_composite(_with_alpha(_solid((w, h), glow), halo, 0.55))
    if stroke:
        layer.alpha_composite(_with_alpha(_solid((w, h), stroke), stroke_mask))
    grad = len(fill) > 1
    body = _gradient_fill((w, h), ink.y0, ink.y1, fill) if grad else _solid((w, h), fill[0])
    layer.alpha_composite(_with_alpha(body, mask))
    return ink


def draw_label(img: Image.Image, face: FontFace, *, x: int, y: int, size: int) -> Box:
    """The visible 'AI生成 / AI-generated' label: light text on a dark translucent pill."""
    require_glyphs(face, AI_LABEL)
    font = load_font(face, size)
    left, top, right, bottom = font.getbbox(AI_LABEL)
    pad_x, pad_y = round(size * 0.55), round(size * 0.32)
    box = Box(x, y, x + int(right - left) + 2 * pad_x, y + int(bottom - top) + 2 * pad_y)
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    d.rounded_rectangle(
        box.as_tuple(),
        radius=box.height // 2,
        fill=(30, 0, 4, 130),
        outline=(255, 230, 180, 150),
        width=max(1, size // 16),
    )
    d.text((x + pad_x - left, y + pad_y - top), AI_LABEL, font=font, fill=(255, 248, 235, 240))
    img.alpha_composite(overlay)
    return box


def divider(width: int, scale: float) -> Image.Image:
    """A small gold ornament: line, diamond, line (drawn 4x and downsampled)."""
    s = 4
    h = max(8, round(30 * scale))
    img = Image.new("RGBA", (width * s, h * s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    cx, cy = width * s // 2, h * s // 2
    r = round(11 * scale * s)
    gold = (*GOLD, 255)
    lw = max(s, round(3 * scale * s))
    gap = r * 2
    d.line([(0, cy), (cx - gap, cy)], fill=(*GOLD, 230), width=lw)
    d.line([(cx + gap, cy), (width * s, cy)], fill=(*GOLD, 230), width=lw)
    d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=gold)
    for sign in (-1, 1):
        dx = cx + sign * round(r * 1.45)
        dr = max(s, round(r * 0.28))
        d.ellipse([dx - dr, cy - dr, dx + dr, cy + dr], fill=gold)
    # fade the line ends
    a = np.asarray(img, dtype=np.float32)
    xs = np.linspace(0.0, 1.0, a.shape[1], dtype=np.float32)
    fade = np.minimum(1.0, np.minimum(xs, 1.0 - xs) / 0.25)
    a[..., 3] *= fade[None, :]
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return img.resize((width, h), Image.Resampling.LANCZOS)


def lantern(width: int, string_len: int, char_face: FontFace | None, *, seed: int = 0) -> Image.Image:
    """One red paper lantern hanging from a gold string (RGBA; the string is at the top)."""
    s = 3  # supersampling
    w = width * s
    body_h = round(w * 0.82)
    cap_h = round(w * 0.11)
    tassel_h = round(w * 0.62)
    pad = round(w * 0.3)  # room for the glow
    total_w = w + 2 * pad
    total_h = string_len * s + cap_h * 2 + body_h + tassel_h + pad
    premul: np.ndarray = np.zeros((total_h, total_w, 3), np.float32)
    alpha: np.ndarray = np.zeros((total_h, total_w), np.float32)
    cx = total_w / 2
    body_top = string_len * s + cap_h
    cy = body_top + body_h / 2
    a, b = w / 2, body_h / 2

    yy, xx = np.mgrid[0:total_h, 0:total_w].astype(np.float32)
    nx, ny = (xx - cx) / a, (yy - cy) / b
    d = np.sqrt(nx**2 + ny**2)
    # glow
    g = np.exp(-((np.maximum(d - 0.75, 0) / 0.35) ** 2)) * 0.45
    premul += g[..., None] * np.array((255, 120, 40), np.float32)
    alpha += g
    # body: radial shading, ribs, soft edge
    inside = 1.0 - _smoothstep(0.985, 1.0, d)
    shade = np.clip(d, 0, 1) ** 1.6
    col = (
        np.array((255, 96, 52), np.float32) * (1 - shade[..., None])
        + np.array((150, 8, 18), np.float32) * shade[..., None]
    )
    half_w = np.sqrt(np.clip(1.0 - ny**2, 0.0, 1.0))
    ribs = np.zeros_like(d)
    for k in (-0.66, -0.33, 0.0, 0.33, 0.66):
        ribs = np.maximum(ribs, 1.0 - _smoothstep(0.0, 0.035, np.abs(nx - k * half_w)))
    col = col * (1.0 - 0.28 * ribs[..., None])
    inside_m = inside[..., None]
    premul = premul * (1 - inside_m) + col * inside_m
    alpha = alpha * (1 - inside) + inside
    img = Image.fromarray(_unpremultiply(premul, alpha))

    dr = ImageDraw.Draw(img)
    gold, deep = (*GOLD, 255), (*GOLD_DEEP, 255)
    lw = max(2, round(w * 0.025))
    dr.line([(cx, 0), (cx, body_top)], fill=deep, width=lw)
    cap_w = round(w * 0.46)
    dr.rounded_rectangle(
        [cx - cap_w / 2, body_top - cap_h - round(w * 0.02), cx + cap_w / 2, body_top + round(w * 0.04)],
        radius=cap_h // 3,
        fill=gold,
        outline=deep,
        width=lw // 2,
    )
    body_bot = body_top + body_h
    dr.rounded_rectangle(
        [cx - cap_w / 2, body_bot - round(w * 0.04), cx + cap_w / 2, body_bot + cap_h],
        radius=cap_h // 3,
        fill=gold,
        outline=deep,
        width=lw // 2,
    )
    knot = round(w * 0.06)
    ky = body_bot + cap_h + knot
    dr.ellipse([cx - knot, ky - knot, cx + knot, ky + knot], fill=gold)
    rng = np.random.default_rng(seed)
    for i in range(9):
        tx = cx + (i - 4) * w * 0.022
        length = tassel_h * float(rng.uniform(0.75, 0.95))
        dr.line([(cx + (i - 4) * knot * 0.2, ky), (tx, ky + length)], fill=gold, width=max(2, lw // 2))
    if char_face is not None:
        require_glyphs(char_face, LANTERN_CHAR)
        font = load_font(char_face, round(body_h * 0.42))
        dr.text((cx, cy), LANTERN_CHAR, font=font, fill=(*GOLD_LIGHT, 235), anchor="mm")
    return img.resize((math.ceil(total_w / s), math.ceil(total_h / s)), Image.Resampling.LANCZOS)


def lantern_cluster(width: int, height: int, char_face: FontFace | None) -> tuple[Image.Image, int]:
    """Three lanterns hanging at the top right (clear of the label at the top left).

    Returns the layer (its top edge starts `bob_margin` px above the frame so the strings
    never end inside the frame while bobbing) and its x position."""
    scale = height / BASE_HEIGHT
    specs = [  # (x centre as a fraction of width, lantern width px @1920, string px @1920)
        (0.60, 112, 30),
        (0.76, 150, 110),
        (0.91, 104, 10),
    ]
    lanterns = [
        (fx, lantern(round(lw * scale), round(sl * scale) + 24, char_face, seed=i))
        for i, (fx, lw, sl) in enumerate(specs)
    ]
    x0 = min(round(fx * width) - im.width // 2 for fx, im in lanterns)
    x1 = max(round(fx * width) + im.width - im.width // 2 for fx, im in lanterns)
    layer = Image.new("RGBA", (x1 - x0, max(im.height for _, im in lanterns)), (0, 0, 0, 0))
    for fx, im in lanterns:
        layer.alpha_composite(im, (round(fx * width) - im.width // 2 - x0, 0))
    return layer, x0


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class TextLayer:
    image: Image.Image  # RGBA, cropped to the text block
    x: int
    y: int
    name_box: Box  # in frame coordinates
    greeting_box: Box
    name_size: int  # font size (px) the name was fitted to
    name_lines: tuple[str, ...]


def text_layer(
    name: str,
    locale: Locale,
    width: int,
    height: int,
    *,
    font_dirs: Sequence[Path | str] = (),
) -> TextLayer:
    """The recipient's name (gold, large, auto-fitted) over a divider and the greeting."""
    scale = height / BASE_HEIGHT
    area = safe_area(width, height)
    line = name_line(name, locale)
    greet = GREETING_LINES[locale]
    name_face = find_font_face(line, locale, weight="bold", extra_dirs=font_dirs)
    greet_face = find_font_face("".join(greet), locale, weight="bold", extra_dirs=font_dirs)

    # leave room for the stroke and the glow at the sides
    name_fit = fit_text(
        line,
        name_face,
        max_width=area.width - round(16 * scale),
        max_height=round(420 * scale),
        max_size=round(150 * scale),
        min_size=round(72 * scale),
    )
    greet_fit = fit_text(
        greet,
        greet_face,
        max_width=round(area.width * 0.92),
        max_height=round(420 * scale),
        max_size=round(118 * scale),
        min_size=round(40 * scale),
        leading=1.3,
    )
    gap = round(66 * scale)
    div_h = max(8, round(30 * scale))
    block_h = name_fit.height + gap + div_h + gap + greet_fit.height
    # centre the block in the safe area, a touch high, and below the label and lanterns
    top = max(area.y0 + round(200 * scale), round(area.y0 + (area.height - block_h) * 0.46))
    if top + block_h > area.y1:
        raise RenderError(f"text block of {block_h}px does not fit the safe area {area}")

    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    cx = width // 2
    name_box = draw_text_block(
        layer,
        name_fit,
        name_face,
        center_x=cx,
        top=top - name_fit.ink_top,
        fill=(GOLD_LIGHT, GOLD, GOLD_DEEP),
        stroke=(110, 40, 6),
        glow=(255, 170, 60),
        scale=scale,
    )
    div_y = name_box.y1 + gap
    div_w = min(area.width, round(560 * scale))
    layer.alpha_composite(divider(div_w, scale), (cx - div_w // 2, div_y))
    greet_box = draw_text_block(
        layer,
        greet_fit,
        greet_face,
        center_x=cx,
        top=div_y + div_h + gap - greet_fit.ink_top,
        fill=(CREAM,),
        scale=scale,
    )
    bbox = layer.getbbox()
    if bbox is None:
        raise RenderError("text layer is empty")
    # even offsets: overlay on yuv420 positions the layer on even pixels
    x0, y0 = bbox[0] // 2 * 2, bbox[1] // 2 * 2
    x1, y1 = min(width, bbox[2] + 1), min(height, bbox[3] + 1)
    return TextLayer(layer.crop((x0, y0, x1, y1)), x0, y0, name_box, greet_box, name_fit.size, name_fit.lines)


# --------------------------------------------------------------------------- music


PENTATONIC = (0, 2, 4, 7, 9)  # major pentatonic degrees (semitones)


def _midi_hz(n: float) -> float:
    return float(440.0 * 2.0 ** ((n - 69) / 12))


def _pluck(freq: float, dur: float, sr: int) -> np.ndarray:
    t = np.arange(int(dur * sr), dtype=np.float64) / sr
    tone = np.zeros_like(t)
    for k, amp in enumerate((1.0, 0.45, 0.22, 0.12, 0.06), start=1):
        tone += amp * np.sin(2 * np.pi * freq * k * t) * np.exp(-t * (2.2 + 1.6 * k))
    attack = np.minimum(1.0, t / 0.006)
    return tone * attack


def _bell(freq: float, dur: float, sr: int) -> np.ndarray:
    t = np.arange(int(dur * sr), dtype=np.float64) / sr
    env = np.exp(-t * 2.2) * np.minimum(1.0, t / 0.003)
    return env * (np.sin(2 * np.pi * freq * t) + 0.35 * np.sin(2 * np.pi * freq * 2.76 * t))


def music_bed(
    duration_s: float,
    *,
    sample_rate: int = SAMPLE_RATE,
    tempo_bpm: float = 96.0,
    root_midi: int = 62,
    peak_dbfs: float = -3.0,
    seed: int = 0,
) -> np.ndarray:
    """A gentle pentatonic arpeggio over a soft pad, stereo float64 (n, 2) in [-1, 1].

    Peaks are normalised to `peak_dbfs`; the head and tail fade so clips start and end
    without clicks.
    """
    n = round(duration_s * sample_rate)
    out = np.zeros((n + sample_rate * 2, 2))
    rng = np.random.default_rng(seed)
    step = 60.0 / tempo_bpm / 2  # eighth notes
    scale = [root_midi + 12 * o + d for o in (0, 1) for d in PENTATONIC] + [root_midi + 24]
    # chord-ish arpeggio shapes (indices into `scale`), one per bar of 8 steps
    shapes = (
        [0, 2, 3, 5, 7, 5, 3, 2],
        [4, 5, 7, 9, 8, 7, 5, 4],
        [1, 3, 4, 6, 8, 6, 4, 3],
        [2, 3, 5, 7, 10, 7, 6, 5],
    )
    bass = (root_midi - 24, root_midi - 27, root_midi - 19, root_midi - 17)  # I vi IV V
    steps = math.ceil(duration_s / step)

    def add(sig: np.ndarray, start_s: float, gain: float, pan: float) -> None:
        i = int(start_s * sample_rate)
        j = min(out.shape[0], i + sig.size)
        left = math.cos((pan + 1) * math.pi / 4)
        right = math.sin((pan + 1) * math.pi / 4)
        out[i:j, 0] += sig[: j - i] * gain * left
        out[i:j, 1] += sig[: j - i] * gain * right

    for s in range(steps):
        bar, pos = divmod(s, 8)
        shape = shapes[bar % len(shapes)]
        note = scale[shape[pos]]
        vel = 0.85 if pos % 4 == 0 else 0.6 + 0.1 * float(rng.random())
        add(_pluck(_midi_hz(note), 1.6, sample_rate), s * step, 0.32 * vel, -0.35 if s % 2 else 0.35)
        if pos == 0:
            add(_pluck(_midi_hz(bass[bar % len(bass)]), 3.0, sample_rate), s * step, 0.45, 0.0)
            add(_bell(_midi_hz(note + 24), 2.0, sample_rate), s * step + 0.01, 0.07, 0.5)
    # soft pad on root and fifth, slow swell
    t = np.arange(out.shape[0]) / sample_rate
    swell = np.minimum(1.0, t / 1.5)
    for semis, pan in ((0, -0.4), (7, 0.4), (12, 0.0)):
        f = _midi_hz(root_midi - 12 + semis)
        pad = np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 0.25 * t)) * swell * 0.05
        add(pad, 0.0, 1.0, pan)
    # a little space: cross-fed echoes
    for delay, gain, src, dst in ((0.23, 0.22, 0, 1), (0.31, 0.2, 1, 0), (0.46, 0.1, 0, 0)):
        d = int(delay * sample_rate)
        out[d:, dst] += gain * out[:-d, src]
    out = out[:n]
    fade_in = min(n, int(0.02 * sample_rate))
    fade_out = min(n, int(0.8 * sample_rate))
    out[:fade_in] *= np.linspace(0.0, 1.0, fade_in)[:, None]
    out[n - fade_out :] *= (0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, fade_out)))[:, None]
    peak = float(np.max(np.abs(out))) or 1.0
    return out * (10 ** (peak_dbfs / 20) / peak)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write float samples (n, channels) in [-1, 1] as 16-bit PCM WAV (TPDF dithered)."""
    rng = np.random.default_rng(0)
    dither = (rng.random(samples.shape) - rng.random(samples.shape)) / 32768.0
    pcm = np.clip(np.rint((samples + dither) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


# --------------------------------------------------------------------------- encode


def x264_args(fps: int, threads: int = 0) -> list[str]:
    """Encoder settings shared by every segment (identical settings let the concat
    demuxer join segments with stream copy; fixed GOP, no scene-cut keyframes)."""
    args = [
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-profile:v",
        "high",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        "20",
        "-g",
        str(fps * 2),
        "-keyint_min",
        str(fps),
        "-sc_threshold",
        "0",
        "-colorspace",
        "bt709",
        "-color_primaries",
        "bt709",
        "-color_trc",
        "bt709",
        "-color_range",
        "tv",
    ]
    if threads > 0:
        args += ["-threads", str(threads)]
    return args


# The "fast" coder: 2.5x less CPU than the default twoloop for this mix; at 160k its
# waveform error is lower still (SNR 37 dB vs 26 dB on the lunar-new-year mix).
AAC_ARGS = ["-c:a", "aac", "-aac_coder", "fast", "-b:a", "160k", "-ar", str(SAMPLE_RATE), "-ac", "2"]


def _write_raw(path: Path, rgba_or_rgb: np.ndarray) -> Path:
    path.write_bytes(np.ascontiguousarray(rgba_or_rgb).tobytes())
    return path


def _raw_input(path: Path, width: int, height: int, pix_fmt: str, fps: int) -> list[str]:
    return [
        "-f",
        "rawvideo",
        "-pix_fmt",
        pix_fmt,
        "-s",
        f"{width}x{height}",
        "-framerate",
        str(fps),
        "-i",
        str(path),
    ]


def _still(label: str, idx: int, fps: int, alpha: bool) -> str:
    """Filter chain: convert one still to yuv once (bt709), then repeat it forever."""
    fmt = "yuva420p" if alpha else "yuv420p"
    return (
        f"[{idx}:v]scale=out_color_matrix=bt709:out_range=tv,format={fmt},"
        f"loop=loop=-1:size=1:start=0,setpts=N/({fps}*TB)[{label}]"
    )


def paste_portrait(canvas: Image.Image, photo: Path, area: Box) -> None:
    """The subject photo, center-cropped square in a gold-rimmed rounded frame, in the lower
    part of the safe area (below the greeting)."""
    try:
        with Image.open(photo) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as exc:
        raise PermanentError(f"subject photo {photo.name} cannot be decoded: {exc}") from exc
    side = round(min(area.x1 - area.x0, canvas.height) * 0.36)
    side -= side % 2
    img = ImageOps.fit(img, (side, side), method=Image.Resampling.LANCZOS, centering=(0.5, 0.4))
    radius = side // 8
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).rounded_rectangle((0, 0, side - 1, side - 1), radius=radius, fill=255)
    x = (canvas.width - side) // 2
    y = area.y1 - side - round(canvas.height * 0.012)
    rim = max(3, side // 60)
    ImageDraw.Draw(canvas).rounded_rectangle(
        (x - rim, y - rim, x + side + rim, y + side + rim), radius=radius + rim, fill=(242, 196, 92, 255)
    )
    canvas.paste(img, (x, y), mask)


@dataclass(frozen=True)
class RenderOutput:
    video_path: Path
    poster_path: Path
    sha256: str
    duration_s: float
    width: int
    height: int
    name_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # where the name is drawn (x0,y0,x1,y1)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def render_greeting(
    req: RenderRequested,
    out_dir: Path,
    *,
    width: int = 1080,
    height: int = 1920,
    fps: int = 30,
    duration_s: float = 6.0,
    threads: int = 0,
    font_dirs: Sequence[Path | str] = (),
    timeout_s: float = 300.0,
    photo: Path | None = None,
) -> RenderOutput:
    """Render one greeting clip: `<out_dir>/<job_id>.mp4` (H.264 High yuv420p, AAC 48 kHz
    stereo, faststart) and its poster `<job_id>.jpg`."""
    if width % 2 or height % 2:
        raise ValueError("width and height must be even (yuv420p)")
    if duration_s <= 1.5:
        raise ValueError("duration_s must be more than 1.5 s")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    locale = req.locale
    scale = height / BASE_HEIGHT
    frames = round(duration_s * fps)
    seed = int.from_bytes(hashlib.sha256(req.template.name.encode()).digest()[:4], "big")

    # Fonts first: a missing glyph fails the job before any work.
    text = text_layer(req.recipient.name, locale, width, height, font_dirs=font_dirs)
    label_face = find_font_face(AI_LABEL, locale, weight="regular", extra_dirs=font_dirs)
    char_face = find_font_face(LANTERN_CHAR, locale, weight="bold", extra_dirs=font_dirs)

    bg = Image.fromarray(background(width, height, seed=seed)).convert("RGBA")
    area = safe_area(width, height)
    draw_label(bg, label_face, x=area.x0, y=area.y0 + round(22 * scale), size=round(34 * scale))
    if photo is not None:
        paste_portrait(bg, photo, area)

    far_speed, near_speed = 22 * scale, 54 * scale
    far = bokeh(
        width,
        height + math.ceil(far_speed * duration_s) + 2,
        count=int(90 * scale**2 + 10),
        radius=(4 * scale, 15 * scale),
        opacity=(0.25, 0.7),
        softness=0.35,
        seed=seed + 1,
    )
    near = bokeh(
        width,
        height + math.ceil(near_speed * duration_s) + 2,
        count=16,
        radius=(48 * scale, 120 * scale),
        opacity=(0.08, 0.16),
        softness=0.3,
        rim=0.4,
        colors=WARM_BOKEH_COLORS,
        seed=seed + 2,
    )
    lanterns, lan_x = lantern_cluster(width, height, char_face)
    bob = max(2, round(7 * scale))
    lan_x -= lan_x % 2

    with tempfile.TemporaryDirectory(prefix=".render-", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        bg_rgb = np.asarray(bg.convert("RGB"))
        inputs: list[str] = []
        inputs += _raw_input(_write_raw(tmp / "bg.rgb", bg_rgb), width, height, "rgb24", fps)
        inputs += _raw_input(_write_raw(tmp / "far.rgba", far), width, far.shape[0], "rgba", fps)
        inputs += _raw_input(_write_raw(tmp / "near.rgba", near), width, near.shape[0], "rgba", fps)
        inputs += _raw_input(
            _write_raw(tmp / "lanterns.rgba", np.asarray(lanterns)),
            lanterns.width,
            lanterns.height,
            "rgba",
            fps,
        )
        inputs += _raw_input(
            _write_raw(tmp / "text.rgba", np.asarray(text.image)),
            text.image.width,
            text.image.height,
            "rgba",
            fps,
        )
        wav = write_wav(tmp / "music.wav", music_bed(duration_s, seed=seed))
        inputs += ["-i", str(wav)]

        slide = round(36 * scale)
        graph = ";".join(
            [
                _still("bg", 0, fps, alpha=False),
                _still("far", 1, fps, alpha=True),
                _still("near", 2, fps, alpha=True),
                _still("lan", 3, fps, alpha=True),
                _still("txt0", 4, fps, alpha=True),
                "[txt0]fade=t=in:st=0.25:d=0.9:alpha=1[txt]",
                f"[bg][far]overlay=x=0:y='-t*{far_speed:.3f}':format=yuv420[v1]",
                f"[v1][lan]overlay=x={lan_x}:y='-{bob + 2}+{bob}*sin(2*PI*t/3.2)':format=yuv420[v2]",
                f"[v2][txt]overlay=x={text.x}:y='{text.y}+{slide}*pow(max(0,1-t/1.3),2)':format=yuv420[v3]",
                f"[v3][near]overlay=x=0:y='-t*{near_speed:.3f}':format=yuv420[v]",
            ]
        )
        tmp_mp4 = tmp / "out.mp4"
        run_ffmpeg(
            [
                "-y",
                *(["-filter_complex_threads", str(threads)] if threads > 0 else []),
                *inputs,
                "-filter_complex",
                graph,
                "-map",
                "[v]",
                "-map",
                "5:a",
                "-frames:v",
                str(frames),
                "-r",
                str(fps),
                *x264_args(fps, threads),
                *AAC_ARGS,
                "-t",
                f"{duration_s:.3f}",
                "-movflags",
                "+faststart",
                str(tmp_mp4),
            ],
            timeout=timeout_s,
        )
        info = probe(tmp_mp4)
        if info.video_codec != "h264" or info.audio_codec != "aac" or not info.has_faststart:
            raise RenderError(f"encoder produced an unexpected file: {info}")
        video = out_dir / f"{req.job_id}.mp4"
        os.replace(tmp_mp4, video)

    poster = out_dir / f"{req.job_id}.jpg"
    tmp_poster = out_dir / f".{req.job_id}.poster.jpg"
    try:
        poster_t = f"{min(3.0, duration_s * 0.6):.3f}"
        run_ffmpeg(
            ["-y", "-ss", poster_t, "-i", video, "-frames:v", "1", "-q:v", "3", "-update", "1", tmp_poster],
            timeout=60,
        )
        os.replace(tmp_poster, poster)
    finally:
        tmp_poster.unlink(missing_ok=True)
    return RenderOutput(
        video_path=video,
        poster_path=poster,
        sha256=sha256_file(video),
        duration_s=info.duration_s,
        width=info.width or width,
        height=info.height or height,
        name_box=text.name_box.as_tuple(),
    )
