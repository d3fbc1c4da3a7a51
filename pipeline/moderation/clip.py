"""One pass over a rendered clip for moderation: faces (likeness) and the visible label.

Frames are decoded once, scaled to the analysis width: the first frame, at least one per
`likeness_sample_interval_s`, every scene change, and one every 0.5 s during the
visible-label window. Each frame is searched for faces and for the label. Where and while
the template draws the subject photo, that part of the frame is searched again, upscaled
so that faces down to `likeness_min_face_px` are found: a small face in a supplied photo
ends up there, and upscaling only that region keeps the analysis cheap.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.faces import (
    PHOTO_MAX_SIDE,
    FaceEngine,
    FaceRegion,
    FaceSighting,
    Frame,
    LikenessError,
    crop_jpeg,
    faces_in_frame,
    faces_in_rgb,
    load_rgb,
    sample_clip,
    small_face_scale,
)
from pipeline.moderation.labels import LabelDetector, label_findings, visible_label_report
from pipeline.moderation.likeness import References, likeness_findings
from pipeline.settings import Settings
from schemas.brief import TemplateRef
from schemas.events import Finding
from schemas.provenance import VISIBLE_AI_LABEL, LabelSighting, VisibleLabelReport

log = logging.getLogger(__name__)

WHOLE_CLIP = FaceRegion(start_s=0.0, end_s=float("inf"))
_REGION_MARGIN = 0.015  # of the frame, around the photo (it rises 0.7 % into place)


@dataclass(frozen=True)
class ClipAnalysis:
    frames_sampled: int
    duration_s: float
    width: int
    height: int
    sightings: tuple[FaceSighting, ...]
    label: VisibleLabelReport
    seconds: float  # wall time of the analysis
    region_scale: float = 1.0  # how much the small-face regions were upscaled (1: not searched)


def photo_regions(template: TemplateRef | None, templates_dir: Path | None = None) -> tuple[FaceRegion, ...]:
    """Where and when a clip of `template` shows the subject photo (every photo layer, the
    animated one too), with a margin. A template that cannot be loaded gives the whole
    frame for the whole clip: slower, never blind."""
    if template is None:
        return (WHOLE_CLIP,)
    from pipeline.render.compose import box_px
    from pipeline.render.draw import safe_area
    from pipeline.render.templates import TemplateError, get_template
    from schemas.template import PhotoLayer

    try:
        t = get_template(template, templates_dir).template
    except TemplateError as exc:
        log.warning("small-face search of template %s covers whole frames: %s", template.name, exc)
        return (WHOLE_CLIP,)
    w, h = 10_800, 19_200  # fractions of the frame do not depend on its size
    area = safe_area(w, h)
    out = []
    for layer in t.layers:
        if not isinstance(layer, PhotoLayer):
            continue
        b = box_px(area, layer.box)
        # The renderer draws the photo (still or animated) as a square centred in the box,
        # its side the box's shorter side less a rim (compose.framed_photo).
        half = min(b.width, b.height) / 2
        cx, cy = (b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2
        out.append(
            FaceRegion(
                start_s=layer.start,
                end_s=t.layer_end(layer),
                box=(
                    max(0.0, (cx - half) / w - _REGION_MARGIN),
                    max(0.0, (cy - half) / h - _REGION_MARGIN),
                    min(1.0, (cx + half) / w + _REGION_MARGIN),
                    min(1.0, (cy + half) / h + _REGION_MARGIN),
                ),
            )
        )
    return tuple(out)


def analyze_clip(
    video: Path,
    settings: Settings,
    engine: FaceEngine,
    *,
    keep_crops: bool = True,
    label_text: str = VISIBLE_AI_LABEL,
    small_face_regions: Sequence[FaceRegion] = (),
) -> ClipAnalysis:
    """Sample `video` once; detect faces and the visible label (which must read
    `label_text`, the job's template's label) in every sampled frame, and faces down to
    `likeness_min_face_px` in `small_face_regions` (`photo_regions` of the job's template)."""
    from pipeline.render.media import RenderError

    t0 = time.monotonic()
    clip = sample_clip(video, settings)
    scale = small_face_scale(
        settings.likeness_min_face_px,
        src_height=clip.src_height,
        src_width=clip.src_width,
        analysis_width=clip.width,
    )
    if not small_face_regions:
        scale = 1.0
    detector = LabelDetector(threshold=settings.label_match_threshold, label_text=label_text, cache=True)
    sightings: list[FaceSighting] = []
    label_frames: list[tuple[float, LabelSighting | None]] = []
    threads = max(1, settings.likeness_detect_threads)

    def faces(fr: Frame) -> list[FaceSighting]:
        return faces_in_frame(
            engine, fr, keep_crops=keep_crops, regions=small_face_regions, region_scale=scale
        )

    try:
        if threads == 1:
            for fr in clip.frames:
                sightings.extend(faces(fr))
                label_frames.append((fr.t, detector.find(fr.image, fr.t)))
        else:
            # Frames are searched for faces `threads` at a time while this thread decodes the
            # next ones and looks for the label (in frame order: the detector follows it from
            # frame to frame); sightings are collected in frame order. At most 2 * threads
            # frames wait, so memory stays bounded however long the clip.
            pending: deque[Future[list[FaceSighting]]] = deque()
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="moderate-faces") as pool:
                for fr in clip.frames:
                    pending.append(pool.submit(faces, fr))
                    label_frames.append((fr.t, detector.find(fr.image, fr.t)))
                    while len(pending) > 2 * threads:
                        sightings.extend(pending.popleft().result())
                while pending:
                    sightings.extend(pending.popleft().result())
    except RenderError as exc:
        raise LikenessError(f"cannot decode the clip {video.name}: {exc}") from exc
    return ClipAnalysis(
        frames_sampled=len(label_frames),
        duration_s=clip.duration_s,
        width=clip.src_width,
        height=clip.src_height,
        sightings=tuple(sightings),
        label=visible_label_report(
            label_frames, duration_s=clip.duration_s, required_s=settings.label_min_seconds
        ),
        seconds=time.monotonic() - t0,
        region_scale=scale,
    )


