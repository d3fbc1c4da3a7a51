"""Fault injection on real worker processes: the shared harness and `greetflow bench faults`.

The harness (also used by tests/faults/) runs the embedded stack (`pipeline.dev.stack.DevStack`),
starts real `greetflow worker ROLE` processes against it, submits a campaign, waits until every
job is final and counts what came out: objects in the distribution bucket and
`clips.published` events per job.

`greetflow bench faults --jobs N --json` runs three scenarios, each on a fresh stack and a
fresh SQLite file: kill -9 a render worker, the moderator, the publisher, mid-batch. Its last
stdout line is JSON with, per scenario and in total, `submitted`, `published`, `duplicates`
(extra objects or extra `clips.published` events), `stuck` (not final at the end), `failed`,
and `takeover_s` (seconds from the kill to the first job event by another worker on a job
the killed worker held).

A dev tool: it needs the `dev` extra (it imports `pipeline.dev`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import SecretStr

from pipeline.adapters.db import Database
from pipeline.adapters.storage import ObjectStore
from pipeline.campaigns import CampaignService, sample_brief
from pipeline.dev.stack import DevStack
from pipeline.repositories import JobRepository
from pipeline.settings import Settings
from pipeline.topics import CLIPS_PUBLISHED
from schemas.brief import CampaignBrief
from schemas.common import Locale
from schemas.jobs import FINAL_STATES, JobState

__all__ = [
    "LEAN",
    "SCENARIOS",
    "Outcome",
    "WorkerProc",
    "WorkerProcs",
    "count_outcome",
    "fault_settings",
    "free_port",
    "lean_brief",
    "read_topic",
    "run_bench",
    "run_scenario",
    "stack_running",
    "wait_final",
    "worker_env",
]

Say = Callable[[str], None]


class Container(Protocol):
    """What the harness uses of `pipeline.bootstrap.Container` (the caller builds it: only
    the entry points import the wiring)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def db(self) -> Database: ...
    @property
    def jobs(self) -> JobRepository: ...
    @property
    def store(self) -> ObjectStore: ...
    def campaigns(self) -> CampaignService: ...
    def close(self) -> None: ...


ContainerFactory = Callable[[Settings], Container]

# Settings that keep a clip cheap (render time dominates every case) and recovery quick.
# Only the fields this Settings class has are applied, so names that land later (lease,
# sweep interval) are picked up as they appear.
LEAN: dict[str, Any] = {
    "render_width": 180,
    "render_height": 320,
    "render_fps": 8,
    "ffmpeg_threads": 1,
    "likeness_analysis_width": 320,
    "handler_retry_backoff_s": 0.05,
    "outage_backoff_initial_s": 0.2,
    "retry_backoff_max_s": 2.0,
    "consumer_session_timeout_ms": 6_000,
    # short leases (renewed every third by the step's heartbeat) and a quick sweeper; a job
    # waiting in the queue must not look stale, so that stays well above the batch's wait
    "step_lease_s": 8.0,
    "sweep_interval_s": 2.0,
    "sweep_stale_after_s": 120.0,
    "sweep_max_attempts": 5,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fault_settings(data_dir: Path, database_url: str = "", **overrides: Any) -> Settings:
    """Settings for a private stack on free ports, lean rendering, short leases."""
    broker, s3 = free_port(), free_port()
    values: dict[str, Any] = {k: v for k, v in LEAN.items() if k in Settings.model_fields}
    values.update(
        data_dir=data_dir,
        dev_broker_port=broker,
        dev_s3_port=s3,
        kafka_bootstrap=f"127.0.0.1:{broker}",
        s3_endpoint=f"http://127.0.0.1:{s3}",
        database_url=database_url,
    )
    values.update({k: v for k, v in overrides.items() if k in Settings.model_fields})
    return Settings(**values)


def _env_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict, tuple)):
        return json.dumps(value)
    return str(value)


