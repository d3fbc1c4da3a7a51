"""Campaign intake: validate a brief, create its jobs, request the renders, wait, report."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

import yaml
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from pipeline.briefs import BriefError, DocumentError, load_document, one_line
from pipeline.errors import GreetflowError
from pipeline.ports import EventPublisher
from pipeline.repositories import ExistingJob, JobRecord, JobRepository, NewJob
from pipeline.settings import Settings, get_settings
from pipeline.topics import RENDER_REQUESTS
from pipeline.trust import JobIds, differing_fields
from schemas.brief import ALLOW_LOOPBACK_WEBHOOKS, CampaignBrief, Recipient, Reference, TemplateRef
from schemas.common import Scope, utcnow
from schemas.events import RenderRequested, canonical_json
from schemas.events import _canonical as canonical
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


def check_template_fields(
    brief: CampaignBrief, audience: list[Recipient], settings: Settings | None = None
) -> None:
    """Accepting a brief checks it against its template (pipeline/render/templates.py): the
    template exists, supports each recipient's locale, gets every merge field it uses (a
    required photo, a name some installed font can draw). A problem is a BriefError now,
    not a failed render later."""
    from pipeline.render.templates import check_recipients

    settings = settings or get_settings()
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
    the render step will (durations only: it never needs the samples themselves)."""
    from pipeline.render.audio import SAMPLE_RATE
    from pipeline.render.tts import make_tts

    return make_tts(backend, sample_rate=SAMPLE_RATE, timing_only=True)


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
    # Inline briefs: every job id, in brief order. Audience briefs: empty (a million-row
    # audience is streamed, its ids are never all held); `total` counts them.
    job_ids: tuple[uuid.UUID, ...]
    created: int
    requested: int
    already_final: int
    # The signing secret of the brief's webhook_url endpoint, when this submission created it
    # (shown to the submitter once); None without a webhook_url or when it existed already.
    webhook_secret: str | None = None
    # Jobs in the brief (0: as many as job_ids).
    total: int = 0

    def __post_init__(self) -> None:
        if self.total == 0 and self.job_ids:
            object.__setattr__(self, "total", len(self.job_ids))


@dataclass(frozen=True)
class JobsSummary:
    """Where a set of jobs stands: per state, unfinished, and how many the sweeper had to
    re-drive (`swept`, from the jobs' sweep counters) or that failed."""

    total: int
    counts: dict[str, int]  # state (or "missing": no job row yet) -> jobs
    unfinished: int
    swept: int | None  # None: not known (summarized from counts by state alone)
    failed: int

    def describe(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()) if v)
        swept = "" if self.swept is None else f"{self.swept} swept, "
        return (
            f"{self.unfinished} of {self.total} jobs unfinished ({shown or 'no jobs'}); "
            f"{swept}{self.failed} failed"
        )


def summarize_counts(
    expected: int,
    counts: Mapping[JobState, int],
    settled: frozenset[JobState] = FINAL_STATES,
    *,
    swept: int | None = None,
) -> JobsSummary:
    """Where `expected` jobs stand from their counts by state: the jobs with no row yet
    count as `missing` (and unfinished)."""
    by_state = {JobState(st): n for st, n in counts.items() if n}
    shown = {st.value: n for st, n in by_state.items()}
    found = sum(by_state.values())
    missing = max(expected - found, 0)
    if missing:
        shown["missing"] = missing
    return JobsSummary(
        total=max(expected, found),
        counts=shown,
        unfinished=missing + sum(n for st, n in by_state.items() if st not in settled),
        swept=swept,
        failed=by_state.get(JobState.FAILED, 0),
    )


def summarize_jobs(
    job_ids: Iterable[uuid.UUID], records: Sequence[JobRecord], settled: frozenset[JobState] = FINAL_STATES
) -> JobsSummary:
    counts: dict[JobState, int] = {}
    for r in records:
        counts[r.state] = counts.get(r.state, 0) + 1
    return summarize_counts(
        sum(1 for _ in job_ids), counts, settled, swept=sum(1 for r in records if r.sweeps_total > 0)
    )


