"""The likeness rule on embeddings: consented, protected and unknown faces."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from pipeline.faces import FaceSighting
from pipeline.moderation.likeness import References, likeness_findings
from pipeline.moderation.policy import ModerationPolicy
from pipeline.repositories import ProtectedFace
from schemas.events import Decision, Severity

RNG = np.random.default_rng(7)


def person() -> np.ndarray:
    v = RNG.normal(size=128)
    return v / np.linalg.norm(v)  # unit vectors: two people are ~1.4 apart


def near(v: np.ndarray, d: float) -> tuple[float, ...]:
    noise = RNG.normal(size=128)
    noise -= noise.dot(v) * v
    return tuple(float(x) for x in v + d * noise / np.linalg.norm(noise))


GRANDMA, CELEB, STRANGER, OTHER = person(), person(), person(), person()


def seen(v: tuple[float, ...], t: float = 0.0, source: str = "clip") -> FaceSighting:
    return FaceSighting(t=t, box=(10, 10, 90, 90), score=1.2, embedding=v, source=source)


def protected(name: str, v: np.ndarray, subject: str | None = None) -> ProtectedFace:
    return ProtectedFace(
        id=1,
        name=name,
        subject_id=subject,
        embedding=tuple(float(x) for x in v),
        model="m",
        source_sha256="0" * 64,
        enrolled_by="t",
        created_at=datetime.now(UTC),
    )


def decide(sightings: list[FaceSighting], refs: References, **kw: object) -> tuple[Decision, list]:  # type: ignore[type-arg]
    findings, _shown = likeness_findings(sightings, refs, threshold=0.6, frames_sampled=6, **kw)  # type: ignore[arg-type]
    return ModerationPolicy().decide(findings), findings


def test_consented_face_is_approved() -> None:
    refs = References(consented={"grandma": [near(GRANDMA, 0.1)]})
    decision, findings = decide([seen(near(GRANDMA, 0.15), t) for t in (0, 1, 2)], refs)
    assert decision == Decision.APPROVED
    ok = [f for f in findings if f.kind == "face_consented"]
    assert ok[0].evidence["subject_id"] == "grandma" and ok[0].evidence["times_s"] == [0, 1, 2]


def test_protected_person_rejects_even_if_also_close_to_a_subject() -> None:
    # Someone "consents" a celebrity's photo as their grandma: the gallery wins.
    refs = References(consented={"grandma": [near(CELEB, 0.1)]}, protected=[protected("Celebrity", CELEB)])
    decision, findings = decide([seen(near(CELEB, 0.15), 2.0)], refs)
    assert decision == Decision.REJECTED
    hit = next(f for f in findings if f.kind == "protected_person")
    assert hit.severity == Severity.BLOCK and hit.evidence["person"] == "Celebrity"
    assert "2.0s" in hit.message


def test_protected_person_may_appear_as_their_own_consented_subject() -> None:
    refs = References(
        consented={"celeb-1": [near(CELEB, 0.1)]}, protected=[protected("Celebrity", CELEB, "celeb-1")]
    )
    decision, findings = decide([seen(near(CELEB, 0.12))], refs)
    assert decision == Decision.APPROVED
    assert any(f.kind == "face_consented" for f in findings)


def test_unknown_faces_go_to_review_one_finding_per_stranger() -> None:
    refs = References(consented={"grandma": [near(GRANDMA, 0.1)]})
    sightings = [
        seen(near(GRANDMA, 0.1), 0),
        seen(near(STRANGER, 0.1), 0),
        seen(near(STRANGER, 0.12), 1),
        seen(near(OTHER, 0.1), 3),
    ]
    decision, findings = decide(sightings, refs)
    assert decision == Decision.NEEDS_REVIEW
    unknown = [f for f in findings if f.kind == "unknown_face"]
    assert len(unknown) == 2
    assert sorted(len(f.evidence["times_s"]) for f in unknown) == [1, 2]
    assert unknown[0].evidence["nearest"]["subject_id"] == "grandma"


def test_face_only_in_the_input_photo_counts() -> None:
    refs = References(consented={"grandma": [near(GRANDMA, 0.1)]})
    decision, findings = decide(
        [seen(near(STRANGER, 0.1), -1, source="photo")], refs, face_subjects=["grandma"]
    )
    assert decision == Decision.NEEDS_REVIEW
    unknown = next(f for f in findings if f.kind == "unknown_face")
    assert "input photo" in unknown.message and unknown.evidence["sources"] == ["photo"]
    assert any(f.kind == "subject_face_not_seen" for f in findings)


def test_no_faces_no_subjects_is_approved() -> None:
    decision, findings = decide([], References(consented={}))
    assert decision == Decision.APPROVED
    assert [f.kind for f in findings] == ["likeness_checked"]