def worker_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker process: every setting that differs from its default
    as a GREETFLOW_* variable (so lease and sweep settings travel whatever their names)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREETFLOW_")}
    defaults = Settings.model_construct()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name != "data_dir" and value == getattr(defaults, name, None):
            continue
        if name == "font_dirs":
            if value:
                env["GREETFLOW_FONT_DIRS"] = os.pathsep.join(str(p) for p in value)
            continue
        if value is None:
            continue
        env[f"GREETFLOW_{name.upper()}"] = _env_value(value)
    env["GREETFLOW_DATA_DIR"] = str(settings.data_dir.resolve())
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- processes

# `greetflow worker ROLE` without relying on the console script being on PATH.
_WORKER_MAIN = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


@dataclass
class WorkerProc:
    role: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def name_suffix(self) -> str:
        """The tail of its worker name (`ROLE@HOST:PID`), as in jobs.claimed_by and actors."""
        return f":{self.proc.pid}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        """The end of its log, from the start of the last traceback when there is one."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        at = text.rfind("Traceback (most recent call last)")
        if at >= 0:
            start = max(at - 1500, 0)
            body = text[start:]
            return body if len(body) <= chars else body[:3000] + "\n[...]\n" + body[-(chars - 3000) :]
        return text[-chars:]


class WorkerProcs:
    """Real worker processes (`python -m pipeline.cli worker ROLE`): start, kill -9, checks."""

    def __init__(self, settings: Settings, log_dir: Path, *, extra_env: Mapping[str, str] | None = None):
        self.settings = settings
        self.log_dir = log_dir
        self.env = worker_env(settings, extra_env)
        self.procs: list[WorkerProc] = []
        # role -> the `python -c` code of its process (tests wrap a role to inject a fault)
        self.main_code: dict[str, str] = {}

    def start(self, role: str) -> WorkerProc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        n = sum(1 for p in self.procs if p.role == role)
        log_path = self.log_dir / f"{role}-{n}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", self.main_code.get(role, _WORKER_MAIN), "worker", role],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        wp = WorkerProc(role, proc, log_path)
        self.procs.append(wp)
        return wp

    def kill9(self, wp: WorkerProc) -> float:
        """SIGKILL the worker; the monotonic time of the kill."""
        wp.killed = True
        at = time.monotonic()
        wp.proc.send_signal(signal.SIGKILL)
        wp.proc.wait(timeout=30)
        return at

    def of(self, role: str) -> list[WorkerProc]:
        return [p for p in self.procs if p.role == role and not p.killed]

    def exited(self) -> list[WorkerProc]:
        """Workers that exited on their own (not killed by us)."""
        return [p for p in self.procs if not p.killed and not p.alive()]

    def check_alive(self) -> None:
        dead = self.exited()
        if dead:
            detail = "\n".join(
                f"--- {p.role} pid {p.pid} exited {p.proc.returncode} ({p.log_path}):\n{p.log_tail()}"
                for p in dead
            )
            raise AssertionError(f"worker process(es) exited: {[(p.role, p.pid) for p in dead]}\n{detail}")

    def stop_all(self, grace_s: float = 20.0) -> None:
        live = [p for p in self.procs if p.alive()]
        for p in live:
            p.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.proc.kill()
                p.proc.wait(timeout=10)

    def __enter__(self) -> WorkerProcs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@contextmanager
def stack_running(settings: Settings, log: Say | None = None) -> Iterator[DevStack]:
    """The embedded broker and S3 server for `settings` (fails when they cannot start)."""
    with DevStack(settings, log=log or (lambda _m: None)) as stack:
        yield stack


def sweeper_role() -> str | None:
    """The sweeper's worker role when this build has one (`greetflow worker sweep`)."""
    from pipeline import workers

    roles = tuple(getattr(workers, "ALL_ROLES", ())) + tuple(getattr(workers, "ROLES", ()))
    for name in ("sweep", "sweeper"):
        if name in roles:
            return name
    return None


# --------------------------------------------------------------------------- campaign