AudienceResolver = Callable[[CampaignBrief], Iterable[list[Recipient]]]


class BriefWebhooks(Protocol):
    """The endpoints of briefs' webhook_url (pipeline.webhooks.WebhookService)."""

    def check_url(self, url: str) -> str: ...

    def register_brief(self, campaign_id: str, url: str) -> str | None: ...


# Which existing, non-final jobs a submission requests again:
# - "pending": every one (an inline brief, a retried DAG chunk: the try before may have
#   written the rows and died before their requests were sent);
# - "none": none (a re-run of an audience brief: a stuck job is the sweeper's to re-drive).
Rerequest = Literal["pending", "none"]


class BulkPublisher(Protocol):
    """An event bus that sends a chunk of payloads, given as canonical JSON-ready dicts,
    without waiting (pipeline.adapters.kafka.EventBus)."""

    def send_payloads(
        self,
        topic: str,
        event_type: str,
        schema_version: int,
        items: Sequence[tuple[str, dict[str, Any]]],
        *,
        trace_id: str | None = None,
        texts: Sequence[str] | None = None,
    ) -> Callable[[], int]: ...


def _fit_key(r: Recipient) -> tuple[str, str, bool, bool]:
    """What the template check of a recipient depends on: the name, the locale, whether it
    has a photo, and whether a pictured subject lacks scope animate."""
    unanimated = r.photo_key is not None and any(
        Scope.FACE in u.scopes and Scope.ANIMATE not in u.scopes for u in r.subjects
    )
    return r.name, r.locale.value, r.photo_key is not None, unanimated


def _fit_problem(
    brief: CampaignBrief, todo: list[Recipient], detail: list[Recipient], settings: Settings
) -> str | None:
    """`check_template_fields` in a fit worker process: None, or the error's text (measured
    over `detail`, every recipient of the chunk with one of those shapes, as the plain check
    names them)."""
    try:
        check_template_fields(brief, todo, settings)
    except BriefError as exc:
        try:
            check_template_fields(brief, detail, settings)
        except BriefError as full:
            return str(full)
        return str(exc)
    return None


class TemplateFit:
    """`check_template_fields` over a stream of chunks: a (name, locale, photo) shape that
    fitted once is not measured again (names repeat a lot in real audiences). A chunk with
    a problem is checked in full, so the error names its recipients as the plain check does.

    With `workers`, the chunks after the first are measured in that many worker processes
    while the caller reads on; `drain` then waits for them and raises the first problem, in
    chunk order. A worker pool that cannot start leaves the checks in this process."""

    MAX_SHAPES = 200_000  # remembered shapes; past that the memory starts afresh
    MAX_PENDING = 400  # chunks handed to the workers and not measured yet

    def __init__(self, brief: CampaignBrief, *, workers: int = 0, settings: Settings | None = None) -> None:
        self.brief = brief
        self._fits: set[tuple[str, str, bool, bool]] = set()
        self._lock = threading.Lock()
        self._workers = workers
        self._settings = settings
        self._pool: ProcessPoolExecutor | None = None
        self._pending: deque[Future[str | None]] = deque()
        self._checks = 0

    def check(self, audience: Sequence[Recipient]) -> None:
        with self._lock:
            self._checks += 1
            if self._workers > 0 and self._checks > 1 and self._submit(audience):
                return
            self._check(audience)

    def drain(self) -> None:
        """Wait for the chunks handed to the workers; BriefError for the first problem. Later
        checks run in this process."""
        with self._lock:
            self._workers = 0
            try:
                while self._pending:
                    self._settle(self._pending.popleft())
            finally:
                self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    def _todo(self, audience: Sequence[Recipient]) -> dict[tuple[str, str, bool, bool], Recipient]:
        todo: dict[tuple[str, str, bool, bool], Recipient] = {}
        for r in audience:
            key = _fit_key(r)
            if key not in self._fits and key not in todo:
                todo[key] = r
        return todo

    def _remember(self, shapes: Iterable[tuple[str, str, bool, bool]], count: int) -> None:
        if len(self._fits) + count > self.MAX_SHAPES:
            self._fits.clear()
        self._fits.update(shapes)

    def _check(self, audience: Sequence[Recipient]) -> None:
        todo = self._todo(audience)
        if not todo:
            return
        try:
            check_template_fields(self.brief, list(todo.values()), self._settings)
        except BriefError:
            check_template_fields(
                self.brief, [r for r in audience if _fit_key(r) not in self._fits], self._settings
            )
            raise
        self._remember(todo, len(todo))

    def _submit(self, audience: Sequence[Recipient]) -> bool:
        """Hand the chunk's new shapes to a worker (False: no pool, check here). A shape in
        flight counts as known to later chunks: if it does not fit, `drain` fails the whole
        intake anyway."""
        todo = self._todo(audience)
        if not todo:
            return True
        try:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=self._workers, mp_context=multiprocessing.get_context("spawn")
                )
            detail = [r for r in audience if _fit_key(r) in todo]
            fut = self._pool.submit(
                _fit_problem, self.brief, list(todo.values()), detail, self._settings or get_settings()
            )
        except (OSError, RuntimeError, AssertionError) as exc:  # e.g. a daemonic process
            log.info("template fit: no worker process (%s); measuring here", exc)
            self._workers = 0
            self.close()
            return False
        self._remember(todo, len(todo))
        self._pending.append(fut)
        while self._pending and (len(self._pending) > self.MAX_PENDING or self._pending[0].done()):
            self._settle(self._pending.popleft())
        return True

    def _settle(self, fut: Future[str | None]) -> None:
        try:
            problem = fut.result()
        except BrokenProcessPool as exc:
            self.close()
            raise BriefError(
                f"brief {self.brief.campaign_id}: the template fit worker died ({exc})"
            ) from None
        if problem is not None:
            self.close()
            raise BriefError(problem)


