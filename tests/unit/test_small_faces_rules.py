"""Pure logic of the small-face and evidence checks: when a supplied photo's face missing
from the clip needs a human, how much a region is upscaled, where the photo box is, and
which first bytes make an accepted consent artifact."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.consent.evidence import sniff
from pipeline.faces import FaceRegion, FaceSighting, photo_detection_scale, small_face_scale
from pipeline.moderation.clip import WHOLE_CLIP, photo_regions
from pipeline.moderation.likeness import References, likeness_findings
from pipeline.moderation.policy import ModerationPolicy
from schemas.brief import TemplateRef
from schemas.events import Decision, Severity

RNG = np.random.default_rng(11)


def person() -> tuple[float, ...]:
    v = RNG.normal(size=128)
    return tuple(float(x) for x in v / np.linalg.norm(v))


GRANDMA = person()


def seen(v: tuple[float, ...], source: str = "clip") -> FaceSighting:
    return FaceSighting(
        t=-1.0 if source == "photo" else 3.0, box=(0, 0, 40, 40), score=1.0, embedding=v, source=source
    )


def decide(sightings: list[FaceSighting], *, photo_supplied: bool) -> tuple[Decision, dict[str, Severity]]:
    refs = References(consented={"grandma": [GRANDMA]})
    findings, _ = likeness_findings(
        sightings,
        refs,
        threshold=0.6,
        frames_sampled=9,
        face_subjects=["grandma"],
        photo_supplied=photo_supplied,
    )
    return ModerationPolicy().decide(findings), {f.kind: f.severity for f in findings}


def test_a_supplied_photo_whose_face_the_clip_does_not_show_needs_review() -> None:
    decision, kinds = decide([], photo_supplied=True)
    assert decision == Decision.NEEDS_REVIEW and kinds["subject_face_not_seen"] == Severity.WARN


def test_the_face_seen_only_in_the_photo_does_not_count_as_seen_in_the_clip() -> None:
    decision, kinds = decide([seen(GRANDMA, "photo")], photo_supplied=True)
    assert decision == Decision.NEEDS_REVIEW and kinds["subject_face_not_seen"] == Severity.WARN


def test_the_subject_seen_in_the_clip_is_approved() -> None:
    decision, kinds = decide([seen(GRANDMA, "photo"), seen(GRANDMA)], photo_supplied=True)
    assert decision == Decision.APPROVED and "subject_face_not_seen" not in kinds


def test_without_a_photo_a_missing_face_stays_information() -> None:
    decision, kinds = decide([], photo_supplied=False)
    assert decision == Decision.APPROVED and kinds["subject_face_not_seen"] == Severity.INFO


@pytest.mark.parametrize(
    ("src", "analysis_width", "expected"),
    [
        ((540, 960), 1080, 2.0),  # 20 px at 960 is 40 px in the analysed frame
        ((1080, 1920), 1080, 2.0),
        ((1080, 1920), 540, 4.0),  # capped
        ((2160, 3840), 1080, 2.0),
        ((1920, 1080), 1080, 4.0),  # 16:9 analysed at 1080 wide: capped
    ],
)
def test_region_scale_brings_the_smallest_face_to_80_px(
    src: tuple[int, int], analysis_width: int, expected: float
) -> None:
    w, h = src
    assert small_face_scale(40, src_height=h, src_width=w, analysis_width=analysis_width) == pytest.approx(
        expected
    )
    assert small_face_scale(400, src_height=h, src_width=w, analysis_width=analysis_width) == 1.0


def test_photos_are_scaled_to_a_1200_px_short_side_within_6_megapixels() -> None:
    assert photo_detection_scale(274, 171) == pytest.approx(1200 / 171)
    assert photo_detection_scale(600, 600) == pytest.approx(2.0)
    assert photo_detection_scale(4032, 3024) == pytest.approx(1200 / 3024)
    wide = photo_detection_scale(12000, 1000)
    assert 12000 * 1000 * wide**2 == pytest.approx(6_000_000)


def test_the_region_is_the_templates_photo_box_while_the_photo_shows() -> None:
    (region,) = photo_regions(TemplateRef(name="lunar-new-year", version="1"))
    assert (region.start_s, region.end_s) == (2.6, 6.0)
    x0, y0, x1, y1 = region.box
    assert 0.2 < x0 < 0.25 and 0.75 < x1 < 0.8 and 0.35 < y0 < 0.4 and 0.68 < y1 < 0.72
    assert region.covers(3.0) and not region.covers(6.0) and not region.covers(2.0)
    assert region.pixels(1080, 1920)[2] <= 1080
    assert photo_regions(TemplateRef(name="no-such-template", version="1")) == (WHOLE_CLIP,)
    assert photo_regions(None) == (WHOLE_CLIP,)
    assert FaceRegion(0, float("inf")).pixels(100, 200) == (0, 0, 100, 200)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "WAV"),
        (b"ID3\x04\x00\x00\x00\x00", "MP3"),
        (b"\xff\xfb\x90\x64\x00\x00", "MP3"),  # MPEG-1 layer III frame, no tag
        (b"OggS\x00\x02", "OGG"),
        (b"\x00\x00\x00\x20ftypisom", "ISO"),
        (b"\x00\x00\x00\x14ftypqt  ", "ISO"),
        (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\xf7\x81\x01B\xf2\x81\x04B\xf3\x81\x08B\x82\x84webm", "WebM"),
        (b"\x1aE\xdf\xa3\x9fB\x86\x81\x01B\x82\x88matroska", None),
        (b"I consent. Code ABC234", None),
        (b"%PDF-1.7\n", None),
        (b"PK\x03\x04", None),
        (b"\xff\xf1\x50\x80", None),  # AAC in ADTS: not MP3
        (b"", None),
    ],
)
def test_sniff_accepts_only_the_listed_formats(head: bytes, expected: str | None) -> None:
    assert sniff(head) == expected
