"""An unreachable service is waited out (not-ready meanwhile), never dead-lettered; past
outage_max_wait_s the worker stops uncommitted. Real broker."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.errors import WorkerOutage
from pipeline.settings import Settings
from pipeline.topics import RENDER_REQUESTS, dlq
from schemas.events import Envelope, RenderRequested
from tests.integration.pipeline_fixtures import consume_all, run_workers

pytestmark = pytest.mark.integration

GROUP = "outage-group"


def _db_down() -> OperationalError:
    return OperationalError("SELECT 1", {}, ConnectionRefusedError(111, "Connection refused"))


def _worker(container: Container, settings: Settings, handler: Any) -> ConsumerWorker[RenderRequested]:
    return ConsumerWorker(
        settings,
        name="outage-worker",
        topic=RENDER_REQUESTS,
        group_id=GROUP,
        payload_type=RenderRequested,
        handler=handler,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
        spill=container.store,
    )


def _publish_one(container: Container) -> RenderRequested:
    brief = sample_brief(1)
    req = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    return req


def test_outage_is_waited_out_and_not_dead_lettered(container: Container) -> None:
    _publish_one(container)
    # More outage failures than handler_max_attempts: they are not message attempts.
    failures = container.settings.handler_max_attempts + 2
    settings = container.settings.model_copy(update={"outage_backoff_initial_s": 0.05})
    calls: list[bool] = []  # worker.is_ready as seen by each call
    holder: list[ConsumerWorker[RenderRequested]] = []

    def handler(env: Envelope[RenderRequested]) -> None:
        calls.append(holder[0].is_ready)
        if len(calls) <= failures:
            raise _db_down()

    holder.append(_worker(container, settings, handler))
    run_workers(container, [lambda _c: holder[0]], lambda: holder[0].stats.processed == 1)

    stats = holder[0].stats
    assert len(calls) == failures + 1
    assert stats.dead_lettered == 0 and stats.retried == 0 and stats.outage_retries == failures
    assert calls[0] and not any(calls[1:])  # not ready from the first outage until it recovered
    assert holder[0].is_ready
    assert consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1, timeout_s=3) == []


def test_outage_past_the_limit_stops_the_worker_uncommitted(container: Container) -> None:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    _publish_one(container)
    settings = container.settings.model_copy(
        update={"outage_max_wait_s": 1.0, "outage_backoff_initial_s": 0.1}
    )
    calls: list[int] = []

    def handler(env: Envelope[RenderRequested]) -> None:
        calls.append(1)
        raise _db_down()

    worker = _worker(container, settings, handler)
    with pytest.raises(WorkerOutage, match="OperationalError"):
        worker.run()

    assert len(calls) > 1 and worker.stats.dead_lettered == 0 and not worker.healthy.is_set()
    reader = KafkaConsumer(
        bootstrap_servers=container.settings.kafka_bootstrap, group_id=GROUP, enable_auto_commit=False
    )
    try:
        tps = [TopicPartition(RENDER_REQUESTS, p) for p in reader.partitions_for_topic(RENDER_REQUESTS)]
        committed = [reader.committed(tp) for tp in tps]
    finally:
        reader.close()
    assert not any(committed), committed  # nothing committed: redelivered on restart
    assert consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1, timeout_s=3) == []
