"""Clips composed by the tests themselves (ffmpeg from a still), independent of the
renderer's templates: a background, optionally a photo and the visible AI label. And a
template whose label layer declares its own text."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from pipeline.render.draw import draw_label, safe_area
from pipeline.render.fonts import find_font_face
from pipeline.render.media import run_ffmpeg
from schemas.common import Locale
from schemas.provenance import VISIBLE_AI_LABEL


def frame(
    width: int = 540,
    height: int = 960,
    *,
    photo: Path | None = None,
    photo_side: float = 0.6,
    label: bool = True,
    label_scale: float = 1.0,
    label_at: tuple[float, float] | None = None,
    color: tuple[int, int, int] = (150, 18, 30),
    label_text: str = VISIBLE_AI_LABEL,
) -> Image.Image:
    """One RGB frame: a plain background, the photo centred (photo_side x width), and the
    label as the renderer draws it (top-left of the safe area unless label_at says where)."""
    img = Image.new("RGBA", (width, height), (*color, 255))
    if photo is not None:
        with Image.open(photo) as p:
            pic = p.convert("RGB")
        side = int(width * photo_side)
        pic.thumbnail((side, side), Image.Resampling.LANCZOS)
        img.paste(pic, ((width - pic.width) // 2, (height - pic.height) // 2))
    if label:
        face = find_font_face(label_text, Locale.ZH_HANT_HK, weight="regular")
        area = safe_area(width, height)
        size = round(34 * height / 1920 * label_scale)
        x, y = (area.x0, area.y0 + round(22 * height / 1920))
        if label_at is not None:
            x, y = round(label_at[0] * width), round(label_at[1] * height)
        draw_label(img, face, x=x, y=y, size=size, text=label_text)
    return img.convert("RGB")


def still_clip(
    out: Path, image: Image.Image, seconds: float = 3.0, *, fps: int = 15, label_until: float | None = None,
    unlabelled: Image.Image | None = None,
) -> Path:  # fmt: skip
    """An H.264/AAC MP4 showing `image` for `seconds`. With label_until, the frames after
    that time show `unlabelled` instead (a label that disappears too early)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    a = out.with_suffix(".a.png")
    image.save(a)
    args: list[str | Path] = ["-y", "-loop", "1", "-framerate", str(fps), "-t", f"{seconds}", "-i", a]
    vf = "format=yuv420p"
    if label_until is not None and unlabelled is not None:
        b = out.with_suffix(".b.png")
        unlabelled.save(b)
        args += ["-loop", "1", "-framerate", str(fps), "-t", f"{seconds}", "-i", b]
        vf = f"[0:v][1:v]overlay=enable='gte(t,{label_until})',format=yuv420p"
    args += ["-f", "lavfi", "-t", f"{seconds}", "-i", "anullsrc=r=48000:cl=stereo"]
    audio_idx = 2 if label_until is not None and unlabelled is not None else 1
    args += ["-filter_complex", f"{vf}[v]" if "[0:v]" in vf else f"[0:v]{vf}[v]", "-map", "[v]",
             "-map", f"{audio_idx}:a", "-c:v", "libx264", "-preset", "veryfast", "-crf", "20",
             "-c:a", "aac", "-shortest", "-movflags", "+faststart", out]  # fmt: skip
    run_ffmpeg(args, timeout=120)
    return out


def custom_label_template(directory: Path, text: str, name: str = "custom-label") -> Path:
    """The shipped lunar-new-year template as `<directory>/<name>.yaml`, its label layer
    declaring `text` (a templates_dir for the engine and the moderation check)."""
    from pipeline.render.templates import shipped_templates_dir

    src = (shipped_templates_dir() / "lunar-new-year.yaml").read_text(encoding="utf-8")
    src = re.sub(r"(?m)^name: lunar-new-year$", f"name: {name}", src)
    src, n = re.subn(r"(?m)^(  - id: ai-label\n    type: label)$", rf'\1\n    text: "{text}"', src)
    if n != 1:
        raise ValueError("the lunar-new-year template has no label layer to change")
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.yaml"
    out.write_text(src, encoding="utf-8")
    return out
