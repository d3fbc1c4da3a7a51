"""`greetflow bench scale --recipients N`: the fan-out of an N-recipient campaign.

One run, on a private embedded stack (Tansu broker + moto S3 server on free ports) and the
job store given (`--database-url`, a PostgreSQL database: the run works in a fresh schema
of it, dropped afterwards; default: a SQLite file in a temporary folder):

1. writes an N-recipient audience (CSV, Parquet, or a table of a SQLite audience database
   for `sql`): names in four locales drawn Zipf-like (s = 1.1) from 5,000 names;
2. runs the real intake, `greetflow submit BRIEF`, as a child process spawned from a small
   launcher, so its peak RSS (wait4's ru_maxrss) is its own: `intake_jobs_per_s` comes
   from the intake's own summary log line (process start-up aside), `peak_rss_mb` and
   `intake_process_s` from the process;
3. runs it again: `rerun_created` (must be 0), `rerun_requested`, `rerun_s`;
4. writes the campaign report (`pipeline.reports.write_campaign_report`) in another child:
   `report_s`, `report_peak_rss_mb`;
5. measures the two floors of the same rows and messages in the same run:
   `copy_floor_jobs_per_s`, a bare COPY (psycopg `cursor.copy`) of the job rows and their
   first event rows into fresh tables of the same shape (SQLite: a bare executemany, and
   `floor_kind` says so); `produce_floor_msgs_per_s`, a bare kafka-python producer with
   the bus's settings sending the same serialized envelopes to a fresh topic. Only the
   COPY / send calls are timed, never the building of the rows.

`intake_vs_slower_floor` = intake rate / the slower floor. Progress goes to `say`.

A dev tool: it needs the `dev` extra (it imports `pipeline.dev`).
"""

from __future__ import annotations

import csv
import json
import os
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import accumulate
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from pipeline.adapters.db import Database, normalize_url
from pipeline.adapters.kafka import EventBus, compression_for, ensure_topics, kafka_client_config
from pipeline.adapters.storage import ObjectStore
from pipeline.bench_faults import free_port, worker_env
from pipeline.campaigns import RequestFactory, parse_brief
from pipeline.dev.stack import DevStack
from pipeline.errors import GreetflowError
from pipeline.repositories import JobRepository, NewJob
from pipeline.settings import Settings, get_settings
from pipeline.topics import RENDER_REQUESTS
from pipeline.trust import JobIds, ProducerKeys
from schemas.brief import Recipient
from schemas.events import RenderRequested
from schemas.jobs import JobState

__all__ = ["BenchError", "bench_audience", "run_scale_bench"]

Say = Callable[[str], None]

FORMATS = ("csv", "parquet", "sql")
TEMPLATE = {"name": "lunar-new-year", "version": "1"}
NAME_COUNT = 5_000
ZIPF_S = 1.1

# Runs argv[2:] and writes its exit code and rusage to argv[1]. A child's ru_maxrss counts
# the memory of the process it was spawned from (Linux records the pre-exec address space
# at exec); spawned from this small launcher instead, the command's peak is its own.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime,
               "max_rss_kb": usage.ru_maxrss}, f)
