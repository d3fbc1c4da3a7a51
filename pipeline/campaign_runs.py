"""One run of a scheduled campaign, step by step. The `campaign_<id>` Airflow DAG
(dags/greetflow_campaigns.py) calls one method per task; nothing here imports Airflow.

A run keeps its working set in the staging bucket under
`campaign-runs/<campaign>/<run>/`, so every step (and every retry, on any worker) sees
the same data, and the run stays auditable afterwards:

- `brief.json`: the brief as validated when the run started (later edits of the brief
  file do not change a run that is under way);
- `audience/part-NNNNN.jsonl`: the resolved audience, one validated recipient a line,
  one file per chunk;
- `jobs/part-NNNNN.txt`: the deterministic job ids of each chunk, one a line.

Steps: `start` (validate), `resolve`, `prewarm`, `submit_part` (one per chunk), `progress`
(polled until every job is settled or the deadline passes), `report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.adapters.storage import ObjectStore, validate_key
from pipeline.audience import check_source, iter_audience
from pipeline.campaigns import (
    BriefError,
    CampaignService,
    TemplateFit,
    check_template_fields,
    load_brief,
    parse_brief,
    summarize_counts,
)
from pipeline.reports import ReportSummary, WrittenReport, write_campaign_report
from pipeline.repositories import JobRepository
from pipeline.settings import Settings
from schemas.brief import CampaignBrief, Recipient, Reference, TemplateRef
from schemas.common import GREETFLOW_NAMESPACE, Locale, utcnow
from schemas.jobs import FINAL_STATES, WAITING_FOR_HUMAN, JobState

log = logging.getLogger(__name__)

RUNS_PREFIX = "campaign-runs"
# (template, locale, the brief's reference assets) -> whether the renderer prewarmed
Prewarm = Callable[[TemplateRef, Locale, tuple[Reference, ...]], bool]


def run_key_for(run_id: str) -> str:
    """An object-key-safe, unique name for an orchestrator run id (e.g. Airflow's
    `scheduled__2027-02-05T12:00:00+00:00`)."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", run_id).strip("-_")[:80] or "run"
    digest = hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


@dataclass(frozen=True)
class RunInfo:
    """What every step of a run needs; small and JSON-safe (it travels as an XCom)."""

    campaign_id: str
    title: str
    run_id: str
    run_key: str
    brief_key: str
    trace_id: str
    deadline: str  # ISO 8601, UTC
    audience: str  # e.g. "inline", "csv:audiences/lny.csv"
    template: dict[str, str]

    @property
    def prefix(self) -> str:
        return f"{RUNS_PREFIX}/{self.campaign_id}/{self.run_key}"

    @property
    def deadline_at(self) -> datetime:
        return datetime.fromisoformat(self.deadline)

    def part_key(self, i: int) -> str:
        return validate_key(f"{self.prefix}/audience/part-{i:05d}.jsonl")

    @property
    def manifest_key(self) -> str:
        """What `resolve` found: the run's recipient and chunk counts."""
        return validate_key(f"{self.prefix}/manifest.json")

    def jobs_key(self, part_key: str) -> str:
        name = Path(part_key).name.removesuffix(".jsonl")
        return validate_key(f"{self.prefix}/jobs/{name}.txt")

    def to_xcom(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_xcom(cls, data: dict[str, Any]) -> RunInfo:
        return cls(**data)


@dataclass(frozen=True)
class Part:
    """One audience chunk: its object key, size and the locales in it."""

    key: str
    recipients: int
    locales: list[str]


@dataclass(frozen=True)
class Resolved:
    parts: list[Part]

    @property
    def recipients(self) -> int:
        return sum(p.recipients for p in self.parts)

    @property
    def locales(self) -> list[str]:
        return sorted({loc for p in self.parts for loc in p.locales})

    def to_xcom(self) -> list[dict[str, Any]]:
        """One entry per chunk (the DAG maps a publish task over them)."""
        return [asdict(p) for p in self.parts]


@dataclass(frozen=True)
class Progress:
    total: int
    counts: dict[str, int]
    unsettled: int
    deadline_passed: bool

    @property
    def settled(self) -> bool:
        return self.unsettled == 0

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v)
        return f"{self.total - self.unsettled}/{self.total} settled ({shown or 'no jobs yet'})"


