"""The visible AI label check: found where and however large the renderer draws it, not
fooled by other text, and required from the first frame for the configured time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import ImageDraw, ImageFont

from pipeline.moderation.labels import (
    LabelDetector,
    check_visible_label,
    expected_label_text,
    visible_label_report,
)
from pipeline.render.fonts import find_font_face
from pipeline.settings import Settings
from schemas.brief import TemplateRef
from schemas.common import Locale
from schemas.provenance import VISIBLE_AI_LABEL, LabelSighting
from tests.clips import custom_label_template, frame, still_clip

CUSTOM_LABEL = "本片由AI生成 / Made with AI"


@pytest.mark.parametrize(
    ("w", "h", "scale", "at"),
    [
        (1080, 1920, 1.0, None),
        (540, 960, 1.0, None),
        (1080, 1920, 0.7, (0.2, 0.05)),
        (720, 1280, 1.5, (0.1, 0.2)),
        (1920, 1080, 1.0, None),
    ],
)
def test_label_is_found_at_any_size_and_position_in_the_region(
    w: int, h: int, scale: float, at: tuple[float, float] | None
) -> None:
    img = frame(w, h, label_scale=scale, label_at=at, color=(40, 90, 160))
    hit = LabelDetector().find(np.asarray(img))
    assert hit is not None and hit.score > 0.6
    assert hit.box is not None and hit.box[0] < w * 0.8 and hit.box[1] < h * 0.3


def test_no_label_and_other_text_are_not_taken_for_the_label() -> None:
    detector = LabelDetector()
    assert detector.find(np.asarray(frame(label=False))) is None
    img = frame(label=False)
    face = find_font_face("新年快樂 Happy-new-year", Locale.ZH_HANT_HK, weight="regular")
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((40, 110, 260, 140), radius=15, fill=(30, 0, 4))
    d.text(
        (50, 115), "新年快樂 / Happy-new-year", font=ImageFont.truetype(str(face.path), 17, index=face.index)
    )
    assert detector.find(np.asarray(img)) is None
    noise = np.random.default_rng(1).integers(0, 255, (960, 540, 3), dtype=np.uint8)
    assert detector.find(noise) is None


def _s(t: float) -> LabelSighting:
    return LabelSighting(t=t, score=0.8)


def test_report_needs_the_label_from_the_start_for_the_required_time() -> None:
    full = [(t, _s(t)) for t in (0.0, 0.5, 1.0, 1.5, 2.5, 3.5)]
    assert visible_label_report(full, duration_s=4.0, required_s=2.0).ok
    late = [(0.0, None), *full[1:]]
    r = visible_label_report(late, duration_s=4.0, required_s=2.0)
    assert not r.ok and r.shown_from_start_s == 0.0
    short = [(0.0, _s(0)), (0.5, _s(0.5)), (1.0, None), (1.5, _s(1.5))]
    r = visible_label_report(short, duration_s=4.0, required_s=2.0)
    assert not r.ok and r.shown_from_start_s == 1.0 and "1.0s" in r.message
    # gone after the required time is fine
    after = [(0.0, _s(0)), (0.5, _s(0.5)), (1.0, _s(1)), (1.5, _s(1.5)), (2.5, None)]
    assert visible_label_report(after, duration_s=4.0, required_s=2.0).ok
    # a clip shorter than the requirement needs it throughout
    assert visible_label_report([(0.0, _s(0)), (0.5, _s(0.5))], duration_s=1.0, required_s=2.0).ok


def test_label_on_a_clip_for_too_short_a_time_fails(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    good = still_clip(tmp_path / "good.mp4", frame(), 3.0)
    report = check_visible_label(good, settings)
    assert report.ok and report.shown_from_start_s >= 2.0
    # at 15 fps: the first frame of every half second (0.533 is the first frame after 0.5)
    assert [s.t for s in report.sightings][:4] == pytest.approx([0.0, 0.533, 1.0, 1.533], abs=0.01)
    bad = still_clip(tmp_path / "bad.mp4", frame(), 3.0, label_until=1.0, unlabelled=frame(label=False))
    report = check_visible_label(bad, settings)
    assert not report.ok and report.shown_from_start_s == pytest.approx(1.0, abs=0.1)


def test_the_label_a_template_declares_is_the_one_looked_for() -> None:
    default = np.asarray(frame(label_text=VISIBLE_AI_LABEL))
    custom = np.asarray(frame(label_text=CUSTOM_LABEL))
    assert LabelDetector().spec.text == VISIBLE_AI_LABEL
    hit = LabelDetector(label_text=CUSTOM_LABEL).find(custom)
    assert hit is not None and hit.score > 0.6
    assert LabelDetector().find(default) is not None
    # each text is told from the other
    assert LabelDetector().find(custom) is None
    assert LabelDetector(label_text=CUSTOM_LABEL).find(default) is None


def test_expected_label_text_reads_the_template(tmp_path: Path) -> None:
    custom_label_template(tmp_path, CUSTOM_LABEL)
    assert expected_label_text(TemplateRef(name="custom-label"), tmp_path) == CUSTOM_LABEL
    assert expected_label_text(TemplateRef(name="lunar-new-year"), tmp_path) == VISIBLE_AI_LABEL
    assert expected_label_text() == VISIBLE_AI_LABEL
    # a template that cannot be found: the default text, so a custom label fails the check
    assert expected_label_text(TemplateRef(name="no-such-template"), tmp_path) == VISIBLE_AI_LABEL


def test_a_clip_with_a_custom_label_passes_the_check_for_that_text(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    clip = still_clip(tmp_path / "custom.mp4", frame(label_text=CUSTOM_LABEL), 3.0)
    report = check_visible_label(clip, settings, label_text=CUSTOM_LABEL)
    assert report.ok and report.shown_from_start_s >= 2.0
