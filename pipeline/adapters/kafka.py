"""Kafka adapter: the event bus (producer) and the consumer-worker loop.

The worker loop is the reliability core of every consumer:

- offsets are committed only after the handler returned (the effect is durable);
- a message that cannot be parsed, or whose handler keeps failing, goes to `<topic>.dlq`
  with the error and the original bytes, and the worker carries on;
- a long handler runs in a thread while the loop keeps polling with the partitions
  paused, so the consumer stays in its group (no rebalance storm on slow renders);
- stop() (SIGTERM) lets the in-flight message finish within a grace period, commits it,
  and closes; an abandoned message is simply redelivered.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from pipeline.errors import GreetflowError, PermanentError
from pipeline.settings import Settings
from pipeline.topics import dlq
from schemas.events import Envelope, _Payload, parse_envelope

log = logging.getLogger(__name__)

P = TypeVar("P", bound=_Payload)


class BusError(GreetflowError):
    pass


class EventBus:
    """A thin producer: JSON envelopes keyed by job id, acks from all replicas."""

    def __init__(self, settings: Settings, *, send_timeout_s: float = 30.0) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        self._timeout = send_timeout_s
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                client_id=f"{settings.kafka_client_id}-producer",
                acks="all",
                linger_ms=5,
                retries=5,
                max_in_flight_requests_per_connection=1,
                request_timeout_ms=int(send_timeout_s * 1000),
            )
        except KafkaError as exc:
            raise BusError(
                f"no Kafka broker reachable at {settings.kafka_bootstrap} "
                "(start the local stack with `greetflow dev up`, or set GREETFLOW_KAFKA_BOOTSTRAP)"
            ) from exc

    def publish(
        self, topic: str, payload: _Payload, *, key: str, trace_id: str | None = None
    ) -> Envelope[Any]:
        env = Envelope.wrap(payload, trace_id=trace_id)
        self.send_raw(topic, env.model_dump_json().encode(), key=key)
        return env

    def publish_many(
        self, topic: str, items: Iterable[tuple[str, _Payload]], *, trace_id: str | None = None
    ) -> int:
        """Send a batch and wait for every ack once (much faster than one flush per message)."""
        futures = []
        for key, payload in items:
            env = Envelope.wrap(payload, trace_id=trace_id)
            futures.append(self._producer.send(topic, value=env.model_dump_json().encode(), key=key.encode()))
        for fut in futures:
            fut.get(timeout=self._timeout)
        return len(futures)

    def send_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        kb = key.encode() if isinstance(key, str) else key
        fut = self._producer.send(topic, value=value, key=kb, headers=headers or [])
        fut.get(timeout=self._timeout)

    def close(self) -> None:
        self._producer.close(timeout=5)


@dataclass
class WorkerStats:
    processed: int = 0
    dead_lettered: int = 0
    retried: int = 0
    last_activity: float = field(default_factory=time.monotonic)


Handler = Callable[[Envelope[P]], None]
DeadLetterHook = Callable[[Envelope[P] | None, BaseException], None]


class ConsumerWorker(Generic[P]):
    """One consumer-group member that feeds one topic's envelopes to one handler."""

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        topic: str,
        group_id: str,
        payload_type: type[P],
        handler: Handler[P],
        bus: EventBus,
        on_dead_letter: DeadLetterHook[P] | None = None,
        max_poll_records: int = 10,
        shutdown_grace_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self.name = name
        self.topic = topic
        self.group_id = group_id
        self.payload_type = payload_type
        self.handler = handler
        self.bus = bus
        self.on_dead_letter = on_dead_letter
        self.max_poll_records = max_poll_records
        self.shutdown_grace_s = shutdown_grace_s
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-handler")
        self.ready = threading.Event()  # set once the group gave us partitions

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=f"{self.settings.kafka_client_id}-{self.name}",
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self.max_poll_records,
                max_poll_interval_ms=self.settings.consumer_max_poll_interval_ms,
                session_timeout_ms=self.settings.consumer_session_timeout_ms,
                heartbeat_interval_ms=max(1000, self.settings.consumer_session_timeout_ms // 4),
            )
        except KafkaError as exc:
            raise BusError(
                f"{self.name}: no Kafka broker reachable at {self.settings.kafka_bootstrap}"
            ) from exc
        consumer.subscribe([self.topic])
        return consumer

    def run(self, *, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until stop() (or until idle for idle_exit_s, for batch runs and tests)."""
        from kafka.structs import OffsetAndMetadata

        consumer = self._consumer()
        log.info("%s: consuming %s as group %s", self.name, self.topic, self.group_id)
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=self.settings.consumer_poll_timeout_ms)
                if consumer.assignment():
                    self.ready.set()
                if not batch:
                    if idle_exit_s is not None and time.monotonic() - self.stats.last_activity > idle_exit_s:
                        break
                    continue
                for tp, records in batch.items():
                    for index, record in enumerate(records):
                        if self._stop.is_set():
                            # Not processed, not committed: redelivered to whoever owns it next.
                            consumer.seek(tp, record.offset)
                            break
                        done = self._process(consumer, record)
                        if not done:
                            # Abandoned during shutdown: leave it (and the rest) for redelivery.
                            consumer.seek(tp, record.offset)
                            break
                        self._commit(consumer, tp, OffsetAndMetadata(record.offset + 1, "", -1))
                        self.stats.last_activity = time.monotonic()
                        if index + 1 < len(records) and tp not in consumer.assignment():
                            break  # revoked by a rebalance while we worked
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            try:
                consumer.close(autocommit=False)
            except Exception:  # pragma: no cover - best effort on the way out
                log.exception("%s: error while closing the consumer", self.name)
        log.info(
            "%s: stopped after %d messages (%d dead-lettered)",
            self.name,
            self.stats.processed,
            self.stats.dead_lettered,
        )
        return self.stats

    def _commit(self, consumer: Any, tp: Any, offset: Any) -> None:
        from kafka.errors import CommitFailedError, RebalanceInProgressError

        try:
            consumer.commit({tp: offset})
        except (CommitFailedError, RebalanceInProgressError) as exc:
            # The partition moved to another member; it will redeliver and our handlers
            # are idempotent, so this is safe.
            log.warning("%s: commit of %s@%s failed (%s)", self.name, tp, offset.offset, exc)

    def _process(self, consumer: Any, record: Any) -> bool:
        """Handle one record. Returns False only when abandoned at shutdown."""
        try:
            env: Envelope[P] | None = parse_envelope(record.value, self.payload_type)
        except Exception as parse_exc:  # any undecodable input (None, bytes, bad JSON) is dead-lettered
            return self._dead_letter(record, None, parse_exc, attempts=1)

        assert env is not None
        attempt = 0
        while True:
            attempt += 1
            future = self._executor.submit(self.handler, env)
            if not self._wait_polling(consumer, future):
                log.warning("%s: abandoning %s at shutdown (it will be redelivered)", self.name, env.id)
                return False
            failure = future.exception()
            if failure is None:
                self.stats.processed += 1
                return True
            permanent = isinstance(failure, PermanentError | ValidationError)
            if permanent or attempt >= self.settings.handler_max_attempts:
                return self._dead_letter(record, env, failure, attempts=attempt)
            self.stats.retried += 1
            delay = self.settings.handler_retry_backoff_s * (2 ** (attempt - 1))
            log.warning(
                "%s: attempt %d for %s failed (%s: %s); retrying in %.1fs",
                self.name,
                attempt,
                env.id,
                type(failure).__name__,
                failure,
                delay,
            )
            if self._stop.wait(delay):
                return False

    def _wait_polling(self, consumer: Any, future: Future[None]) -> bool:
        """Wait for the handler, polling with every partition paused to stay in the group."""
        deadline: float | None = None
        while not future.done():
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + self.shutdown_grace_s
            if deadline is not None and time.monotonic() > deadline:
                return False
            assigned = consumer.assignment()
            if assigned:
                consumer.pause(*assigned)
            stray = consumer.poll(timeout_ms=200)
            for tp, records in stray.items():
                # A rebalance during the wait can hand us unpaused partitions; put back.
                consumer.seek(tp, records[0].offset)
            if future.done():
                break
        paused = consumer.paused() & consumer.assignment()
        if paused:
            consumer.resume(*paused)
        return True

    def _dead_letter(
        self, record: Any, env: Envelope[P] | None, exc: BaseException, *, attempts: int
    ) -> bool:
        err = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: dead-lettering %s[%s]@%s: %s", self.name, record.topic, record.partition, record.offset, err
        )
        headers = [
            ("error", err[:4000].encode()),
            ("error_class", type(exc).__name__.encode()),
            ("error_trace", "".join(traceback.format_exception(exc))[-4000:].encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("worker", self.name.encode()),
            ("attempts", str(attempts).encode()),
            ("failed_at", datetime.now(UTC).isoformat().encode()),
        ]
        # Never lose an accepted message: keep trying the DLQ until it takes it (or we stop,
        # in which case the offset is not committed and the message is redelivered).
        backoff = 0.5
        while True:
            try:
                self.bus.send_raw(dlq(self.topic), record.value or b"", key=record.key, headers=headers)
                break
            except Exception as send_exc:
                log.error("%s: DLQ write failed (%s); retrying", self.name, send_exc)
                if self._stop.wait(backoff):
                    return False
                backoff = min(backoff * 2, 10.0)
        self.stats.dead_lettered += 1
        if self.on_dead_letter is not None:
            try:
                self.on_dead_letter(env, exc)
            except Exception:
                log.exception("%s: on_dead_letter hook failed", self.name)
        return True