class CampaignRunService:
    def __init__(
        self,
        settings: Settings,
        store: ObjectStore,
        jobs: JobRepository,
        campaigns: CampaignService,
        prewarm: Prewarm,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.campaigns = campaigns
        self._prewarm = prewarm

    @property
    def bucket(self) -> str:
        return self.settings.bucket_staging

    @property
    def settled_states(self) -> frozenset[JobState]:
        if self.settings.campaign_wait_for_review:
            return FINAL_STATES
        return FINAL_STATES | WAITING_FOR_HUMAN

    # ------------------------------------------------------------------ steps

    def start(
        self,
        brief_path: Path,
        run_id: str,
        *,
        expect_campaign_id: str | None = None,
        deadline_s: float | None = None,
        now: datetime | None = None,
    ) -> RunInfo:
        """Validate the brief file and its audience source; snapshot the brief for the run."""
        brief = load_brief(brief_path, self.settings)
        if expect_campaign_id is not None and brief.campaign_id != expect_campaign_id:
            raise BriefError(
                f"{brief_path} now names campaign {brief.campaign_id!r}, not {expect_campaign_id!r}; "
                "the DAG is re-created under the new id at the next parse"
            )
        check_template_fields(brief, list(brief.recipients))  # the template exists and fits
        src = check_source(brief, self.store, self.settings)
        if self.campaigns.register_webhook(brief) is not None:
            # A task log is no place for a secret: the operator prints (rotates) it.
            log.warning(
                "campaign %s: webhook endpoint on %s registered; print its signing secret with "
                "`greetflow webhook secret %s`",
                brief.campaign_id,
                urlsplit(brief.webhook_url or "").netloc,  # not the path: it may hold a token
                brief.campaign_id,
            )
        now = now or utcnow()
        run = RunInfo(
            campaign_id=brief.campaign_id,
            title=brief.title,
            run_id=run_id,
            run_key=run_key_for(run_id),
            brief_key="",
            trace_id=uuid.uuid5(GREETFLOW_NAMESPACE, f"run:{brief.campaign_id}/{run_id}").hex,
            deadline=(now + timedelta(seconds=deadline_s or self.settings.campaign_deadline_s)).isoformat(),
            audience=src.describe(),
            template={"name": brief.template.name, "version": brief.template.version},
        )
        run = RunInfo(**{**asdict(run), "brief_key": validate_key(f"{run.prefix}/brief.json")})
        self.store.put_bytes(
            self.bucket,
            run.brief_key,
            brief.model_dump_json().encode("utf-8"),
            content_type="application/json",
        )
        log.info("campaign %s run %s: brief valid, audience %s", run.campaign_id, run.run_key, run.audience)
        return run

    def brief(self, run: RunInfo) -> CampaignBrief:
        data = json.loads(self.store.get_bytes(self.bucket, run.brief_key))
        return parse_brief(data, source=f"run snapshot {run.brief_key}", settings=self.settings)

    def resolve(self, run: RunInfo) -> Resolved:
        """Stream the audience into chunk files (and their job ids) in the staging bucket,
        one chunk in memory at a time. Every recipient is checked against the template here
        (a fitted name shape is not measured twice), so a run whose audience does not fit
        fails before any chunk is submitted."""
        brief = self.brief(run)
        fit = TemplateFit(brief)
        stale_keys = self.store.list_keys(self.bucket, f"{run.prefix}/audience/") + self.store.list_keys(
            self.bucket, f"{run.prefix}/jobs/"
        )
        if self.store.exists(self.bucket, run.manifest_key):
            stale_keys.insert(0, run.manifest_key)  # first: a half-done retry counts its files
        for stale in stale_keys:
            self.store.remove(self.bucket, stale)  # a retry of a run whose audience shrank
        parts: list[Part] = []
        for i, chunk in enumerate(iter_audience(brief, store=self.store, settings=self.settings)):
            fit.check(chunk)
            key = run.part_key(i)
            body = "".join(r.model_dump_json() + "\n" for r in chunk).encode("utf-8")
            ids = "".join(f"{self._job_id(brief, r)}\n" for r in chunk).encode("ascii")
            self.store.put_bytes(self.bucket, key, body, content_type="application/x-ndjson")
            self.store.put_bytes(self.bucket, run.jobs_key(key), ids, content_type="text/plain")
            parts.append(Part(key, len(chunk), sorted({r.locale.value for r in chunk})))
        out = Resolved(parts)
        self.store.put_bytes(
            self.bucket,
            run.manifest_key,
            json.dumps({"recipients": out.recipients, "parts": len(parts)}).encode("utf-8"),
            content_type="application/json",
        )
        log.info(
            "campaign %s run %s: %d recipients in %d chunk(s), locales %s",
            run.campaign_id,
            run.run_key,
            out.recipients,
            len(parts),
            ", ".join(out.locales),
        )
        return out

    def prewarm(self, run: RunInfo, locales: list[str]) -> dict[str, Any]:
        """Ask the renderer to build the shared segments of every (template, locale).

        Never fails the run: prewarming only makes the renders faster, so an error is
        logged and returned (the renders then build the segments themselves).
        """
        template = TemplateRef(**run.template)
        references = self.brief(run).references  # style references condition generated plates
        done: list[str] = []
        failed: dict[str, str] = {}
        for loc in locales:
            try:
                if self._prewarm(template, Locale(loc), references):
                    done.append(loc)
            except Exception as exc:
                log.warning("campaign %s: prewarm %s/%s failed: %s", run.campaign_id, template.name, loc, exc)
                failed[loc] = f"{type(exc).__name__}: {exc}"[:500]
        if not done and not failed:
            log.info("campaign %s: the renderer has no prewarm hook; nothing to prewarm", run.campaign_id)
        return {"template": f"{template.name}@{template.version}", "prewarmed": done, "failed": failed}

    def submit_part(self, run: RunInfo, part_key: str, *, retry: bool = False) -> dict[str, int]:
        """Create the chunk's jobs and publish their render requests (idempotent), through
        the intake's batched path (`CampaignService.submit`). A first try requests the jobs
        it created (a stuck one is the sweeper's); a retry (`retry`: the try before failed,
        maybe after its rows were written and before their requests were confirmed) requests
        every job of the chunk that is not final."""
        brief = self.brief(run)
        if not part_key.startswith(f"{run.prefix}/audience/"):
            raise BriefError(f"{part_key!r} is not an audience chunk of run {run.run_key}")
        text = self.store.get_bytes(self.bucket, part_key).decode("utf-8")
        recipients = [Recipient.model_validate_json(line) for line in text.splitlines() if line.strip()]
        res = self.campaigns.submit(
            brief,
            recipients=recipients,
            batch_size=self.settings.campaign_batch_size,
            trace_id=run.trace_id,
            rerequest="pending" if retry else "none",
        )
        return {
            "jobs": res.total,
            "created": res.created,
            "requested": res.requested,
            "already_final": res.already_final,
        }

    def iter_job_ids(self, run: RunInfo) -> Iterator[uuid.UUID]:
        """The run's job ids, one chunk file at a time (never all of them in memory)."""
        for key in sorted(self.store.list_keys(self.bucket, f"{run.prefix}/jobs/")):
            text = self.store.get_bytes(self.bucket, key).decode("ascii")
            yield from (uuid.UUID(line) for line in text.split())

    def job_ids(self, run: RunInfo) -> list[uuid.UUID]:
        """Every job id of the run, as a list: for small runs (tests, tools)."""
        return list(self.iter_job_ids(run))

    def recipients(self, run: RunInfo) -> int:
        """How many jobs the run has, as `resolve` counted them (its manifest); a run
        resolved before manifests existed counts the lines of its job id files."""
        found = self.store.get_versioned(self.bucket, run.manifest_key)
        if found is not None:
            return int(json.loads(found[0])["recipients"])
        total = 0
        for key in self.store.list_keys(self.bucket, f"{run.prefix}/jobs/"):
            total += len(self.store.get_bytes(self.bucket, key).split())
        return total

    def progress(self, run: RunInfo, *, now: datetime | None = None) -> Progress:
        """Counts by state of the run's campaign (one GROUP BY, whatever its size); the
        run's jobs without a row yet count as `missing`."""
        summary = summarize_counts(
            self.recipients(run), self.jobs.counts_by_state(run.campaign_id), self.settled_states
        )
        return Progress(
            total=summary.total,
            counts=summary.counts,
            unsettled=summary.unfinished,
            deadline_passed=(now or utcnow()) > run.deadline_at,
        )

    def report(self, run: RunInfo, *, now: datetime | None = None) -> tuple[ReportSummary, WrittenReport]:
        """The run's report, chart included, streamed from the job table in bounded memory
        (pipeline.reports.write_campaign_report)."""
        total = self.recipients(run)
        written = write_campaign_report(
            self.jobs,
            self.store,
            self.settings.bucket_reports,
            run.campaign_id,
            run_key=run.run_key,
            run_id=run.run_id,
            title=run.title,
            template=run.template,
            audience={"source": run.audience, "recipients": total},
            expected=total,
            settled=self.settled_states,
            deadline=run.deadline_at,
            now=now,
        )
        summary = written.summary
        if summary is None:
            raise RuntimeError("write_campaign_report returned no summary")
        log.info(
            "campaign %s run %s: report %s, chart %s (complete=%s, %d swept, %d failed)",
            run.campaign_id,
            run.run_key,
            written.json_key,
            written.chart_key or "none",
            summary.complete,
            summary.swept,
            summary.failed,
        )
        return summary, written

    def _job_id(self, brief: CampaignBrief, r: Recipient) -> uuid.UUID:
        return self.campaigns.job_id(brief.campaign_id, r.id, brief.template)