"""
_CLI_MAIN = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


class BenchError(GreetflowError):
    """The bench could not run (a child failed, a service is missing); one line."""


# --------------------------------------------------------------------------- audience

_SURNAMES = {
    "zh-Hant-HK": "陳黃李張何林梁吳劉鄭謝蔡郭楊曾",
    "zh-Hans-CN": "王李张刘陈杨赵黄周吴徐孙胡朱高",
    "en": ["Wong", "Chan", "Smith", "Lee", "Brown", "Taylor", "Carter", "Nguyen", "Patel", "Garcia",
           "Kim", "Lopez", "Martin", "Clark", "Lewis", "Walker", "Young", "King", "Wright", "Scott",
           "Green", "Baker", "Adams", "Nelson", "Hill", "Ramos", "Cooper", "Reed", "Cook", "Bell"],
    "ja": ["佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "山本", "中村", "小林", "加藤"],
}  # fmt: skip
_GIVEN = {
    "zh-Hant-HK": "文玲欣明儀豪詩傑敏健美德華偉芬強麗榮輝珊",
    "zh-Hans-CN": "伟芳娜敏静明洋磊婷军杰涛燕超霞刚平辉鹏丽",
    "en": ["Alice", "Ben", "Chloe", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
           "Kate", "Leo", "Mia", "Noah", "Olivia", "Paul", "Quinn", "Ruby", "Sam", "Tina",
           "Uma", "Victor", "Wendy", "Xavier", "Yuki", "Zoe", "Amy", "Brian", "Cindy", "Dan"],
    "ja": ["花子", "太郎", "結衣", "翔", "美咲", "蓮", "陽菜", "大翔", "優", "悠真"],
}  # fmt: skip


def _names_of(locale: str) -> list[str]:
    family, given = _SURNAMES[locale], _GIVEN[locale]
    if locale == "en":
        return [f"{g} {f}" for f in family for g in given]
    if locale == "ja":
        return [f"{f}{g}" for f in family for g in given]
    singles = [f"{f}{g}" for f in family for g in given]
    doubles = [f"{f}{g}{h}" for f in family for g in given for h in given if g != h]
    return singles + doubles


def bench_names(count: int = NAME_COUNT) -> list[tuple[str, str]]:
    """`count` distinct (name, locale) pairs of four locales (family and given names), in a
    fixed shuffled order: the bench's Zipf weights go by this order."""
    pools = {loc: _names_of(loc) for loc in _SURNAMES}
    share = {"zh-Hant-HK": 0.41, "zh-Hans-CN": 0.41, "en": 0.16, "ja": 0.02}
    out: list[tuple[str, str]] = []
    for loc, names in pools.items():
        take = min(len(names), max(1, round(count * share[loc])))
        out.extend((name, loc) for name in names[:take])
    rng = random.Random(7)
    rng.shuffle(out)
    if len(out) < count:
        raise BenchError(f"only {len(out)} distinct bench names; asked for {count}")
    return out[:count]


def bench_audience(n: int, *, seed: int = 15) -> Iterator[tuple[str, str, str]]:
    """(id, name, locale) of n recipients, the names drawn from `bench_names()` with
    Zipf weights (s = 1.1): the same seed gives the same audience."""
    names = bench_names()
    cum = list(accumulate(1.0 / (k**ZIPF_S) for k in range(1, len(names) + 1)))
    rng = random.Random(seed)
    step = 10_000
    for start in range(0, n, step):
        picks = rng.choices(names, cum_weights=cum, k=min(step, n - start))
        for i, (name, loc) in enumerate(picks, start=start):
            yield f"r-{i:08d}", name, loc


def _write_audience(fmt: str, n: int, folder: Path) -> Path:
    if fmt == "csv":
        path = folder / "audience.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(("id", "name", "locale"))
            w.writerows(bench_audience(n))
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "audience.parquet"
        schema = pa.schema([("id", pa.string()), ("name", pa.string()), ("locale", pa.string())])
        with pq.ParquetWriter(path, schema) as writer:
            batch: list[tuple[str, str, str]] = []
            for row in bench_audience(n):
                batch.append(row)
                if len(batch) >= 50_000:
                    writer.write_table(
                        pa.Table.from_pylist(
                            [dict(zip(("id", "name", "locale"), r, strict=True)) for r in batch], schema
                        )
                    )
                    batch = []
            if batch:
                writer.write_table(
                    pa.Table.from_pylist(
                        [dict(zip(("id", "name", "locale"), r, strict=True)) for r in batch], schema
                    )
                )
        return path
    path = folder / "crm.db"
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT NOT NULL, locale TEXT)")
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", bench_audience(n))
        conn.commit()
    finally:
        conn.close()
    return path


# --------------------------------------------------------------------------- children


@dataclass(frozen=True)
class ChildRun:
    rc: int
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    stdout: str
    stderr: str


def _run_child(argv: list[str], env: dict[str, str], folder: Path, name: str) -> ChildRun:
    usage, out, err = folder / f"{name}.usage.json", folder / f"{name}.out", folder / f"{name}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(usage), *argv],
            stdout=fo,
            stderr=fe,
            env=env,
            cwd=folder,
            check=True,
        )
        wall = time.monotonic() - t0
    data = json.loads(usage.read_text())
    return ChildRun(
        rc=int(data["rc"]),
        wall_s=wall,
        cpu_s=float(data["cpu_s"]),
        max_rss_mb=data["max_rss_kb"] / 1024,
        stdout=out.read_text("utf-8", errors="replace"),
        stderr=err.read_text("utf-8", errors="replace"),
    )


