"""One pass over a rendered clip for moderation: faces (likeness) and the visible label.

Frames are decoded once, scaled to the analysis width: the first frame, at least one per
`likeness_sample_interval_s`, every scene change, and one every 0.5 s during the
visible-label window. Each frame is searched for faces and for the label.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.faces import (
    FaceEngine,
    FaceSighting,
    LikenessError,
    crop_jpeg,
    faces_in_frame,
    faces_in_photo,
    load_rgb,
    sample_clip,
)
from pipeline.moderation.labels import LabelDetector, label_findings, visible_label_report
from pipeline.moderation.likeness import References, likeness_findings
from pipeline.settings import Settings
from schemas.events import Finding
from schemas.provenance import VISIBLE_AI_LABEL, LabelSighting, VisibleLabelReport


@dataclass(frozen=True)
class ClipAnalysis:
    frames_sampled: int
    duration_s: float
    width: int
    height: int
    sightings: tuple[FaceSighting, ...]
    label: VisibleLabelReport
    seconds: float  # wall time of the analysis


def analyze_clip(
    video: Path,
    settings: Settings,
    engine: FaceEngine,
    *,
    keep_crops: bool = True,
    label_text: str = VISIBLE_AI_LABEL,
) -> ClipAnalysis:
    """Sample `video` once; detect faces and the visible label (which must read
    `label_text`, the job's template's label) in every sampled frame."""
    from pipeline.render.media import RenderError

    t0 = time.monotonic()
    clip = sample_clip(video, settings)
    detector = LabelDetector(threshold=settings.label_match_threshold, label_text=label_text)
    sightings: list[FaceSighting] = []
    label_frames: list[tuple[float, LabelSighting | None]] = []
    try:
        for fr in clip.frames:
            sightings.extend(faces_in_frame(engine, fr, keep_crops=keep_crops))
            label_frames.append((fr.t, detector.find(fr.image, fr.t)))
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
    )


def photo_sightings(engine: FaceEngine, photo: Path, *, keep_crops: bool = True) -> list[FaceSighting]:
    """Faces of the subject photo that went into the clip (source 'photo', t = -1)."""
    rgb = load_rgb(photo) if keep_crops else None
    out = []
    for f in faces_in_photo(engine, photo):
        out.append(
            FaceSighting(
                t=-1.0,
                box=f.box,
                score=f.score,
                embedding=f.embedding,
                crop_jpeg=crop_jpeg(rgb, f.box) if rgb is not None else None,
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
) -> tuple[list[Finding], list[tuple[Finding, FaceSighting]]]:
    """Likeness and visible-label findings of an analysed clip (and of its input photo)."""
    findings, to_show = likeness_findings(
        [*extra_sightings, *analysis.sightings],
        refs,
        threshold=settings.likeness_threshold,
        frames_sampled=analysis.frames_sampled,
        face_subjects=face_subjects,
    )
    findings.extend(label_findings(analysis.label))
    return findings, to_show
