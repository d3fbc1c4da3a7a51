"""The fault-injection harness: a private real stack (DevStack: Tansu + moto), SQLite or a
throwaway PostgreSQL schema (optionally behind a TcpProxy), real worker processes, and the
counting helpers. The reusable part (worker processes, counting, waiting) lives in
`pipeline.bench_faults`, which `greetflow bench faults` runs without tests/."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from pipeline.adapters.db import normalize_url
from pipeline.adapters.storage import sha256_file
from pipeline.bench_faults import (
    Outcome,
    WorkerProcs,
    count_outcome,
    fault_settings,
    lean_brief,
    read_topic,
    stack_running,
    start_pipeline,
    sweeper_role,
    wait_events,
    wait_final,
    wait_holding,
)
from pipeline.bootstrap import Container
from pipeline.dev.stack import DevStack
from pipeline.keys import captions_key, clip_key
from pipeline.repositories import ConsentRecord
from pipeline.settings import Settings
from pipeline.topics import MODERATION_DECISIONS, TOPICS, dlq
from schemas.brief import SubjectUse
from schemas.common import Scope, job_id_for
from schemas.events import Decision, ModerationDecided, RenderRequested
from schemas.jobs import JobState
from tests.faults.proxy import TcpProxy
from tests.integration.db_fixtures import TEST_JOB_ID_KEY, postgres_database, postgres_url, render_request

__all__ = [
    "FaultEnv",
    "Outcome",
    "WorkerProcs",
    "approved_job",
    "assert_exactly_once",
    "count_outcome",
    "dlq_records",
    "fault_env",
    "grant_consent",
    "lean_brief",
    "png_bomb",
    "produce_raw",
    "read_topic",
    "require_sweeper",
    "signal_component",
    "start_pipeline",
    "wait_events",
    "wait_final",
    "wait_group_caught_up",
    "wait_holding",
]


@dataclass
class FaultEnv:
    settings: Settings  # what the worker processes get (their database URL may be the proxy)
    container: Container  # the test's own view: the same stack, the database directly
    stack: DevStack
    procs: WorkerProcs
    proxy: TcpProxy | None
    tmp: Path

    def submit(self, n: int) -> tuple[str, list[uuid.UUID]]:
        brief = lean_brief(n)
        result = self.container.campaigns().submit(brief)
        return brief.campaign_id, list(result.job_ids)

    def finish(self, job_ids: list[uuid.UUID], *, timeout_s: float, stall_s: float = 120.0) -> Outcome:
        """Wait until every job is final (bounded; fails naming the states), then count."""
        wait_final(self.container, job_ids, timeout_s=timeout_s, procs=self.procs, stall_s=stall_s)
        wait_events(self.container, job_ids, timeout_s=30)
        self.procs.check_alive()
        outcome = count_outcome(self.container, "", job_ids)
        print(f"outcome: {outcome.summary()}")
        return outcome


@contextmanager
def fault_env(
    tmp_path: Path,
    *,
    backend: str = "sqlite",
    proxy: bool = False,
    extra_env: dict[str, str] | None = None,
    **overrides: Any,
) -> Iterator[FaultEnv]:
    """Everything a case needs; fails (never skips) when a service is missing."""
    with ExitStack() as es:
        direct_url = ""
        worker_url = ""
        tcp_proxy: TcpProxy | None = None
        if backend == "postgresql":
            database = es.enter_context(postgres_database())  # fails when PostgreSQL is down
            base = make_url(normalize_url(postgres_url()))
            pinned = base.update_query_dict({"options": f"-csearch_path={database.schema}"})
            direct_url = pinned.render_as_string(hide_password=False)
            worker_url = direct_url
            if proxy:
                tcp_proxy = es.enter_context(TcpProxy(base.host or "127.0.0.1", base.port or 5432))
                worker_url = pinned.set(host="127.0.0.1", port=tcp_proxy.port).render_as_string(
                    hide_password=False
                )
        elif backend != "sqlite":
            raise ValueError(backend)
        settings = fault_settings(tmp_path / "data", worker_url, **overrides)
        stack = es.enter_context(stack_running(settings))
        container = Container(settings.model_copy(update={"database_url": direct_url}))
        es.callback(container.close)
        _ = container.db  # migrated before the workers start
        procs = es.enter_context(WorkerProcs(settings, tmp_path / "logs", extra_env=extra_env))
        yield FaultEnv(settings, container, stack, procs, tcp_proxy, tmp_path)


def require_sweeper() -> None:
    assert sweeper_role() is not None, (
        "this build has no sweeper (`greetflow worker sweep`): a job whose worker died stays stuck"
    )


def assert_exactly_once(outcome: Outcome, job_ids: list[uuid.UUID]) -> None:
    """Every job published; one distribution object and one clips.published event (by
    envelope id) per job. Raw duplicate records are reported, not failed on."""
    assert outcome.states == {JobState.PUBLISHED.value: len(job_ids)}, (
        f"not every job is published: {dict(outcome.states)}; reasons: "
        f"{dict(list(outcome.reasons.items())[:5])}"
    )
    extra = {str(j): n for j, n in outcome.objects.items() if n != 1}
    missing = [str(j) for j in job_ids if outcome.objects.get(j, 0) == 0]
    assert not extra and not missing, f"objects per job: extra {extra}, missing {missing}"
    ids_per_job = {j: set(outcome.events.get(j, [])) for j in job_ids}
    bad = {str(j): sorted(ids) for j, ids in ids_per_job.items() if len(ids) != 1}
    assert not bad, f"clips.published envelope ids per job should be exactly one: {bad}"
    print(
        f"clips.published: {sum(len(v) for v in outcome.events.values())} records for {len(job_ids)} "
        f"jobs ({outcome.raw_event_duplicates} raw duplicates, all with the first id)"
    )


def dlq_records(settings: Settings) -> dict[str, int]:
    """Records on every `<topic>.dlq` (only the non-empty ones)."""
    out = {}
    for t in TOPICS:
        n = len(read_topic(settings, dlq(t)))
        if n:
            out[dlq(t)] = n
    return out


def signal_component(stack: DevStack, name: str, sig: signal.Signals) -> None:
    """SIGSTOP / SIGCONT a child of the dev stack (broker or s3) and its process group."""
    pid = stack.pids[name]
    try:
        os.killpg(pid, sig)
    except OSError:
        os.kill(pid, sig)


def produce_raw(
    settings: Settings, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]] | None = None
) -> None:
    """One record as it is (large ones too: max_request_size 8 MiB on this producer)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, max_request_size=8 * 1024 * 1024)
    try:
        producer.send(topic, value=value, key=key, headers=headers or []).get(timeout=30)
    finally:
        producer.close(timeout=5)