def _intake_line(stderr: str, campaign_id: str) -> dict[str, Any]:
    """The intake's summary (the `intake` extra of its JSON log line)."""
    for line in reversed(stderr.splitlines()):
        if '"intake"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        intake = record.get("intake")
        if isinstance(intake, dict) and intake.get("campaign_id") == campaign_id:
            return intake
    tail = " | ".join(stderr.strip().splitlines()[-3:])[-600:]
    raise BenchError(f"the intake printed no summary line: {tail or 'no output'}")


def _submit(
    env: dict[str, str], brief: Path, folder: Path, name: str, campaign_id: str
) -> tuple[ChildRun, dict[str, Any]]:
    run = _run_child([sys.executable, "-c", _CLI_MAIN, "submit", str(brief)], env, folder, name)
    if run.rc != 0:
        tail = " | ".join(run.stderr.strip().splitlines()[-3:])[-600:]
        raise BenchError(f"`greetflow submit` exited {run.rc}: {tail}")
    return run, _intake_line(run.stderr, campaign_id)


def report_main(campaign_id: str, expected: int) -> None:
    """The report child: write the campaign's report from this process's settings and print
    its timing as one JSON line."""
    from pipeline.reports import write_campaign_report

    settings = get_settings()
    db = Database(settings.resolved_database_url)
    try:
        t0 = time.perf_counter()
        written = write_campaign_report(
            JobRepository(db),
            ObjectStore(settings),
            settings.bucket_reports,
            campaign_id,
            run_key="bench",
            title="bench scale",
            expected=expected,
        )
        elapsed = time.perf_counter() - t0
    finally:
        db.dispose()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"report_s": round(elapsed, 3), "json_key": written.json_key, "rss_mb": round(peak, 1)}))


# --------------------------------------------------------------------------- floors


def _floor_rows(
    brief_data: dict[str, Any], n: int, chunk: int, job_ids: JobIds
) -> Iterator[tuple[list[NewJob], list[dict[str, Any]]]]:
    """The intake's rows and payloads of the bench audience, chunk by chunk."""
    brief = parse_brief(brief_data, source="bench brief")
    factory = RequestFactory(brief, job_ids)
    batch: list[Recipient] = []
    for rid, name, loc in bench_audience(n):
        batch.append(Recipient(id=rid, name=name, locale=loc))
        if len(batch) >= chunk:
            yield factory.build(batch)
            batch = []
    if batch:
        yield factory.build(batch)


_FLOOR_JOB_COLUMNS = (
    "job_id, campaign_id, recipient_id, template_name, template_version, locale, state, "
    "request_json, attempts, sweeps, sweeps_total, created_at, updated_at, owner"
)


def _floor_row(j: NewJob, now: Any) -> tuple[Any, ...]:
    request = json.dumps(j.request_json, ensure_ascii=False, separators=(",", ":"))
    return (
        j.job_id, j.campaign_id, j.recipient_id, j.template_name, j.template_version, j.locale,
        "requested", request, 0, 0, 0, now, now, None,
    )  # fmt: skip


def _copy_floor(
    db: Database, chunks: Iterator[tuple[list[NewJob], list[dict[str, Any]]]]
) -> tuple[float, int, str]:
    """Seconds spent in a bare COPY (PostgreSQL) or executemany (SQLite) of the job rows and
    their first event rows, into fresh tables of the same shape; one transaction a chunk."""
    if db.is_sqlite:
        return (*_sqlite_floor(db, chunks), "executemany")
    return (*_postgres_floor(db, chunks), "copy")


