"""Retry and dead-letter behaviour of the consumer loop, on the real broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container, default_renderer
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.errors import PermanentError
from pipeline.ports import RenderedClip, Renderer
from pipeline.topics import RENDER_REQUESTS, dlq
from schemas.events import Envelope, RenderRequested
from schemas.jobs import JobState
from tests.integration.pipeline_fixtures import consume_all, run_workers

pytestmark = pytest.mark.integration


def _worker(container: Container, handler: Any, calls: list[str]) -> ConsumerWorker[RenderRequested]:
    def counted(env: Envelope[RenderRequested]) -> None:
        calls.append(env.payload.recipient.id)
        handler(env)

    return ConsumerWorker(
        container.settings,
        name="test-worker",
        topic=RENDER_REQUESTS,
        group_id="test-group",
        payload_type=RenderRequested,
        handler=counted,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
    )


def test_transient_failure_is_retried_then_succeeds(container: Container) -> None:
    brief = sample_brief(1)
    req = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    calls: list[str] = []

    def flaky(env: Envelope[RenderRequested]) -> None:
        if len(calls) < 3:
            raise RuntimeError("ffmpeg exited with status 1")  # not an outage: counts as an attempt

    holder: list[ConsumerWorker[RenderRequested]] = []

    def factory(c: Container) -> ConsumerWorker[Any]:
        holder.append(_worker(c, flaky, calls))
        return holder[-1]

    run_workers(container, [factory], lambda: bool(holder) and holder[0].stats.processed == 1)
    stats = holder[0].stats
    assert len(calls) == 3 and stats.retried == 2 and stats.dead_lettered == 0 and stats.outage_retries == 0


def test_permanent_failure_goes_to_dlq_at_once_and_fails_the_job(container: Container) -> None:
    brief = sample_brief(2)
    bad, good = (render_request_for(brief, r) for r in brief.recipients)
    for req in (bad, good):
        container.jobs.create_if_absent(req)
        container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    calls: list[str] = []

    def handler(env: Envelope[RenderRequested]) -> None:
        if env.payload.job_id == bad.job_id:
            raise PermanentError("template 'nope' does not exist")

    holder: list[ConsumerWorker[RenderRequested]] = []

    def factory(c: Container) -> ConsumerWorker[Any]:
        holder.append(_worker(c, handler, calls))
        return holder[-1]

    run_workers(
        container,
        [factory],
        lambda: bool(holder) and holder[0].stats.processed == 1 and holder[0].stats.dead_lettered == 1,
    )
    assert calls.count(bad.recipient.id) == 1  # no retries for a permanent error
    job = container.jobs.get(bad.job_id)
    assert job is not None and job.state == JobState.FAILED
    assert "does not exist" in (job.reason or "")
    [dead] = consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1)
    headers = dict(dead.headers)
    assert headers["error_class"] == b"PermanentError" and headers["attempts"] == b"1"
    # Everything a sweeper needs to fail the job later travels with the record.
    assert headers["job_id"] == str(bad.job_id).encode() and headers["envelope_type"] == b"render.requested"
    assert Envelope[RenderRequested].model_validate_json(dead.value).payload.job_id == bad.job_id


class FailsOnce:
    """The real renderer, but its first call fails (a crash no outage explains)."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self.calls = 0

    def __call__(self, req: RenderRequested, out_dir: Path, photo: Path | None) -> RenderedClip:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the renderer crashed")
        return self.renderer(req, out_dir, photo)


def test_a_render_that_fails_once_is_retried_and_published(container: Container) -> None:
    flaky = FailsOnce(default_renderer(container.settings))
    container.renderer = flaky
    brief = sample_brief(1)
    req = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))

    def settled() -> bool:
        job = container.jobs.get(req.job_id)
        return job is not None and job.state in (JobState.PUBLISHED, JobState.FAILED, JobState.REJECTED)

    built: list[ConsumerWorker[Any]] = []

    def render_worker(c: Container) -> ConsumerWorker[Any]:
        built.append(consumers.render.build(c))
        return built[-1]

    run_workers(container, [render_worker, consumers.moderate.build, consumers.publish.build], settled)
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == JobState.PUBLISHED, (job.state, job.reason) if job else None
    assert flaky.calls == 2 and built[0].stats.retried == 1 and built[0].stats.dead_lettered == 0
    assert job.attempts >= 2  # rendering claimed twice: the failed attempt gave its claim back
    states = [e.to_state for e in container.jobs.history(req.job_id)]
    assert states.count(JobState.RENDERING) == 1 and states.count(JobState.RENDERED) == 1
