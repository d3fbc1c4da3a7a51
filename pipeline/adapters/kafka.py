"""Kafka adapter: the event bus (producer) and the consumer-worker loop.

The worker loop is the reliability core of every consumer:

- offsets are committed only after the handler returned (the effect is durable), and
  only by the member that still owns the partition, never below what the group already
  committed (a member that lost a partition mid-message must not rewind it);
- after every rebalance each assigned partition is re-positioned at its committed offset
  and the rest of the in-memory batch is dropped, so no partition keeps a fetch position
  past records nobody handled;
- a message that cannot be parsed, fails permanently, or keeps failing for its own
  reasons goes to `<topic>.dlq` with the error and the original bytes, and the worker
  carries on; one the DLQ will not take (too large, or the DLQ write keeps failing) is
  spilled to the object store and a small pointer record goes to the DLQ instead;
- an unreachable database, broker or object store is an outage, not the message's
  fault: the message is kept and retried with backoff while the worker reports itself
  unhealthy; past `outage_max_wait_s` the worker stops uncommitted (`WorkerOutage`);
- a long handler runs in a thread while the loop keeps polling with the partitions
  paused, so the consumer stays in its group (no rebalance storm on slow renders);
- stop() (SIGTERM) lets the in-flight message finish within a grace period, commits it,
  and closes; an abandoned message is simply redelivered.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache, partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import PrivateAttr
from pydantic_core import to_jsonable_python
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from pipeline import metrics
from pipeline.errors import (
    ConfigError,
    GreetflowError,
    MessageTooLarge,
    WorkerOutage,
    is_outage,
    is_permanent,
    is_too_large,
)
from pipeline.logs import bind
from pipeline.settings import Settings
from pipeline.topics import dlq
from pipeline.tracing import TRACEPARENT, header, headers_for, parse_traceparent, step_span
from schemas.events import Envelope, _canonical, _Payload, canonical_json, parse_envelope

if TYPE_CHECKING:
    from pipeline.adapters.storage import ObjectStore

log = logging.getLogger(__name__)

P = TypeVar("P", bound=_Payload)
T = TypeVar("T")

Headers = list[tuple[str, bytes]]


class BusError(GreetflowError):
    pass


def record_size(key: bytes | None, value: bytes | None, headers: Headers) -> int:
    """The size kafka-python checks against max_request_size (one record in a v2 batch)."""
    from kafka.record.default_records import DefaultRecordBatchBuilder

    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))


def kafka_client_config(settings: Settings) -> dict[str, Any]:
    """Connection security of every Kafka client (producer, consumer, admin): the ONE place
    that turns the kafka_security_* / kafka_sasl_* / kafka_ssl_* settings into kafka-python
    options. ConfigError (one line, naming the setting) for an incomplete or unsafe set;
    production refuses connections without TLS."""
    protocol = settings.kafka_security_protocol
    if settings.environment == "production" and protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
        raise ConfigError(
            f"GREETFLOW_KAFKA_SECURITY_PROTOCOL is {protocol}: production needs SASL_SSL (or SSL with "
            "client certificates)"
        )
    config: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        config["ssl_check_hostname"] = settings.kafka_ssl_check_hostname
        files = {
            "ssl_cafile": settings.kafka_ssl_cafile,
            "ssl_certfile": settings.kafka_ssl_certfile,
            "ssl_keyfile": settings.kafka_ssl_keyfile,
        }
        for option, path in files.items():
            if path is None:
                continue
            if not path.is_file():
                raise ConfigError(f"GREETFLOW_KAFKA_{option.upper()} {path} is not a readable file")
            config[option] = str(path)
        if (settings.kafka_ssl_certfile is None) != (settings.kafka_ssl_keyfile is None):
            raise ConfigError("GREETFLOW_KAFKA_SSL_CERTFILE and GREETFLOW_KAFKA_SSL_KEYFILE go together")
        if protocol == "SSL" and settings.kafka_ssl_certfile is None and settings.environment == "production":
            raise ConfigError(
                "GREETFLOW_KAFKA_SECURITY_PROTOCOL=SSL without GREETFLOW_KAFKA_SSL_CERTFILE authenticates "
                "nobody: set a client certificate, or use SASL_SSL"
            )
        key_password = settings.kafka_ssl_key_password.get_secret_value()
        if key_password:
            config["ssl_password"] = key_password
    if protocol.startswith("SASL_"):
        password = settings.kafka_sasl_password.get_secret_value()
        if not settings.kafka_sasl_username or not password:
            raise ConfigError(
                f"GREETFLOW_KAFKA_SECURITY_PROTOCOL={protocol} needs GREETFLOW_KAFKA_SASL_USERNAME and "
                "GREETFLOW_KAFKA_SASL_PASSWORD"
            )
        config.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password,
        )
    return config


Signer = Callable[[Envelope[Any]], Envelope[Any]]
# Signs an envelope's canonical bytes: {"key_id": ..., "hmac_sha256": ...}, or None (no key).
ContentSigner = Callable[[bytes], dict[str, str] | None]

# Bytes a record adds to its key and value in a v2 batch (headers aside), well above the
# real overhead: below it a record needs no exact size estimate.
_RECORD_SLACK = 512


def compression_for(setting: str) -> str | None:
    """kafka-python's compression_type for `Settings.kafka_compression` (auto: lz4 when the
    lz4 package is installed, else gzip, which needs nothing)."""
    if setting == "none":
        return None
    if setting != "auto":
        return setting
    try:
        import lz4.frame  # noqa: F401
    except ImportError:
        return "gzip"
    return "lz4"


class _Presigned(Envelope[Any]):
    """An envelope whose canonical bytes were built already, from the canonical payload
    dict: the Signer gets them without a model dump. Only its signature is read back."""

    _content: bytes = PrivateAttr(default=b"")

    def signed_content(self) -> bytes:
        return self._content


@lru_cache(maxsize=16)
def _key_id_json(key_id: str) -> str:
    return canonical_json(key_id)


class EventBus:
    """A thin producer: JSON envelopes keyed by job id, acks from all replicas. `sign`
    (pipeline.trust.ProducerKeys.sign) adds this producer's signature to every envelope.

    Tuned for fan-out (`kafka_linger_ms`, `kafka_batch_bytes`, `kafka_compression`):
    batched sends fill large compressed batches; a single `publish` is flushed at once,
    so the linger never delays a worker's one message."""

    def __init__(
        self,
        settings: Settings,
        *,
        send_timeout_s: float = 30.0,
        sign: Signer | None = None,
        sign_content: ContentSigner | None = None,
    ) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        self._timeout = send_timeout_s
        self._sign: Signer = sign or (lambda env: env)
        # The same signature from the canonical bytes alone (batched sends: no model at all).
        self._sign_content = sign_content
        self.max_request_bytes = settings.kafka_max_request_bytes
        self.compression = compression_for(settings.kafka_compression)
        security = kafka_client_config(settings)
        try:
            self._producer = KafkaProducer(
                **security,
                bootstrap_servers=settings.kafka_bootstrap,
                client_id=f"{settings.kafka_client_id}-producer",
                acks="all",
                linger_ms=settings.kafka_linger_ms,
                batch_size=settings.kafka_batch_bytes,
                compression_type=self.compression,
                retries=5,
                max_in_flight_requests_per_connection=1,
                request_timeout_ms=int(send_timeout_s * 1000),
                max_request_size=settings.kafka_max_request_bytes,
            )
        except KafkaError as exc:
            raise BusError(
                f"no Kafka broker reachable at {settings.kafka_bootstrap} "
                "(start the local stack with `greetflow dev up`, or set GREETFLOW_KAFKA_BOOTSTRAP)"
            ) from exc

    def publish(
        self,
        topic: str,
        payload: _Payload,
        *,
        key: str,
        trace_id: str | None = None,
        event_id: uuid.UUID | None = None,
    ) -> Envelope[Any]:
        """`event_id`: the envelope id (deterministic for re-announcements); None: a random one."""
        env = self._sign(Envelope.wrap(payload, trace_id=trace_id, id=event_id))
        self.send_raw(topic, env.model_dump_json().encode(), key=key, headers=headers_for(env.trace_id))
        return env

    def publish_many(
        self, topic: str, items: Iterable[tuple[str, _Payload]], *, trace_id: str | None = None
    ) -> int:
        """Send a batch and wait for every ack once (never a flush per message)."""
        by_type: dict[tuple[str, int], list[tuple[str, dict[str, Any]]]] = {}
        for key, payload in items:
            kind = (payload.event_type, payload.schema_version)
            by_type.setdefault(kind, []).append((key, _canonical(payload.model_dump(mode="python"))))
        confirms = [
            self.send_payloads(topic, kind, version, batch, trace_id=trace_id)
            for (kind, version), batch in by_type.items()
        ]
        return sum(confirm() for confirm in confirms)

    def send_payloads(
        self,
        topic: str,
        event_type: str,
        schema_version: int,
        items: Sequence[tuple[str, dict[str, Any]]],
        *,
        trace_id: str | None = None,
        texts: Sequence[str] | None = None,
    ) -> Callable[[], int]:
        """Send one envelope per (key, payload) without waiting; the callable returned waits
        for every ack (BusError, one line, when one failed) and returns the count. The
        producer's batching does the rest: a fan-out sends a chunk, writes the next chunk's
        rows, then confirms. `texts`: see `encode_payloads`."""
        from kafka.errors import KafkaError

        headers, records = self.encode_payloads(
            topic, event_type, schema_version, items, trace_id=trace_id, texts=texts
        )
        try:
            futures = [self._producer.send(topic, value=v, key=k, headers=headers) for k, v in records]
        except KafkaError as exc:
            raise BusError(f"could not send {len(records)} records to {topic}: {exc}") from exc
        timeout = self._timeout

        def confirm() -> int:
            try:
                for fut in futures:
                    fut.get(timeout=timeout)
            except KafkaError as exc:
                raise BusError(
                    f"{topic}: a batch of {len(futures)} records was not acknowledged: {exc}"
                ) from exc
            return len(futures)

        return confirm

    def encode_payloads(
        self,
        topic: str,
        event_type: str,
        schema_version: int,
        items: Sequence[tuple[str, dict[str, Any]]],
        *,
        trace_id: str | None = None,
        texts: Sequence[str] | None = None,
    ) -> tuple[Headers, list[tuple[bytes, bytes]]]:
        """The headers and the (key, value) records of signed envelopes, one per (key, payload).

        `payload` is the payload's canonical JSON-ready dict, as `Envelope.signed_content`
        computes it from the parsed model (`schemas.events._canonical` of its python dump);
        `texts`, when given, holds each payload's `canonical_json` already (an empty text:
        serialize that one here). The envelope's canonical bytes are spliced around that
        text (the envelope's own keys sorted), signed with one HMAC, and the record is those
        bytes with the signature appended: one serialization a message, no model. A record
        over `kafka_max_request_bytes` raises MessageTooLarge before anything of the batch
        is sent."""
        trace = trace_id or uuid.uuid4().hex
        headers = headers_for(trace)
        occurred_at = canonical_json(to_jsonable_python(datetime.now(UTC)))
        # Envelope keys in sorted order around the payload: id, occurred_at, payload,
        # schema_version, trace_id, type (schemas.events.Envelope).
        head = '{"id":"'
        mid = f'","occurred_at":{occurred_at},"payload":'
        tail = (
            f',"schema_version":{int(schema_version)},"trace_id":{canonical_json(trace)},'
            f'"type":{canonical_json(event_type)}}}'
        )
        shell = _Presigned.model_construct(type=event_type, trace_id=trace, payload=None, signature=None)
        ids = os.urandom(16 * len(items))
        records: list[tuple[bytes, bytes]] = []
        for i, (key, payload) in enumerate(items):
            text = texts[i] if texts is not None and texts[i] else canonical_json(payload)
            event_id = uuid.UUID(bytes=ids[16 * i : 16 * i + 16], version=4)
            content = f"{head}{event_id}{mid}{text}{tail}".encode()
            signature = self._signature(content, shell)
            value = content if signature is None else content[:-1] + b',"signature":' + signature + b"}"
            kb = key.encode()
            if len(value) + len(kb) + _RECORD_SLACK > self.max_request_bytes:
                size = record_size(kb, value, headers)
                if size > self.max_request_bytes:
                    raise MessageTooLarge(
                        f"a {size}-byte record for {topic} exceeds "
                        f"kafka_max_request_bytes={self.max_request_bytes}"
                    )
            records.append((kb, value))
        return headers, records

    def _signature(self, content: bytes, shell: _Presigned) -> bytes | None:
        """The JSON of the signature of an envelope's canonical bytes (None: unsigned).
        Without a content signer, `shell` carries the bytes to the Signer (one shell serves
        a whole batch)."""
        if self._sign_content is not None:
            sig = self._sign_content(content)
            if sig is None:
                return None
            digest, key_id = sig["hmac_sha256"], sig["key_id"]
            if digest.isalnum() and digest.isascii():  # hex: nothing to escape
                return f'{{"hmac_sha256":"{digest}","key_id":{_key_id_json(key_id)}}}'.encode()
        else:
            shell._content = content
            signed = self._sign(shell).signature
            if signed is None:
                return None
            sig = {"hmac_sha256": signed.hmac_sha256, "key_id": signed.key_id}
        return canonical_json(sig).encode()

    def send_raw(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
    ) -> None:
        """Raises MessageTooLarge at once (before any network call) for an oversized record.
        Flushed at once: one message never waits for the batch linger."""
        kb = key.encode() if isinstance(key, str) else key
        size = record_size(kb, value, headers or [])
        if size > self.max_request_bytes:
            raise MessageTooLarge(
                f"a {size}-byte record for {topic} exceeds kafka_max_request_bytes={self.max_request_bytes}"
            )
        fut = self._producer.send(topic, value=value, key=kb, headers=headers or [])
        self._producer.flush(timeout=self._timeout)
        fut.get(timeout=self._timeout)

    def close(self) -> None:
        self._producer.close(timeout=5)