# The fields of a render request that differ between the recipients of one brief.
_VARYING = ("job_id", "recipient", "locale", "requested_at")


class _TextTemplate:
    """The canonical JSON text of a dict whose top-level `keys` vary, from the texts of
    those values alone: the rest is serialized once, with a marker where each key's value
    goes. Same text as `canonical_json` of the whole dict (keys sorted, at any depth)."""

    def __init__(self, proto: Mapping[str, Any], keys: Sequence[str]) -> None:
        # a control character never survives validation: the markers cannot clash
        marks = {k: canonical_json(f"\x00{k}\x00") for k in keys}
        text = canonical_json({**proto, **{k: f"\x00{k}\x00" for k in keys}})
        spots = sorted((text.index(mark), k) for k, mark in marks.items())
        self._order = [k for _, k in spots]
        self._parts: list[str] = []
        at = 0
        for pos, k in spots:
            self._parts.append(text[at:pos])
            at = pos + len(marks[k])
        self._parts.append(text[at:])

    def fill(self, values: Mapping[str, str]) -> str:
        """The whole text, given each varying key's value as canonical JSON text."""
        out = [self._parts[0]]
        for k, part in zip(self._order, self._parts[1:], strict=True):
            out.append(values[k])
            out.append(part)
        return "".join(out)


