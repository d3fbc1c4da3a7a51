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
from pipeline.logs import bind
from pipeline.topics import (
    CLIPS_PUBLISHED,
    CLIPS_TAKEN_DOWN,
    CONSENT_EVENTS,
    MODERATION_DECISIONS,
    RENDER_REQUESTS,
    RENDER_RESULTS,
)
from schemas.events import (
    ClipPublished,
    ClipRendered,
    ClipTakenDown,
    ConsentChanged,
    ModerationDecided,
    RenderRequested,
    _Payload,
)


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
# The webhook worker (pipeline/webhooks/) consumes clips.published as its role's spec, and
# clips.taken_down as a second consumer in the same process (WEBHOOK_TOPICS), beside its
# delivery loop; job.failed / job.rejected come from the job_events log, not a topic.
WEBHOOK = WorkerSpec("webhook", CLIPS_PUBLISHED, "greetflow-webhook", ClipPublished)
WEBHOOK_TAKEDOWNS = WorkerSpec("webhook", CLIPS_TAKEN_DOWN, "greetflow-webhook-takedowns", ClipTakenDown)
WEBHOOK_TOPICS: tuple[WorkerSpec, ...] = (WEBHOOK, WEBHOOK_TAKEDOWNS)

SPECS: dict[str, WorkerSpec] = {s.role: s for s in (RENDER, MODERATE, PUBLISH, TAKEDOWN, WEBHOOK)}
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


class Observed(Protocol):
    """A process's telemetry (pipeline.metrics.Telemetry): started before the loop, stopped after."""

    def start(self) -> object: ...
    def stop(self) -> None: ...


def run_until_signalled(
    worker: ConsumerWorker[Any], resources: Closeable, telemetry: Observed | None = None
) -> int:
    """Run `worker` until SIGTERM / SIGINT (the in-flight message finishes), then close
    `resources` (the container's producer and engine). `telemetry` (metrics endpoints,
    probes, trace export) runs alongside. Returns the exit status, 0."""

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(worker.name).info(
            "received %s, finishing the current message", signal.Signals(signum).name
        )
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if telemetry is not None:
        telemetry.start()
    try:
        worker.run()
    finally:
        if telemetry is not None:
            telemetry.stop()
        resources.close()
    return 0


def run_periodic_until_signalled(
    name: str,
    tick: Callable[[], object],
    *,
    interval_s: float,
    resources: Closeable,
    on_stop: Callable[[], object] | None = None,
    telemetry: Observed | None = None,
) -> int:
    """Call `tick` every `interval_s` until SIGTERM / SIGINT (the running pass finishes),
    then `on_stop` and close `resources`. A failing pass (a database or broker outage) is
    logged and the next one runs on time. Returns the exit status, 0."""
    return run_many_until_signalled(
        name, [], tick, interval_s=interval_s, resources=resources, on_stop=on_stop, telemetry=telemetry
    )


def run_many_until_signalled(
    name: str,
    workers: list[ConsumerWorker[Any]],
    tick: Callable[[], object],
    *,
    interval_s: float,
    resources: Closeable,
    on_stop: Callable[[], object] | None = None,
    telemetry: Observed | None = None,
) -> int:
    """Several consumers (one thread each) and a periodic `tick` in one process, until
    SIGTERM / SIGINT: each consumer finishes its in-flight message, the running pass
    finishes, then `on_stop` and `resources` close. A consumer that stops on its own (an
    outage past its limit) stops the others too and makes the exit status 1."""
    logger = logging.getLogger(name)
    stopping = threading.Event()
    failed: list[str] = []

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, finishing the current pass", signal.Signals(signum).name)
        stopping.set()

    def _consume(worker: ConsumerWorker[Any]) -> None:
        try:
            worker.run()
        except Exception:
            logger.exception("%s: consumer of %s stopped", name, worker.topic)
            failed.append(worker.topic)
        finally:
            stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if telemetry is not None:
        telemetry.start()
    threads = [threading.Thread(target=_consume, args=(w,), name=f"{name}-{w.topic}") for w in workers]
    for t in threads:
        t.start()
    try:
        while not stopping.is_set():
            try:
                with bind(worker=name, step=name.partition("@")[0]):
                    tick()
            except Exception:
                logger.exception("%s: pass failed; next one in %.1f s", name, interval_s)
            stopping.wait(interval_s)
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join()
        try:
            if on_stop is not None:
                on_stop()
        except Exception:
            logger.exception("%s: could not clean up", name)
        if telemetry is not None:
            telemetry.stop()
        resources.close()
    return 1 if failed else 0
