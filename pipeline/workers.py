"""The consumer-group workers: what each one consumes, and the loop that runs one until
SIGTERM / SIGINT. Which service handles each topic is wired in pipeline/bootstrap.py
(`Container.worker(role)`). Periodic roles (the job sweeper) consume nothing: they run a
pass every interval under the same SIGTERM handling (`run_periodic_until_signalled`)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
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

SWEEP = "sweep"  # the job sweeper (pipeline/sweeper.py): a periodic loop, not a consumer
PERIODIC_ROLES: tuple[str, ...] = (SWEEP,)
ALL_ROLES: tuple[str, ...] = ROLES + PERIODIC_ROLES


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


def run_periodic_until_signalled(
    name: str,
    tick: Callable[[], object],
    *,
    interval_s: float,
    resources: Closeable,
    on_stop: Callable[[], object] | None = None,
) -> int:
    """Call `tick` every `interval_s` until SIGTERM / SIGINT (the running pass finishes),
    then `on_stop` and close `resources`. A failing pass (a database or broker outage) is
    logged and the next one runs on time. Returns the exit status, 0."""
    logger = logging.getLogger(name)
    stopping = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, finishing the current pass", signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stopping.is_set():
            try:
                tick()
            except Exception:
                logger.exception("%s: pass failed; next one in %.0f s", name, interval_s)
            stopping.wait(interval_s)
    finally:
        try:
            if on_stop is not None:
                on_stop()
        except Exception:
            logger.exception("%s: could not clean up", name)
        resources.close()
    return 0
