"""Moderation of clips the test composes itself (ffmpeg from a still of a real photo plus
the visible label), independent of the renderer: consented, unknown and protected faces,
and a missing label. Prints the seconds each analysis took."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.faces import FaceEngine, face_engine, reference_embedding
from pipeline.moderation.clip import analyze_clip, clip_findings, photo_sightings
from pipeline.moderation.likeness import References
from pipeline.moderation.policy import ModerationPolicy
from pipeline.repositories import ProtectedFace
from pipeline.settings import Settings
from schemas.events import Decision, Finding
from tests import faces
from tests.clips import frame, still_clip

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("photos")
    return {
        "grace": faces.grace(d),
        "selfie": faces.grace_selfie(d),
        "astronaut": faces.astronaut(d),
        "portrait": faces.astronaut_portrait(d),
        "pair": faces.pair(d),
    }


@pytest.fixture(scope="module")
def engine() -> FaceEngine:
    return face_engine()


@pytest.fixture(scope="module")
def refs(engine: FaceEngine, photos: dict[str, Path]) -> References:
    grandma = reference_embedding(engine, photos["selfie"])  # consented with another picture
    celeb = reference_embedding(engine, photos["astronaut"])
    return References(
        consented={"grandma": [grandma.values]},
        protected=[
            ProtectedFace(
                id=1,
                name="Eileen Collins",
                subject_id=None,
                embedding=celeb.values,
                model=celeb.model,
                source_sha256=celeb.source_sha256,
                enrolled_by="test",
                created_at=datetime.now(UTC),
            )
        ],
    )


def moderate(
    clip: Path, engine: FaceEngine, refs: References, photo: Path | None = None
) -> tuple[Decision, list[Finding]]:
    settings = Settings()
    analysis = analyze_clip(clip, settings, engine)
    extra = photo_sightings(engine, photo) if photo is not None else []
    findings, _ = clip_findings(analysis, refs, settings, face_subjects=["grandma"], extra_sightings=extra)
    n = len(analysis.sightings)
    print(f"{clip.name}: {analysis.frames_sampled} frames, {n} faces, {analysis.seconds:.2f}s")
    return ModerationPolicy().decide(findings), findings


def by_kind(findings: list[Finding], kind: str) -> list[Finding]:
    return [f for f in findings if f.kind == kind]


def test_consented_face_is_approved(
    tmp_path: Path, photos: dict[str, Path], engine: FaceEngine, refs: References
) -> None:
    clip = still_clip(tmp_path / "grace.mp4", frame(photo=photos["grace"]), 4.0)
    decision, findings = moderate(clip, engine, refs, photos["grace"])
    assert decision == Decision.APPROVED, [f.message for f in findings]
    (ok,) = by_kind(findings, "face_consented")
    assert ok.evidence["subject_id"] == "grandma" and ok.evidence["distance"] < 0.4
    assert ok.evidence["times_s"][:2] == [0.0, 0.53] and ok.evidence["sources"] == ["clip", "photo"]
    assert by_kind(findings, "label_visible")


def test_unconsented_second_face_needs_review(
    tmp_path: Path, photos: dict[str, Path], engine: FaceEngine, refs: References
) -> None:
    clip = still_clip(tmp_path / "pair.mp4", frame(photo=photos["pair"], photo_side=0.9), 3.0)
    decision, findings = moderate(clip, engine, References(consented=refs.consented))  # nobody protected
    assert decision == Decision.NEEDS_REVIEW, [f.message for f in findings]
    (unknown,) = by_kind(findings, "unknown_face")
    assert unknown.evidence["nearest"]["subject_id"] == "grandma"
    assert unknown.evidence["nearest"]["distance"] > 0.6
    assert by_kind(findings, "face_consented")


def test_protected_person_is_rejected(
    tmp_path: Path, photos: dict[str, Path], engine: FaceEngine, refs: References
) -> None:
    clip = still_clip(tmp_path / "celeb.mp4", frame(photo=photos["portrait"]), 3.0)
    decision, findings = moderate(clip, engine, refs)
    assert decision == Decision.REJECTED
    (hit,) = by_kind(findings, "protected_person")
    assert hit.evidence["person"] == "Eileen Collins" and hit.evidence["distance"] < 0.6


def test_missing_visible_label_is_rejected(
    tmp_path: Path, photos: dict[str, Path], engine: FaceEngine, refs: References
) -> None:
    clip = still_clip(tmp_path / "nolabel.mp4", frame(photo=photos["grace"], label=False), 3.0)
    decision, findings = moderate(clip, engine, refs)
    assert decision == Decision.REJECTED
    assert by_kind(findings, "label_missing") and by_kind(findings, "face_consented")


def test_a_face_nobody_consented_to_needs_review(
    tmp_path: Path, photos: dict[str, Path], engine: FaceEngine
) -> None:
    clip = still_clip(tmp_path / "grace.mp4", frame(photo=photos["grace"]), 3.0)
    decision, findings = moderate(clip, engine, References(consented={}))
    assert decision == Decision.NEEDS_REVIEW
    assert by_kind(findings, "unknown_face") and by_kind(findings, "subject_face_not_seen")