def _sqlite_floor(
    db: Database, chunks: Iterator[tuple[list[NewJob], list[dict[str, Any]]]]
) -> tuple[float, int]:
    spent, count = 0.0, 0
    with db.engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        for (sql,) in raw.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name IN ('jobs', 'job_events') AND sql IS NOT NULL "
            "ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, tbl_name DESC"
        ).fetchall():
            raw.execute(sql.replace("job_events", "floor_events").replace("jobs", "floor_jobs"))
    insert_job = f"INSERT INTO floor_jobs ({_FLOOR_JOB_COLUMNS}) VALUES ({','.join('?' * 14)})"
    insert_event = (
        "INSERT INTO floor_events (job_id, from_state, to_state, reason, actor, at) VALUES (?, ?, ?, ?, ?, ?)"
    )
    for rows, _ in chunks:
        at = datetime.now(UTC).replace(tzinfo=None).isoformat(sep=" ")
        params = [_floor_row(j, at) for j in rows]
        events = [(j.job_id, None, "requested", None, "intake", at) for j in rows]
        t0 = time.perf_counter()
        with db.engine.begin() as conn:
            raw = conn.connection.driver_connection
            raw.executemany(insert_job, params)
            raw.executemany(insert_event, events)
        spent += time.perf_counter() - t0
        count += len(rows)
    return spent, count


def _postgres_floor(
    db: Database, chunks: Iterator[tuple[list[NewJob], list[dict[str, Any]]]]
) -> tuple[float, int]:
    spent, count = 0.0, 0
    with db.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE floor_jobs (LIKE jobs INCLUDING ALL)")
        conn.exec_driver_sql("CREATE TABLE floor_events (LIKE job_events INCLUDING ALL)")
        conn.exec_driver_sql(
            "ALTER TABLE floor_events ADD FOREIGN KEY (job_id) REFERENCES floor_jobs (job_id)"
        )
    for rows, _ in chunks:
        now = datetime.now(UTC)
        params = [_floor_row(j, now) for j in rows]
        t0 = time.perf_counter()
        with db.engine.begin() as conn:
            raw: Any = conn.connection.driver_connection
            with raw.cursor() as cur:
                with cur.copy(f"COPY floor_jobs ({_FLOOR_JOB_COLUMNS}) FROM STDIN") as copy:
                    for p in params:
                        copy.write_row(p)
                with cur.copy(
                    "COPY floor_events (job_id, from_state, to_state, reason, actor, at) FROM STDIN"
                ) as copy:
                    for p in params:
                        copy.write_row((p[0], None, "requested", None, "intake", now))
        spent += time.perf_counter() - t0
        count += len(rows)
    return spent, count