class RequestFactory:
    """Render requests of one brief as canonical JSON-ready dicts (what a consumer's
    `Envelope.signed_content` computes from the parsed model) and job rows, without a
    pydantic model per recipient: the brief's part is dumped once, each recipient's
    validated model once."""

    def __init__(self, brief: CampaignBrief, job_ids: JobIds) -> None:
        self.brief = brief
        self.job_ids = job_ids
        proto = render_request_for(brief, Recipient(id="prototype", name="prototype"), job_ids)
        self._proto: dict[str, Any] = canonical(proto.model_dump(mode="python"))
        self._text = _TextTemplate(self._proto, _VARYING)

    def prepare(self, recipients: Sequence[Recipient]) -> tuple[list[str], list[dict[str, Any]]]:
        """The job ids and the canonical recipient dicts of a chunk (what `rows_of` takes)."""
        b = self.brief
        name, version = b.template.name, b.template.version
        job_id = self.job_ids.job_id
        ids = [str(job_id(b.campaign_id, r.id, name, version)) for r in recipients]
        recs = [
            canonical(r.model_dump(mode="python")) if r.subjects else r.model_dump(mode="json")
            for r in recipients
        ]
        return ids, recs

    def rows_of(
        self, job_ids: Sequence[str], recs: Sequence[dict[str, Any]]
    ) -> tuple[list[NewJob], list[dict[str, Any]]]:
        """Job rows and request payloads of prepared recipients, requested now."""
        b = self.brief
        name, version = b.template.name, b.template.version
        requested_at = to_jsonable_python(utcnow())
        rows: list[NewJob] = []
        payloads: list[dict[str, Any]] = []
        at_text = canonical_json(requested_at)
        fill = self._text.fill
        for job_id, rec in zip(job_ids, recs, strict=True):
            locale = rec["locale"]
            payload = {
                **self._proto,
                "job_id": job_id,
                "recipient": rec,
                "locale": locale,
                "requested_at": requested_at,
            }
            text = fill(
                {
                    "job_id": canonical_json(job_id),
                    "recipient": canonical_json(rec),
                    "locale": canonical_json(locale),
                    "requested_at": at_text,
                }
            )
            rows.append(
                NewJob(job_id, b.campaign_id, rec["id"], name, version, locale, payload, text)
            )  # fmt: skip
            payloads.append(payload)
        return rows, payloads

    def build(self, recipients: Sequence[Recipient]) -> tuple[list[NewJob], list[dict[str, Any]]]:
        return self.rows_of(*self.prepare(recipients))


@dataclass(frozen=True)
class _Prepared:
    """A chunk validated and fitted, ready to store: its job ids, canonical recipients and,
    per row, whether it had no job when it was checked (None: none of the campaign's had)."""

    job_ids: list[str]
    recs: list[dict[str, Any]]
    new: list[bool] | None


def _spill(items: Iterable[_Prepared], into: IO[bytes]) -> int:
    """Write prepared chunks to a private temporary file; the rows written."""
    rows = 0
    for item in items:
        pickle.dump((item.job_ids, item.recs, item.new), into, protocol=pickle.HIGHEST_PROTOCOL)
        rows += len(item.job_ids)
    return rows


def _unspill(spill: IO[bytes]) -> Iterator[_Prepared]:
    spill.seek(0)
    while True:
        try:
            job_ids, recs, new = pickle.load(spill)  # this process's own private file
        except EOFError:
            return
        yield _Prepared(job_ids, recs, new)


