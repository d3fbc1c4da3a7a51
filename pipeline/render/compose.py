"""Layer stills and the ffmpeg filter graphs that animate them.

Every layer is drawn ONCE as a still (numpy / Pillow). ffmpeg moves and fades the stills
with cheap filters (overlay positions as expressions of time, alpha fades) while it
encodes; no Python code runs per frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from pipeline.errors import PermanentError
from pipeline.render.draw import (
    GOLD,
    GOLD_DEEP,
    REF_H,
    REF_W,
    RGB,
    Box,
    bokeh,
    divider,
    draw_label,
    draw_text_block,
    lantern,
    safe_area,
    unpremultiply,
)
from pipeline.render.fonts import FontFace, find_font_face
from pipeline.render.layout import fit_text_box, load_font
from schemas.common import Locale
from schemas.template import Box as FracBox
from schemas.template import Overflow, TextStyle


def size_scale(width: int, height: int) -> float:
    """Sizes in templates are given for a 1080x1920 frame; scale by the area's root."""
    return math.sqrt(width * height / (REF_W * REF_H))


def box_px(area: Box, b: FracBox) -> Box:
    x0 = area.x0 + round(b.x * area.width)
    y0 = area.y0 + round(b.y * area.height)
    return Box(x0, y0, x0 + round(b.w * area.width), y0 + round(b.h * area.height))


def hex_rgb(color: str) -> RGB:
    c = color.lstrip("#")
    return (int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16))


@dataclass
class Still:
    """One layer image and how it moves. Times are GLOBAL clip seconds; expressions use
    `T` for the global time (the graph builder rewrites it for each segment)."""

    name: str
    image: np.ndarray  # uint8 RGBA (h, w, 4) or RGB (h, w, 3)
    x: int
    y: int
    start: float = 0.0
    end: float | None = None
    fade_in: float = 0.0
    fade_out: float = 0.0
    x_expr: str | None = None
    y_expr: str | None = None
    # The same motion as y_expr, in Python (for posters drawn without ffmpeg).
    y_at: Callable[[float], float] | None = None
    x_at: Callable[[float], float] | None = None
    meta: dict[str, object] = field(default_factory=dict)
    # A moving layer: raw frames (the format and size of `image`, its first frame) from
    # `start` on, one per output frame; the last one holds.
    video: Path | None = None

    @property
    def alpha(self) -> bool:
        return bool(self.image.shape[2] == 4)

    def opacity_at(self, t: float) -> float:
        end = self.end if self.end is not None else math.inf
        if t < self.start or t > end:
            return 0.0
        a = 1.0
        if self.fade_in > 0:
            a = min(a, (t - self.start) / self.fade_in)
        if self.fade_out > 0 and self.end is not None:
            a = min(a, (self.end - t) / self.fade_out)
        return max(0.0, min(1.0, a))

    def position_at(self, t: float) -> tuple[int, int]:
        x = round(self.x_at(t)) if self.x_at is not None else self.x
        return x, round(self.y_at(t)) if self.y_at is not None else self.y


# --------------------------------------------------------------------------- drawing


def crop_to_ink(img: Image.Image, x: int, y: int) -> tuple[Image.Image, int, int]:
    """Crop a transparent layer to its ink, on even offsets (yuv420 positions)."""
    bbox = img.getbbox()
    if bbox is None:
        raise PermanentError("a layer drew nothing")
    x0, y0 = bbox[0] // 2 * 2, bbox[1] // 2 * 2
    x1, y1 = min(img.width, bbox[2] + 1), min(img.height, bbox[3] + 1)
    if (x + x0) % 2:
        x0 = max(0, x0 - 1)
    if (y + y0) % 2:
        y0 = max(0, y0 - 1)
    return img.crop((x0, y0, x1, y1)), x + x0, y + y0


@dataclass(frozen=True)
class DrawnText:
    image: Image.Image
    x: int
    y: int
    ink: Box  # frame coordinates
    size: int
    lines: tuple[str, ...]
    face: FontFace


