"""`greetflow bench latency`: event-to-published latency of single renders on warm workers.

One run brings up the embedded stack (Tansu broker, moto S3) with a SQLite job store in a
temporary data directory, starts real `greetflow worker` processes (render, moderate,
publish), warms them with untimed requests (the first one builds the template's shared
segments), then sends N single render requests one at a time, the way an app does
(`CampaignService.request_render`), each waiting until its job is published. Every figure
comes from the job's `job_events` timestamps:

- `total`: requested -> published (what `p50_s` / `p95_s` summarise);
- `render`, `moderate`, `publish`: each step's working time (claimed -> next state);
- `to_render`, `to_moderate`, `to_publish`: the hand-offs (the previous state -> the
  claim: the announcement, the broker, the consumer's poll and the claim).

`--photo`: each request carries a photo of a subject who consented (face, name) for the
bench's campaign, so moderation matches the clip's faces against a real reference face.
The workers are stopped and the temporary directory removed at the end.

A dev tool: it needs the `dev` extra (it runs the embedded stack through pipeline.bench_faults).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from PIL import Image, ImageEnhance, ImageOps

from pipeline.adapters.storage import ObjectStore
from pipeline.bench_faults import WorkerProcs, free_port, stack_running
from pipeline.campaigns import CampaignService
from pipeline.consent.service import ConsentService
from pipeline.errors import ConfigError, GreetflowError
from pipeline.repositories import JobEvent, JobRepository
from pipeline.settings import Settings
from schemas.brief import Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.jobs import FINAL_STATES, JobState

Say = Callable[[str], None]

TEMPLATE = TemplateRef(name="lunar-new-year", version="1")
LOCALE = Locale.ZH_HANT_HK
# Every request gets a name of its own (surname x given name: 100 of them), as an app's
# users have: a repeated name would let the renderer reuse a personal segment it drew.
SURNAMES = ("陳", "黃", "何", "李", "張", "王", "林", "吳", "劉", "梁")
GIVEN = ("大文", "小玲", "嘉欣", "家明", "美玲", "志強", "家豪", "詠詩", "俊傑", "淑儀")
SUBJECT = "bench-latency-subject"
ROLES = ("render", "moderate", "publish")

# The steps of a job's life, each from one state to the next (as job_events records them).
_MARKS: tuple[tuple[str, JobState, JobState], ...] = (
    ("to_render", JobState.REQUESTED, JobState.RENDERING),
    ("render", JobState.RENDERING, JobState.RENDERED),
    ("to_moderate", JobState.RENDERED, JobState.MODERATING),
    ("moderate", JobState.MODERATING, JobState.APPROVED),
    ("to_publish", JobState.APPROVED, JobState.PUBLISHING),
    ("publish", JobState.PUBLISHING, JobState.PUBLISHED),
)
STEPS: tuple[str, ...] = (*(name for name, _, _ in _MARKS), "total")


class Container(Protocol):
    """What the bench uses of `pipeline.bootstrap.Container` (the caller builds it)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def jobs(self) -> JobRepository: ...
    @property
    def store(self) -> ObjectStore: ...
    def campaigns(self) -> CampaignService: ...
    def consent_service(self) -> ConsentService: ...
    def close(self) -> None: ...


ContainerFactory = Callable[[Settings], Container]