def _same_request(fresh: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    """Whether a job row holds the request the brief asks for (requested_at aside)."""
    a = {k: v for k, v in fresh.items() if k != "requested_at"}
    b = {k: v for k, v in stored.items() if k != "requested_at"}
    if a == b:
        return True
    try:
        row = RenderRequested.model_validate(stored)
    except ValidationError:
        return False
    return not differing_fields(_request_fields(RenderRequested.model_validate(fresh)), _request_fields(row))


def _log_intake(campaign_id: str, tally: _Tally, elapsed_s: float, validated_s: float) -> None:
    """The intake's summary line; its fields also travel as log extras (`greetflow bench
    scale` reads them from the JSON log)."""
    log.info(
        "campaign %s: %d jobs (%d new), %d render requests sent, %d already final (%.1f s)",
        campaign_id, tally.total, tally.created, tally.requested, tally.final, elapsed_s,
        extra={
            "intake": {
                "campaign_id": campaign_id,
                "jobs": tally.total,
                "created": tally.created,
                "requested": tally.requested,
                "already_final": tally.final,
                "elapsed_s": round(elapsed_s, 3),
                "validate_s": round(validated_s, 3),
            }
        },
    )  # fmt: skip


def _row_payload(job: ExistingJob) -> dict[str, Any]:
    """The canonical payload of the request a job row holds."""
    return dict(canonical(RenderRequested.model_validate(job.request_json).model_dump(mode="python")))


@dataclass(frozen=True)
class _Stored:
    rows: list[NewJob]
    payloads: list[dict[str, Any]]
    created: frozenset[str]
    existing: list[ExistingJob]


@dataclass
class _Tally:
    total: int = 0
    created: int = 0
    requested: int = 0
    final: int = 0
    differ: int = 0
    differ_example: str = ""


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
        self,
        brief: CampaignBrief,
        *,
        trace_id: str | None = None,
        owner: str | None = None,
        fit_workers: int = 0,
    ) -> SubmitResult:
        """Submit a whole brief: its inline recipients (`submit`), or its audience object,
        streamed. `owner`: the API tenant submitting it (None: the CLI or a DAG). A
        `webhook_url` is checked before any job is written and registered as the campaign's
        endpoint after (BriefError when the webhook guard refuses it); its secret comes back
        once, in `webhook_secret`.

        An audience is read twice, chunk by chunk (`Settings.campaign_chunk_size`), never
        whole. The first pass validates every row (the model, duplicate ids, the template
        fit) and writes nothing, so a bad row anywhere fails the intake (AudienceError or
        BriefError, naming the row) before any job exists. The second pass creates each
        chunk's jobs with one batched insert and sends its render requests as one batched
        produce, confirmed before the intake reports success (the sends of a chunk overlap
        the insert of the next). `fit_workers`: processes that measure the template fit of
        the second chunk on while this one reads (`TemplateFit`).

        A submission requests only the jobs it created. Existing jobs are left alone: their
        workers move them on, and a job stuck with no message left to move it (its request
        lost) is the sweeper's to re-drive, which knows a backlog being drained from a lost
        request (leases) and gives up after `sweep_max_attempts`. Final jobs are never
        requested again. A re-run of a million-row campaign thus reads its rows and sends
        nothing, however long its jobs have been waiting for render capacity."""
        self._webhook(brief, register=False)
        if brief.audience_key is None:
            res = self.submit(brief, trace_id=trace_id, owner=owner)
            return replace(res, webhook_secret=self._webhook(brief, register=True))
        if self.audience is None:
            raise BriefError(f"brief {brief.campaign_id}: this intake cannot resolve audience_key audiences")
        t0 = time.perf_counter()
        fit = TemplateFit(brief, workers=fit_workers)
        factory = RequestFactory(brief, self.job_ids)
        with tempfile.TemporaryFile(prefix="greetflow-intake-") as spill:
            # the validation pass: nothing is written but this process's own spill file
            try:
                rows = _spill(self._prepare(brief, self.audience(brief), factory, fit), spill)
                fit.drain()
            finally:
                fit.close()
            validated_s = time.perf_counter() - t0
            log.info(
                "campaign %s: %d recipients valid (%.1f s); submitting", brief.campaign_id, rows, validated_s
            )
            self._screen_references(brief)
            tally = self._fan_out(
                brief, _unspill(spill), factory, fit=fit, rerequest="none", trace_id=trace_id, owner=owner
            )
        secret = self._webhook(brief, register=True)
        _log_intake(brief.campaign_id, tally, time.perf_counter() - t0, validated_s)
        return SubmitResult(
            brief.campaign_id,
            (),
            tally.created,
            tally.requested,
            tally.final,
            webhook_secret=secret,
            total=tally.total,
        )

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
        rerequest: Rerequest = "pending",
    ) -> SubmitResult:
        """Create (idempotently) one job per recipient, `batch_size` jobs per batched insert
        and produce, and request its render. Jobs already final are not requested again,
        so re-running a campaign publishes nothing new for them; `rerequest` says which
        other existing jobs are (default: every one not final; "none": no existing job)."""
        audience = list(recipients if recipients is not None else brief.recipients)
        fit = TemplateFit(brief)
        fit.check(audience)
        self._screen_references(brief)
        factory = RequestFactory(brief, self.job_ids)
        batches = (audience[i : i + batch_size] for i in range(0, len(audience), max(batch_size, 1)))
        t0 = time.perf_counter()
        tally = self._fan_out(
            brief,
            self._prepare(brief, batches, factory, fit),
            factory,
            fit=fit,
            rerequest=rerequest,
            trace_id=trace_id,
            owner=owner,
        )
        _log_intake(brief.campaign_id, tally, time.perf_counter() - t0, 0.0)
        ids = tuple(self.job_id(brief.campaign_id, r.id, brief.template) for r in audience)
        return SubmitResult(
            campaign_id=brief.campaign_id,
            job_ids=ids,
            created=tally.created,
            requested=tally.requested,
            already_final=tally.final,
            total=len(ids),
        )

    def _prepare(
        self,
        brief: CampaignBrief,
        chunks: Iterable[Sequence[Recipient]],
        factory: RequestFactory,
        fit: TemplateFit,
    ) -> Iterator[_Prepared]:
        """Per chunk: its job ids and canonical recipients, and the template check of the
        recipients that have no job yet (a job row was checked when it was created, so a
        re-run measures no name again). A campaign without any job row skips the lookups."""
        known = self.jobs.has_jobs(brief.campaign_id)
        for chunk in chunks:
            if not chunk:
                continue
            ids, recs = factory.prepare(chunk)
            new: list[bool] | None = None
            fresh: Sequence[Recipient] = chunk
            if known:
                have = self.jobs.existing_ids(ids)
                new = [job_id not in have for job_id in ids]
                fresh = [r for r, is_new in zip(chunk, new, strict=True) if is_new]
            fit.check(fresh)
            yield _Prepared(ids, recs, new)

    def _screen_references(self, brief: CampaignBrief) -> None:
        if self.screen_references is not None and brief.references:
            self.screen_references(brief.campaign_id, brief.references)

    def _fan_out(
        self,
        brief: CampaignBrief,
        chunks: Iterable[_Prepared],
        factory: RequestFactory,
        *,
        fit: TemplateFit,
        rerequest: Rerequest,
        trace_id: str | None,
        owner: str | None,
    ) -> _Tally:
        """Store each prepared chunk (photo screen, one batched insert of its new jobs), then
        send its requests. Storing runs on a thread of its own: chunk k+1 is written while
        the requests of chunk k are encoded and handed to the producer, and a chunk's
        requests are sent only once its rows are written. The sends of a chunk are confirmed
        after the next chunk's are handed over; every send is confirmed before this returns."""
        trace = trace_id or uuid.uuid4().hex
        tally = _Tally()
        unconfirmed: Callable[[], int] | None = None
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake-store") as pool:
                stored: Future[_Stored] | None = None
                for item in chunks:
                    nxt = pool.submit(self._store, brief, item, factory, fit, owner)
                    if stored is not None:
                        unconfirmed = self._send_stored(stored.result(), rerequest, tally, trace, unconfirmed)
                    stored = nxt
                if stored is not None:
                    unconfirmed = self._send_stored(stored.result(), rerequest, tally, trace, unconfirmed)
            if unconfirmed is not None:
                pending, unconfirmed = unconfirmed, None
                pending()
        finally:
            if unconfirmed is not None:  # a failure: still hand over what was sent before it
                try:
                    unconfirmed()
                except Exception as exc:
                    log.warning(
                        "campaign %s: render requests of the last chunk unconfirmed: %s",
                        brief.campaign_id,
                        exc,
                    )
        if tally.differ:
            log.warning(
                "campaign %s: %d recipient(s) differ from their jobs (e.g. %s); the jobs keep what "
                "they were created with",
                brief.campaign_id, tally.differ, tally.differ_example,
            )  # fmt: skip
        return tally

    def _store(
        self,
        brief: CampaignBrief,
        item: _Prepared,
        factory: RequestFactory,
        fit: TemplateFit,
        owner: str | None,
    ) -> _Stored:
        """Write a prepared chunk's new jobs; read the rows of those that existed."""
        rows, payloads = factory.rows_of(item.job_ids, item.recs)
        if item.new is None:
            new_rows, existing = rows, []
        else:
            new_rows = [row for row, is_new in zip(rows, item.new, strict=True) if is_new]
            old = [row.job_id for row, is_new in zip(rows, item.new, strict=True) if not is_new]
            existing = self.jobs.existing_jobs(old)
            if len(existing) < len(old):
                # rows deleted since they were checked: checked now, then created again
                gone = set(old) - {e.job_id for e in existing}
                back = [row for row in rows if row.job_id in gone]
                fit.check([Recipient.model_validate(row.request_json["recipient"]) for row in back])
                new_rows += back
        photos = [
            Recipient.model_validate(row.request_json["recipient"])
            for row in new_rows
            if row.request_json["recipient"].get("photo_key")
        ]
        if self.screen_photos is not None and photos:
            self.screen_photos(brief.campaign_id, photos)
        created = self.jobs.create_many(new_rows, owner=owner, actor="intake")
        return _Stored(rows, payloads, created.created, [*existing, *created.existing])

    def _send_stored(
        self,
        stored: _Stored,
        rerequest: Rerequest,
        tally: _Tally,
        trace: str,
        unconfirmed: Callable[[], int] | None,
    ) -> Callable[[], int]:
        """Hand a stored chunk's requests to the bus, then confirm the chunk before it."""
        items, texts = self._to_request(
            stored.rows, stored.payloads, stored.created, stored.existing, rerequest, tally
        )
        confirm = self._send(items, texts, trace)
        if unconfirmed is not None:
            unconfirmed()
        return confirm

    def _to_request(
        self,
        rows: Sequence[NewJob],
        payloads: Sequence[dict[str, Any]],
        created: frozenset[str],
        existing: Sequence[ExistingJob],
        rerequest: Rerequest,
        tally: _Tally,
    ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
        """The (key, payload) of every request a chunk sends, and each one's canonical JSON
        text where the row has it: its new jobs, then the existing ones `rerequest` picks,
        with what their rows hold (the row is the truth)."""
        tally.total += len(rows)
        tally.created += len(created)
        out = [(row.job_id, p) for row, p in zip(rows, payloads, strict=True) if row.job_id in created]
        texts = [row.request_text for row in rows if row.job_id in created]
        fresh = {row.job_id: p for row, p in zip(rows, payloads, strict=True)} if existing else {}
        for job in existing:
            if job.state in FINAL_STATES:
                tally.final += 1
                continue
            asked = fresh.get(job.job_id)
            if asked is not None and not _same_request(asked, job.request_json):
                tally.differ += 1
                tally.differ_example = tally.differ_example or f"job {job.job_id}"
            if rerequest == "pending":
                out.append((job.job_id, _row_payload(job)))
                texts.append("")
        tally.requested += len(out)
        return out, texts

    def _send(
        self, items: Sequence[tuple[str, dict[str, Any]]], texts: Sequence[str], trace_id: str
    ) -> Callable[[], int]:
        """Hand the requests to the bus; the callable returned waits for their acks."""
        send_payloads = getattr(self.events, "send_payloads", None)
        if send_payloads is not None:
            bulk: BulkPublisher = self.events  # type: ignore[assignment]
            return bulk.send_payloads(
                RENDER_REQUESTS,
                RenderRequested.event_type,
                RenderRequested.schema_version,
                items,
                trace_id=trace_id,
                texts=texts,
            )
        for key, payload in items:
            self.events.publish(
                RENDER_REQUESTS, RenderRequested.model_validate(payload), key=key, trace_id=trace_id
            )
        sent = len(items)
        return lambda: sent

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

    def wait_campaign(
        self,
        campaign_id: str,
        *,
        expected: int,
        timeout_s: float,
        poll_s: float = 0.5,
        settled: frozenset[JobState] = FINAL_STATES,
        on_progress: Callable[[dict[JobState, int]], None] | None = None,
    ) -> dict[JobState, int]:
        """Block until `expected` jobs of the campaign exist and all are settled, or the
        timeout passes; returns the job count per state (every state present). Each poll is
        one GROUP BY over the campaign, never a read of its rows, so it suits any size."""
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.jobs.counts_by_state(campaign_id)
            if on_progress is not None:
                on_progress({st: n for st, n in counts.items() if n})
            total = sum(counts.values())
            if total >= expected and all(n == 0 for st, n in counts.items() if st not in settled):
                return counts
            if time.monotonic() > deadline:
                shown = ", ".join(f"{st.value}={n}" for st, n in counts.items() if n) or "no jobs"
                log.warning(
                    "wait: campaign %s after %g s: %s of %d expected", campaign_id, timeout_s, shown, expected
                )
                return counts
            time.sleep(poll_s)
