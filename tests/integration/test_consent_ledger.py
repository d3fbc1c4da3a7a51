"""Consent challenges, reference faces, the gallery, moderation results and the job ->
subject index, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from pipeline.adapters.db import Database
from pipeline.repositories import (
    ConsentRecord,
    ConsentRepository,
    FaceEmbedding,
    InvalidChallenge,
    JobRepository,
    JobSubjectRepository,
    LikenessGallery,
    ModerationResultRepository,
)
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.events import Decision, Finding, Severity
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def face(n: float, src: str = "a") -> FaceEmbedding:
    return FaceEmbedding(values=tuple([n] * 128), model="dlib-resnet-v1", source_sha256=src * 64)


def grant(subject: str = "grandma", **kw: object) -> ConsentRecord:
    fields: dict[str, object] = {
        "subject_id": subject,
        "action": "grant",
        "scopes": frozenset({Scope.FACE, Scope.NAME}),
        "purpose": "campaign:lny",
        "recorded_by": "test",
        "granted_at": NOW,
        "created_at": NOW,
        "expires_at": NOW + timedelta(days=30),
        "evidence_sha256": "e" * 64,
        "challenge_code": "ABC234",
    }
    fields.update(kw)
    return ConsentRecord(**fields)  # type: ignore[arg-type]


def test_a_grant_redeems_its_challenge_once_and_stores_faces_atomically(db: Database) -> None:
    repo = ConsentRepository(db)
    repo.issue_challenge("grandma", "ABC234", issued_by="op", ttl_s=600, at=NOW)
    g = grant()
    repo.append_grant(g, challenge_code="ABC234", faces=[face(0.1), face(0.2, "b")], at=NOW)
    assert repo.subject_faces([g.record_id]) == {g.record_id: [tuple([0.1] * 128), tuple([0.2] * 128)]}
    (ch,) = repo.challenges("grandma")
    assert ch.used_at == NOW and ch.used_by_record == g.record_id

    again = grant()
    with pytest.raises(InvalidChallenge):
        repo.append_grant(again, challenge_code="ABC234", faces=[face(0.3)], at=NOW)
    # nothing of the refused grant was written
    assert [r.record_id for r in repo.records("grandma")] == [g.record_id]
    assert repo.face_record_ids("grandma") == {g.record_id}


@pytest.mark.parametrize("case", ["expired", "other-subject", "unknown"])
def test_invalid_challenges_are_refused(db: Database, case: str) -> None:
    repo = ConsentRepository(db)
    repo.issue_challenge(
        "grandma" if case != "other-subject" else "someone", "ABC234", issued_by="op", ttl_s=60, at=NOW
    )
    at = NOW + timedelta(seconds=61) if case == "expired" else NOW
    code = "ZZZ999" if case == "unknown" else "ABC234"
    with pytest.raises(InvalidChallenge):
        repo.append_grant(grant(), challenge_code=code, at=at)
    assert repo.records("grandma") == []


def test_reference_faces_can_be_deleted_but_the_ledger_cannot_be_edited(db: Database) -> None:
    repo = ConsentRepository(db)
    g = grant()
    repo.append_grant(g, challenge_code=None, faces=[face(0.1)], at=NOW)
    assert repo.delete_subject_faces([g.record_id]) == 1
    assert repo.subject_faces([g.record_id]) == {}
    with pytest.raises(DBAPIError), db.engine.begin() as conn:
        conn.execute(text("UPDATE consents SET purpose = '*'"))


def test_due_expiries_skip_grants_already_ended(db: Database) -> None:
    repo = ConsentRepository(db)
    short = grant(expires_at=NOW + timedelta(hours=1))
    long = grant(expires_at=NOW + timedelta(days=60))
    ended = grant(expires_at=NOW + timedelta(hours=1))
    for g in (short, long, ended):
        repo.append(g)
    repo.append(
        ConsentRecord(
            subject_id="grandma",
            action="revoke",
            scopes=ended.scopes,
            purpose=ended.purpose,
            recorded_by="t",
            granted_at=NOW,
            created_at=NOW,
            supersedes=ended.record_id,
        )
    )
    assert repo.due_expiries(NOW) == []
    assert [r.record_id for r in repo.due_expiries(NOW + timedelta(hours=2))] == [short.record_id]


def test_gallery_enrols_each_photo_once(db: Database) -> None:
    gallery = LikenessGallery(db)
    assert gallery.protect("Famous Person", [face(0.5, "a"), face(0.6, "b")], enrolled_by="op") == 2
    assert gallery.protect("Famous Person", [face(0.5, "a")], enrolled_by="op") == 0
    assert gallery.protect("Other", [face(0.5, "a")], enrolled_by="op", subject_id="other-1") == 1
    assert sorted((f.name, f.subject_id) for f in gallery.faces()) == [
        ("Famous Person", None),
        ("Famous Person", None),
        ("Other", "other-1"),
    ]
    assert gallery.unprotect("Famous Person") == 2


def test_moderation_results_are_append_only_and_feed_the_review_queue(db: Database) -> None:
    jobs, results = JobRepository(db), ModerationResultRepository(db)
    reqs = [render_request(recipient_id=f"r-{i}") for i in range(3)]
    for r in reqs:
        jobs.create_if_absent(r)
        for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING):
            prev = jobs.get(r.job_id)
            assert prev is not None
            assert jobs.transition(r.job_id, to_state=st, expected=prev.state)
    warn = Finding(kind="unknown_face", severity=Severity.WARN, message="a stranger", evidence={"t": 1.0})
    for r in (reqs[1], reqs[0]):  # r-1 waits longer
        results.record(r.job_id, Decision.NEEDS_REVIEW, [warn], decided_by="auto", reason="a stranger")
        assert jobs.transition(r.job_id, to_state=JobState.NEEDS_REVIEW, expected=JobState.MODERATING)
    results.record(reqs[2].job_id, Decision.APPROVED, [], decided_by="auto")
    assert jobs.transition(reqs[2].job_id, to_state=JobState.APPROVED, expected=JobState.MODERATING)

    queue = results.review_queue()
    assert [j.recipient_id for j, _ in queue] == ["r-1", "r-0"]
    assert queue[0][1].findings == (warn,)
    # a human decision is another row, never an edit
    results.record(reqs[1].job_id, Decision.APPROVED, [], decided_by="reviewer:ann", reason="known guest")
    assert [m.decided_by for m in results.history(reqs[1].job_id)] == ["auto", "reviewer:ann"]
    with pytest.raises(DBAPIError), db.engine.begin() as conn:
        conn.execute(text("UPDATE moderation_results SET decision = 'approved'"))


def test_job_subject_index(db: Database) -> None:
    jobs, subjects = JobRepository(db), JobSubjectRepository(db)
    use = SubjectUse(subject_id="grandma", scopes=frozenset({Scope.FACE}))
    a = render_request(recipient_id="r-a", subjects=(use,))
    b = render_request(recipient_id="r-b")
    for r in (a, b):
        jobs.create_if_absent(r)
    assert subjects.index(a.job_id, a.recipient.subjects) == 1
    assert subjects.index(a.job_id, a.recipient.subjects) == 0  # idempotent
    assert [j.job_id for j in subjects.jobs_using("grandma")] == [a.job_id]
    assert subjects.jobs_using("grandma", states=[JobState.PUBLISHED]) == []
    assert [j.job_id for j in subjects.jobs_with_subjects([JobState.REQUESTED])] == [a.job_id]


def test_release_lets_a_retry_claim_at_once(db: Database) -> None:
    jobs = JobRepository(db)
    r = render_request()
    jobs.create_if_absent(r)
    first = jobs.claim(
        r.job_id, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED], owner="a", lease_s=300
    )
    assert first is not None and first.claim_token is not None
    assert (
        jobs.claim(
            r.job_id, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED], owner="b", lease_s=300
        )
        is None
    )
    assert jobs.release(r.job_id, claim_token=first.claim_token)
    assert not jobs.release(r.job_id, claim_token=first.claim_token)
    again = jobs.claim(
        r.job_id, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED], owner="b", lease_s=300
    )
    assert again is not None and again.claimed_by == "b"
