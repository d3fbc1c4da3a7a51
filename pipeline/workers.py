"""The consumer-group workers: what each one consumes, and the loop that runs one until
SIGTERM / SIGINT. Which service handles each topic is wired in pipeline/bootstrap.py
(`Container.worker(role)`)."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.errors import ConfigError
from pipeline.topics import CONSENT_EVENTS, MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS
from schemas.events import ClipRendered, ConsentChanged, ModerationDecided, RenderRequested, _Payload


@dataclass(frozen=True)
class WorkerSpec:
    """One worker role: the topic it consumes as which group, and its payload type."""

    role: str
    topic: str
    group_id: str
    payload_type: type[_Payload]
    max_poll_records: int = 10


RENDER = WorkerSpec("render", RENDER_REQUESTS, "greetflow-render", RenderRequested, max_poll_records=2)
MODERATE = WorkerSpec("moderate", RENDER_RESULTS, "greetflow-moderate", ClipRendered)
PUBLISH = WorkerSpec("publish", MODERATION_DECISIONS, "greetflow-publish", ModerationDecided)
TAKEDOWN = WorkerSpec("takedown", CONSENT_EVENTS, "greetflow-takedown", ConsentChanged)

SPECS: dict[str, WorkerSpec] = {s.role: s for s in (RENDER, MODERATE, PUBLISH, TAKEDOWN)}
ROLES: tuple[str, ...] = tuple(SPECS)


def worker_spec(role: str) -> WorkerSpec:
    try:
        return SPECS[role]
    except KeyError:
        raise ConfigError(f"unknown worker role {role!r}; one of {', '.join(ROLES)}") from None


class Closeable(Protocol):
    def close(self) -> None: ...


def run_until_signalled(worker: ConsumerWorker[Any], resources: Closeable) -> int:
    """Run `worker` until SIGTERM / SIGINT (the in-flight message finishes), then close
    `resources` (the container's producer and engine). Returns the exit status, 0."""

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(worker.name).info(
            "received %s, finishing the current message", signal.Signals(signum).name
        )
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run()
    finally:
        resources.close()
    return 0
