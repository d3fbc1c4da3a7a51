"""Campaign reports: what happened to every job of one campaign run.

A report has the counts by state, the failures with their reasons, the moderation
outcome of every job (automatic or human, from the audited job history) and the URLs
of the published clips. It is written to the reports bucket twice:

- `campaigns/<campaign>/<run>/report.json`: the summary and every job;
- `campaigns/<campaign>/<run>/report.csv`: one row per job, for spreadsheets.

`build_report` makes one in memory from records already loaded (a few jobs);
`write_campaign_report` streams a campaign of any size from the job table in keyset
pages into spooled temporary files and uploads them, so its memory does not grow with
the campaign.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

from pipeline.adapters.storage import ObjectStore, validate_key
from pipeline.repositories import JobEvent, JobLineRow, JobRecord, JobRepository
from schemas.common import Locale, utcnow
from schemas.jobs import FINAL_STATES, WAITING_FOR_HUMAN, JobState

REPORTS_PREFIX = "campaigns"
# A cell starting with one of these is a formula to a spreadsheet program (CSV injection).
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> str:
    """A CSV cell that a spreadsheet shows as text: a formula-looking value gets a leading
    apostrophe (the text itself, e.g. a recipient's name, is kept as it was given)."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(CSV_FORMULA_START) else text


MODERATION_OUTCOMES = (JobState.APPROVED, JobState.NEEDS_REVIEW, JobState.REJECTED)
CSV_COLUMNS = (
    "job_id",
    "recipient_id",
    "locale",
    "state",
    "moderation",
    "moderated_by",
    "reviewed",
    "reason",
    "url",
    "name",
)


def report_prefix(campaign_id: str, run_key: str) -> str:
    return validate_key(f"{REPORTS_PREFIX}/{campaign_id}/{run_key}")


@dataclass(frozen=True)
class Moderation:
    """The last moderation decision of a job (None fields: not moderated yet)."""

    outcome: str | None = None  # approved | needs_review | rejected
    decided_by: str | None = None
    reason: str | None = None
    reviewed: bool = False  # a human decided after needs_review


def moderation_of(events: Sequence[JobEvent]) -> Moderation:
    """From the audited history: the automatic decision, overridden by a human review."""
    out = Moderation()
    for ev in events:
        if ev.to_state not in MODERATION_OUTCOMES:
            continue
        if ev.from_state == JobState.MODERATING:
            out = Moderation(ev.to_state.value, ev.actor, ev.reason, reviewed=False)
        elif ev.from_state == JobState.NEEDS_REVIEW:
            out = Moderation(ev.to_state.value, ev.actor, ev.reason, reviewed=True)
    return out


@dataclass(frozen=True)
class JobLine:
    job_id: str
    recipient_id: str
    locale: str
    state: str
    moderation: str | None
    moderated_by: str | None
    reviewed: bool
    reason: str | None
    url: str | None
    # The recipient's display name as intake accepted it (a CSV cell neutralizes formulas).
    name: str = ""


# The summary keys a report.json writes after its lists and jobs.
_TAIL = ("swept", "failed", "total")


@dataclass(frozen=True)
class ReportSummary:
    """The head of a report.json without its lists: what a caller checks after writing it."""

    campaign_id: str
    title: str
    run_id: str
    run_key: str
    template: dict[str, str]
    audience: dict[str, Any]
    settled_states: list[str]
    complete: bool
    deadline: str | None
    deadline_passed: bool
    generated_at: str
    counts: dict[str, int]
    moderation: dict[str, int]
    # Jobs the sweeper had to re-drive at least once (pipeline/sweeper.py), and failed jobs.
    swept: int
    failed: int
    total: int


@dataclass(frozen=True)
class CampaignReport(ReportSummary):
    """A whole report in memory (small campaigns; `write_campaign_report` streams one)."""

    failures: list[dict[str, Any]]
    pending_review: list[dict[str, Any]]
    published: list[dict[str, Any]]
    jobs: list[JobLine] = field(repr=False)

    def to_json(self) -> bytes:
        data = asdict(self)
        data.update({k: data.pop(k) for k in _TAIL})  # the head, the lists, the jobs, the tail
        return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False).encode("utf-8")

    def to_csv(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for j in self.jobs:
            w.writerow(_csv_row(j))
        # A BOM so that spreadsheet programs read the CJK names and reasons as UTF-8.
        return ("\ufeff" + buf.getvalue()).encode("utf-8")


class _Tally:
    """The running counts of a report, one job at a time."""

    def __init__(self, settled: frozenset[JobState]) -> None:
        self.settled = settled
        self.counts: dict[str, int] = {s.value: 0 for s in JobState}
        self.counts["missing"] = 0
        self.moderation = {
            "approved": 0,
            "needs_review": 0,
            "rejected": 0,
            "human_approved": 0,
            "human_rejected": 0,
            "not_moderated": 0,
        }
        self.swept = 0
        self.complete = True

    def missing(self, n: int = 1) -> None:
        if n > 0:
            self.counts["missing"] += n
            self.complete = False

    def add(self, state: JobState, sweeps_total: int, mod: Moderation) -> None:
        self.counts[state.value] += 1
        if sweeps_total > 0:
            self.swept += 1
        if state not in self.settled:
            self.complete = False
        if mod.outcome is None:
            self.moderation["not_moderated"] += 1
        elif mod.reviewed:
            key = f"human_{mod.outcome}"
            self.moderation[key] = self.moderation.get(key, 0) + 1
        else:
            self.moderation[mod.outcome] += 1

    def head(
        self,
        *,
        campaign_id: str,
        title: str,
        run_id: str,
        run_key: str,
        template: Mapping[str, str] | None,
        audience: Mapping[str, Any] | None,
        deadline: datetime | None,
        now: datetime,
        total: int,
    ) -> dict[str, Any]:
        """The fields of a ReportSummary, from these counts."""
        return {
            "campaign_id": campaign_id,
            "title": title,
            "run_id": run_id,
            "run_key": run_key,
            "template": dict(template or {}),
            "audience": dict(audience or {}),
            "settled_states": sorted(s.value for s in self.settled),
            "complete": self.complete,
            "deadline": deadline.isoformat() if deadline else None,
            "deadline_passed": bool(deadline and now > deadline),
            "generated_at": now.isoformat(),
            "counts": self.counts,
            "moderation": self.moderation,
            "swept": self.swept,
            "failed": self.counts[JobState.FAILED.value],
            "total": total,
        }


def _job_line(
    *,
    job_id: uuid.UUID,
    recipient_id: str,
    locale: str,
    state: JobState,
    reason: str | None,
    url: str | None,
    name: str,
    mod: Moderation,
) -> JobLine:
    return JobLine(
        job_id=str(job_id),
        recipient_id=recipient_id,
        locale=locale,
        state=state.value,
        moderation=mod.outcome,
        moderated_by=mod.decided_by,
        reviewed=mod.reviewed,
        reason=reason,
        url=url if state == JobState.PUBLISHED else None,
        name=name,
    )


def _listed(line: JobLine, sweeps_total: int) -> tuple[str, dict[str, Any]] | None:
    """The summary list the job belongs to (failures, pending_review, published), with its entry."""
    state = JobState(line.state)
    if state in (JobState.FAILED, JobState.REJECTED, JobState.TAKEN_DOWN):
        return "failures", {
            "job_id": line.job_id,
            "recipient_id": line.recipient_id,
            "state": line.state,
            "reason": line.reason or "",
            "swept": sweeps_total,
        }
    if state == JobState.NEEDS_REVIEW:
        return "pending_review", {
            "job_id": line.job_id,
            "recipient_id": line.recipient_id,
            "reason": line.reason or "",
        }
    if state == JobState.PUBLISHED:
        return "published", {"job_id": line.job_id, "recipient_id": line.recipient_id, "url": line.url}
    return None


def _csv_row(j: JobLine) -> list[str]:
    return [
        csv_cell(c)
        for c in [
            j.job_id,
            j.recipient_id,
            j.locale,
            j.state,
            j.moderation or "",
            j.moderated_by or "",
            "yes" if j.reviewed else "",
            j.reason or "",
            j.url or "",
            j.name,
        ]
    ]


def build_report(
    *,
    campaign_id: str,
    title: str,
    run_id: str,
    run_key: str,
    template: dict[str, str],
    audience: dict[str, Any],
    job_ids: Iterable[uuid.UUID],
    records: Sequence[JobRecord],
    history: dict[uuid.UUID, list[JobEvent]],
    settled: frozenset[JobState] = FINAL_STATES | WAITING_FOR_HUMAN,
    deadline: datetime | None = None,
    now: datetime | None = None,
) -> CampaignReport:
    """A report over the run's jobs. A job id with no record yet counts as `missing`."""
    now = now or utcnow()
    by_id = {r.job_id: r for r in records}
    tally = _Tally(settled)
    lines: list[JobLine] = []
    listed: dict[str, list[dict[str, Any]]] = {"failures": [], "pending_review": [], "published": []}
    for job_id in job_ids:
        rec = by_id.get(job_id)
        if rec is None:
            tally.missing()
            lines.append(JobLine(str(job_id), "", "", "missing", None, None, False, None, None))
            continue
        mod = moderation_of(history.get(job_id, []))
        tally.add(rec.state, rec.sweeps_total, mod)
        line = _job_line(
            job_id=rec.job_id,
            recipient_id=rec.recipient_id,
            locale=rec.locale.value,
            state=rec.state,
            reason=rec.reason,
            url=rec.url,
            name=str(rec.request_json.get("recipient", {}).get("name", "")),
            mod=mod,
        )
        lines.append(line)
        entry = _listed(line, rec.sweeps_total)
        if entry is not None:
            listed[entry[0]].append(entry[1])
    return CampaignReport(
        **tally.head(
            campaign_id=campaign_id,
            title=title,
            run_id=run_id,
            run_key=run_key,
            template=template,
            audience=audience,
            deadline=deadline,
            now=now,
            total=len(lines),
        ),
        failures=listed["failures"],
        pending_review=listed["pending_review"],
        published=listed["published"],
        jobs=lines,
    )


@dataclass(frozen=True)
class WrittenReport:
    json_key: str
    csv_key: str
    # Set by write_campaign_report: the summary it wrote and the chart's key (None: no chart).
    summary: ReportSummary | None = None
    chart_key: str | None = None


def write_report(report: CampaignReport, store: ObjectStore, bucket: str) -> WrittenReport:
    prefix = report_prefix(report.campaign_id, report.run_key)
    json_key, csv_key = f"{prefix}/report.json", f"{prefix}/report.csv"
    store.put_bytes(bucket, json_key, report.to_json(), content_type="application/json")
    store.put_bytes(bucket, csv_key, report.to_csv(), content_type="text/csv; charset=utf-8")
    return WrittenReport(json_key=json_key, csv_key=csv_key)


# A section of a streamed report stays in memory up to this size, then moves to a temp file.
SPOOL_BYTES = 1 << 20
REPORT_PAGE_SIZE = 2_000
_LISTS = ("failures", "pending_review", "published")


def _spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES, mode="w+b")