def draw_text(
    text: str,
    locale: Locale,
    box: Box,
    style: TextStyle,
    scale: float,
    *,
    font_dirs: Sequence[Path | str] = (),
    ornament: bool = False,
    pill: bool = False,
    overflow: Overflow = "reject",
) -> DrawnText:
    """Auto-fit `text` in `box` (frame px), centred, with stroke/glow/shadow; optionally a
    gold divider under it, or a translucent pill behind it (captions)."""
    face = find_font_face(text.replace("\n", ""), locale, weight=style.weight, extra_dirs=font_dirs)
    div_h = max(8, round(30 * scale)) if ornament else 0
    gap = round(40 * scale) if ornament else 0
    fitted = fit_text_box(
        text,
        face,
        box_width=box.width,
        box_height=box.height,
        style=style,
        scale=scale,
        ornament=ornament,
        pill=pill,
        overflow=overflow,
    )
    pad = round(70 * scale) + 8
    w, h = box.width + 2 * pad, box.height + 2 * pad
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    block_h = fitted.height + (gap + div_h if ornament else 0)
    top = pad + (box.height - block_h) // 2 - fitted.ink_top
    cx = w // 2
    if pill:
        font = load_font(face, fitted.size)
        width = max(math.ceil(font.getlength(ln)) for ln in fitted.lines)
        px, py = round(28 * scale) + 4, round(14 * scale) + 3
        y0 = top + fitted.ink_top - py
        y1 = top + fitted.ink_bottom + py
        ImageDraw.Draw(layer).rounded_rectangle(
            (cx - width // 2 - px, y0, cx + width // 2 + px, y1),
            radius=min((y1 - y0) // 2, round(28 * scale) + 4),
            fill=(12, 6, 10, 150),
        )
    fill = tuple(hex_rgb(c) for c in style.fill)
    ink = draw_text_block(
        layer,
        fitted,
        face,
        center_x=cx,
        top=top,
        fill=fill,
        stroke=hex_rgb(style.stroke) if style.stroke else None,
        glow=hex_rgb(style.glow) if style.glow else None,
        scale=scale,
    )
    if ornament:
        div_w = min(box.width, round(520 * scale))
        layer.alpha_composite(divider(div_w, scale), (cx - div_w // 2, ink.y1 + gap))
    img, x, y = crop_to_ink(layer, box.x0 - pad, box.y0 - pad)
    frame_ink = Box(
        ink.x0 + box.x0 - pad, ink.y0 + box.y0 - pad, ink.x1 + box.x0 - pad, ink.y1 + box.y0 - pad
    )
    return DrawnText(img, x, y, frame_ink, fitted.size, fitted.lines, face)


def label_still(
    text: str, locale: Locale, width: int, height: int, font_dirs: Sequence[Path | str] = ()
) -> tuple[Image.Image, int, int]:
    """The visible AI label (`text`: the template's, pipeline.render.templates.label_text)
    at the top-left of the safe area."""
    area = safe_area(width, height)
    scale = size_scale(width, height) if width > height else height / REF_H
    face = find_font_face(text, locale, weight="regular", extra_dirs=font_dirs)
    size = max(10, round(34 * scale))
    canvas = Image.new("RGBA", (area.width, size * 3), (0, 0, 0, 0))
    draw_label(canvas, face, x=0, y=0, size=size, text=text)
    bbox = canvas.getbbox()
    if bbox is None:
        raise PermanentError(f"the label {text!r} drew nothing")
    return canvas.crop((0, 0, bbox[2] + 1, bbox[3] + 1)), area.x0, area.y0 + round(22 * scale)


def face_center(img: Image.Image) -> tuple[float, float, float] | None:
    """(cx, cy, size) of the largest face (dlib HOG detector), in fractions of the image."""
    try:
        import dlib
    except ImportError:  # pragma: no cover - dlib-bin is a dependency of moderation
        return None
    small = img.copy()
    small.thumbnail((480, 480))
    pixels = np.asarray(small.convert("RGB"))
    # A portrait's face is large: look at 1x first (4x cheaper), upsample only when that finds none.
    dets = _detector()(pixels, 0) or _detector()(pixels, 1)
    if not dets:
        return None
    d = max(dets, key=lambda r: r.width() * r.height())
    del dlib
    return (
        (d.left() + d.right()) / 2 / small.width,
        (d.top() + d.bottom()) / 2 / small.height,
        max(d.width() / small.width, d.height() / small.height),
    )


_DETECTOR: Any = None


def _detector() -> Any:
    global _DETECTOR
    if _DETECTOR is None:
        import dlib

        _DETECTOR = dlib.get_frontal_face_detector()
    return _DETECTOR


def photo_still(
    photo: Path, box: Box, *, shape: str, frame: str, scale: float
) -> tuple[Image.Image, int, int]:
    """The subject photo: a face-centred square crop in a rim, with a soft shadow."""
    return framed_photo(load_photo(photo), box, shape=shape, frame=frame, scale=scale)


def load_photo(photo: Path) -> Image.Image:
    try:
        with Image.open(photo) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as exc:
        raise PermanentError(f"subject photo {photo.name} cannot be decoded: {exc}") from exc


def face_crop(img: Image.Image) -> Image.Image:
    """A square crop where the face fills ~45 %, a little above the centre (the image as it
    is when no face is found)."""
    face = face_center(img)
    if face is not None:
        cx, cy, fs = face
        crop = min(1.0, fs / 0.45) * max(img.width, img.height)
        crop = min(crop, img.width, img.height)
        x0 = min(max(0.0, cx * img.width - crop / 2), img.width - crop)
        y0 = min(max(0.0, cy * img.height - crop * 0.45), img.height - crop)
        img = img.crop((round(x0), round(y0), round(x0 + crop), round(y0 + crop)))
    return img


def framed_photo(
    img: Image.Image, box: Box, *, shape: str, frame: str, scale: float, find_face: bool = True
) -> tuple[Image.Image, int, int]:
    """`img` fitted in the photo box: cropped round the face (find_face), in a rim, with a
    soft shadow; RGBA and its top-left corner."""
    side = min(box.width, box.height) - round(24 * scale)
    side -= side % 2
    if side < 16:
        raise PermanentError(f"photo box {box} is too small")
    face = face_center(img) if find_face else None
    if face is not None:
        cx, cy, fs = face
        # the face fills ~45 % of the crop, a little above the centre
        crop = min(1.0, fs / 0.45) * max(img.width, img.height)
        crop = min(crop, img.width, img.height)
        x0 = min(max(0.0, cx * img.width - crop / 2), img.width - crop)
        y0 = min(max(0.0, cy * img.height - crop * 0.45), img.height - crop)
        img = img.crop((round(x0), round(y0), round(x0 + crop), round(y0 + crop)))
    img = ImageOps.fit(img, (side, side), method=Image.Resampling.LANCZOS, centering=(0.5, 0.4))
    rim = max(3, side // 50)
    pad = round(30 * scale) + rim
    total = side + 2 * pad
    out = Image.new("RGBA", (total, total), (0, 0, 0, 0))
    mask = Image.new("L", (side, side), 0)
    rim_box = (pad - rim, pad - rim, pad + side + rim, pad + side + rim)
    shadow = Image.new("L", (total, total), 0)
    sd = ImageDraw.Draw(shadow)
    if shape == "circle":
        ImageDraw.Draw(mask).ellipse((0, 0, side - 1, side - 1), fill=255)
        sd.ellipse(rim_box, fill=170)
    else:
        radius = side // 8
        ImageDraw.Draw(mask).rounded_rectangle((0, 0, side - 1, side - 1), radius=radius, fill=255)
        sd.rounded_rectangle(rim_box, radius=radius + rim, fill=170)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(2, round(12 * scale))))
    out.alpha_composite(
        Image.merge("RGBA", (*Image.new("RGB", (total, total), (20, 0, 0)).split(), shadow)),
        (0, round(6 * scale)),
    )
    d = ImageDraw.Draw(out)
    rgb = hex_rgb(frame)
    if shape == "circle":
        d.ellipse(rim_box, fill=(*rgb, 255))
    else:
        d.rounded_rectangle(rim_box, radius=side // 8 + rim, fill=(*rgb, 255))
    out.paste(img, (pad, pad), mask)
    x = box.x0 + (box.width - total) // 2
    y = box.y0 + (box.height - total) // 2
    return out, x - x % 2, y - y % 2


def particles_image(
    width: int,
    height: int,
    style: str,
    count: int,
    size: tuple[float, float],
    opacity: tuple[float, float],
    colors: Sequence[str],
    scale: float,
    seed: int,
) -> np.ndarray:
    cols = [hex_rgb(c) for c in colors]
    radius = (size[0] * scale, size[1] * scale)
    n = max(1, round(count * width * height / (REF_W * REF_H)))
    if style == "bokeh":
        return bokeh(
            width,
            height,
            count=n,
            radius=radius,
            opacity=opacity,
            softness=0.35,
            rim=0.3 if radius[1] > 40 * scale else 0.0,
            colors=cols,
            seed=seed,
        )
    if style == "snow":
        return bokeh(
            width, height, count=n, radius=radius, opacity=opacity, softness=0.6, colors=cols, seed=seed
        )
    # sparkle: small bright discs with a cross glint
    base = bokeh(width, height, count=n, radius=radius, opacity=opacity, softness=0.5, colors=cols, seed=seed)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(seed + 99)
    for _ in range(max(1, n // 4)):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        r = float(rng.uniform(radius[0] * 1.5, radius[1] * 2.5))
        c = cols[int(rng.integers(len(cols)))]
        lw = max(1, round(r / 8))
        d.line([(x - r, y), (x + r, y)], fill=(*c, 200), width=lw)
        d.line([(x, y - r), (x, y + r)], fill=(*c, 200), width=lw)
    return np.asarray(img)


def bauble(width: int, string_len: int, color: RGB, *, seed: int = 0) -> Image.Image:
    """A Christmas bauble hanging from a gold string (RGBA)."""
    s = 3
    w = width * s
    pad = round(w * 0.25)
    cap_h = round(w * 0.14)
    total_w, total_h = w + 2 * pad, string_len * s + cap_h + w + pad
    cx, cy = total_w / 2, string_len * s + cap_h + w / 2
    yy, xx = np.mgrid[0:total_h, 0:total_w].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (w / 2)
    premul = np.zeros((total_h, total_w, 3), np.float32)
    alpha = np.zeros((total_h, total_w), np.float32)
    g = np.exp(-((np.maximum(d - 0.9, 0) / 0.3) ** 2)) * 0.35
    premul += g[..., None] * np.array(color, np.float32)
    alpha += g
    inside = np.clip((1.0 - d) * w / 3, 0, 1)
    lx, ly = (xx - (cx - w * 0.16)) / (w / 2), (yy - (cy - w * 0.18)) / (w / 2)
    hl = np.exp(-(lx**2 + ly**2) / 0.035)
    shade = np.clip(d, 0, 1) ** 2
    col = np.array(color, np.float32) * (1 - 0.55 * shade[..., None]) + 255 * 0.8 * hl[..., None]
    premul = premul * (1 - inside[..., None]) + np.clip(col, 0, 255) * inside[..., None]
    alpha = alpha * (1 - inside) + inside
    img = Image.fromarray(unpremultiply(premul, alpha))
    dr = ImageDraw.Draw(img)
    top = string_len * s
    lw = max(2, round(w * 0.02))
    dr.line([(cx, 0), (cx, top + cap_h // 2)], fill=(*GOLD_DEEP, 255), width=lw)
    cap_w = round(w * 0.24)
    dr.rounded_rectangle(
        [cx - cap_w / 2, top, cx + cap_w / 2, top + cap_h + round(w * 0.04)],
        radius=max(1, cap_h // 4),
        fill=(*GOLD, 255),
        outline=(*GOLD_DEEP, 255),
        width=max(1, lw // 2),
    )
    return img.resize((math.ceil(total_w / s), math.ceil(total_h / s)), Image.Resampling.LANCZOS)


def hanging_cluster(
    kind: str, width: int, height: int, char_face: FontFace | None, scale: float
) -> tuple[Image.Image, int]:
    """Lanterns or baubles hanging at the top right (clear of the label at the top left)."""
    specs = [(0.60, 112, 30), (0.76, 150, 110), (0.91, 104, 10)]
    if width > height:  # landscape: spread over the right half
        specs = [(0.70, 112, 20), (0.80, 150, 70), (0.92, 104, 10)]
    items: list[tuple[float, Image.Image]] = []
    colors = [(200, 24, 40), (24, 120, 70), (214, 160, 40)]
    for i, (fx, lw, sl) in enumerate(specs):
        size, string = max(12, round(lw * scale)), round(sl * scale) + round(24 * scale)
        if kind == "lanterns":
            im = lantern(size, string, char_face, seed=i)
        else:
            im = bauble(size, string, colors[i % len(colors)], seed=i)
        items.append((fx, im))
    x0 = min(round(fx * width) - im.width // 2 for fx, im in items)
    x1 = max(round(fx * width) + im.width - im.width // 2 for fx, im in items)
    layer = Image.new("RGBA", (x1 - x0, max(im.height for _, im in items)), (0, 0, 0, 0))
    for fx, im in items:
        layer.alpha_composite(im, (round(fx * width) - im.width // 2 - x0, 0))
    return layer, x0 - x0 % 2


# --------------------------------------------------------------------------- graphs


def _expr(e: str, offset: float) -> str:
    return e.replace("T", f"(t+{offset:.6f})")


def overlay_chain(
    base: str,
    stills: Sequence[Still],
    first_input: int,
    fps: int,
    offset: float,
    seg_end: float,
) -> tuple[list[str], str]:
    """Filter lines that overlay `stills` (inputs first_input, first_input+1, ...) on the
    stream labelled `base`, for a segment whose t=0 is global time `offset`."""
    lines: list[str] = []
    cur = base
    for k, s in enumerate(stills):
        idx = first_input + k
        fmt = "yuva420p" if s.alpha else "yuv420p"
        if s.video is not None:
            # frame k of the layer shows at global time s.start + k / fps
            chain = (
                f"[{idx}:v]scale=out_color_matrix=bt709:out_range=tv,format={fmt},"
                f"setpts=N/({fps}*TB)+{s.start - offset:.4f}/TB"
            )
        else:
            chain = (
                f"[{idx}:v]scale=out_color_matrix=bt709:out_range=tv,format={fmt},"
                f"loop=loop=-1:size=1:start=0,setpts=N/({fps}*TB)"
            )
        start = max(s.start, offset)
        end = min(seg_end, s.end if s.end is not None else seg_end)
        if s.fade_in > 0 and s.start + s.fade_in > offset:
            chain += f",fade=t=in:st={s.start - offset:.4f}:d={s.fade_in:.4f}:alpha=1"
        if s.fade_out > 0 and s.end is not None and s.end - s.fade_out < seg_end:
            chain += f",fade=t=out:st={s.end - s.fade_out - offset:.4f}:d={s.fade_out:.4f}:alpha=1"
        lines.append(f"{chain}[l{k}]")
        x = f"'{_expr(s.x_expr, offset)}'" if s.x_expr else str(s.x)
        y = f"'{_expr(s.y_expr, offset)}'" if s.y_expr else str(s.y)
        enable = ""
        if start > offset + 1e-6 or end < seg_end - 1e-6:
            enable = f":enable='between(t,{start - offset:.4f},{end - offset:.4f})'"
        out = f"v{k}"
        lines.append(f"[{cur}][l{k}]overlay=x={x}:y={y}:format=yuv420:eof_action=repeat{enable}[{out}]")
        cur = out
    return lines, cur


def yuv420_frame_to_rgb(data: bytes, width: int, height: int) -> np.ndarray:
    """One raw yuv420p frame (BT.709, limited range) as uint8 RGB."""
    n = width * height
    y = np.frombuffer(data, np.uint8, n).reshape(height, width).astype(np.float32)
    u = np.frombuffer(data, np.uint8, n // 4, n).reshape(height // 2, width // 2).astype(np.float32)
    v = np.frombuffer(data, np.uint8, n // 4, n + n // 4).reshape(height // 2, width // 2).astype(np.float32)
    u = np.repeat(np.repeat(u, 2, axis=0), 2, axis=1) - 128.0
    v = np.repeat(np.repeat(v, 2, axis=0), 2, axis=1) - 128.0
    yy = (y - 16.0) * (255.0 / 219.0)
    cu, cv = u * (255.0 / 224.0), v * (255.0 / 224.0)
    r = yy + 1.5748 * cv
    g = yy - 0.1873 * cu - 0.4681 * cv
    b = yy + 1.8556 * cu
    return np.clip(np.stack([r, g, b], axis=-1) + 0.5, 0, 255).astype(np.uint8)


def composite_at(base_rgb: np.ndarray, stills: Sequence[Still], t: float) -> Image.Image:
    """The frame at global time t: stills over a background (for posters and previews)."""
    frame = Image.fromarray(base_rgb).convert("RGBA")
    for s in stills:
        a = s.opacity_at(t)
        if a <= 0:
            continue
        img = Image.fromarray(np.ascontiguousarray(s.image)).convert("RGBA")
        if a < 1:
            alpha = np.asarray(img)[..., 3].astype(np.float32) * a
            img.putalpha(Image.fromarray(alpha.astype(np.uint8)))
        x, y = s.position_at(t)
        frame.alpha_composite(img, (max(0, x), max(0, y)), (max(0, -x), max(0, -y)))
    return frame.convert("RGB")