class LatencyBenchError(GreetflowError):
    """The bench could not measure (a job did not publish, a worker died...)."""


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def step_durations(events: Sequence[JobEvent]) -> dict[str, float]:
    """Seconds of each step of one published job, from its events (oldest first): the
    first arrival in each state counts (a retried step is measured from its first claim to
    its final transition). Raises LatencyBenchError when the job never reached published."""
    first: dict[JobState, datetime] = {}
    last: dict[JobState, datetime] = {}
    for e in events:
        at = _aware(e.at)
        first.setdefault(e.to_state, at)
        last[e.to_state] = at
    if JobState.REQUESTED not in first or JobState.PUBLISHED not in first:
        states = " -> ".join(e.to_state.value for e in events) or "no events"
        raise LatencyBenchError(f"the job was not requested and published ({states})")
    out: dict[str, float] = {}
    for name, start, end in _MARKS:
        if start not in first or end not in last:
            raise LatencyBenchError(f"the job has no {start.value} -> {end.value} step")
        # from the last arrival in `start` (a retry re-enters it) to the first in `end`
        began = last[start] if start != JobState.REQUESTED else first[start]
        out[name] = round(max((first[end] - began).total_seconds(), 0.0), 3)
    out["total"] = round((first[JobState.PUBLISHED] - first[JobState.REQUESTED]).total_seconds(), 3)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(rows: Sequence[dict[str, float]], *, photo: bool, cpus: int) -> dict[str, Any]:
    """The bench's JSON from each request's step durations."""
    totals = [r["total"] for r in rows]
    out: dict[str, Any] = {
        "requests": len(rows),
        "photo": photo,
        "cpus": cpus,
        "p50_s": round(percentile(totals, 50), 3),
        "p95_s": round(percentile(totals, 95), 3),
        "max_s": round(max(totals), 3),
    }
    for name in ("render", "moderate", "publish", "to_render", "to_moderate", "to_publish"):
        out[f"{name}_median_s"] = round(statistics.median(r[name] for r in rows), 3)
    if len(rows) <= 50:
        out["per_request"] = [dict(r) for r in rows]
    return out


# --------------------------------------------------------------------------- the run