def photo_sightings(engine: FaceEngine, photo: Path, *, keep_crops: bool = True) -> list[FaceSighting]:
    """Faces of the subject photo that went into the clip (source 'photo', t = -1), found
    whatever the photo's size (see `faces.photo_detection_scale`)."""
    rgb = load_rgb(photo, max_side=PHOTO_MAX_SIDE)
    out = []
    for f in faces_in_rgb(engine, rgb):
        out.append(
            FaceSighting(
                t=-1.0,
                box=f.box,
                score=f.score,
                embedding=f.embedding,
                crop_jpeg=crop_jpeg(rgb, f.box) if keep_crops else None,
                source="photo",
            )
        )
    return out


def clip_findings(
    analysis: ClipAnalysis,
    refs: References,
    settings: Settings,
    *,
    face_subjects: Sequence[str] = (),
    extra_sightings: Sequence[FaceSighting] = (),
    photo_supplied: bool = False,
) -> tuple[list[Finding], list[tuple[Finding, FaceSighting]]]:
    """Likeness and visible-label findings of an analysed clip (and of its input photo;
    `photo_supplied`: the recipient gave one, so the subject's face must be in the clip)."""
    findings, to_show = likeness_findings(
        [*extra_sightings, *analysis.sightings],
        refs,
        threshold=settings.likeness_threshold,
        frames_sampled=analysis.frames_sampled,
        face_subjects=face_subjects,
        photo_supplied=photo_supplied,
    )
    # the summary finding records how the photo box was searched
    searched = {
        "min_face_px": settings.likeness_min_face_px,
        "photo_box_scale": round(analysis.region_scale, 2),
    }
    findings = [
        f.model_copy(update={"evidence": {**f.evidence, **searched}}) if f.kind == "likeness_checked" else f
        for f in findings
    ]
    findings.extend(label_findings(analysis.label))
    return findings, to_show
