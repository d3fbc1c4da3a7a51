"""Campaign intake: validate a brief, create its jobs, request the renders, wait, report."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.errors import PermanentError
from pipeline.ports import EventPublisher
from pipeline.repositories import JobRecord, JobRepository
from pipeline.topics import RENDER_REQUESTS
from schemas.brief import CampaignBrief, Recipient
from schemas.common import job_id_for
from schemas.events import RenderRequested
from schemas.jobs import FINAL_STATES, JobState

log = logging.getLogger(__name__)


class BriefError(PermanentError):
    pass


def parse_brief(data: Any, *, source: str = "brief") -> CampaignBrief:
    try:
        return CampaignBrief.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source} is not a valid campaign brief:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            lines.append(f"  - {loc}: {err['msg']}")
        raise BriefError("\n".join(lines)) from exc


def check_template_fields(brief: CampaignBrief, audience: list[Recipient]) -> None:
    """Accepting a brief checks it against its template (pipeline/render/templates.py): the
    template exists, supports each recipient's locale, gets every merge field it uses (a
    required photo, a name some installed font can draw). A problem is a BriefError now,
    not a failed render later."""
    from pipeline.render.templates import check_recipients
    from pipeline.settings import get_settings

    settings = get_settings()
    problems = check_recipients(
        brief.template, audience, extra_dir=settings.templates_dir, font_dirs=tuple(settings.font_dirs)
    )
    if problems:
        ref = f"{brief.template.name}@{brief.template.version}"
        lines = [f"brief {brief.campaign_id} does not fit template {ref}:"]
        lines += [f"  - {p}" for p in problems]
        raise BriefError("\n".join(lines))


def load_brief(path: Path) -> CampaignBrief:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BriefError(f"cannot read brief {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BriefError(f"{path} is not valid YAML/JSON: {exc}") from exc
    return parse_brief(data, source=str(path))


def sample_brief(recipients: int | None = None) -> CampaignBrief:
    """The bundled Lunar New Year brief, optionally cut or extended to N recipients."""
    text = resources.files("pipeline.samples").joinpath("lunar_new_year.yaml").read_text("utf-8")
    brief = parse_brief(yaml.safe_load(text), source="sample brief")
    if recipients is None:
        return brief
    if recipients < 1:
        raise BriefError("recipients must be at least 1")
    base = brief.recipients
    extended: list[Recipient] = []
    for i in range(recipients):
        r = base[i % len(base)]
        if i < len(base):
            extended.append(r)
        else:
            extended.append(r.model_copy(update={"id": f"{r.id}-{i // len(base)}"}))
    return brief.model_copy(update={"recipients": tuple(extended)})


def render_request_for(brief: CampaignBrief, recipient: Recipient) -> RenderRequested:
    job_id = job_id_for(brief.campaign_id, recipient.id, brief.template.name, brief.template.version)
    return RenderRequested(
        job_id=job_id,
        campaign_id=brief.campaign_id,
        recipient=recipient,
        template=brief.template,
        locale=recipient.locale,
    )


@dataclass(frozen=True)
class SubmitResult:
    campaign_id: str
    job_ids: tuple[uuid.UUID, ...]
    created: int
    requested: int
    already_final: int


@dataclass(frozen=True)
class JobsSummary:
    """Where a set of jobs stands: per state, unfinished, and how many the sweeper had to
    re-drive (`swept`, from the jobs' sweep counters) or that failed."""

    total: int
    counts: dict[str, int]  # state (or "missing": no job row yet) -> jobs
    unfinished: int
    swept: int
    failed: int

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v)
        return (
            f"{self.unfinished} of {self.total} jobs unfinished ({shown or 'no jobs'}); "
            f"{self.swept} swept, {self.failed} failed"
        )


def summarize_jobs(
    job_ids: Iterable[uuid.UUID], records: Sequence[JobRecord], settled: frozenset[JobState] = FINAL_STATES
) -> JobsSummary:
    ids = list(job_ids)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    missing = len(ids) - len(records)
    if missing > 0:
        counts["missing"] = missing
    return JobsSummary(
        total=len(ids),
        counts=counts,
        unfinished=max(missing, 0) + sum(1 for r in records if r.state not in settled),
        swept=sum(1 for r in records if r.sweeps_total > 0),
        failed=sum(1 for r in records if r.state == JobState.FAILED),
    )


def _chunks(items: list[RenderRequested], size: int) -> Iterator[list[RenderRequested]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class CampaignService:
    def __init__(self, jobs: JobRepository, events: EventPublisher) -> None:
        self.jobs = jobs
        self.events = events

    def submit(
        self,
        brief: CampaignBrief,
        *,
        recipients: list[Recipient] | None = None,
        batch_size: int = 500,
        trace_id: str | None = None,
    ) -> SubmitResult:
        """Create (idempotently) one job per recipient and request its render.

        Jobs already in a final state are not requested again, so re-running a campaign
        publishes nothing new for them.
        """
        audience = list(recipients if recipients is not None else brief.recipients)
        check_template_fields(brief, audience)
        trace = trace_id or uuid.uuid4().hex
        reqs = [render_request_for(brief, r) for r in audience]
        created = requested = final = 0
        for chunk in _chunks(reqs, batch_size):
            pending: list[RenderRequested] = []
            for req in chunk:
                if self.jobs.create_if_absent(req):
                    created += 1
                job = self.jobs.get(req.job_id)
                if job is not None and job.state in FINAL_STATES:
                    final += 1
                    continue
                pending.append(req)
            publish_many = getattr(self.events, "publish_many", None)
            if publish_many is not None:
                publish_many(RENDER_REQUESTS, [(str(r.job_id), r) for r in pending], trace_id=trace)
            else:
                for r in pending:
                    self.events.publish(RENDER_REQUESTS, r, key=str(r.job_id), trace_id=trace)
            requested += len(pending)
        log.info(
            "campaign %s: %d jobs (%d new), %d render requests sent, %d already final",
            brief.campaign_id,
            len(reqs),
            created,
            requested,
            final,
        )
        return SubmitResult(
            campaign_id=brief.campaign_id,
            job_ids=tuple(r.job_id for r in reqs),
            created=created,
            requested=requested,
            already_final=final,
        )

    def wait(
        self,
        job_ids: tuple[uuid.UUID, ...],
        *,
        timeout_s: float,
        poll_s: float = 0.5,
        settled: frozenset[JobState] = FINAL_STATES,
        on_progress: Callable[[dict[JobState, int]], None] | None = None,
    ) -> list[JobRecord]:
        """Block until every job is settled or the timeout passes; returns the latest records
        (`summarize_jobs` counts them, swept and failed ones included)."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = [r for r in (self.jobs.get(j) for j in job_ids) if r is not None]
            counts: dict[JobState, int] = {}
            for r in records:
                counts[r.state] = counts.get(r.state, 0) + 1
            if on_progress is not None:
                on_progress(counts)
            if len(records) == len(job_ids) and all(r.state in settled for r in records):
                return records
            if time.monotonic() > deadline:
                log.warning("wait: %s", summarize_jobs(job_ids, records, settled).describe())
                return records
            time.sleep(poll_s)
