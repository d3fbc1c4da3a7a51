"""The foundation path on the real broker, S3 server and database."""

from __future__ import annotations

from typing import Any

import pytest

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.render.media import probe
from pipeline.topics import RENDER_REQUESTS, dlq
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.jobs import JobState
from tests.integration.pipeline_fixtures import consume_all, run_workers

pytestmark = pytest.mark.integration

ALL = [consumers.render.build, consumers.moderate.build, consumers.publish.build]


def test_duplicate_render_request_gives_one_job_and_one_published_object(
    container: Container,
) -> None:
    brief = sample_brief(1)
    req = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))

    def published() -> bool:
        job = container.jobs.get(req.job_id)
        return job is not None and job.state == JobState.PUBLISHED

    built: list[ConsumerWorker[Any]] = []

    def render_worker(c: Container) -> ConsumerWorker[Any]:
        built.append(consumers.render.build(c))
        return built[-1]

    # Both deliveries are handled, the second as a no-op.
    run_workers(container, [render_worker, *ALL[1:]], lambda: published() and built[0].stats.processed == 2)

    jobs = container.jobs.list_jobs(campaign_id=brief.campaign_id)
    assert [j.job_id for j in jobs] == [req.job_id]
    keys = container.store.list_keys(container.settings.bucket_distribution)
    stem = f"{brief.campaign_id}/{req.recipient.id}/{req.job_id}"
    assert sorted(keys) == [f"{stem}.mp4", f"{stem}.vtt"]  # one clip, and its captions sidecar
    states = [e.to_state for e in container.jobs.history(req.job_id)]
    assert states.count(JobState.PUBLISHED) == 1
    assert states.count(JobState.RENDERING) == 1


def test_malformed_message_goes_to_dlq_and_worker_carries_on(container: Container) -> None:
    brief = sample_brief(1)
    good = render_request_for(brief, brief.recipients[0])
    container.bus.send_raw(
        RENDER_REQUESTS, b'{"type": "render.requested", "payload": {"oops": 1}}', key="bad"
    )
    container.bus.send_raw(RENDER_REQUESTS, b"\xff not json at all", key="bad2")
    container.bus.publish(RENDER_REQUESTS, good, key=str(good.job_id))

    def rendered() -> bool:
        job = container.jobs.get(good.job_id)
        return job is not None and job.state == JobState.RENDERED

    built: list[ConsumerWorker[Any]] = []

    def render_worker(c: Container) -> ConsumerWorker[Any]:
        built.append(consumers.render.build(c))
        return built[-1]

    # The three messages sit on different partitions: wait for all of them.
    run_workers(container, [render_worker], lambda: rendered() and built[0].stats.dead_lettered == 2)

    dead = consume_all(container.settings, dlq(RENDER_REQUESTS), expect=2)
    assert sorted(r.value for r in dead) == sorted(
        [b'{"type": "render.requested", "payload": {"oops": 1}}', b"\xff not json at all"]
    )
    for r in dead:
        headers = dict(r.headers)
        assert headers["error_class"] in (b"ValidationError", b"UnknownEventType")
        assert headers["source_topic"] == RENDER_REQUESTS.encode()
        assert headers["error"]


def test_published_clip_is_real_h264_aac(container: Container, tmp_path) -> None:  # type: ignore[no-untyped-def]
    brief = sample_brief(1)
    result = container.campaigns().submit(brief)
    job_id = result.job_ids[0]

    def done() -> bool:
        job = container.jobs.get(job_id)
        return job is not None and job.state == JobState.PUBLISHED

    run_workers(container, ALL, done)
    job = container.jobs.get(job_id)
    assert job is not None and job.published_key and job.url
    path = container.store.get_file(
        container.settings.bucket_distribution, job.published_key, tmp_path / "c.mp4"
    )
    info = probe(path)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.width, info.height) == (
        container.settings.render_width,
        container.settings.render_height,
    )

    # Re-submitting the same brief publishes nothing new.
    again = container.campaigns().submit(brief)
    assert (again.created, again.requested, again.already_final) == (0, 0, 1)


def test_photo_without_consent_is_not_published(container: Container) -> None:
    brief = sample_brief(1)
    r = brief.recipients[0].model_copy(
        update={"subjects": (SubjectUse(subject_id="grandma-chan", scopes=frozenset({Scope.FACE})),)}
    )
    req = render_request_for(brief, r)
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))

    def decided() -> bool:
        job = container.jobs.get(req.job_id)
        return job is not None and job.state in (JobState.REJECTED, JobState.PUBLISHED)

    run_workers(container, ALL, decided)
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == JobState.REJECTED
    assert "grandma-chan" in (job.reason or "")
    assert container.store.list_keys(container.settings.bucket_distribution) == []
