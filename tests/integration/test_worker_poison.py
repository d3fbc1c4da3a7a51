"""No single message stops a worker: oversized and undeliverable dead letters are spilled to
the object store, undecodable images are dead-lettered at once. Real broker, moto S3."""

from __future__ import annotations

import json
from typing import Any

import pytest
from PIL import Image, UnidentifiedImageError

from pipeline.adapters.kafka import ConsumerWorker, EventBus
from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.settings import Settings
from pipeline.topics import RENDER_REQUESTS, dlq
from schemas.events import Envelope, RenderRequested
from tests.integration.pipeline_fixtures import consume_all, run_workers

pytestmark = pytest.mark.integration

BIG = 1_500_000


def _worker(
    container: Container, handler: Any, *, settings: Settings | None = None, bus: EventBus | None = None
) -> ConsumerWorker[RenderRequested]:
    return ConsumerWorker(
        settings or container.settings,
        name="poison-worker",
        topic=RENDER_REQUESTS,
        group_id="poison-group",
        payload_type=RenderRequested,
        handler=handler,
        bus=bus or container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
        spill=container.store,
    )


def _run(container: Container, worker: ConsumerWorker[Any], until: Any) -> None:
    run_workers(container, [lambda _c: worker], until)


def _produce_big(settings: Settings, value: bytes) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=4 * 1024 * 1024)
    try:
        producer.send(RENDER_REQUESTS, value=value, key=b"big").get(timeout=30)  # the broker takes it
    finally:
        producer.close(timeout=5)


def _spilled(container: Container, record: Any) -> tuple[bytes, dict[str, Any]]:
    headers = dict(record.headers)
    url = headers["spilled_to"].decode()
    assert json.loads(record.value)["spilled_to"] == url
    bucket, key = url.removeprefix("s3://").split("/", 1)
    body = container.store.get_bytes(bucket, key)
    sidecar = json.loads(container.store.get_bytes(bucket, key.removesuffix(".bin") + ".json"))
    return body, sidecar


def test_oversized_message_is_spilled_and_the_next_one_is_handled(container: Container) -> None:
    big = b"{" + b"x" * BIG  # not even JSON: dead-lettered, and too large for the DLQ as it is
    _produce_big(container.settings, big)
    brief = sample_brief(1)
    good = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, good, key="big")  # same key: same partition, after it
    handled: list[RenderRequested] = []
    worker = _worker(container, lambda env: handled.append(env.payload))

    _run(container, worker, lambda: bool(handled))

    assert worker.stats.dead_lettered == 1 and worker.stats.spilled == 1 and worker.stats.processed == 1
    [pointer] = consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1)
    assert len(pointer.value) < 10_000
    body, sidecar = _spilled(container, pointer)
    assert body == big
    assert sidecar["size"] == len(big) and sidecar["headers"]["error_class"] == "ValidationError"


class _DlqDown(EventBus):
    """The DLQ topic refuses every record except the small pointer."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.refused = 0

    def send_raw(self, topic: str, value: bytes, **kw: Any) -> None:
        if topic.endswith(".dlq") and "spilled_to" not in dict(kw.get("headers") or []):
            self.refused += 1
            raise RuntimeError("NOT_ENOUGH_REPLICAS on the DLQ")
        super().send_raw(topic, value, **kw)


def test_dlq_write_that_keeps_failing_spills_and_the_worker_carries_on(container: Container) -> None:
    settings = container.settings.model_copy(
        update={"dlq_send_max_attempts": 2, "outage_backoff_initial_s": 0.05}
    )
    brief = sample_brief(2)
    bad, good = (render_request_for(brief, r) for r in brief.recipients)
    for req in (bad, good):
        container.jobs.create_if_absent(req)
        container.bus.publish(RENDER_REQUESTS, req, key="same")
    handled: list[RenderRequested] = []

    def handler(env: Envelope[RenderRequested]) -> None:
        if env.payload.job_id == bad.job_id:
            raise Image.DecompressionBombError("image size (200000000 pixels) exceeds limit")
        handled.append(env.payload)

    bus = _DlqDown(settings)
    try:
        worker = _worker(container, handler, settings=settings, bus=bus)
        _run(container, worker, lambda: bool(handled))
    finally:
        bus.close()

    assert bus.refused == 2 and worker.stats.spilled == 1 and worker.stats.dead_lettered == 1
    [pointer] = consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1)
    assert dict(pointer.headers)["job_id"] == str(bad.job_id).encode()
    body, _sidecar = _spilled(container, pointer)
    assert Envelope[RenderRequested].model_validate_json(body).payload.job_id == bad.job_id


@pytest.mark.parametrize(
    "error",
    [
        Image.DecompressionBombError("image size (200000000 pixels) exceeds limit"),
        UnidentifiedImageError("cannot identify image file 'poster.png'"),
    ],
    ids=["decompression-bomb", "unidentified-image"],
)
def test_undecodable_images_are_dead_lettered_at_once(container: Container, error: Exception) -> None:
    brief = sample_brief(1)
    req = render_request_for(brief, brief.recipients[0])
    container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    calls: list[int] = []

    def handler(env: Envelope[RenderRequested]) -> None:
        calls.append(1)
        raise RuntimeError("decoding the poster failed") from error

    worker = _worker(container, handler)
    _run(container, worker, lambda: worker.stats.dead_lettered == 1)

    assert len(calls) == 1 and worker.stats.retried == 0
    [dead] = consume_all(container.settings, dlq(RENDER_REQUESTS), expect=1)
    assert dict(dead.headers)["attempts"] == b"1"
