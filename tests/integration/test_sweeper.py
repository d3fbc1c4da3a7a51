"""The job sweeper, deterministic envelope ids, the publish order and a publisher's
takeover, on the real broker, S3 server and database."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.adapters.storage import ObjectStore, sha256_file
from pipeline.bootstrap import Container
from pipeline.keys import captions_key, clip_key, poster_key
from pipeline.render.service import announce_rendered
from pipeline.repositories import JobRepository, LockRepository
from pipeline.steps import decision_event_id
from pipeline.sweeper import JobSweeper, stuck_reason
from pipeline.topics import CLIPS_PUBLISHED, MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS
from schemas.common import utcnow
from schemas.events import Decision, Envelope, ModerationDecided, RenderRequested
from schemas.jobs import JobState
from tests.clips import frame, still_clip
from tests.integration.db_fixtures import render_request
from tests.integration.pipeline_fixtures import consume_all
from tests.integration.test_publish_takedown import CAMPAIGN, approved_job, consent

pytestmark = pytest.mark.integration

S = JobState
STALE = 60.0


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def staged(c: Container, req: RenderRequested, tmp_path: Path) -> str:
    """The rendered clip in staging, with the metadata the render step writes."""
    video = still_clip(tmp_path / f"{req.recipient.id}.mp4", frame(), 1.0)
    key = clip_key(req.campaign_id, req.recipient.id, req.job_id)
    meta = {"sha256": sha256_file(video), "duration": "1.000", "width": "540", "height": "960"}
    c.store.put_file(c.settings.bucket_staging, key, video, content_type="video/mp4", metadata=meta)
    poster = poster_key(req.campaign_id, req.recipient.id, req.job_id)
    c.store.put_bytes(c.settings.bucket_staging, poster, b"jpeg", content_type="image/jpeg")
    return key


def stuck_in(c: Container, jobs: JobRepository, state: JobState, tmp_path: Path) -> uuid.UUID:
    """A job left in `state` by a worker that died (a lease, never renewed) or by a lost message."""
    req = render_request(CAMPAIGN, f"r-{state.value}")
    jobs.create_if_absent(req)
    path = [S.RENDERING, S.RENDERED, S.MODERATING, S.APPROVED, S.PUBLISHING]
    prev = S.REQUESTED
    for st in path[: path.index(state) + 1] if state != S.REQUESTED else []:
        if st in (S.RENDERING, S.MODERATING, S.PUBLISHING):
            assert (
                jobs.claim(req.job_id, to_state=st, from_states=[prev], owner="dead", lease_s=5) is not None
            )
        else:
            if st == S.APPROVED:
                c.moderation_results.record(
                    req.job_id, Decision.APPROVED, [], decided_by="moderate@x", reason=""
                )
            if st == S.RENDERED:
                assert jobs.transition(
                    req.job_id, to_state=st, expected=prev, staging_key=staged(c, req, tmp_path)
                )
            else:
                assert jobs.transition(req.job_id, to_state=st, expected=prev)
        prev = st
    return req.job_id


def sweeper(c: Container, clock: Clock, owner: str = "sweep-test") -> tuple[JobSweeper, JobRepository]:
    jobs = JobRepository(c.db, clock=clock)
    return (
        JobSweeper(
            c.settings,
            jobs,
            LockRepository(c.db, clock=clock),
            c.moderation_results,
            c.store,
            c.bus,
            owner=owner,
        ),
        jobs,
    )


def keyed(records: list[Any]) -> dict[str, dict[str, Any]]:
    return {r.key.decode(): json.loads(r.value) for r in records}


def test_stuck_jobs_are_re_announced_then_failed_after_n_sweeps(stack: object, tmp_path: Path) -> None:
    from pipeline.settings import Settings

    assert isinstance(stack, Settings)
    settings = stack.model_copy(update={"sweep_stale_after_s": STALE, "sweep_max_attempts": 2})
    c = Container(settings)
    try:
        clock = Clock()
        sweep, jobs = sweeper(c, clock)
        working = [S.REQUESTED, S.RENDERING, S.RENDERED, S.MODERATING, S.APPROVED, S.PUBLISHING]
        ids = {st: stuck_in(c, jobs, st, tmp_path) for st in working}
        review = render_request(CAMPAIGN, "r-review")
        jobs.create_if_absent(review)
        for src, dst in [(S.REQUESTED, S.RENDERING), (S.RENDERING, S.RENDERED), (S.RENDERED, S.MODERATING)]:
            assert jobs.transition(review.job_id, to_state=dst, expected=src)
        assert jobs.transition(review.job_id, to_state=S.NEEDS_REVIEW, expected=S.MODERATING)

        first = sweep.sweep()
        assert first.locked and first.redriven == () and first.failed == ()  # nothing expired yet

        clock.advance(STALE + 1)
        # Another sweeper at the same time: the lock keeps it out.
        other, _ = sweeper(c, clock, owner="sweep-other")
        report = sweep.sweep()
        assert not other.sweep().locked
        assert sorted(r.state.value for r in report.redriven) == sorted(s.value for s in working)
        assert report.errors == ()
        assert sweep.sweep().redriven == ()  # swept just now: not again before STALE

        by_topic = {
            RENDER_REQUESTS: [S.REQUESTED, S.RENDERING],
            RENDER_RESULTS: [S.RENDERED, S.MODERATING],
            MODERATION_DECISIONS: [S.APPROVED, S.PUBLISHING],
        }
        for topic, states in by_topic.items():
            got = keyed(consume_all(settings, topic, expect=len(states)))
            assert sorted(got) == sorted(str(ids[st]) for st in states), topic
            for key, env in got.items():
                assert env["payload"]["job_id"] == key  # payload type per topic: ids line up
        decisions = keyed(consume_all(settings, MODERATION_DECISIONS, expect=2))
        for st in (S.APPROVED, S.PUBLISHING):
            last = c.moderation_results.latest(ids[st])
            assert decisions[str(ids[st])]["id"] == str(decision_event_id(ids[st], Decision.APPROVED, last))

        clock.advance(STALE + 1)
        assert len(sweep.sweep().redriven) == len(working)  # the second sweep without progress
        clock.advance(STALE + 1)
        final = sweep.sweep()
        assert sorted(final.failed) == sorted(ids.values()) and final.redriven == ()
        for st, job_id in ids.items():
            job = c.jobs.get(job_id)
            assert job is not None and job.state == S.FAILED and job.reason == stuck_reason(2, st)
            assert job.sweeps_total == 2
            assert c.jobs.history(job_id)[-1].actor == "sweep-test"
        waiting = c.jobs.get(review.job_id)
        assert waiting is not None and waiting.state == S.NEEDS_REVIEW and waiting.sweeps_total == 0
    finally:
        c.close()


def test_progress_resets_the_sweep_count(container: Container, tmp_path: Path) -> None:
    clock = Clock()
    sweep, jobs = sweeper(container, clock)
    job_id = stuck_in(container, jobs, S.REQUESTED, tmp_path)
    clock.advance(container.settings.sweep_stale_after_s + 1)
    assert [r.job_id for r in sweep.sweep().redriven] == [job_id]
    job = jobs.get(job_id)
    assert job is not None and job.sweeps == 1
    assert jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w", lease_s=30)
    job = jobs.get(job_id)
    assert job is not None and job.sweeps == 0 and job.sweeps_total == 1


def test_a_queued_job_is_not_swept_while_its_step_drains_a_backlog(
    container: Container, tmp_path: Path
) -> None:
    clock = Clock()
    sweep, jobs = sweeper(container, clock)
    queued = stuck_in(container, jobs, S.REQUESTED, tmp_path)
    busy = render_request(CAMPAIGN, "r-busy")
    jobs.create_if_absent(busy)
    clock.advance(container.settings.sweep_stale_after_s + 1)
    worker = jobs.claim(busy.job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w", lease_s=30)
    assert worker is not None
    assert sweep.sweep().redriven == ()  # a renderer is at work: the queue is moving
    assert jobs.transition(
        busy.job_id, to_state=S.RENDERED, expected=S.RENDERING, claim_token=worker.claim_token
    )
    assert [r.job_id for r in sweep.sweep().redriven] == [queued]


def test_re_announcements_carry_the_same_envelope_id(container: Container, tmp_path: Path) -> None:
    rendered = render_request(CAMPAIGN, "r-rendered")
    staged(container, rendered, tmp_path)
    for _ in range(2):
        announce_rendered(
            container.bus, container.store, container.settings.bucket_staging, rendered, trace_id=None
        )
    a, b = consume_all(container.settings, RENDER_RESULTS, expect=2)
    assert json.loads(a.value)["id"] == json.loads(b.value)["id"]

    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")

    publisher = container.publish_service("publish-test")
    env = Envelope.wrap(
        ModerationDecided(job_id=req.job_id, campaign_id=CAMPAIGN, decision=Decision.APPROVED)
    )
    publisher.handle(env)
    publisher.handle(env)  # redelivered: re-announced
    first, second = consume_all(container.settings, CLIPS_PUBLISHED, expect=2)
    assert json.loads(first.value)["id"] == json.loads(second.value)["id"]


class FailingClipUpload(ObjectStore):
    """The distribution upload of the clip fails (the publisher is killed there)."""

    def put_file(self, bucket: str, key: str, *args: Any, **kwargs: Any) -> None:
        if key.endswith(".mp4") and bucket == self.settings.bucket_distribution:
            raise ConnectionError("killed while uploading the clip")
        super().put_file(bucket, key, *args, **kwargs)


def test_captions_never_reach_distribution_without_their_clip(container: Container, tmp_path: Path) -> None:
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    publisher = container.publish_service("publish-test")
    publisher.store = FailingClipUpload(container.settings)
    env = Envelope.wrap(
        ModerationDecided(job_id=req.job_id, campaign_id=CAMPAIGN, decision=Decision.APPROVED)
    )
    with pytest.raises(ConnectionError):
        publisher.handle(env)
    dist = container.settings.bucket_distribution
    assert container.store.list_keys(dist) == []
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == S.PUBLISHING and job.claim_token is None  # released

    container.publish_service("publish-test").handle(env)  # the retry completes it
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == S.PUBLISHED and job.published_key
    assert sorted(container.store.list_keys(dist)) == sorted(
        [job.published_key, captions_key(CAMPAIGN, "r-1", req.job_id)]
    )


def test_a_redelivered_approval_takes_over_a_dead_publishers_job(
    container: Container, tmp_path: Path
) -> None:
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    dead = container.jobs.claim(
        req.job_id, to_state=S.PUBLISHING, from_states=[S.APPROVED], owner="publish@dead", lease_s=1.0
    )
    assert dead is not None
    env = Envelope.wrap(
        ModerationDecided(job_id=req.job_id, campaign_id=CAMPAIGN, decision=Decision.APPROVED)
    )
    container.publish_service("publish-test").handle(env)  # waits out the lease, then publishes
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == S.PUBLISHED
    assert len(consume_all(container.settings, CLIPS_PUBLISHED, expect=1)) == 1
