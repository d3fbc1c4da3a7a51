"""The step helper (claim -> work -> transition or release) and the JobRepository writes
it and the review queue rely on, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.adapters.db import Database, JobRow, ModerationResultRow
from pipeline.repositories import JobRepository, ModerationResultRepository
from pipeline.steps import Step, claim_step
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

S = JobState
T0 = datetime(2026, 2, 16, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def new_job(db: Database, clock: FakeClock) -> tuple[JobRepository, uuid.UUID]:
    jobs = JobRepository(db, clock=clock)
    req = render_request()
    assert jobs.create_if_absent(req)
    return jobs, req.job_id


def render_step(
    jobs: JobRepository, job_id: uuid.UUID, owner: str = "w1", lease_s: float = 60
) -> Step | None:
    # No takeover wait: these tests move a fake clock (tests/integration/test_leases.py waits).
    return claim_step(
        jobs, job_id, from_states=[S.REQUESTED], to_state=S.RENDERING, owner=owner, lease_s=lease_s, wait_s=0
    )


def test_success_moves_the_job_on_with_the_claim_token(db: Database) -> None:
    jobs, job_id = new_job(db, FakeClock())
    step = render_step(jobs, job_id)
    assert step is not None
    assert step.working_state == S.RENDERING and step.job.claim_token == step.claim_token
    with step:
        won = step.finish(S.RENDERED, staging_key="c/r/j.mp4", poster_key="c/r/j.jpg")
    assert won
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED
    assert (job.staging_key, job.poster_key) == ("c/r/j.mp4", "c/r/j.jpg")
    assert job.claim_token is None and job.lease_expires_at is None
    assert [(e.from_state, e.to_state, e.actor) for e in jobs.history(job_id)][1:] == [
        (S.REQUESTED, S.RENDERING, "w1"),
        (S.RENDERING, S.RENDERED, "w1"),
    ]


def test_an_error_releases_the_claim_so_a_retry_claims_at_once(db: Database) -> None:
    jobs, job_id = new_job(db, FakeClock())
    step = render_step(jobs, job_id)
    assert step is not None
    with pytest.raises(ConnectionError), step:
        raise ConnectionError("renderer crashed")
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERING
    assert job.claim_token is None and job.lease_expires_at is None
    retry = render_step(jobs, job_id, owner="w2")  # no wait for the lease
    assert retry is not None and retry.claim_token != step.claim_token
    with retry:
        assert retry.finish(S.RENDERED)
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED and job.attempts == 2


def test_a_held_or_finished_job_is_not_claimable(db: Database) -> None:
    jobs, job_id = new_job(db, FakeClock())
    first = render_step(jobs, job_id)
    assert first is not None
    assert render_step(jobs, job_id, owner="w2") is None  # held under a live lease
    with first:
        first.finish(S.RENDERED)
    assert render_step(jobs, job_id, owner="w2") is None  # past this step


def test_a_lost_claim_is_reported_and_the_new_owner_keeps_the_job(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    jobs, job_id = new_job(db, clock)
    slow = render_step(jobs, job_id, lease_s=30)
    assert slow is not None
    clock.advance(31)
    taker = render_step(jobs, job_id, owner="w2", lease_s=30)  # the lease expired
    assert taker is not None
    with caplog.at_level(logging.WARNING, logger="pipeline.steps"), slow:
        assert not slow.renew()
        assert not slow.finish(S.RENDERED)
    assert "lost the claim" in caplog.text
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERING and job.claim_token == taker.claim_token
    with pytest.raises(RuntimeError), taker:  # the stale step's exit did not release it either
        raise RuntimeError("boom")
    job = jobs.get(job_id)
    assert job is not None and job.claim_token is None


def test_renew_extends_the_lease_of_a_live_claim(db: Database) -> None:
    clock = FakeClock()
    jobs, job_id = new_job(db, clock)
    step = render_step(jobs, job_id, lease_s=30)
    assert step is not None
    clock.advance(20)
    assert step.renew()
    job = jobs.get(job_id)
    assert job is not None and job.lease_expires_at is not None
    assert job.lease_expires_at == T0 + timedelta(seconds=50)
    clock.advance(20)  # 40 s after the claim: expired without the renewal
    assert render_step(jobs, job_id, owner="w2") is None
    with pytest.raises(ValueError, match="positive"):
        jobs.renew(job_id, claim_token=step.claim_token, lease_s=0)
    with step:
        assert step.finish(S.RENDERED)
    assert not step.renew()  # the transition ended the claim


def test_a_step_ending_without_a_transition_gives_the_claim_back(db: Database) -> None:
    jobs, job_id = new_job(db, FakeClock())
    step = render_step(jobs, job_id)
    assert step is not None
    with step:
        pass
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERING and job.claim_token is None


def test_a_transition_in_a_session_commits_or_rolls_back_with_the_callers_writes(db: Database) -> None:
    jobs, job_id = new_job(db, FakeClock())
    for src, dst in [(S.REQUESTED, S.RENDERING), (S.RENDERING, S.RENDERED), (S.RENDERED, S.MODERATING)]:
        assert jobs.transition(job_id, to_state=dst, expected=src)
    key = str(job_id)

    def result_row() -> ModerationResultRow:
        return ModerationResultRow(
            job_id=key, decision="approved", findings=[], decided_by="t", reason="ok", created_at=T0
        )

    with pytest.raises(RuntimeError), db.session() as s:
        assert jobs.transition(job_id, session=s, to_state=S.APPROVED, expected=S.MODERATING, reason="ok")
        s.add(result_row())
        raise RuntimeError("the other write failed")
    job = jobs.get(job_id)
    assert job is not None and job.state == S.MODERATING
    assert ModerationResultRepository(db).history(job_id) == []

    with db.session() as s:
        # An extra condition that does not hold: nothing changes.
        assert not jobs.transition(
            job_id, session=s, to_state=S.APPROVED, expected=S.MODERATING, where=[JobRow.attempts < 0]
        )
    with db.session() as s:
        assert jobs.transition(
            job_id,
            session=s,
            to_state=S.APPROVED,
            expected=S.MODERATING,
            reason="ok",
            at=T0 + timedelta(hours=1),
        )
        s.add(result_row())
    job = jobs.get(job_id)
    assert job is not None and job.state == S.APPROVED and job.reason == "ok"
    assert len(ModerationResultRepository(db).history(job_id)) == 1
    last = jobs.history(job_id)[-1]
    assert last.to_state == S.APPROVED and last.at == T0 + timedelta(hours=1)
    with db.session() as s, pytest.raises(ValueError, match="illegal transition"):
        jobs.transition(job_id, session=s, to_state=S.RENDERING, expected=S.APPROVED)