@dataclass
class WorkerStats:
    processed: int = 0
    dead_lettered: int = 0
    retried: int = 0  # handler re-runs after a failure of the message itself
    outage_retries: int = 0  # re-runs (handler, DLQ write, spill, commit) while a service was down
    spilled: int = 0  # dead letters stored in the object store instead of the DLQ
    last_activity: float = field(default_factory=time.monotonic)


Handler = Callable[[Envelope[P]], None]
DeadLetterHook = Callable[[Envelope[P] | None, BaseException], None]


class _Abandoned(Exception):
    """The worker is stopping: the message is left uncommitted for redelivery."""


class _RebalanceWatch:
    """Counts assignments, so the loop can tell that a rebalance happened under it."""

    def __init__(self) -> None:
        self.generation = 0
        self.pending = False

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.pending = True

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.generation += 1
        self.pending = True


def _listener(watch: _RebalanceWatch) -> Any:
    from kafka import ConsumerRebalanceListener

    class Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python is untyped
        def on_partitions_revoked(self, revoked: Any) -> None:
            watch.on_partitions_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            watch.on_partitions_assigned(assigned)

    return Listener()


def _identity(raw: bytes | None, env: Envelope[Any] | None) -> Headers:
    """Envelope id, type and job id as DLQ headers, so a sweeper can fail the job later;
    taken from the raw JSON (best effort) when the envelope did not parse."""
    if env is not None:
        ident: dict[str, Any] = {
            "id": env.id,
            "type": env.type,
            "job_id": getattr(env.payload, "job_id", None),
        }
    else:
        try:
            doc = json.loads(raw or b"")
        except ValueError:
            doc = None
        doc = doc if isinstance(doc, dict) else {}
        payload = doc.get("payload")
        job_id = payload.get("job_id") if isinstance(payload, dict) else None
        ident = {"id": doc.get("id"), "type": doc.get("type"), "job_id": job_id}
    return [
        (f"envelope_{k}" if k != "job_id" else k, str(v)[:200].encode())
        for k, v in ident.items()
        if v is not None and not isinstance(v, dict | list)
    ]


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
        spill: ObjectStore | None = None,
        step: str | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        # The step label of metrics, spans and log lines; default: the role in `ROLE@host:pid`.
        self.step = step or name.partition("@")[0]
        metrics.init_topic(topic, self.step)
        self.topic = topic
        self.group_id = group_id
        self.payload_type = payload_type
        self.handler = handler
        self.bus = bus
        self.on_dead_letter = on_dead_letter
        self.max_poll_records = max_poll_records
        self.shutdown_grace_s = shutdown_grace_s
        self.spill = spill
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-handler")
        self._watch = _RebalanceWatch()
        self.ready = threading.Event()  # set once the group gave us partitions
        # Cleared while a service the worker needs is unreachable; set again once it answers.
        self.healthy = threading.Event()
        self.healthy.set()
        self.last_poll = time.monotonic()  # the loop polls at least every second, even mid-handler

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def is_live(self) -> bool:
        """For a liveness probe: the loop polled within max.poll.interval, or two minutes when
        that is shorter (a commit may block for a minute while the broker is away)."""
        limit = max(120.0, self.settings.consumer_max_poll_interval_ms / 1000)
        return time.monotonic() - self.last_poll < limit

    @property
    def is_ready(self) -> bool:
        """For a readiness probe: in the group and not waiting out an outage."""
        return self.ready.is_set() and self.healthy.is_set()

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        security = kafka_client_config(self.settings)
        try:
            consumer = KafkaConsumer(
                **security,
                bootstrap_servers=self.settings.kafka_bootstrap,
                client_id=f"{self.settings.kafka_client_id}-{self.name}",
                group_id=self.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=self.max_poll_records,
                max_poll_interval_ms=self.settings.consumer_max_poll_interval_ms,
                session_timeout_ms=self.settings.consumer_session_timeout_ms,
                heartbeat_interval_ms=max(1000, self.settings.consumer_session_timeout_ms // 4),
                max_partition_fetch_bytes=self.settings.kafka_max_partition_fetch_bytes,
                fetch_max_bytes=self.settings.kafka_fetch_max_bytes,
                fetch_max_wait_ms=self.settings.consumer_fetch_max_wait_ms,
            )
        except KafkaError as exc:
            raise BusError(
                f"{self.name}: no Kafka broker reachable at {self.settings.kafka_bootstrap}"
            ) from exc
        consumer.subscribe([self.topic], listener=_listener(self._watch))
        return consumer

    def run(self, *, idle_exit_s: float | None = None) -> WorkerStats:
        """Consume until stop() (or until idle for idle_exit_s, for batch runs and tests).

        Raises WorkerOutage when a service stayed unreachable past outage_max_wait_s."""
        consumer = self._consumer()
        log.info("%s: consuming %s as group %s", self.name, self.topic, self.group_id)
        try:
            while not self._stop.is_set():
                batch = consumer.poll(timeout_ms=self.settings.consumer_poll_timeout_ms)
                self.last_poll = time.monotonic()
                if consumer.assignment():
                    self.ready.set()
                if self._watch.pending:
                    # Positions of retained partitions may be ahead of their committed offsets
                    # (records fetched, never handled): start again from what was committed.
                    self._realign(consumer)
                    continue
                if not batch:
                    if idle_exit_s is not None and time.monotonic() - self.stats.last_activity > idle_exit_s:
                        break
                    continue
                self._run_batch(consumer, batch)
        except WorkerOutage as exc:
            log.error("%s: stopping, nothing committed for the current message: %s", self.name, exc)
            raise
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

    def _run_batch(self, consumer: Any, batch: dict[Any, list[Any]]) -> None:
        generation = self._watch.generation
        for tp, records in batch.items():
            for record in records:
                if self._stop.is_set():
                    return  # not processed, not committed: redelivered to whoever owns it next
                if tp not in consumer.assignment():
                    break  # revoked: its new owner starts from the committed offset
                if not self._process(consumer, record):
                    return  # abandoned during shutdown: left for redelivery
                self._commit(consumer, tp, record.offset + 1, fetched_in=generation)
                self.stats.last_activity = time.monotonic()
                if self._watch.pending:
                    self._realign(consumer)
                    return  # the rest of the batch is refetched from the committed offsets

    def _realign(self, consumer: Any) -> None:
        """Seek every assigned partition to its committed offset (the beginning when none)."""
        self._watch.pending = False
        for tp in sorted(consumer.assignment()):
            committed: int | None = self._outage_retry(
                consumer, partial(consumer.committed, tp), what=f"reading the committed offset of {tp}"
            )
            if committed is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, committed)
        log.info("%s: rebalanced; now own %s", self.name, sorted(consumer.assignment()))

    def _commit(self, consumer: Any, tp: Any, offset: int, *, fetched_in: int) -> None:
        from kafka.errors import (
            CommitFailedError,
            IllegalGenerationError,
            RebalanceInProgressError,
            UnknownMemberIdError,
        )

        try:
            self._outage_retry(
                consumer,
                lambda: self._commit_if_owner(consumer, tp, offset, fetched_in=fetched_in),
                what=f"committing {tp}@{offset}",
            )
        except (
            CommitFailedError,
            RebalanceInProgressError,
            IllegalGenerationError,
            UnknownMemberIdError,
        ) as exc:
            # The partition moved to another member; it will redeliver and our handlers
            # are idempotent, so this is safe.
            log.warning("%s: commit of %s@%s failed (%s)", self.name, tp, offset, exc)

    def _commit_if_owner(self, consumer: Any, tp: Any, offset: int, *, fetched_in: int) -> None:
        from kafka.structs import OffsetAndMetadata

        # The broker does not check who owns a partition: a member that lost it while its
        # handler ran would rewind the new owner's progress, leaving a backlog that nobody
        # reads (the new owner's fetch position is already past it).
        if tp not in consumer.assignment():
            log.info("%s: not committing %s@%d: the partition moved to another member", self.name, tp, offset)
            return
        if self._watch.generation != fetched_in:
            current = consumer.committed(tp)
            if current is not None and current >= offset:
                log.info(
                    "%s: not committing %s@%d: the group is already at %d", self.name, tp, offset, current
                )
                return
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})

    # ------------------------------------------------------------------ one message

    def _process(self, consumer: Any, record: Any) -> bool:
        """Handle one record. Returns False only when abandoned at shutdown."""
        metrics.MESSAGES_CONSUMED.labels(topic=self.topic).inc()
        parent = header(record.headers, TRACEPARENT)
        try:
            env: Envelope[P] = parse_envelope(record.value, self.payload_type)
        except Exception as parse_exc:  # any undecodable input (None, bytes, bad JSON) is dead-lettered
            from_header = parse_traceparent(parent)
            with bind(worker=self.name, step=self.step, trace_id=from_header[0] if from_header else None):
                return self._dead_letter(consumer, record, None, parse_exc, attempts=1)
        payload = env.payload
        with bind(
            worker=self.name,
            step=self.step,
            trace_id=env.trace_id,
            job_id=getattr(payload, "job_id", None),
            campaign_id=getattr(payload, "campaign_id", None),
        ):
            return self._process_envelope(consumer, record, env, parent)

    def _traced(self, env: Envelope[P], parent: bytes | None) -> None:
        """One handler call, in the step's span and timed (runs in the handler thread)."""
        job_id = getattr(env.payload, "job_id", None)
        attributes = {
            "messaging.system": "kafka",
            "messaging.destination.name": self.topic,
            "messaging.message.id": str(env.id),
            "greetflow.job_id": str(job_id) if job_id is not None else None,
            "greetflow.worker": self.name,
        }
        started = time.perf_counter()
        try:
            with step_span(self.step, trace_id=env.trace_id, parent=parent, attributes=attributes):
                self.handler(env)
        finally:
            metrics.HANDLER_SECONDS.labels(step=self.step).observe(time.perf_counter() - started)

    def _process_envelope(self, consumer: Any, record: Any, env: Envelope[P], parent: bytes | None) -> bool:
        started = time.perf_counter()
        attempts = 0

        def attempt() -> None:
            nonlocal attempts
            attempts += 1
            self._outage_retry(
                consumer,
                lambda: self._call_polling(consumer, self._traced, env, parent),
                what=f"handling {env.id}",
            )

        def retry_message(exc: BaseException) -> bool:
            return not isinstance(exc, _Abandoned | WorkerOutage) and not is_permanent(exc)

        def before_sleep(state: RetryCallState) -> None:
            self.stats.retried += 1
            metrics.MESSAGES_RETRIED.labels(topic=self.topic).inc()
            failure = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s: attempt %d for %s failed (%s: %s); retrying in %.1fs",
                self.name,
                state.attempt_number,
                env.id,
                type(failure).__name__,
                failure,
                state.upcoming_sleep,
            )

        try:
            Retrying(
                stop=stop_after_attempt(self.settings.handler_max_attempts),
                wait=wait_exponential(
                    multiplier=self.settings.handler_retry_backoff_s, max=self.settings.retry_backoff_max_s
                ),
                retry=retry_if_exception(retry_message),
                sleep=self._sleep_polling(consumer),
                before_sleep=before_sleep,
                reraise=True,
            )(attempt)
        except _Abandoned:
            log.warning("%s: abandoning %s at shutdown (it will be redelivered)", self.name, env.id)
            return False
        except WorkerOutage:
            raise
        except Exception as failure:
            return self._dead_letter(consumer, record, env, failure, attempts=attempts)
        self.stats.processed += 1
        metrics.MESSAGES_SUCCEEDED.labels(topic=self.topic).inc()
        log.info(
            "%s: handled %s %s[%s]@%s in %.2fs",
            self.name, env.type, record.topic, record.partition, record.offset, time.perf_counter() - started,
        )  # fmt: skip
        return True

    # ------------------------------------------------------------------ waiting in the group

    def _hold(self, consumer: Any, done: Callable[[], bool], *, grace_s: float) -> bool:
        """Poll with the assigned partitions paused until done(), so the consumer stays in its
        group. False when stop() was called and grace_s passed first."""
        deadline: float | None = None
        while not done():
            if self._stop.is_set() and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() >= deadline:
                return False
            assigned = consumer.assignment()
            if assigned:
                consumer.pause(*assigned)
            stray = consumer.poll(timeout_ms=200)
            self.last_poll = time.monotonic()
            for tp, records in stray.items():
                # A rebalance during the wait can hand us unpaused partitions; put back.
                consumer.seek(tp, records[0].offset)
        paused = consumer.paused() & consumer.assignment()
        if paused:
            consumer.resume(*paused)
        return True

    def _call_polling(self, consumer: Any, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call (handler, DLQ write, spill) in the handler thread while polling;
        it sees this thread's contextvars (the log context of the message)."""
        future = self._executor.submit(contextvars.copy_context().run, fn, *args)
        if not self._hold(consumer, future.done, grace_s=self.shutdown_grace_s):
            raise _Abandoned
        return future.result()

    def _sleep_polling(self, consumer: Any) -> Callable[[float], None]:
        def sleep(seconds: float) -> None:
            end = time.monotonic() + seconds
            if not self._hold(consumer, lambda: time.monotonic() >= end, grace_s=0.0):
                raise _Abandoned

        return sleep

    def _outage_retry(
        self,
        consumer: Any,
        fn: Callable[[], T],
        *,
        what: str,
        retry_on: Callable[[BaseException], bool] = is_outage,
    ) -> T:
        """Call fn until it stops failing with an outage (or retry_on), backing off while
        polling; unhealthy meanwhile. Past outage_max_wait_s: WorkerOutage."""
        limit = self.settings.outage_max_wait_s

        def retry(exc: BaseException) -> bool:
            return not isinstance(exc, _Abandoned | WorkerOutage) and retry_on(exc)

        def before_sleep(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome else None
            if self.healthy.is_set():
                log.error(
                    "%s: outage while %s (%s: %s); waiting up to %.0fs",
                    self.name,
                    what,
                    type(failure).__name__,
                    failure,
                    limit,
                )
            self.healthy.clear()
            self.stats.outage_retries += 1

        try:
            result = Retrying(
                stop=stop_after_delay(limit),
                wait=self._outage_backoff(),
                retry=retry_if_exception(retry),
                sleep=self._sleep_polling(consumer),
                before_sleep=before_sleep,
                reraise=True,
            )(fn)
        except Exception as exc:
            if retry(exc):
                raise WorkerOutage(
                    f"{self.name}: {what} still failing after {limit:.0f}s: {type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(exc, _Abandoned | WorkerOutage):
                self._recovered()
            raise
        self._recovered()
        return result

    def _outage_backoff(self) -> wait_exponential:
        return wait_exponential(
            multiplier=self.settings.outage_backoff_initial_s, max=self.settings.retry_backoff_max_s
        )

    def _recovered(self) -> None:
        if not self.healthy.is_set():
            log.warning("%s: services answer again; carrying on", self.name)
            self.healthy.set()

    # ------------------------------------------------------------------ dead letters

    def _dead_letter(
        self, consumer: Any, record: Any, env: Envelope[P] | None, exc: BaseException, *, attempts: int
    ) -> bool:
        err = f"{type(exc).__name__}: {exc}"
        log.error(
            "%s: dead-lettering %s[%s]@%s: %s", self.name, record.topic, record.partition, record.offset, err
        )
        headers: Headers = [
            ("error", err[:4000].encode()),
            ("error_class", type(exc).__name__.encode()),
            ("error_trace", "".join(traceback.format_exception(exc))[-4000:].encode()),
            ("source_topic", record.topic.encode()),
            ("source_partition", str(record.partition).encode()),
            ("source_offset", str(record.offset).encode()),
            ("worker", self.name.encode()),
            ("attempts", str(attempts).encode()),
            ("failed_at", datetime.now(UTC).isoformat().encode()),
            *_identity(record.value, env),
        ]
        if env is not None:
            headers.extend(headers_for(env.trace_id))
        elif (original := header(record.headers, TRACEPARENT)) is not None:
            headers.append((TRACEPARENT, original))
        # Never lose an accepted message: until the DLQ or the object store took it, the
        # offset is not committed (any failure of the spill counts as an outage).
        try:
            self._outage_retry(
                consumer,
                lambda: self._write_dead_letter(consumer, record, headers, err),
                what=f"dead-lettering {record.topic}[{record.partition}]@{record.offset}",
                retry_on=lambda _exc: True,
            )
        except _Abandoned:
            return False
        self.stats.dead_lettered += 1
        metrics.MESSAGES_DEAD_LETTERED.labels(topic=self.topic).inc()
        if self.on_dead_letter is not None:
            try:
                self.on_dead_letter(env, exc)
            except Exception as hook_exc:
                if is_outage(hook_exc):
                    # The DLQ record carries the job id: a sweeper fails the job later.
                    log.error("%s: on_dead_letter hook hit an outage (%s); carrying on", self.name, hook_exc)
                else:
                    log.exception("%s: on_dead_letter hook failed", self.name)
        return True

    def _write_dead_letter(self, consumer: Any, record: Any, headers: Headers, err: str) -> None:
        value: bytes = record.value or b""
        topic = dlq(self.topic)
        size = record_size(record.key, value, headers)
        if size > self.bus.max_request_bytes:
            reason = f"{size} bytes exceed kafka_max_request_bytes={self.bus.max_request_bytes}"
        else:
            try:
                Retrying(
                    stop=stop_after_attempt(self.settings.dlq_send_max_attempts)
                    | stop_after_delay(self.settings.dlq_send_max_wait_s),
                    wait=self._outage_backoff(),
                    retry=retry_if_exception(lambda e: not isinstance(e, _Abandoned) and not is_too_large(e)),
                    sleep=self._sleep_polling(consumer),
                    reraise=True,
                )(
                    lambda: self._call_polling(
                        consumer, lambda: self.bus.send_raw(topic, value, key=record.key, headers=headers)
                    )
                )
                return
            except _Abandoned:
                raise
            except Exception as send_exc:
                reason = f"the DLQ write failed: {type(send_exc).__name__}: {send_exc}"
        self._spill(consumer, record, headers, err, reason)

    def _spill(self, consumer: Any, record: Any, headers: Headers, err: str, reason: str) -> None:
        value: bytes = record.value or b""
        topic = dlq(self.topic)
        if self.spill is None:
            # No object store to keep the body: the DLQ gets the headers, and the body stays
            # readable at its source offset for the topic's retention.
            log.error(
                "%s: %s and no object store is configured; the DLQ gets the headers only", self.name, reason
            )
            body = json.dumps({"body_omitted": len(value), "reason": reason}).encode()
            self._call_polling(
                consumer, lambda: self.bus.send_raw(topic, body, key=record.key, headers=headers)
            )
            return
        store = self.spill
        bucket = self.settings.dead_letter_bucket or self.settings.bucket_staging
        base = f"{self.settings.dead_letter_prefix}/{record.topic}/{record.partition}-{record.offset}"
        url = f"s3://{bucket}/{base}.bin"
        sidecar = {
            "source_topic": record.topic,
            "source_partition": record.partition,
            "source_offset": record.offset,
            "key": record.key.decode(errors="replace") if record.key is not None else None,
            "size": len(value),
            "error": err,
            "spill_reason": reason,
            "headers": {k: v.decode(errors="replace") for k, v in headers},
        }

        def store_both() -> None:
            store.put_bytes(bucket, f"{base}.bin", value, content_type="application/octet-stream")
            store.put_bytes(
                bucket, f"{base}.json", json.dumps(sidecar).encode(), content_type="application/json"
            )

        self._call_polling(consumer, store_both)
        self.stats.spilled += 1
        log.error("%s: %s; stored the message at %s", self.name, reason, url)
        pointer = json.dumps({"spilled_to": url, "sidecar": f"s3://{bucket}/{base}.json", "size": len(value)})
        try:
            self._call_polling(
                consumer,
                lambda: self.bus.send_raw(
                    topic, pointer.encode(), key=record.key, headers=[*headers, ("spilled_to", url.encode())]
                ),
            )
        except _Abandoned:
            raise
        except Exception as exc:
            # The message is safe in the object store; the pointer is a convenience.
            log.error("%s: pointer to %s not written to %s (%s)", self.name, url, topic, exc)


# --------------------------------------------------------------------------- admin

_TOPIC_ALREADY_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


def admin_client(bootstrap: str, client_id: str, timeout_s: float, settings: Settings | None = None) -> Any:
    """A KafkaAdminClient that gives up connecting and answering after about `timeout_s`;
    with `settings`, connected as they say (SASL / TLS); without, PLAINTEXT (the embedded stack)."""
    from kafka import KafkaAdminClient

    timeout_ms = max(int(timeout_s * 1000), 500)
    security = kafka_client_config(settings) if settings is not None else {}
    return KafkaAdminClient(
        **security,
        bootstrap_servers=bootstrap,
        client_id=client_id,
        request_timeout_ms=max(timeout_ms, 1000),
        bootstrap_timeout_ms=timeout_ms,
    )


def ensure_topics(
    settings: Settings,
    *,
    bootstrap: str | None = None,
    topics: Iterable[str] | None = None,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create every topic that is missing (idempotent): by default every pipeline topic and
    its `.dlq` twin, on `settings.kafka_bootstrap`. Returns the names created.

    Main topics get `settings.topic_partitions` partitions, `.dlq` topics
    `settings.dlq_topic_partitions`; replication factor `settings.topic_replication_factor`.
    """
    from kafka.errors import for_code

    from pipeline.topics import ALL_TOPICS

    wanted = tuple(ALL_TOPICS if topics is None else topics)
    admin = admin_client(bootstrap or settings.kafka_bootstrap, settings.kafka_client_id, timeout_s, settings)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if not missing:
            return []
        request = {
            t: {
                "num_partitions": (
                    settings.dlq_topic_partitions if t.endswith(".dlq") else settings.topic_partitions
                ),
                "replication_factor": settings.topic_replication_factor,
            }
            for t in missing
        }
        response = admin.create_topics(request, timeout_ms=int(timeout_s * 1000), raise_errors=False)
        created: list[str] = []
        failures: list[str] = []
        for item in response.get("topics", []):
            code = int(item.get("error_code", 0))
            name = str(item.get("name"))
            if code == 0:
                created.append(name)
            elif code != _TOPIC_ALREADY_EXISTS:
                err = for_code(code)
                failures.append(f"{name}: {err.__name__} {item.get('error_message') or ''}")
        if failures:
            raise BusError("could not create topics: " + "; ".join(failures))
        return created
    finally:
        admin.close()


@dataclass(frozen=True)
class GroupLag:
    """A consumer group's backlog on one topic, sampled twice `sample_s` apart."""

    group_id: str
    topic: str
    lag: dict[int, int]  # partition -> log end minus the committed offset, at the second sample
    progressed: dict[int, bool]  # partition -> its committed offset moved between the samples
    sample_s: float

    @property
    def total(self) -> int:
        return sum(self.lag.values())

    @property
    def stalled(self) -> list[int]:
        """Partitions with a backlog whose committed offset did not move: a stuck member
        (or none running)."""
        return sorted(p for p, n in self.lag.items() if n > 0 and not self.progressed.get(p, False))

    def render(self) -> str:
        head = f"group {self.group_id} on {self.topic}: lag {self.total}"
        if not self.stalled:
            return head + (" (draining)" if self.total else "")
        where = ", ".join(f"[{p}] {self.lag[p]}" for p in self.stalled)
        return (
            f"{head}, NO PROGRESS in {self.sample_s:g} s on {where}: no worker running, or the "
            "group is stuck (restart its workers)"
        )


def group_lag(
    settings: Settings,
    groups: Iterable[tuple[str, str]],
    *,
    sample_s: float = 2.0,
    bootstrap: str | None = None,
) -> list[GroupLag]:
    """Backlog and progress of each (group id, topic), read with the committed-offset and
    log-end APIs of a consumer that never joins the group (so probing never rebalances it)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError
    from kafka.structs import TopicPartition

    pairs = list(groups)
    readers: dict[str, Any] = {}
    try:
        first: dict[tuple[str, int], int] = {}
        parts: dict[str, list[Any]] = {}
        for group_id, topic in pairs:
            reader = readers[group_id] = KafkaConsumer(
                **kafka_client_config(settings),
                bootstrap_servers=bootstrap or settings.kafka_bootstrap,
                client_id=f"{settings.kafka_client_id}-lag-probe",
                group_id=group_id,
                enable_auto_commit=False,
                request_timeout_ms=10_000,
            )
            ids = reader.partitions_for_topic(topic) or set()
            parts[group_id] = [TopicPartition(topic, p) for p in sorted(ids)]
            for tp in parts[group_id]:
                first[(group_id, tp.partition)] = reader.committed(tp) or 0
        time.sleep(sample_s)
        out = []
        for group_id, topic in pairs:
            reader = readers[group_id]
            ends = reader.end_offsets(parts[group_id])
            lag: dict[int, int] = {}
            moved: dict[int, bool] = {}
            for tp in parts[group_id]:
                committed = reader.committed(tp) or 0
                lag[tp.partition] = max(0, ends[tp] - committed)
                moved[tp.partition] = committed != first[(group_id, tp.partition)]
            out.append(GroupLag(group_id, topic, lag, moved, sample_s))
        return out
    except KafkaError as exc:
        raise BusError(f"cannot read consumer group offsets at {settings.kafka_bootstrap}: {exc}") from exc
    finally:
        for reader in readers.values():
            reader.close(autocommit=False)
