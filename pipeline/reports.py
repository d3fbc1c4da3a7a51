"""Campaign reports: what happened to every job of one campaign run.

A report has the counts by state, the failures with their reasons, the moderation
outcome of every job (automatic or human, from the audited job history) and the URLs
of the published clips. It is written to the reports bucket twice:

- `campaigns/<campaign>/<run>/report.json`: the summary and every job;
- `campaigns/<campaign>/<run>/report.csv`: one row per job, for spreadsheets.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pipeline.adapters.storage import ObjectStore, validate_key
from pipeline.repositories import JobEvent, JobRecord
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


@dataclass(frozen=True)
class CampaignReport:
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
    failures: list[dict[str, Any]]
    pending_review: list[dict[str, Any]]
    published: list[dict[str, Any]]
    jobs: list[JobLine] = field(repr=False)
    # Jobs the sweeper had to re-drive at least once (pipeline/sweeper.py), and failed jobs.
    swept: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return len(self.jobs)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["total"] = self.total
        return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=False).encode("utf-8")

    def to_csv(self) -> bytes:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for j in self.jobs:
            w.writerow(
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
            )
        # A BOM so that spreadsheet programs read the CJK names and reasons as UTF-8.
        return ("\ufeff" + buf.getvalue()).encode("utf-8")


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
    counts: dict[str, int] = {s.value: 0 for s in JobState}
    counts["missing"] = 0
    moderation_counts = {
        "approved": 0,
        "needs_review": 0,
        "rejected": 0,
        "human_approved": 0,
        "human_rejected": 0,
        "not_moderated": 0,
    }
    lines: list[JobLine] = []
    failures: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    published: list[dict[str, Any]] = []
    swept = 0
    complete = True
    for job_id in job_ids:
        rec = by_id.get(job_id)
        if rec is None:
            counts["missing"] += 1
            complete = False
            lines.append(JobLine(str(job_id), "", "", "missing", None, None, False, None, None))
            continue
        counts[rec.state.value] += 1
        if rec.sweeps_total > 0:
            swept += 1
        if rec.state not in settled:
            complete = False
        mod = moderation_of(history.get(job_id, []))
        if mod.outcome is None:
            moderation_counts["not_moderated"] += 1
        elif mod.reviewed:
            moderation_counts[f"human_{mod.outcome}"] = moderation_counts.get(f"human_{mod.outcome}", 0) + 1
        else:
            moderation_counts[mod.outcome] += 1
        line = JobLine(
            job_id=str(rec.job_id),
            recipient_id=rec.recipient_id,
            locale=rec.locale.value,
            state=rec.state.value,
            moderation=mod.outcome,
            moderated_by=mod.decided_by,
            reviewed=mod.reviewed,
            reason=rec.reason,
            url=rec.url if rec.state == JobState.PUBLISHED else None,
            name=str(rec.request_json.get("recipient", {}).get("name", "")),
        )
        lines.append(line)
        if rec.state in (JobState.FAILED, JobState.REJECTED, JobState.TAKEN_DOWN):
            failures.append(
                {
                    "job_id": line.job_id,
                    "recipient_id": line.recipient_id,
                    "state": line.state,
                    "reason": rec.reason or "",
                    "swept": rec.sweeps_total,
                }
            )
        elif rec.state == JobState.NEEDS_REVIEW:
            pending.append(
                {"job_id": line.job_id, "recipient_id": line.recipient_id, "reason": rec.reason or ""}
            )
        elif rec.state == JobState.PUBLISHED:
            published.append({"job_id": line.job_id, "recipient_id": line.recipient_id, "url": rec.url})
    return CampaignReport(
        campaign_id=campaign_id,
        title=title,
        run_id=run_id,
        run_key=run_key,
        template=dict(template),
        audience=dict(audience),
        settled_states=sorted(s.value for s in settled),
        complete=complete,
        deadline=deadline.isoformat() if deadline else None,
        deadline_passed=bool(deadline and now > deadline),
        generated_at=now.isoformat(),
        counts=counts,
        moderation=moderation_counts,
        failures=failures,
        pending_review=pending,
        published=published,
        jobs=lines,
        swept=swept,
        failed=counts[JobState.FAILED.value],
    )


@dataclass(frozen=True)
class WrittenReport:
    json_key: str
    csv_key: str


def write_report(report: CampaignReport, store: ObjectStore, bucket: str) -> WrittenReport:
    prefix = report_prefix(report.campaign_id, report.run_key)
    json_key, csv_key = f"{prefix}/report.json", f"{prefix}/report.csv"
    store.put_bytes(bucket, json_key, report.to_json(), content_type="application/json")
    store.put_bytes(bucket, csv_key, report.to_csv(), content_type="text/csv; charset=utf-8")
    return WrittenReport(json_key=json_key, csv_key=csv_key)


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


def render_state_chart(
    history: Mapping[uuid.UUID, Sequence[JobEvent]],
    *,
    title: str,
    deadline: datetime | None = None,
    until: datetime | None = None,
) -> bytes:
    """A PNG: the campaign's jobs stacked by state over time (UTC), up to `until` (default
    now: the last states hold until then), with the deadline."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
    from matplotlib.figure import Figure

    times, series = state_timeline(history)
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