def lean_brief(n: int, campaign_id: str | None = None) -> CampaignBrief:
    """The sample brief with `n` recipients in one locale (one set of shared segments)."""
    base = sample_brief(1)
    cid = campaign_id or f"faults-{uuid.uuid4().hex[:8]}"
    first = base.recipients[0]
    recipients = tuple(
        first.model_copy(update={"id": f"r-{i:04d}", "name": f"Guest {i}", "locale": Locale.EN})
        for i in range(n)
    )
    return base.model_copy(update={"campaign_id": cid, "recipients": recipients, "default_locale": Locale.EN})


# --------------------------------------------------------------------------- counting


def read_topic(settings: Settings, topic: str, *, timeout_s: float = 30.0) -> list[Any]:
    """Every record of `topic`, from the beginning to the current end of each partition."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=1000,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    out: list[Any] = []
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return out
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end within {timeout_s} s")
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(records)
    finally:
        consumer.close()
    return out


@dataclass
class Outcome:
    """What a campaign produced. Per job: distribution objects (.mp4) and published events."""

    submitted: int
    states: Counter[str]
    objects: dict[uuid.UUID, int]  # job -> number of .mp4 objects in the distribution bucket
    events: dict[uuid.UUID, list[str]]  # job -> envelope ids of its clips.published events
    reasons: dict[uuid.UUID, str] = field(default_factory=dict)

    @property
    def published(self) -> int:
        return self.states.get(JobState.PUBLISHED.value, 0)

    @property
    def failed(self) -> int:
        return self.states.get(JobState.FAILED.value, 0)

    @property
    def stuck(self) -> int:
        final = {s.value for s in FINAL_STATES}
        return sum(n for s, n in self.states.items() if s not in final) + max(
            self.submitted - sum(self.states.values()), 0
        )

    @property
    def extra_objects(self) -> int:
        return sum(max(n - 1, 0) for n in self.objects.values())

    @property
    def raw_event_duplicates(self) -> int:
        """Extra clips.published records (redeliveries re-announce with the same id)."""
        return sum(max(len(ids) - 1, 0) for ids in self.events.values())

    @property
    def distinct_event_duplicates(self) -> int:
        """Extra clips.published events after dedupe by envelope id."""
        return sum(max(len(set(ids)) - 1, 0) for ids in self.events.values())

    @property
    def duplicates(self) -> int:
        return self.extra_objects + self.distinct_event_duplicates

    def summary(self) -> dict[str, Any]:
        return {
            "submitted": self.submitted,
            "published": self.published,
            "duplicates": self.duplicates,
            "stuck": self.stuck,
            "failed": self.failed,
            "raw_event_records": sum(len(v) for v in self.events.values()),
            "raw_event_duplicates": self.raw_event_duplicates,
            "states": dict(self.states),
        }


def count_outcome(container: Container, campaign_id: str, job_ids: Iterable[uuid.UUID]) -> Outcome:
    ids = list(job_ids)
    records = container.jobs.get_many(ids)
    states: Counter[str] = Counter(r.state.value for r in records)
    wanted = set(ids)
    objects: dict[uuid.UUID, int] = {}
    for key in container.store.list_keys(container.settings.bucket_distribution):
        if not key.endswith(".mp4"):
            continue
        try:
            jid = uuid.UUID(key.rsplit("/", 1)[-1].removesuffix(".mp4"))
        except ValueError:
            continue
        if jid in wanted:
            objects[jid] = objects.get(jid, 0) + 1
    events: dict[uuid.UUID, list[str]] = {}
    for rec in read_topic(container.settings, CLIPS_PUBLISHED):
        try:
            env = json.loads(rec.value)
            jid = uuid.UUID(env["payload"]["job_id"])
        except (ValueError, KeyError, TypeError):
            continue
        if jid in wanted:
            events.setdefault(jid, []).append(str(env["id"]))
    reasons = {r.job_id: r.reason or "" for r in records if r.reason}
    return Outcome(len(ids), states, objects, events, reasons)


def wait_final(
    container: Container,
    job_ids: Iterable[uuid.UUID],
    *,
    timeout_s: float,
    procs: WorkerProcs | None = None,
    say: Say | None = None,
    raise_on_timeout: bool = True,
    stall_s: float | None = None,
) -> Counter[str]:
    """Poll the job table until every job is final; check the workers meanwhile. Gives up
    after `timeout_s`, or after `stall_s` without any job changing state (a stuck job)."""
    ids = list(job_ids)
    start = time.monotonic()
    deadline = start + timeout_s
    last_print = 0.0
    last_change = start
    last_states: dict[uuid.UUID, JobState] = {}
    while True:
        if procs is not None:
            procs.check_alive()
        states = container.jobs.states_of(ids)
        counts: Counter[str] = Counter(s.value for s in states.values())
        if len(states) == len(ids) and all(s in FINAL_STATES for s in states.values()):
            return counts
        now = time.monotonic()
        if states != last_states:
            last_change, last_states = now, dict(states)
        if say is not None and now - last_print > 10:
            say(f"  states: {dict(counts)}")
            last_print = now
        stalled = stall_s is not None and now - last_change > stall_s
        if now > deadline or stalled:
            why = f"no job changed state for {stall_s:.0f} s" if stalled else f"after {timeout_s:.0f} s"
            if raise_on_timeout:
                raise AssertionError(f"not every job is final ({why}): {dict(counts)}")
            if say is not None:
                say(f"  giving up ({why}): {dict(counts)}")
            return counts
        time.sleep(0.5)


def wait_events(container: Container, job_ids: Iterable[uuid.UUID], *, timeout_s: float = 60.0) -> None:
    """Wait (bounded) until every published job has its clips.published event on the topic."""
    ids = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = container.jobs.states_of(ids)
        published = {j for j, s in states.items() if s == JobState.PUBLISHED}
        seen: set[uuid.UUID] = set()
        for rec in read_topic(container.settings, CLIPS_PUBLISHED):
            try:
                seen.add(uuid.UUID(json.loads(rec.value)["payload"]["job_id"]))
            except (ValueError, KeyError, TypeError):
                continue
        if published <= seen:
            return
        time.sleep(1.0)


# --------------------------------------------------------------------------- kill -9 scenarios


def wait_holding(
    container: Container,
    procs: WorkerProcs,
    role: str,
    job_ids: list[uuid.UUID],
    *,
    working: JobState,
    after_done: int,
    timeout_s: float,
) -> tuple[WorkerProc, set[uuid.UUID]]:
    """Wait until a `role` worker holds a job in `working` and at least `after_done` jobs are
    past that step (mid-batch); the worker and the jobs it holds."""
    order = list(JobState)
    deadline = time.monotonic() + timeout_s
    while True:
        procs.check_alive()
        records = container.jobs.get_many(job_ids)
        past = sum(
            1 for r in records if order.index(r.state) > order.index(working) or r.state in FINAL_STATES
        )
        for wp in procs.of(role):
            held = {
                r.job_id
                for r in records
                if r.state == working and (r.claimed_by or "").endswith(wp.name_suffix)
            }
            if held and past >= after_done:
                return wp, held
        if time.monotonic() > deadline:
            raise AssertionError(f"no {role} worker held a {working.value} job within {timeout_s:.0f} s")
        time.sleep(0.05)


def first_takeover_s(
    container: Container, held: set[uuid.UUID], killed: WorkerProc, killed_at_wall: datetime, kill_mono: float
) -> float | None:
    """Seconds from the kill to the first job event, by another worker, on a job the killed
    worker held (from job_events' timestamps)."""
    firsts: list[datetime] = []
    for events in container.jobs.history_many(held).values():
        for e in events:
            at = e.at if e.at.tzinfo else e.at.replace(tzinfo=UTC)
            if at > killed_at_wall and not e.actor.endswith(killed.name_suffix):
                firsts.append(at)
    if not firsts:
        return None
    return round(max((min(firsts) - killed_at_wall).total_seconds(), 0.0), 3)


# role killed -> (working state it holds, roles started, how many of that role)
SCENARIOS: dict[str, tuple[str, JobState]] = {
    "kill_render": ("render", JobState.RENDERING),
    "kill_moderator": ("moderate", JobState.MODERATING),
    "kill_publisher": ("publish", JobState.PUBLISHING),
}


def start_pipeline(procs: WorkerProcs, *, renderers: int = 2, sweeper: bool = True) -> None:
    for _ in range(renderers):
        procs.start("render")
    procs.start("moderate")
    procs.start("publish")
    if sweeper:
        role = sweeper_role()
        procs.start(role or "sweep")  # a build without a sweeper fails here (the process exits)


def run_scenario(
    name: str,
    settings: Settings,
    jobs: int,
    *,
    make_container: ContainerFactory,
    say: Say,
    timeout_s: float | None = None,
    require_sweeper: bool = False,
) -> tuple[Outcome, float | None]:
    """One kill -9 scenario on the running stack of `settings`: its outcome and takeover_s."""
    role, working = SCENARIOS[name]
    container = make_container(settings)
    try:
        _ = container.db  # migrate before the workers race to
        brief = lean_brief(jobs)
        with WorkerProcs(settings, settings.data_dir / "logs" / name) as procs:
            sweeper = require_sweeper or sweeper_role() is not None
            if not sweeper:
                say(f"{name}: this build has no sweeper role (`greetflow worker sweep`); running without")
            start_pipeline(procs, sweeper=sweeper)
            result = container.campaigns().submit(brief)
            ids = list(result.job_ids)
            say(f"{name}: submitted {len(ids)} jobs to {len(procs.procs)} workers")
            victim, held = wait_holding(
                container, procs, role, ids, working=working, after_done=max(1, jobs // 5), timeout_s=600
            )
            wall = datetime.now(UTC)
            at = procs.kill9(victim)
            say(f"{name}: kill -9 {role} pid {victim.pid} holding {len(held)} job(s)")
            if role != "render":
                procs.start(role)
                say(f"{name}: started a new {role} worker")
            limit = timeout_s if timeout_s is not None else 120.0 + 6.0 * jobs
            wait_final(
                container, ids, timeout_s=limit, procs=procs, say=say, raise_on_timeout=False, stall_s=90
            )
            wait_events(container, ids, timeout_s=30)
            takeover = first_takeover_s(container, held, victim, wall, at)
            outcome = count_outcome(container, brief.campaign_id, ids)
            say(f"{name}: {outcome.summary()} takeover_s={takeover}")
            return outcome, takeover
    finally:
        container.close()


def run_bench(
    jobs: int,
    *,
    make_container: ContainerFactory,
    say: Say,
    scenarios: Iterable[str] = tuple(SCENARIOS),
) -> dict[str, Any]:
    """Every kill -9 scenario on its own embedded stack and SQLite file; the JSON summary."""
    out: dict[str, Any] = {"jobs": jobs, "scenarios": {}}
    total = {"submitted": 0, "published": 0, "duplicates": 0, "stuck": 0, "failed": 0}
    takeovers: list[float] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="greetflow-bench-faults-") as tmp:
        for name in scenarios:
            # queued jobs wait longer in a bigger batch: they must not look stale to the sweeper
            settings = fault_settings(Path(tmp) / name, sweep_stale_after_s=max(120.0, 4.0 * jobs))
            t0 = time.monotonic()
            with stack_running(settings, log=say):
                outcome, takeover = run_scenario(name, settings, jobs, make_container=make_container, say=say)
            row: dict[str, Any] = {
                k: v for k, v in outcome.summary().items() if k in total or k.startswith("raw_")
            }
            row["takeover_s"] = takeover
            row["wall_s"] = round(time.monotonic() - t0, 1)
            out["scenarios"][name] = row
            for k in total:
                total[k] += int(row[k])
            if takeover is not None:
                takeovers.append(takeover)
    total_row: dict[str, Any] = dict(total)
    total_row["takeover_s"] = max(takeovers) if takeovers else None
    total_row["wall_s"] = round(time.monotonic() - started, 1)
    out["total"] = total_row
    return out