def _json_item(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def _append(out: IO[bytes], item: bytes, first: bool) -> None:
    out.write(b"\n    " + item if first else b",\n    " + item)


def _copy_section(out: IO[bytes], section: IO[bytes], empty: bool) -> None:
    out.write(b"[]" if empty else b"[")
    if not empty:
        section.seek(0)
        while chunk := section.read(1 << 16):
            out.write(chunk)
        out.write(b"\n  ]")


def write_campaign_report(
    jobs: JobRepository,
    store: ObjectStore,
    bucket: str,
    campaign_id: str,
    *,
    run_key: str = "adhoc",
    run_id: str | None = None,
    title: str = "",
    template: Mapping[str, str] | None = None,
    audience: Mapping[str, Any] | None = None,
    expected: int | None = None,
    settled: frozenset[JobState] = FINAL_STATES | WAITING_FOR_HUMAN,
    deadline: datetime | None = None,
    now: datetime | None = None,
    chart: bool = True,
    page_size: int = REPORT_PAGE_SIZE,
) -> WrittenReport:
    """Write report.json, report.csv (and the state chart) of every job of the campaign to
    `campaigns/<campaign>/<run_key>/` in `bucket`, in memory that does not grow with the
    campaign: job rows come in keyset pages, each page's moderation events in one batched
    read, the sections go to spooled temporary files and are uploaded as streams.

    `expected`: how many jobs the run should have (its recipients); fewer rows count as
    `missing`. Jobs are listed in creation order (created_at, job_id).
    """
    now = now or utcnow()
    prefix = report_prefix(campaign_id, run_key)
    json_key, csv_key = f"{prefix}/report.json", f"{prefix}/report.csv"
    tally = _Tally(settled)
    rows = 0
    with _spool() as lines_f, _spool() as csv_f, _spool() as fail_f, _spool() as pend_f, _spool() as pub_f:
        sections = {"failures": fail_f, "pending_review": pend_f, "published": pub_f}
        sizes = dict.fromkeys(_LISTS, 0)
        # A BOM so that spreadsheet programs read the CJK names and reasons as UTF-8.
        csv_f.write(("\ufeff" + ",".join(CSV_COLUMNS) + "\n").encode("utf-8"))
        for page in jobs.iter_campaign_lines(campaign_id, page_size=page_size):
            history = jobs.history_many([r.job_id for r in page], to_states=MODERATION_OUTCOMES)
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            for r in page:
                mod = moderation_of(history.get(r.job_id, []))
                line = _line_of(r, mod)
                tally.add(r.state, r.sweeps_total, mod)
                _append(lines_f, _json_item(dict(vars(line))), rows == 0)
                rows += 1
                w.writerow(_csv_row(line))
                entry = _listed(line, r.sweeps_total)
                if entry is not None:
                    _append(sections[entry[0]], _json_item(entry[1]), sizes[entry[0]] == 0)
                    sizes[entry[0]] += 1
            csv_f.write(buf.getvalue().encode("utf-8"))
        if expected is not None:
            tally.missing(expected - rows)
        summary = ReportSummary(
            **tally.head(
                campaign_id=campaign_id,
                title=title,
                run_id=run_id if run_id is not None else run_key,
                run_key=run_key,
                template=template,
                audience=audience,
                deadline=deadline,
                now=now,
                total=max(rows, expected or 0),
            )
        )
        with _spool() as out:
            head = asdict(summary)
            tail = {k: head.pop(k) for k in _TAIL}
            # The keys in CampaignReport.to_json's order: the head, the lists, the jobs, the tail.
            out.write(b"{\n")
            for k, v in head.items():
                out.write(b"  " + _json_item(k) + b": " + _json_item(v) + b",\n")
            for name in _LISTS:
                out.write(b"  " + _json_item(name) + b": ")
                _copy_section(out, sections[name], sizes[name] == 0)
                out.write(b",\n")
            out.write(b'  "jobs": ')
            _copy_section(out, lines_f, rows == 0)
            for k, v in tail.items():
                out.write(b",\n  " + _json_item(k) + b": " + _json_item(v))
            out.write(b"\n}\n")
            store.put_fileobj(bucket, json_key, out, content_type="application/json")
        store.put_fileobj(bucket, csv_key, csv_f, content_type="text/csv; charset=utf-8")
    chart_key = None
    if chart:
        chart_key = write_campaign_chart(
            jobs,
            store,
            bucket,
            campaign_id,
            run_key=run_key,
            title=f"{title or campaign_id} ({campaign_id}, run {run_key}): jobs by state",
            deadline=deadline,
            until=now,
        )
    return WrittenReport(json_key=json_key, csv_key=csv_key, summary=summary, chart_key=chart_key)


def _line_of(r: JobLineRow, mod: Moderation) -> JobLine:
    return _job_line(
        job_id=r.job_id,
        recipient_id=r.recipient_id,
        locale=r.locale,
        state=r.state,
        reason=r.reason,
        url=r.url,
        name=r.name,
        mod=mod,
    )


# --------------------------------------------------------------------------- chart: jobs by state over time

CHART_KEY_NAME = "jobs-by-state.png"
# Stacked bottom to top: the working states first, the final ones on top.
CHART_STATES: tuple[JobState, ...] = (
    JobState.REQUESTED,
    JobState.RENDERING,
    JobState.RENDERED,
    JobState.MODERATING,
    JobState.APPROVED,
    JobState.PUBLISHING,
    JobState.NEEDS_REVIEW,
    JobState.PUBLISHED,
    JobState.REJECTED,
    JobState.TAKEN_DOWN,
    JobState.FAILED,
)
CHART_COLORS: dict[JobState, str] = {
    JobState.REQUESTED: "#c7c7c7",
    JobState.RENDERING: "#9ecae1",
    JobState.RENDERED: "#6baed6",
    JobState.MODERATING: "#fdd0a2",
    JobState.APPROVED: "#a1d99b",
    JobState.PUBLISHING: "#74c476",
    JobState.NEEDS_REVIEW: "#fdae6b",
    JobState.PUBLISHED: "#238b45",
    JobState.REJECTED: "#9e9ac8",
    JobState.TAKEN_DOWN: "#756bb1",
    JobState.FAILED: "#de2d26",
}


def state_timeline(
    history: Mapping[uuid.UUID, Sequence[JobEvent]],
) -> tuple[list[datetime], dict[JobState, list[int]]]:
    """Jobs per state after every recorded transition (job_events), oldest first: the
    times, and one count series per state of CHART_STATES."""
    events = sorted((ev for evs in history.values() for ev in evs), key=lambda ev: (ev.at, ev.id))
    current: dict[uuid.UUID, JobState] = {}
    counts = dict.fromkeys(CHART_STATES, 0)
    times: list[datetime] = []
    series: dict[JobState, list[int]] = {st: [] for st in CHART_STATES}
    for ev in events:
        before = current.get(ev.job_id)
        if before is not None:
            counts[before] -= 1
        current[ev.job_id] = ev.to_state
        counts[ev.to_state] += 1
        if times and times[-1] == ev.at:
            for st in CHART_STATES:
                series[st][-1] = counts[st]
            continue
        times.append(ev.at)
        for st in CHART_STATES:
            series[st].append(counts[st])
    return times, series


# The most time buckets of a chart drawn from aggregated events (campaign_timeline).
CHART_BUCKETS = 600


def campaign_timeline(
    jobs: JobRepository, campaign_id: str, *, buckets: int = CHART_BUCKETS
) -> tuple[list[datetime], dict[JobState, list[int]]]:
    """`state_timeline` of a campaign of any size, from its events counted per time bucket
    and transition in the database (one GROUP BY), not from every job's history: a job
    moving S -> T in a bucket is one less in S and one more in T from that bucket on."""
    span = jobs.campaign_event_span(campaign_id)
    series: dict[JobState, list[int]] = {st: [] for st in CHART_STATES}
    if span is None:
        return [], series
    first, last = span
    width = max((last - first).total_seconds() / max(buckets - 1, 1), 0.001)
    delta: dict[int, dict[JobState, int]] = {}
    for b, src, dst, n in jobs.campaign_state_flow(campaign_id, origin=first, width_s=width):
        step = delta.setdefault(b, {})
        step[dst] = step.get(dst, 0) + n
        if src is not None:
            step[src] = step.get(src, 0) - n
    counts = dict.fromkeys(CHART_STATES, 0)
    times: list[datetime] = []
    for b in sorted(delta):
        for st, n in delta[b].items():
            counts[st] = counts.get(st, 0) + n
        times.append(min(first + timedelta(seconds=b * width), last))
        for st in CHART_STATES:
            series[st].append(counts[st])
    return times, series


def render_state_chart(
    history: Mapping[uuid.UUID, Sequence[JobEvent]],
    *,
    title: str,
    deadline: datetime | None = None,
    until: datetime | None = None,
) -> bytes:
    """A PNG: the campaign's jobs stacked by state over time (UTC), up to `until` (default
    now: the last states hold until then), with the deadline."""
    times, series = state_timeline(history)
    return render_timeline_chart(times, series, title=title, deadline=deadline, until=until)


def render_timeline_chart(
    times: list[datetime],
    series: dict[JobState, list[int]],
    *,
    title: str,
    deadline: datetime | None = None,
    until: datetime | None = None,
) -> bytes:
    """The PNG of `render_state_chart` from a timeline already computed (the times and
    one count series per state of CHART_STATES)."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    times = list(times)
    series = {st: list(v) for st, v in series.items()}
    end = max(until or utcnow(), times[-1]) if times else None
    if end is not None and end > times[-1]:
        times.append(end)
        for counts in series.values():
            counts.append(counts[-1])
    x: list[float] = [float(date2num(t)) for t in times]  # type: ignore[no-untyped-call]
    fig = Figure(figsize=(10, 5), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    shown = [st for st in CHART_STATES if any(series[st])]
    if times:
        ax.stackplot(
            x,
            *[series[st] for st in shown],
            labels=[st.value for st in shown],
            colors=[CHART_COLORS[st] for st in shown],
            step="post",
        )
        right = x[-1]
        if deadline is not None:
            at = float(date2num(deadline))  # type: ignore[no-untyped-call]
            # Drawn when it does not squash the history into a sliver of the chart.
            if x[0] <= at <= x[-1] + (x[-1] - x[0]):
                ax.axvline(at, color="black", linestyle="--", linewidth=1, label="deadline")
                right = max(right, at + 0.02 * (x[-1] - x[0]))
        locator = AutoDateLocator()  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
        ax.set_xlim(x[0], right)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    else:
        ax.text(0.5, 0.5, "no job events yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontproperties=_title_font(title))
    ax.set_xlabel("time (UTC)")
    ax.set_ylabel("jobs")
    ax.margins(x=0)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _title_font(title: str) -> Any:
    """Font properties of a face that has every glyph of `title` (campaign titles are often
    Chinese or Japanese, which matplotlib's default face lacks); None: the default face."""
    from matplotlib.font_manager import FontProperties

    from pipeline.render.fonts import FontNotFoundError, find_font_face

    try:
        face = find_font_face(title, Locale.ZH_HANT_HK, weight="regular")
    except FontNotFoundError as exc:
        logging.getLogger(__name__).warning("report chart title drawn without some glyphs: %s", exc)
        return None
    return FontProperties(fname=str(face.path))


def write_chart(
    report: CampaignReport,
    history: Mapping[uuid.UUID, Sequence[JobEvent]],
    store: ObjectStore,
    bucket: str,
) -> str | None:
    """`campaigns/<campaign>/<run>/jobs-by-state.png` beside the report; None (logged) when
    matplotlib is not installed (it comes with the `airflow` extra)."""
    try:
        png = render_state_chart(
            history,
            title=f"{report.title} ({report.campaign_id}, run {report.run_key}): jobs by state",
            deadline=datetime.fromisoformat(report.deadline) if report.deadline else None,
            until=datetime.fromisoformat(report.generated_at),
        )
    except ImportError:
        logging.getLogger(__name__).warning("no report chart: matplotlib is not installed")
        return None
    key = f"{report_prefix(report.campaign_id, report.run_key)}/{CHART_KEY_NAME}"
    store.put_bytes(bucket, key, png, content_type="image/png")
    return key


def write_campaign_chart(
    jobs: JobRepository,
    store: ObjectStore,
    bucket: str,
    campaign_id: str,
    *,
    run_key: str,
    title: str,
    deadline: datetime | None = None,
    until: datetime | None = None,
) -> str | None:
    """`campaigns/<campaign>/<run>/jobs-by-state.png` from the campaign's aggregated events
    (`campaign_timeline`); None (logged) when matplotlib is not installed."""
    times, series = campaign_timeline(jobs, campaign_id)
    try:
        png = render_timeline_chart(times, series, title=title, deadline=deadline, until=until)
    except ImportError:
        logging.getLogger(__name__).warning("no report chart: matplotlib is not installed")
        return None
    key = f"{report_prefix(campaign_id, run_key)}/{CHART_KEY_NAME}"
    store.put_bytes(bucket, key, png, content_type="image/png")
    return key
