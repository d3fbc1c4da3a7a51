"""Leases that are alive while the work is: the step heartbeat, takeover of a dead
worker's claim, and the database lock of the sweeper, on SQLite and PostgreSQL (real
clock, leases of a fraction of a second)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from pipeline.adapters.db import Database
from pipeline.repositories import JobRepository, LockRepository
from pipeline.steps import Step, claim_step
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

S = JobState
LEASE = 0.6


def new_job(db: Database, recipient: str = "r-0001") -> tuple[JobRepository, uuid.UUID]:
    jobs = JobRepository(db)
    req = render_request(recipient_id=recipient)
    assert jobs.create_if_absent(req)
    return jobs, req.job_id


def render_step(
    jobs: JobRepository, job_id: uuid.UUID, owner: str, wait_s: float | None = None
) -> Step | None:
    return claim_step(
        jobs,
        job_id,
        from_states=[S.REQUESTED],
        to_state=S.RENDERING,
        owner=owner,
        lease_s=LEASE,
        wait_s=wait_s,
    )


def test_the_heartbeat_keeps_a_long_steps_lease_alive(db: Database) -> None:
    jobs, job_id = new_job(db)
    step = render_step(jobs, job_id, "w1")
    assert step is not None
    with step:
        time.sleep(LEASE * 3)  # three lease periods of work
        assert render_step(jobs, job_id, "w2", wait_s=0) is None  # still held
        assert not step.lost
        assert step.finish(S.RENDERED, staging_key="c/r/j.mp4")
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED and job.claim_token is None


def test_a_stopped_heartbeat_lets_the_lease_expire_and_finish_reports_the_loss(db: Database) -> None:
    jobs, job_id = new_job(db)
    stalled = render_step(jobs, job_id, "w1")
    assert stalled is not None
    stalled.stop_heartbeat()  # the worker froze
    time.sleep(LEASE * 1.5)
    taker = render_step(jobs, job_id, "w2", wait_s=0)
    assert taker is not None and taker.job.claimed_by == "w2"
    with stalled:
        assert not stalled.finish(S.RENDERED)
    assert stalled.lost
    with taker:
        assert taker.finish(S.RENDERED)
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED


def test_a_renewal_that_finds_the_claim_lost_stops_the_heartbeat(db: Database) -> None:
    jobs, job_id = new_job(db)
    step = render_step(jobs, job_id, "w1")
    assert step is not None
    with db.session() as s:  # another worker took the job over meanwhile
        from pipeline.adapters.db import JobRow

        row = s.get(JobRow, str(job_id))
        assert row is not None
        row.claim_token = "f" * 32
    deadline = time.monotonic() + LEASE * 5
    while not step.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert step.lost
    with step:
        assert not step.finish(S.RENDERED)
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERING and job.claim_token == "f" * 32


def test_a_dead_owners_claim_is_taken_over_once_its_lease_expires(db: Database) -> None:
    jobs, job_id = new_job(db)
    # The dead worker: claimed with a short lease and never renewed.
    dead = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="dead", lease_s=LEASE)
    assert dead is not None
    # The redelivered message: the step waits out the lease instead of giving up.
    taker = render_step(jobs, job_id, "w2")
    assert taker is not None and taker.job.claimed_by == "w2"
    with taker:
        assert taker.finish(S.RENDERED, staging_key="c/r/j.mp4")
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED
    assert not jobs.transition(
        job_id, to_state=S.RENDERED, expected=S.RENDERING, claim_token=dead.claim_token
    )
    assert [e.to_state for e in jobs.history(job_id)] == [S.REQUESTED, S.RENDERING, S.RENDERED]


def test_a_job_that_moves_on_during_the_wait_is_left_to_its_worker(db: Database) -> None:
    jobs, job_id = new_job(db)
    live = render_step(jobs, job_id, "w1")
    assert live is not None
    done = threading.Timer(LEASE / 2, lambda: live.finish(S.RENDERED))
    done.start()
    try:
        assert render_step(jobs, job_id, "w2") is None
    finally:
        done.join()
    job = jobs.get(job_id)
    assert job is not None and job.state == S.RENDERED


def test_a_live_holder_that_keeps_renewing_is_not_taken_over(db: Database) -> None:
    jobs, job_id = new_job(db)
    live = render_step(jobs, job_id, "w1")
    assert live is not None
    with live:
        assert render_step(jobs, job_id, "w2", wait_s=LEASE * 2) is None
        assert live.finish(S.RENDERED)


def test_the_lock_has_one_owner_at_a_time(db: Database) -> None:
    locks = LockRepository(db)
    barrier = threading.Barrier(4)
    won: list[str] = []

    def take(owner: str) -> None:
        barrier.wait()
        if locks.acquire("job-sweeper", owner, ttl_s=30):
            won.append(owner)

    threads = [threading.Thread(target=take, args=(f"s{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    (owner,) = won
    other = "s0" if owner != "s0" else "s1"
    assert locks.acquire("job-sweeper", owner, ttl_s=30)  # the owner renews
    assert not locks.acquire("job-sweeper", other, ttl_s=30)
    holder = locks.holder("job-sweeper")
    assert holder is not None and holder[0] == owner
    assert not locks.release("job-sweeper", other)
    assert locks.release("job-sweeper", owner)
    assert locks.holder("job-sweeper") is None
    assert locks.acquire("job-sweeper", other, ttl_s=LEASE)
    time.sleep(LEASE * 1.5)  # expired: anybody may take it
    assert locks.acquire("job-sweeper", owner, ttl_s=30)
