"""A private real stack per test (Tansu broker + moto S3 server on free ports) and a
helper that runs real consumer-group workers in threads until a condition holds."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.dev.stack import DevStack
from pipeline.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stack_settings(data_dir: Path, database_url: str = "") -> Settings:
    broker, s3 = _free_port(), _free_port()
    return Settings(
        data_dir=data_dir,
        dev_broker_port=broker,
        dev_s3_port=s3,
        kafka_bootstrap=f"127.0.0.1:{broker}",
        s3_endpoint=f"http://127.0.0.1:{s3}",
        database_url=database_url,
        handler_retry_backoff_s=0.05,
        render_width=540,
        render_height=960,
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Settings]:
    """Fails (never skips) when the broker or the S3 server cannot start."""
    settings = stack_settings(tmp_path / "data")
    with DevStack(settings, log=lambda _m: None):
        yield settings


@pytest.fixture
def container(stack: Settings) -> Iterator[Container]:
    c = Container(stack)
    yield c
    c.close()


def run_workers(
    container: Container,
    factories: Sequence[Callable[[Container], ConsumerWorker[Any]]],
    until: Callable[[], bool],
    *,
    timeout_s: float = 90.0,
) -> list[ConsumerWorker[Any]]:
    workers = [f(container) for f in factories]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    try:
        while not until():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout_s} s")
            dead = [w.name for w, t in zip(workers, threads, strict=True) if not t.is_alive()]
            if dead:
                raise AssertionError(f"worker thread(s) died: {dead}")
            time.sleep(0.2)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=30)
    return workers


def consume_all(settings: Settings, topic: str, *, expect: int, timeout_s: float = 20.0) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"test-reader-{time.monotonic_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_interval_ms=10_000,
        session_timeout_ms=10_000,
    )
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
    finally:
        consumer.close()
    return out