def bench_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a private stack on free ports with a SQLite job store; everything else
    (render size, moderation) as configured."""
    broker, s3 = free_port(), free_port()
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "dev_broker_port": broker,
        "dev_s3_port": s3,
        "kafka_bootstrap": f"127.0.0.1:{broker}",
        "s3_endpoint": f"http://127.0.0.1:{s3}",
        "database_url": "",
    }
    values.update(overrides)
    return Settings(**values)


def sample_photo() -> Path:
    """A real face photo that ships with matplotlib (Grace Hopper); nothing is downloaded."""
    try:
        from matplotlib import cbook

        return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (ImportError, OSError) as exc:
        raise ConfigError(
            f"bench latency --photo needs matplotlib's sample photo (pip install matplotlib): {exc}"
        ) from None


def _consent_with_photo(container: Container, campaign_id: str, photo: Path, work: Path) -> None:
    """The subject's consent (face, name) for the campaign, with `photo` as reference face and
    another picture of them (mirrored, rescaled) as the artifact."""
    consent = container.consent_service()
    ch = consent.challenge(SUBJECT, issued_by="bench")
    evidence = work / "evidence.jpg"
    with Image.open(photo) as im:
        other = ImageOps.mirror(im.convert("RGB"))
    other = other.resize((int(other.width * 0.8), int(other.height * 0.8)), Image.Resampling.LANCZOS)
    ImageEnhance.Brightness(other).enhance(1.1).save(evidence, quality=90)
    consent.grant(
        SUBJECT,
        scopes=[Scope.FACE, Scope.NAME],
        purpose=f"campaign:{campaign_id}",
        evidence=evidence,
        challenge_code=ch.code,
        recorded_by="bench",
        photo=photo,
    )


@dataclass
class _Run:
    container: Container
    procs: WorkerProcs
    campaign_id: str
    photo_key: str | None
    say: Say
    timeout_s: float

    def recipient(self, n: int) -> Recipient:
        """The n-th request's recipient (n from 0, warm-ups first)."""
        name = SURNAMES[n % len(SURNAMES)] + GIVEN[n // len(SURNAMES) % len(GIVEN)]
        if self.photo_key is None:
            return Recipient(id=f"app-{n:04d}", name=name, locale=LOCALE)
        return Recipient(
            id=f"app-{n:04d}",
            name=name,
            locale=LOCALE,
            photo_key=self.photo_key,
            subjects=(SubjectUse(subject_id=SUBJECT, scopes=frozenset({Scope.FACE, Scope.NAME})),),
        )

    def one(self, n: int) -> dict[str, float]:
        """Request one render and wait until it is published; its step durations."""
        job = self.container.campaigns().request_render(self.campaign_id, self.recipient(n), TEMPLATE)
        deadline = time.monotonic() + self.timeout_s
        while True:
            now = self.container.jobs.get(job.job_id)
            state = now.state if now is not None else None
            if state == JobState.PUBLISHED:
                break
            if state in FINAL_STATES or state == JobState.NEEDS_REVIEW:
                why = now.reason if now is not None else ""
                raise LatencyBenchError(f"request {n}: job {job.job_id} ended {state}: {why}")
            if time.monotonic() > deadline:
                raise LatencyBenchError(
                    f"request {n}: job {job.job_id} not published within {self.timeout_s:.0f} s "
                    f"(state {state})"
                )
            try:
                self.procs.check_alive()
            except AssertionError as exc:
                raise LatencyBenchError(str(exc).splitlines()[0]) from None
            time.sleep(0.02)
        return step_durations(self.container.jobs.history(job.job_id))


def run_latency_bench(
    requests: int,
    *,
    photo: bool,
    say: Say,
    make_container: ContainerFactory,
    warmup: int = 2,
    timeout_s: float = 300.0,
    settings_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send `requests` single renders one after another to warm workers on a fresh embedded
    stack; the JSON summary (`summarize`). `warmup` untimed requests go first."""
    if requests < 1:
        raise ConfigError("bench latency needs --requests 1 or more")
    campaign_id = f"latency-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="greetflow-bench-latency-") as tmp:
        root = Path(tmp)
        settings = bench_settings(root / "data", **(settings_overrides or {}))
        with stack_running(settings, log=say):
            container = make_container(settings)
            try:
                photo_key: str | None = None
                if photo:
                    path = sample_photo()
                    _consent_with_photo(container, campaign_id, path, root)
                    photo_key = f"{campaign_id}/photos/subject.jpg"
                    container.store.put_file(
                        settings.bucket_assets, photo_key, path, content_type="image/jpeg"
                    )
                with WorkerProcs(settings, root / "logs") as procs:
                    for role in ROLES:
                        procs.start(role)
                    run = _Run(container, procs, campaign_id, photo_key, say, timeout_s)
                    t0 = time.monotonic()
                    for n in range(warmup):
                        d = run.one(n)
                        say(
                            f"warm-up {n + 1}/{warmup}: {d['total']:.2f} s ({time.monotonic() - t0:.0f} s in)"
                        )
                    rows: list[dict[str, float]] = []
                    for n in range(requests):
                        d = run.one(warmup + n)
                        rows.append(d)
                        say(
                            f"request {n + 1}/{requests}: {d['total']:.2f} s "
                            f"(render {d['render']:.2f}, moderate {d['moderate']:.2f}, "
                            f"publish {d['publish']:.2f}; hand-offs {d['to_render']:.2f} / "
                            f"{d['to_moderate']:.2f} / {d['to_publish']:.2f})"
                        )
                    _phase_log(procs, say)
            finally:
                container.close()
    return summarize(rows, photo=photo, cpus=os.cpu_count() or 1)


_PHASES = re.compile(r"moderate \S+: phases (.*)$")


def _phase_log(procs: WorkerProcs, say: Say) -> None:
    """The moderator's last per-phase line, when it logs one (for profiling)."""
    for wp in procs.of("moderate"):
        try:
            text = wp.log_path.read_text(errors="replace")
        except OSError:
            continue
        found = None
        for line in text.splitlines():
            try:
                message = str(json.loads(line).get("message", ""))
            except (ValueError, AttributeError):
                message = line
            m = _PHASES.search(message)
            if m:
                found = m[1]
        if found:
            say(f"moderator phases (last request): {found}")
