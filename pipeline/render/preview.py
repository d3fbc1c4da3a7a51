"""`greetflow template preview`: render a sample clip and pull a few frames out as PNG,
plus a contact sheet of them side by side."""

from __future__ import annotations

import uuid
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.render.engine import TemplateRenderer
from pipeline.render.media import extract_frame
from schemas.brief import Recipient, TemplateRef
from schemas.common import Locale
from schemas.events import RenderRequested

SAMPLE_NAMES: dict[Locale, str] = {
    Locale.ZH_HANT_HK: "陳大文",
    Locale.ZH_HANS_CN: "李小明",
    Locale.EN: "Alice Wong",
    Locale.JA: "山田 花子",
}


def default_times(renderer: TemplateRenderer, template: str) -> list[float]:
    t = renderer.template(template).template
    p0, p1 = t.personal.start, t.personal.end
    times = []
    if p0 > 0:
        times.append(round(min(p0 * 0.6, p0 - 0.1), 2))
    times += [round(p0 + (p1 - p0) * 0.35, 2), round(p0 + (p1 - p0) * 0.75, 2)]
    if p1 < t.duration_s:
        times.append(round(min(t.duration_s - 0.2, p1 + 1.5), 2))
    return times


def preview(
    renderer: TemplateRenderer,
    template: str,
    locale: str | Locale,
    out_dir: Path,
    *,
    name: str | None = None,
    photo: Path | None = None,
    times: str | None = None,
) -> list[Path]:
    """Render one sample clip into out_dir and write frame PNGs and contact-sheet.png."""
    loc = Locale(locale)
    out_dir.mkdir(parents=True, exist_ok=True)
    lt = renderer.template(template)
    req = RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="preview",
        recipient=Recipient(id="preview", name=name or SAMPLE_NAMES[loc], locale=loc),
        template=TemplateRef(name=lt.template.name, version=lt.template.version),
        locale=loc,
    )
    stem = f"{lt.template.name}-{loc.value}"
    res = renderer.render(req, out_dir, photo=photo, stem=stem)
    ts = [float(x) for x in times.split(",")] if times else default_times(renderer, template)
    frames = [extract_frame(res.video_path, t, out_dir / f"{stem}-{t:05.2f}s.png") for t in ts]
    sheet = contact_sheet(frames, ts, out_dir / f"{stem}-contact-sheet.png")
    return [
        res.video_path,
        res.poster_path,
        *([res.captions_path] if res.captions_path else []),
        *frames,
        sheet,
    ]


def contact_sheet(frames: list[Path], times: list[float], out: Path, width: int = 360) -> Path:
    ims = [Image.open(f).convert("RGB") for f in frames]
    h = round(ims[0].height * width / ims[0].width)
    label_h = 28
    sheet = Image.new("RGB", (width * len(ims) + 8 * (len(ims) - 1), h + label_h), (24, 24, 24))
    d = ImageDraw.Draw(sheet)
    for i, (im, t) in enumerate(zip(ims, times, strict=True)):
        x = i * (width + 8)
        sheet.paste(im.resize((width, h), Image.Resampling.LANCZOS), (x, label_h))
        d.text((x + 6, 6), f"t = {t:.2f} s", fill=(230, 230, 230))
    sheet.save(out)
    return out