def _produce_floor(
    settings: Settings, bus: EventBus, chunks: Iterator[tuple[list[NewJob], list[dict[str, Any]]]]
) -> tuple[float, int]:
    """Seconds a bare kafka-python producer (the bus's settings) spends sending the same
    envelopes to a fresh topic, flushed once per chunk; the encoding is not timed."""
    from kafka import KafkaProducer

    topic = f"bench.floor.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings, topics=[topic])
    producer = KafkaProducer(
        **kafka_client_config(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=settings.kafka_linger_ms,
        batch_size=settings.kafka_batch_bytes,
        compression_type=compression_for(settings.kafka_compression),
        retries=5,
        max_in_flight_requests_per_connection=1,
        max_request_size=settings.kafka_max_request_bytes,
    )
    spent, count = 0.0, 0
    try:
        for rows, payloads in chunks:
            items = [(j.job_id, p) for j, p in zip(rows, payloads, strict=True)]
            headers, records = bus.encode_payloads(
                topic, RenderRequested.event_type, RenderRequested.schema_version, items, trace_id="floor"
            )
            t0 = time.perf_counter()
            for key, value in records:
                producer.send(topic, value=value, key=key, headers=headers)
            producer.flush()
            spent += time.perf_counter() - t0
            count += len(records)
    finally:
        producer.close(timeout=5)
    return spent, count


def _count_messages(settings: Settings, topic: str, *, expect: int, idle_s: float = 3.0) -> int:
    """Records on the topic, counted by reading it from the start (the embedded broker's end
    offsets run short of the records of compressed batches): until `expect` are read and
    nothing more came for `idle_s`."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"bench-count-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 2**20,
        fetch_max_bytes=64 * 2**20,
        **kafka_client_config(settings),
    )
    seen, last = 0, time.monotonic()
    deadline = time.monotonic() + 120 + expect / 5_000
    try:
        while time.monotonic() < deadline:
            got = sum(len(records) for records in consumer.poll(timeout_ms=500, max_records=50_000).values())
            seen += got
            if got:
                last = time.monotonic()
            elif seen >= expect and time.monotonic() - last > idle_s:
                break
    finally:
        consumer.close()
    return seen


# --------------------------------------------------------------------------- the run


@contextmanager
def _job_store(database_url: str | None, folder: Path, say: Say) -> Iterator[tuple[str, Database, str]]:
    """(URL for the child processes, the migrated database, its kind). PostgreSQL: a fresh
    schema of the given database, dropped afterwards."""
    if not database_url:
        url = f"sqlite:///{folder / 'bench.db'}"
        db = Database(url)
        try:
            db.migrate()
            yield url, db, "sqlite"
        finally:
            db.dispose()
        return
    try:
        base = normalize_url(database_url)
    except Exception as exc:
        raise BenchError(f"--database-url is not a usable database URL: {exc}") from None
    if base.get_backend_name() == "sqlite":
        db = Database(base)
        try:
            db.migrate()
            yield base.render_as_string(hide_password=False), db, "sqlite"
        finally:
            db.dispose()
        return
    schema = f"gf_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, connect_args={"connect_timeout": 5})
    try:
        try:
            with admin.begin() as conn:
                conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        except Exception as exc:
            shown = base.render_as_string(hide_password=True)
            raise BenchError(f"PostgreSQL at {shown} is not usable: {str(exc).splitlines()[0]}") from None
        say(f"job store: PostgreSQL schema {schema}")
        db = Database(base, schema=schema)
        try:
            db.migrate()
            child = base.update_query_dict({"options": f"-csearch_path={schema}"})
            yield child.render_as_string(hide_password=False), db, "postgresql"
        finally:
            db.dispose()
            with admin.begin() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


def run_scale_bench(
    recipients: int,
    *,
    database_url: str | None,
    audience_format: str = "csv",
    chunk_size: int | None,
    say: Say,
) -> dict[str, Any]:
    """The fan-out bench (see the module doc); returns the result as a JSON-ready dict."""
    if recipients < 1:
        raise BenchError("--recipients must be at least 1")
    if audience_format not in FORMATS:
        raise BenchError(f"--audience-format must be one of {', '.join(FORMATS)}")
    if chunk_size is not None and not 1 <= chunk_size <= 100_000:
        raise BenchError("--chunk-size must be between 1 and 100000")
    started = time.monotonic()
    base = get_settings()
    chunk = chunk_size or base.campaign_chunk_size
    campaign_id = f"bench-scale-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="greetflow-bench-scale-") as tmp_name:
        tmp = Path(tmp_name)
        with _job_store(database_url, tmp, say) as (url, db, kind):
            broker, s3 = free_port(), free_port()
            settings = base.model_copy(
                update={
                    "data_dir": tmp / "data",
                    "dev_broker_port": broker,
                    "dev_s3_port": s3,
                    "kafka_bootstrap": f"127.0.0.1:{broker}",
                    "s3_endpoint": f"http://127.0.0.1:{s3}",
                    "database_url": url,
                    "campaign_chunk_size": chunk,
                    "audience_database_url": base.audience_database_url,
                }
            )
            say(f"writing a {recipients}-recipient {audience_format} audience")
            t0 = time.perf_counter()
            source = _write_audience(audience_format, recipients, tmp)
            if audience_format == "sql":
                settings = settings.model_copy(
                    update={"audience_database_url": SecretStr(f"sqlite:///{source}")}
                )
            audience_s = time.perf_counter() - t0
            with DevStack(settings, log=lambda _m: None):
                result = _measure(
                    settings, db, kind, campaign_id, source, audience_format, recipients, chunk, tmp, say
                )
            result["audience_write_s"] = round(audience_s, 2)
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _measure(
    settings: Settings,
    db: Database,
    kind: str,
    campaign_id: str,
    source: Path,
    audience_format: str,
    n: int,
    chunk: int,
    tmp: Path,
    say: Say,
) -> dict[str, Any]:
    store = ObjectStore(settings)
    key = f"audiences/{campaign_id}.{'sql' if audience_format == 'sql' else audience_format}"
    if audience_format == "sql":
        store.put_bytes(
            settings.bucket_assets, key, b"SELECT id, name, locale FROM customers", content_type="text/plain"
        )
    else:
        store.put_file(settings.bucket_assets, key, source, content_type="application/octet-stream")
    brief_data: dict[str, Any] = {
        "campaign_id": campaign_id,
        "title": "bench scale",
        "template": dict(TEMPLATE),
        "default_locale": "en",
        "audience_key": key,
    }
    brief = tmp / "brief.yaml"
    brief.write_text(yaml.safe_dump(brief_data, allow_unicode=True), encoding="utf-8")
    env = worker_env(settings, {"GREETFLOW_LOG_FORMAT": "json", "GREETFLOW_LOG_LEVEL": "INFO"})

    say(f"intake of {n} recipients ({kind}, chunks of {chunk})")
    first, line = _submit(env, brief, tmp, "intake", campaign_id)
    intake_s = float(line["elapsed_s"])
    sent = _count_messages(settings, RENDER_REQUESTS, expect=int(line["requested"]))
    say(f"intake: {line['created']} created, {line['requested']} requested in {intake_s:.1f} s; rerun")
    second, again = _submit(env, brief, tmp, "rerun", campaign_id)
    sent_again = _count_messages(settings, RENDER_REQUESTS, expect=sent + int(again["requested"]))

    say("report")
    report = _run_child(
        [sys.executable, "-m", "pipeline.bench_scale", "report", campaign_id, str(n)], env, tmp, "report"
    )
    if report.rc != 0:
        tail = " | ".join(report.stderr.strip().splitlines()[-3:])[-600:]
        raise BenchError(f"the report exited {report.rc}: {tail}")
    report_line = json.loads(report.stdout.strip().splitlines()[-1])
    counts = JobRepository(db).counts_by_state(campaign_id)

    job_ids = JobIds.from_settings(settings)
    say("floor: bare COPY" if kind == "postgresql" else "floor: bare executemany")
    copy_s, copied, floor_kind = _copy_floor(db, _floor_rows(brief_data, n, chunk, job_ids))
    say("floor: bare produce")
    keys = ProducerKeys.from_settings(settings)
    bus = EventBus(settings, sign=keys.sign, sign_content=keys.sign_content)
    try:
        produce_s, produced = _produce_floor(settings, bus, _floor_rows(brief_data, n, chunk, job_ids))
    finally:
        bus.close()

    intake_rate = n / intake_s if intake_s > 0 else 0.0
    copy_rate = copied / copy_s if copy_s > 0 else 0.0
    produce_rate = produced / produce_s if produce_s > 0 else 0.0
    slower = min(copy_rate, produce_rate)
    return {
        "recipients": n,
        "chunk_size": chunk,
        "audience_format": audience_format,
        "database": kind,
        "cpus": os.cpu_count(),
        "compression": compression_for(settings.kafka_compression) or "none",
        "jobs": sum(counts.values()),
        "jobs_requested_state": counts[JobState.REQUESTED],
        "messages_on_topic": sent,
        "intake_created": int(line["created"]),
        "intake_requested": int(line["requested"]),
        "intake_s": round(intake_s, 2),
        "validate_s": round(float(line["validate_s"]), 2),
        "intake_process_s": round(first.wall_s, 2),
        "intake_cpu_s": round(first.cpu_s, 2),
        "intake_jobs_per_s": round(intake_rate),
        "peak_rss_mb": round(first.max_rss_mb, 1),
        "copy_floor_jobs_per_s": round(copy_rate),
        "floor_kind": floor_kind,
        "produce_floor_msgs_per_s": round(produce_rate),
        "intake_vs_slower_floor": round(intake_rate / slower, 3) if slower > 0 else None,
        "rerun_created": int(again["created"]),
        "rerun_requested": int(again["requested"]),
        "rerun_messages": sent_again - sent,
        "rerun_s": round(float(again["elapsed_s"]), 2),
        "rerun_peak_rss_mb": round(second.max_rss_mb, 1),
        "report_s": report_line["report_s"],
        "report_peak_rss_mb": round(report.max_rss_mb, 1),
    }


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "report":
        report_main(sys.argv[2], int(sys.argv[3]))
    else:
        print("usage: python -m pipeline.bench_scale report CAMPAIGN EXPECTED", file=sys.stderr)
        sys.exit(2)
