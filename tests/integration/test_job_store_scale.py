"""The job store at campaign scale, at a size CI affords (30k jobs per backend).

- the report of a campaign streams from the job table: right counts and lines, and a
  memory peak far below what loading the campaign's rows would take;
- the counting wait and the run progress are one GROUP BY per poll;
- `list_jobs` / `greetflow jobs` page by a keyset cursor.

The query plans of the per-message queries on PostgreSQL are in test_job_store_plans.py.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import io
import json
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, insert

from pipeline.adapters.db import Database, JobEventRow, JobRow
from pipeline.adapters.storage import ObjectStore
from pipeline.bootstrap import Container
from pipeline.campaigns import CampaignService
from pipeline.cli import main
from pipeline.reports import CHART_STATES, WrittenReport, campaign_timeline, write_campaign_report
from pipeline.repositories import CursorNotFound, JobRepository
from pipeline.settings import Settings, get_settings
from pipeline.trust import JobIds
from schemas.jobs import JobState
from tests.integration.db_fixtures import TEST_JOB_ID_KEY

pytestmark = pytest.mark.integration

T = TypeVar("T")

T0 = datetime(2027, 2, 5, 12, 0, tzinfo=UTC)
CAMPAIGN = "scale"
N = 30_000

P, RQ, MO, AP, NR, RJ, FA = (
    JobState.PUBLISHED,
    JobState.REQUESTED,
    JobState.MODERATING,
    JobState.APPROVED,
    JobState.NEEDS_REVIEW,
    JobState.REJECTED,
    JobState.FAILED,
)
# Job i follows path i % 10: (final state, its events after the creation event). Each
# event starts where the previous one ended, as in a real history.
PATHS: list[tuple[JobState, list[tuple[JobState, JobState, str]]]] = [
    *[(P, [(RQ, MO, "mod@h:1"), (MO, AP, "mod@h:1"), (AP, P, "pub@h:1")])] * 6,
    (FA, [(RQ, FA, "dlq")]),
    (RJ, [(RQ, MO, "mod@h:1"), (MO, RJ, "mod@h:1")]),
    (NR, [(RQ, MO, "mod@h:1"), (MO, NR, "mod@h:1")]),
    (P, [(RQ, MO, "mod@h:1"), (MO, NR, "mod@h:1"), (NR, AP, "reviewer:amy"), (AP, P, "pub@h:1")]),
]


def _job_id(campaign: str, i: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{campaign}/{i}"))


def bulk_campaign(db: Database, campaign: str, n: int, *, events: bool = True) -> None:
    """`n` jobs along PATHS with their events, by batched executemany (no service calls)."""
    batch = 5_000
    for start in range(0, n, batch):
        jobs: list[dict[str, Any]] = []
        evs: list[dict[str, Any]] = []
        for i in range(start, min(start + batch, n)):
            state, path = PATHS[i % 10]
            key = _job_id(campaign, i)
            created = T0 + timedelta(milliseconds=i)
            jobs.append(
                {
                    "job_id": key,
                    "campaign_id": campaign,
                    "recipient_id": f"r-{i:07d}",
                    "template_name": "lunar-new-year",
                    "template_version": "1",
                    "locale": "zh-Hant-HK",
                    "state": state.value,
                    "reason": "RenderError: font" if state == FA else None,
                    "request_json": {"recipient": {"id": f"r-{i:07d}", "name": f"=Name {i}"}},
                    "url": f"https://cdn/{key}.mp4" if state == P else None,
                    "attempts": 1,
                    "created_at": created,
                    "updated_at": created + timedelta(seconds=60),
                    "sweeps": 0,
                    "sweeps_total": 1 if i % 50 == 0 else 0,
                }
            )
            if events:
                evs.append(_ev(key, None, RQ, "intake", created))
                for n_step, (src, dst, actor) in enumerate(path, start=1):
                    evs.append(_ev(key, src, dst, actor, created + timedelta(seconds=10 * n_step)))
        if db.dialect == "postgresql":
            _copy(db, "jobs", jobs)
            _copy(db, "job_events", evs)
            continue
        with db.session() as s:
            s.execute(insert(JobRow.__table__), jobs)
            if evs:
                s.execute(insert(JobEventRow.__table__), evs)


def _copy(db: Database, table: str, rows: list[dict[str, Any]]) -> None:
    """PostgreSQL COPY of the rows (the columns of the first one)."""
    if not rows:
        return
    columns = list(rows[0])
    raw = db.engine.raw_connection()
    try:
        cur = raw.cursor()
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:  # type: ignore[attr-defined]
            for row in rows:
                copy.write_row(
                    [json.dumps(v) if isinstance(v, dict) else v for v in (row[c] for c in columns)]
                )
        cur.close()
        raw.commit()
    finally:
        raw.close()


def _ev(key: str, src: JobState | None, dst: JobState, actor: str, at: datetime) -> dict[str, Any]:
    return {
        "job_id": key,
        "from_state": src.value if src else None,
        "to_state": dst.value,
        "reason": None,
        "actor": actor,
        "at": at,
    }


def expected_counts(n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(n):
        st = PATHS[i % 10][0].value
        out[st] = out.get(st, 0) + 1
    return out


@pytest.fixture
def s3(stack: Settings) -> ObjectStore:
    return ObjectStore(stack)


def peak_memory_growth(fn: Callable[[], T]) -> tuple[T, int]:
    """fn's result and how far above the memory in use before it the process's peak went
    while it ran, in bytes: the peak resident set (VmHWM, reset through /proc/self/clear_refs)
    where Linux allows resetting it, else the peak of tracemalloc (slower, same meaning)."""
    clear = Path("/proc/self/clear_refs")
    try:
        # Memory freed earlier goes back to the system first, so that the report cannot
        # hide in what an earlier test left allocated.
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kib("VmRSS")
        clear.write_text("5")
    except (OSError, AttributeError):
        tracemalloc.start()
        try:
            out = fn()
            return out, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    out = fn()
    return out, max(_status_kib("VmHWM") - before, 0) * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.split()[0])
    raise OSError(f"no {field} in /proc/self/status")


class Statements:
    """The SQL statements an engine runs while the block runs."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.seen: list[str] = []

    def _on(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.seen.append(statement)

    def __enter__(self) -> Statements:
        event.listen(self.db.engine, "before_cursor_execute", self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.db.engine, "before_cursor_execute", self._on)


def test_report_of_a_30k_campaign_streams_in_bounded_memory(
    db: Database, stack: Settings, s3: ObjectStore
) -> None:
    started = time.perf_counter()
    bulk_campaign(db, CAMPAIGN, N)
    bulk_campaign(db, "other", 30)  # another campaign: not in the report
    inserted = time.perf_counter()
    jobs = JobRepository(db)
    bucket = stack.bucket_reports

    def report() -> WrittenReport:
        return write_campaign_report(
            jobs,
            s3,
            bucket,
            CAMPAIGN,
            run_key="bench",
            title="新春 scale",
            expected=N + 5,  # 5 recipients without a job row yet
            now=T0 + timedelta(hours=1),
            chart=False,
        )

    # An unmeasured report of the small campaign first: what any first report loads once
    # (code paths, connection state, caches) is not what the bound is about.
    write_campaign_report(jobs, s3, bucket, "other", run_key="warm", expected=30, chart=False)
    written, peak = peak_memory_growth(report)
    summary = written.summary
    assert summary is not None

    body = s3.get_bytes(bucket, written.json_key)
    csv_body = s3.get_bytes(bucket, written.csv_key)
    # Bounded: the two files alone are larger than the bound (so neither was ever whole in
    # memory), and loading the campaign's rows as records and histories (get_many and
    # history_many of every id) grows the process by about 80 MiB here. What the peak
    # holds does not grow with the campaign: one page of rows and their events, the
    # spool buffers (1 MiB each) and one 5 MiB upload part: 13-15 MiB at 30k and at 50k
    # jobs alike (tracemalloc).
    bound = 16 << 20
    print(
        f"{db.dialect}: {N} jobs inserted in {inserted - started:.1f} s; report "
        f"{time.perf_counter() - inserted:.1f} s, peak {peak / 2**20:.1f} MiB, "
        f"json {len(body) / 2**20:.1f} MiB, csv {len(csv_body) / 2**20:.1f} MiB"
    )
    assert len(body) + len(csv_body) > bound
    assert peak < bound, f"peak {peak / 2**20:.1f} MiB"

    want = expected_counts(N)
    data = json.loads(body)
    assert data["total"] == N + 5 == summary.total
    assert {k: v for k, v in data["counts"].items() if v} == {**want, "missing": 5}
    assert data["complete"] is False and summary.complete is False
    assert data["moderation"] == {
        "approved": 6 * N // 10,
        "needs_review": N // 10,
        "rejected": N // 10,
        "human_approved": N // 10,
        "human_rejected": 0,
        "not_moderated": N // 10,
    }
    assert data["swept"] == N // 50 and data["failed"] == N // 10
    assert len(data["jobs"]) == N and len(data["published"]) == want["published"]
    assert len(data["failures"]) == N // 10 * 2 and len(data["pending_review"]) == N // 10
    # In creation order, every field of the line (job 9: published after a human approval).
    assert [j["recipient_id"] for j in data["jobs"][:3]] == ["r-0000000", "r-0000001", "r-0000002"]
    assert data["jobs"][9] == {
        "job_id": _job_id(CAMPAIGN, 9),
        "recipient_id": "r-0000009",
        "locale": "zh-Hant-HK",
        "state": "published",
        "moderation": "approved",
        "moderated_by": "reviewer:amy",
        "reviewed": True,
        "reason": None,
        "url": f"https://cdn/{_job_id(CAMPAIGN, 9)}.mp4",
        "name": "=Name 9",
    }
    rows = list(csv.DictReader(io.StringIO(csv_body.decode("utf-8-sig"))))
    assert len(rows) == N
    assert rows[6] == {
        "job_id": _job_id(CAMPAIGN, 6),
        "recipient_id": "r-0000006",
        "locale": "zh-Hant-HK",
        "state": "failed",
        "moderation": "",
        "moderated_by": "",
        "reviewed": "",
        "reason": "RenderError: font",
        "url": "",
        "name": "'=Name 6",  # a formula-looking name is neutralized
    }


def test_state_timeline_from_aggregated_events(db: Database, stack: Settings, s3: ObjectStore) -> None:
    bulk_campaign(db, CAMPAIGN, 2_000)
    jobs = JobRepository(db)
    with Statements(db) as sql:
        times, series = campaign_timeline(jobs, CAMPAIGN)
    assert len(sql.seen) == 2 and "GROUP BY" in sql.seen[1]  # the span, then one GROUP BY
    assert 1 < len(times) <= 600 and times == sorted(times)
    want = expected_counts(2_000)
    assert {st.value: series[st][-1] for st in CHART_STATES if series[st][-1]} == want
    assert all(sum(series[st][i] for st in CHART_STATES) <= 2_000 for i in range(len(times)))
    written = write_campaign_report(jobs, s3, stack.bucket_reports, CAMPAIGN, run_key="r1", title="T")
    assert written.chart_key is not None
    assert s3.get_bytes(stack.bucket_reports, written.chart_key)[:8] == b"\x89PNG\r\n\x1a\n"


def test_counting_wait_is_one_group_by_per_poll(db: Database) -> None:
    bulk_campaign(db, CAMPAIGN, 1_000, events=False)
    jobs = JobRepository(db)

    class NoEvents:
        def publish(self, *_a: Any, **_k: Any) -> None:
            raise RuntimeError("the wait publishes nothing")

    service = CampaignService(jobs, NoEvents(), job_ids=JobIds(TEST_JOB_ID_KEY))  # type: ignore[arg-type]
    seen: list[dict[JobState, int]] = []
    with Statements(db) as sql:
        counts = service.wait_campaign(
            CAMPAIGN, expected=1_000, timeout_s=0, settled=frozenset(JobState), on_progress=seen.append
        )
    assert {st.value: n for st, n in counts.items() if n} == expected_counts(1_000)
    assert len(sql.seen) == 1 and "GROUP BY" in sql.seen[0] and "count" in sql.seen[0].lower()
    assert seen == [{st: n for st, n in counts.items() if n}]

    # Not settled (requested jobs stay): polls until the timeout, one GROUP BY each.
    with Statements(db) as sql:
        counts = service.wait_campaign(CAMPAIGN, expected=1_000, timeout_s=0.3, poll_s=0.1)
    assert counts[JobState.NEEDS_REVIEW] == 100 and 2 <= len(sql.seen) <= 6
    assert all("GROUP BY" in q for q in sql.seen)
    # Jobs still missing are not settled either.
    counts = service.wait_campaign(
        CAMPAIGN, expected=1_001, timeout_s=0, settled=frozenset(JobState), poll_s=0.1
    )
    assert sum(counts.values()) == 1_000


def test_list_jobs_pages_by_keyset_cursor(db: Database) -> None:
    bulk_campaign(db, CAMPAIGN, 130, events=False)
    bulk_campaign(db, "other", 7, events=False)
    jobs = JobRepository(db)
    pages: list[list[str]] = []
    after: uuid.UUID | None = None
    while True:
        page = jobs.list_jobs(campaign_id=CAMPAIGN, limit=50, after=after)
        if not page:
            break
        pages.append([j.recipient_id for j in page])
        after = page[-1].job_id
    assert [len(p) for p in pages] == [50, 50, 30]
    assert [r for p in pages for r in p] == [f"r-{i:07d}" for i in range(130)]
    failed = jobs.list_jobs(campaign_id=CAMPAIGN, states=[FA], limit=5)
    assert [j.recipient_id for j in failed] == [f"r-{i:07d}" for i in (6, 16, 26, 36, 46)]
    more = jobs.list_jobs(campaign_id=CAMPAIGN, states=[FA], limit=5, after=failed[-1].job_id)
    assert [j.recipient_id for j in more][:2] == ["r-0000056", "r-0000066"]
    assert len(jobs.list_jobs(limit=1_000)) == 137
    with pytest.raises(CursorNotFound):
        jobs.list_jobs(after=uuid.uuid4())


@pytest.fixture
def cli_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Database]:
    settings = Settings(data_dir=tmp_path / "data")
    container = Container(settings)
    monkeypatch.setenv("GREETFLOW_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        yield container.db
    finally:
        container.close()
        get_settings.cache_clear()


def test_greetflow_jobs_prints_a_page_and_the_next_cursor(
    cli_data: Database, capsys: pytest.CaptureFixture[str]
) -> None:
    bulk_campaign(cli_data, CAMPAIGN, 12, events=False)
    assert main(["jobs", "--campaign", CAMPAIGN, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    hint = out.strip().splitlines()[-1]
    assert hint == f"next page: greetflow jobs --campaign {CAMPAIGN} --limit 5 --after {_job_id(CAMPAIGN, 4)}"
    assert "r-0000004" in out and "r-0000005" not in out
    assert main(hint.removeprefix("next page: greetflow ").split()) == 0
    out = capsys.readouterr().out
    assert "r-0000005" in out and "r-0000009" in out and "r-0000004" not in out
    assert main(["jobs", "--campaign", CAMPAIGN, "--after", _job_id(CAMPAIGN, 9)]) == 0
    out = capsys.readouterr().out
    assert "r-0000011" in out and "next page" not in out  # the last page has no hint

    assert main(["jobs", "--state", "failed", "--limit", "1"]) == 0
    assert "r-0000006" in capsys.readouterr().out
    for bad, message in (
        (["jobs", "--after", "nope"], "--after 'nope' is not a job id"),
        (["jobs", "--after", str(uuid.uuid4())], "--after: no job"),
        (["jobs", "--state", "done"], "unknown state in --state done"),
        (["jobs", "--limit", "0"], "--limit must be at least 1"),
    ):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