def wait_group_caught_up(settings: Settings, group: str, topic: str, *, timeout_s: float) -> None:
    """Wait (bounded) until `group` has committed the end offset of every partition of `topic`."""
    from kafka import KafkaConsumer, TopicPartition

    # A consumer with the group's id that never subscribes: it only fetches the commits.
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        deadline = time.monotonic() + timeout_s
        while True:
            ends = consumer.end_offsets(tps)
            lag = {}
            for tp in tps:
                done = consumer.committed(tp) or 0
                if ends[tp] > done:
                    lag[tp.partition] = ends[tp] - done
            if not lag:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"group {group} has not caught up on {topic}: lag {lag}")
            time.sleep(1.0)
    finally:
        consumer.close()


# --------------------------------------------------------------------------- consent, clips


def grant_consent(c: Container, subject: str, campaign_id: str) -> ConsentRecord:
    now = datetime.now(UTC)
    rec = ConsentRecord(
        subject_id=subject,
        action="grant",
        scopes=frozenset({Scope.FACE}),
        purpose=f"campaign:{campaign_id}",
        recorded_by="test",
        granted_at=now - timedelta(days=1),
        expires_at=now + timedelta(days=30),
        evidence_sha256="e" * 64,
        challenge_code="ABC234",
    )
    c.consents.append(rec)
    return rec


def approved_job(c: Container, tmp: Path, campaign_id: str, recipient: str, subject: str) -> RenderRequested:
    """A job moderated and approved (its clip in staging), and its decision on the topic for
    the publisher."""
    from tests.clips import frame, still_clip

    req = render_request(
        campaign_id, recipient, subjects=(SubjectUse(subject_id=subject, scopes=frozenset({Scope.FACE})),)
    )
    assert req.job_id == job_id_for(TEST_JOB_ID_KEY, campaign_id, recipient, "lunar-new-year", "1")
    c.jobs.create_if_absent(req)
    video = still_clip(tmp / f"{recipient}.mp4", frame(), 2.5)
    key = clip_key(campaign_id, recipient, req.job_id)
    c.store.put_file(
        c.settings.bucket_staging,
        key,
        video,
        content_type="video/mp4",
        metadata={"sha256": sha256_file(video)},
    )
    c.store.put_bytes(
        c.settings.bucket_staging,
        captions_key(campaign_id, recipient, req.job_id),
        f"WEBVTT\n\n1\n00:00:00.000 --> 00:00:02.000\n{recipient}\n".encode(),
        content_type="text/vtt; charset=utf-8",
    )
    prev = JobState.REQUESTED
    for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING, JobState.APPROVED):
        extra = {"staging_key": key} if st == JobState.RENDERED else {}
        assert c.jobs.transition(req.job_id, to_state=st, expected=prev, **extra)  # type: ignore[arg-type]
        prev = st
    c.bus.publish(
        MODERATION_DECISIONS,
        ModerationDecided(job_id=req.job_id, campaign_id=campaign_id, decision=Decision.APPROVED),
        key=str(req.job_id),
    )
    return req


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A PNG of a few KB that declares width x height pixels (1-bit grey; a few rows of
    data only: the header is what a decoder sizes its buffer from)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def json_size(value: Any) -> int:
    return len(json.dumps(value).encode())
