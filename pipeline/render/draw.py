"""The drawing library: the palette, the safe area, procedural backgrounds, soft light
(bokeh), text blocks, the visible AI label, ornaments and lanterns.

Everything here draws a still once with numpy / Pillow; ffmpeg animates the stills
(pipeline.render.compose builds the filter graphs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.render.fonts import FontFace, require_glyphs
from pipeline.render.layout import FittedText, load_font
from pipeline.render.media import RenderError
from schemas.provenance import VISIBLE_AI_LABEL

LANTERN_CHAR = "福"

# --------------------------------------------------------------------------- look

RGB = tuple[int, int, int]

RED_TOP: RGB = (196, 22, 34)
RED_BOTTOM: RGB = (88, 4, 14)
GOLD_LIGHT: RGB = (255, 238, 170)
GOLD: RGB = (242, 190, 80)
GOLD_DEEP: RGB = (196, 128, 30)
SHADOW: RGB = (46, 0, 6)

REF_W, REF_H = 1080, 1920  # sizes are given for a 1080x1920 frame and scaled


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


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def to_u8(a: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
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
            value = 1.0 - smoothstep(line * 0.5, line * 1.5, dist)
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
    scale = height / REF_H
    waves = seigaiha(width, height - band_top, 64 * scale)
    fade = smoothstep(0.0, 1.0, np.linspace(0.0, 1.0, height - band_top, dtype=f32))[:, None]
    wa = (waves * fade * f32(0.16))[..., None]
    img[band_top:] = img[band_top:] * (1 - wa) + np.array(GOLD, f32) * wa
    # vignette
    v = np.sqrt(((x - f32(0.5)) * f32(1.2)) ** 2 + (y - f32(0.45)) ** 2)
    img *= (1.0 - f32(0.45) * smoothstep(0.35, 0.95, v))[..., None]
    return to_u8(img, np.random.default_rng(seed))


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
    cover = 1.0 - smoothstep(1.0 - softness, 1.0, d)
    if rim > 0:  # lens bokeh: slightly brighter edge
        cover = cover * (1.0 - rim + rim * smoothstep(0.35, 0.9, d))
    src_a = cover * a
    inv = 1.0 - src_a
    premul[y0:y1, x0:x1] = premul[y0:y1, x0:x1] * inv[..., None] + src_a[..., None] * np.array(
        color, np.float32
    )
    alpha[y0:y1, x0:x1] = alpha[y0:y1, x0:x1] * inv + src_a


def unpremultiply(premul: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    out = np.empty((*alpha.shape, 4), np.uint8)
    rgb = premul / np.maximum(alpha, np.float32(1e-4))[..., None]
    np.clip(rgb, 0, 255, out=rgb)
    out[..., :3] = rgb
    out[..., 3] = np.clip(alpha * np.float32(255.0) + np.float32(0.5), 0, 255)
    return out


BOKEH_COLORS: tuple[RGB, ...] = ((255, 214, 120), (255, 186, 80), (255, 236, 190), (255, 160, 70))


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
    return unpremultiply(premul, alpha)


# --------------------------------------------------------------------------- text


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


def draw_label(
    img: Image.Image, face: FontFace, *, x: int, y: int, size: int, text: str = VISIBLE_AI_LABEL
) -> Box:
    """The visible AI-generated label: light text on a dark translucent pill."""
    require_glyphs(face, text)
    font = load_font(face, size)
    left, top, right, bottom = font.getbbox(text)
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
    d.text((x + pad_x - left, y + pad_y - top), text, font=font, fill=(255, 248, 235, 240))
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
    inside = 1.0 - smoothstep(0.985, 1.0, d)
    shade = np.clip(d, 0, 1) ** 1.6
    col = (
        np.array((255, 96, 52), np.float32) * (1 - shade[..., None])
        + np.array((150, 8, 18), np.float32) * shade[..., None]
    )
    half_w = np.sqrt(np.clip(1.0 - ny**2, 0.0, 1.0))
    ribs = np.zeros_like(d)
    for k in (-0.66, -0.33, 0.0, 0.33, 0.66):
        ribs = np.maximum(ribs, 1.0 - smoothstep(0.0, 0.035, np.abs(nx - k * half_w)))
    col = col * (1.0 - 0.28 * ribs[..., None])
    inside_m = inside[..., None]
    premul = premul * (1 - inside_m) + col * inside_m
    alpha = alpha * (1 - inside) + inside
    img = Image.fromarray(unpremultiply(premul, alpha))

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
