"""Retry and dead-letter behaviour of the consumer loop, on the real broker."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.errors import PermanentError
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
            raise ConnectionError("S3 briefly unreachable")

    holder: list[ConsumerWorker[RenderRequested]] = []

    def factory(c: Container) -> ConsumerWorker[Any]:
        holder.append(_worker(c, flaky, calls))
        return holder[-1]

    run_workers(container, [factory], lambda: bool(holder) and holder[0].stats.processed == 1)
    assert len(calls) == 3 and holder[0].stats.retried == 2 and holder[0].stats.dead_lettered == 0


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
    assert Envelope[RenderRequested].model_validate_json(dead.value).payload.job_id == bad.job_id
