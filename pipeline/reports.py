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
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pipeline.adapters.storage import ObjectStore, validate_key
from pipeline.repositories import JobEvent, JobRecord
from schemas.common import utcnow
from schemas.jobs import FINAL_STATES, WAITING_FOR_HUMAN, JobState

REPORTS_PREFIX = "campaigns"
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
                [
                    j.job_id,
                    j.recipient_id,
                    j.locale,
                    j.state,
                    j.moderation or "",
                    j.moderated_by or "",
                    "yes" if j.reviewed else "",
                    j.reason or "",
                    j.url or "",
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
