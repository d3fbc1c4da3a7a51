"""Campaign intake: validate a brief, create its jobs, request the renders, wait, report."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml
from pydantic import ValidationError

from pipeline.briefs import BriefError, DocumentError, load_document, one_line
from pipeline.errors import GreetflowError
from pipeline.ports import EventPublisher
from pipeline.repositories import JobRecord, JobRepository
from pipeline.settings import Settings, get_settings
from pipeline.topics import RENDER_REQUESTS
from pipeline.trust import JobIds, differing_fields
from schemas.brief import ALLOW_LOOPBACK_WEBHOOKS, CampaignBrief, Recipient, Reference, TemplateRef
from schemas.events import RenderRequested
from schemas.jobs import FINAL_STATES, JobState

if TYPE_CHECKING:
    from pipeline.render.tts import TTS

__all__ = ["BriefError", "CampaignService", "load_brief", "parse_brief"]

log = logging.getLogger(__name__)


def parse_brief(data: Any, *, source: str = "brief", settings: Settings | None = None) -> CampaignBrief:
    """Validate brief data; every problem in ONE line (`source: not a valid campaign brief: ...`)."""
    allow_loopback = (settings or get_settings()).intake_allow_loopback_webhooks
    try:
        return CampaignBrief.model_validate(data, context={ALLOW_LOOPBACK_WEBHOOKS: allow_loopback})
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:20]:
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            problems.append(f"{loc}: {one_line(str(err['msg']).removeprefix('Value error, '))}")
        more = f" (and {exc.error_count() - 20} more)" if exc.error_count() > 20 else ""
        raise BriefError(f"{source}: not a valid campaign brief: {'; '.join(problems)}{more}") from None


def check_template_fields(brief: CampaignBrief, audience: list[Recipient]) -> None:
    """Accepting a brief checks it against its template (pipeline/render/templates.py): the
    template exists, supports each recipient's locale, gets every merge field it uses (a
    required photo, a name some installed font can draw). A problem is a BriefError now,
    not a failed render later."""
    from pipeline.render.templates import check_recipients

    settings = get_settings()
    problems = check_recipients(
        brief.template,
        audience,
        extra_dir=settings.templates_dir,
        font_dirs=tuple(settings.font_dirs),
        size=None if settings.render_variant else (settings.render_width, settings.render_height),
        variant=settings.render_variant or None,
        tts=_intake_tts(settings.tts_backend),
    )
    problems += _living_photo_problems(brief, audience, settings.templates_dir)
    if problems:
        ref = f"{brief.template.name}@{brief.template.version}"
        raise BriefError(f"brief {brief.campaign_id} does not fit template {ref}: {'; '.join(problems)}")


def _living_photo_problems(
    brief: CampaignBrief, audience: list[Recipient], extra_dir: Path | None
) -> list[str]:
    """A template that animates the photo needs scope animate on each pictured subject."""
    from pipeline.consent.rules import living_photo_problems
    from pipeline.render.templates import TemplateError, get_template

    try:
        template = get_template(brief.template, extra_dir).template
    except TemplateError:
        return []  # check_recipients reported it
    return living_photo_problems(template, audience)[:20]


@lru_cache(maxsize=2)
def _intake_tts(backend: str) -> TTS:
    """The renderer's TTS at the renderer's sample rate: intake times a voice line exactly as
    the render step will."""
    from pipeline.render.audio import SAMPLE_RATE
    from pipeline.render.tts import make_tts

    return make_tts(backend, sample_rate=SAMPLE_RATE)


def load_brief(path: Path, settings: Settings | None = None) -> CampaignBrief:
    """Read a brief file with the intake limits (pipeline/briefs.py) and validate it."""
    s = settings or get_settings()
    try:
        data = load_document(path, max_bytes=s.intake_max_brief_bytes, max_depth=s.intake_max_depth)
    except DocumentError as exc:
        raise BriefError(str(exc)) from None
    return parse_brief(data, source=str(path), settings=s)


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


def render_request_for(
    brief: CampaignBrief, recipient: Recipient, job_ids: JobIds | None = None
) -> RenderRequested:
    """The render request of one recipient, with its keyed job id (`job_ids`; None: this
    process's settings)."""
    if job_ids is None:
        job_ids = JobIds.from_settings(get_settings())
    job_id = job_ids.job_id(brief.campaign_id, recipient.id, brief.template.name, brief.template.version)
    return RenderRequested(
        job_id=job_id,
        campaign_id=brief.campaign_id,
        recipient=recipient,
        template=brief.template,
        locale=recipient.locale,
        references=brief.references,
    )


def _request_fields(req: RenderRequested) -> dict[str, Any]:
    return req.model_dump(mode="python", exclude={"requested_at"})


@dataclass(frozen=True)
class SubmitResult:
    campaign_id: str
    job_ids: tuple[uuid.UUID, ...]
    created: int
    requested: int
    already_final: int
    # The signing secret of the brief's webhook_url endpoint, when this submission created it
    # (shown to the submitter once); None without a webhook_url or when it existed already.
    webhook_secret: str | None = None


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


AudienceResolver = Callable[[CampaignBrief], Iterable[list[Recipient]]]


class BriefWebhooks(Protocol):
    """The endpoints of briefs' webhook_url (pipeline.webhooks.WebhookService)."""

    def check_url(self, url: str) -> str: ...

    def register_brief(self, campaign_id: str, url: str) -> str | None: ...


def _chunks(items: list[RenderRequested], size: int) -> Iterator[list[RenderRequested]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class CampaignService:
    """Intake: the trusted producer of render requests. It writes each job's row first and
    then requests the render of what the row holds, so the render step never has to take a
    message's word for a job."""

    def __init__(
        self,
        jobs: JobRepository,
        events: EventPublisher,
        *,
        job_ids: JobIds,
        audience: AudienceResolver | None = None,
        screen_photos: Callable[[str, Sequence[Recipient]], None] | None = None,
        brief_webhooks: BriefWebhooks | None = None,
        screen_references: Callable[[str, Sequence[Reference]], None] | None = None,
    ) -> None:
        self.jobs = jobs
        # Registers the endpoint of a brief's webhook_url (pipeline/webhooks).
        self.brief_webhooks = brief_webhooks
        self.events = events
        self.job_ids = job_ids
        # Refuses recipients whose photo shows a protected person (PhotoScreen).
        self.screen_photos = screen_photos
        # Refuses character references with no usable face or a protected person's (PhotoScreen).
        self.screen_references = screen_references
        # Resolves an `audience_key` brief into recipient chunks (pipeline.audience).
        self.audience = audience

    def job_id(self, campaign_id: str, recipient_id: str, template: TemplateRef) -> uuid.UUID:
        return self.job_ids.job_id(campaign_id, recipient_id, template.name, template.version)

    def request_render(
        self,
        campaign_id: str,
        recipient: Recipient,
        template: TemplateRef,
        *,
        trace_id: str | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        """One render outside a brief (an app's request, an event-triggered render): create
        the job row and request the render of what it holds; a job already final is not
        requested again. BriefError when the job exists with other content (the same
        campaign, recipient id and template must mean the same clip)."""
        req = RenderRequested(
            job_id=self.job_id(campaign_id, recipient.id, template),
            campaign_id=campaign_id,
            recipient=recipient,
            template=template,
            locale=recipient.locale,
        )
        if self.screen_photos is not None:
            self.screen_photos(campaign_id, [recipient])
        self.jobs.create_if_absent(req, actor="intake", owner=owner)
        job = self.jobs.get(req.job_id)
        if job is None:
            raise RuntimeError(f"job {req.job_id} is gone right after it was created")
        if job.owner != owner:
            raise BriefError(
                f"job {req.job_id} of campaign {campaign_id} / recipient {recipient.id} belongs to "
                "another owner"
            )
        differ = differing_fields(_request_fields(req), _request_fields(job.request))
        if differ:
            raise BriefError(
                f"job {req.job_id} of campaign {campaign_id} / recipient {recipient.id} already exists "
                f"with other content ({', '.join(differ)})"
            )
        if job.state not in FINAL_STATES:
            self.events.publish(RENDER_REQUESTS, job.request, key=str(job.job_id), trace_id=trace_id)
        return job

    def submit_brief(
        self, brief: CampaignBrief, *, trace_id: str | None = None, owner: str | None = None
    ) -> SubmitResult:
        """Submit a whole brief: its inline recipients, or its audience object resolved chunk
        by chunk (the object must exist; every chunk is checked before it is submitted).
        `owner`: the API tenant submitting it (None: the CLI or a DAG). A `webhook_url` is
        registered as the campaign's endpoint first (BriefError when the webhook guard
        refuses it); its secret comes back once, in `webhook_secret`."""
        self._webhook(brief, register=False)
        if brief.audience_key is None:
            res = self.submit(brief, trace_id=trace_id, owner=owner)
            return replace(res, webhook_secret=self._webhook(brief, register=True))
        if self.audience is None:
            raise BriefError(f"brief {brief.campaign_id}: this intake cannot resolve audience_key audiences")
        trace = trace_id or uuid.uuid4().hex
        ids: list[uuid.UUID] = []
        created = requested = final = 0
        chunks = list(self.audience(brief))
        for chunk in chunks:  # nothing is submitted unless every recipient fits
            check_template_fields(brief, chunk)
        for chunk in chunks:
            res = self.submit(brief, recipients=chunk, trace_id=trace, owner=owner)
            ids.extend(res.job_ids)
            created, requested, final = (
                created + res.created,
                requested + res.requested,
                final + res.already_final,
            )
        secret = self._webhook(brief, register=True)
        return SubmitResult(brief.campaign_id, tuple(ids), created, requested, final, webhook_secret=secret)

    def register_webhook(self, brief: CampaignBrief) -> str | None:
        """Check and register the brief's webhook_url as the campaign's endpoint: its new
        secret, or None (no webhook_url, or the endpoint exists); BriefError when refused."""
        self._webhook(brief, register=False)
        return self._webhook(brief, register=True)

    def _webhook(self, brief: CampaignBrief, *, register: bool) -> str | None:
        """Check the brief's webhook_url (before any job is written), or register it (after
        the jobs are, so a refused brief leaves no endpoint whose secret nobody saw)."""
        if brief.webhook_url is None or self.brief_webhooks is None:
            return None
        try:
            if not register:
                self.brief_webhooks.check_url(brief.webhook_url)
                return None
            return self.brief_webhooks.register_brief(brief.campaign_id, brief.webhook_url)
        except GreetflowError as exc:
            raise BriefError(f"brief {brief.campaign_id}: webhook_{exc}") from None

    def submit(
        self,
        brief: CampaignBrief,
        *,
        recipients: list[Recipient] | None = None,
        batch_size: int = 500,
        trace_id: str | None = None,
        owner: str | None = None,
    ) -> SubmitResult:
        """Create (idempotently) one job per recipient and request its render.

        Jobs already in a final state are not requested again, so re-running a campaign
        publishes nothing new for them.
        """
        audience = list(recipients if recipients is not None else brief.recipients)
        check_template_fields(brief, audience)
        if self.screen_photos is not None:
            self.screen_photos(brief.campaign_id, audience)
        if self.screen_references is not None and brief.references:
            self.screen_references(brief.campaign_id, brief.references)
        trace = trace_id or uuid.uuid4().hex
        reqs = [render_request_for(brief, r, self.job_ids) for r in audience]
        created = requested = final = 0
        for chunk in _chunks(reqs, batch_size):
            pending: list[RenderRequested] = []
            for req in chunk:
                if self.jobs.create_if_absent(req, owner=owner):
                    created += 1
                job = self.jobs.get(req.job_id)
                if job is None:
                    raise RuntimeError(f"job {req.job_id} is gone right after it was created")
                if job.state in FINAL_STATES:
                    final += 1
                    continue
                # The row is the truth: request what it holds, even when the brief changed.
                differ = differing_fields(_request_fields(req), _request_fields(job.request))
                if differ:
                    log.warning(
                        "campaign %s: recipient %s differs from its job %s (%s); the job keeps "
                        "what it was created with",
                        brief.campaign_id, req.recipient.id, job.job_id, ", ".join(differ),
                    )  # fmt: skip
                pending.append(job.request)
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
