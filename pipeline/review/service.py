"""The review queue's service: log in, list cases, claim, decide (with four eyes where
needed), reopen a likeness rejection on appeal, and escalate overdue cases (SLA).

No web framework in here: pipeline/review/app.py is a thin FastAPI layer over it, the
`review_sla` DAG calls `escalate_overdue`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from argon2 import PasswordHasher

from pipeline.adapters.storage import ObjectStore
from pipeline.errors import GreetflowError
from pipeline.ports import EventPublisher
from pipeline.repositories import (
    ConsentRecord,
    ConsentRepository,
    JobEvent,
    JobRecord,
    JobRepository,
    ModerationResult,
    ModerationResultRepository,
)
from pipeline.review.hashing import HashPool, HashPoolBusy
from pipeline.review.repository import (
    AuditEntry,
    Lease,
    QueueItem,
    ReviewCase,
    ReviewRepository,
    Role,
    SessionInfo,
    Throttle,
    ThrottleScope,
)
from pipeline.settings import Settings
from pipeline.steps import decision_event_id
from pipeline.topics import MODERATION_DECISIONS
from schemas.events import Decision, Finding, ModerationDecided, Severity
from schemas.jobs import JobState

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LIKENESS_KINDS: frozenset[str] = frozenset({"protected_person", "unknown_face"})
MIN_PASSWORD_CHARS = 12
MAX_REASON_CHARS = 2000

# argon2id with the library's RFC 9106 "low memory" defaults (64 MiB, t=3, p=4); the
# service hashes with the cost from the settings (review_argon2_*), through its HashPool.
_hasher = PasswordHasher()


class ReviewError(GreetflowError):
    status = 400
    # Sent as Retry-After when set.
    retry_after_s: int | None = None


class CaseNotFound(ReviewError):
    status = 404


class Forbidden(ReviewError):
    status = 403


class Conflict(ReviewError):
    status = 409


class InvalidInput(ReviewError):
    status = 422


class LoginThrottled(ReviewError):
    """Too many failed logins for this account or client IP: refused without checking
    the password."""

    status = 429

    def __init__(self, retry_after_s: int, *, locked: bool) -> None:
        what = "locked after too many failed logins" if locked else "too many failed logins"
        super().__init__(f"{what}: try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s
        self.locked = locked


class LoginBusy(ReviewError):
    """Every password-hashing slot is busy."""

    status = 503

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("too many logins at once: try again shortly")
        self.retry_after_s = retry_after_s


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def validate_reviewer_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput("a reviewer name is 1-64 characters: letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class MediaFinding:
    """A finding and presigned links to the evidence it names (face crop)."""

    finding: Finding
    crop_url: str | None


@dataclass(frozen=True)
class ConsentView:
    record: ConsentRecord
    evidence_url: str | None


@dataclass(frozen=True)
class CaseView:
    job: JobRecord
    result: ModerationResult | None
    findings: list[MediaFinding]
    consents: dict[str, list[ConsentView]]
    history: list[JobEvent]
    decisions: list[ModerationResult]
    audit: list[AuditEntry]
    case: ReviewCase | None
    lease: Lease | None
    clip_url: str | None
    poster_url: str | None
    four_eyes: bool
    waiting_since: datetime | None
    overdue: bool
    can_reopen: bool


@dataclass(frozen=True)
class Outcome:
    job_id: uuid.UUID
    status: Literal["approved", "rejected", "pending_second_approval", "reopened"]
    by: str


@dataclass(frozen=True)
class QueueFilters:
    campaign: str | None = None
    kind: str | None = None
    min_age_h: float | None = None
    max_age_h: float | None = None


def blocking_or_warning(findings: tuple[Finding, ...] | list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity != Severity.INFO]


class ReviewService:
    def __init__(
        self,
        settings: Settings,
        repo: ReviewRepository,
        jobs: JobRepository,
        results: ModerationResultRepository,
        consents: ConsentRepository,
        store: ObjectStore,
        events: EventPublisher,
        hash_pool: HashPool | None = None,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.jobs = jobs
        self.results = results
        self.consents = consents
        self.store = store
        self.events = events
        self.hashes = hash_pool or HashPool(
            slots=settings.review_hash_concurrency,
            wait_s=settings.review_hash_wait_s,
            max_waiting=settings.review_hash_max_waiting,
            memory_kib=settings.review_argon2_memory_kib,
            time_cost=settings.review_argon2_time_cost,
            parallelism=settings.review_argon2_parallelism,
        )

    # --- reviewers and sessions ---

    def add_user(self, name: str, role: Role, password: str) -> bool:
        validate_reviewer_name(name)
        if len(password) < MIN_PASSWORD_CHARS:
            raise InvalidInput(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
        return self.repo.upsert_reviewer(name, role, self._hash(password))

    def _hash(self, password: str) -> str:
        try:
            return self.hashes.hash(password)
        except HashPoolBusy as exc:
            raise LoginBusy(exc.retry_after_s) from None

    def _block_for(self, scope: ThrottleScope, failures: int) -> tuple[float, bool] | None:
        """Exponential backoff after the free failures, then a lockout."""
        st = self.settings
        if scope == "account":
            free, lockout = st.review_login_free_failures, st.review_login_lockout_failures
        else:
            free, lockout = st.review_login_ip_free_failures, st.review_login_ip_lockout_failures
        if failures >= lockout:
            return st.review_login_lockout_s, True
        if failures < free:
            return None
        backoff = st.review_login_backoff_s * 2.0 ** min(failures - free, 30)
        return min(backoff, st.review_login_backoff_max_s), False

    def _throttled(self, actor: str, ip: str | None, throttle: Throttle) -> LoginThrottled:
        retry = max(1, math.ceil((throttle.until - self.repo.now()).total_seconds()))
        self.repo.audit(
            None, actor, "login_throttled", "", scope=throttle.scope, ip=ip,
            locked=throttle.locked, failures=throttle.failures, retry_after_s=retry,
        )  # fmt: skip
        log.warning(
            "review login: %s %s throttled for %d s (%s, %d failures)",
            throttle.scope, throttle.key, retry, "locked" if throttle.locked else "backoff",
            throttle.failures,
        )  # fmt: skip
        return LoginThrottled(retry, locked=throttle.locked)

    def login(self, name: str, password: str, *, ip: str | None = None) -> tuple[str, SessionInfo]:
        """A new session (cookie value, session), or Forbidden (wrong name or password),
        LoginThrottled (too many failures of this account or IP: the password is not even
        checked) or LoginBusy (every hashing slot busy). The same answer and about the same
        time for an unknown name as for a wrong password."""
        actor = name[:64] or "-"
        ip = ip[:128] if ip else None
        keys: list[tuple[ThrottleScope, str]] = [("account", actor)]
        if ip:
            keys.append(("ip", ip))
        attempt = self.repo.reserve_login_attempt(
            keys, window_s=self.settings.review_login_failure_window_s, block_for=self._block_for
        )
        if isinstance(attempt, Throttle):
            raise self._throttled(actor, ip, attempt)
        reviewer = self.repo.get_reviewer(name) if _NAME.match(name) else None
        stored = reviewer.password_hash if reviewer is not None else self.hashes.dummy_hash()
        try:
            matches = self.hashes.verify(stored, password)
        except HashPoolBusy as exc:
            self.repo.audit(None, actor, "login_busy", "", ip=ip, retry_after_s=exc.retry_after_s)
            raise LoginBusy(exc.retry_after_s) from None
        ok = matches and reviewer is not None and reviewer.disabled_at is None
        if not ok or reviewer is None:
            self.repo.login_failed(keys, block_for=self._block_for)
            self.repo.audit(None, actor, "login_failed", "", ip=ip, failures=attempt.failures)
            for scope in attempt.locked_now:
                self.repo.audit(
                    None, actor, "login_locked", "", scope=scope, ip=ip,
                    failures=attempt.failures[scope], lockout_s=self.settings.review_login_lockout_s,
                )  # fmt: skip
                log.warning("review login: %s of %s locked after %s failures", scope, actor, attempt.failures)
            raise Forbidden("unknown reviewer or wrong password")
        self.repo.login_succeeded(actor, ip)
        if self.hashes.needs_rehash(reviewer.password_hash):
            with contextlib.suppress(HashPoolBusy):  # else rehashed on a later login
                self.repo.set_password_hash(reviewer.name, self.hashes.hash(password))
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        expires = self.repo.create_session(
            reviewer.name, token_digest(token), csrf, self.settings.review_session_ttl_s
        )
        return token, SessionInfo(reviewer.name, reviewer.role, csrf, expires)

    def session(self, token: str | None) -> SessionInfo | None:
        if not token or len(token) > 256:
            return None
        return self.repo.get_session(token_digest(token))

    def logout(self, token: str) -> None:
        self.repo.revoke_session(token_digest(token))

    # --- the queue ---

    def sla(self) -> timedelta:
        return timedelta(hours=self.settings.review_sla_hours)

    def queue(self, filters: QueueFilters | None = None) -> list[QueueItem]:
        f = filters or QueueFilters()
        now = self.repo.now()
        items = self.repo.queue(
            campaign_id=f.campaign or None,
            older_than=now - timedelta(hours=f.min_age_h) if f.min_age_h else None,
            newer_than=now - timedelta(hours=f.max_age_h) if f.max_age_h else None,
            limit=self.settings.review_queue_limit,
        )
        if f.kind:
            items = [i for i in items if any(x.kind == f.kind for x in i.result.findings)]
        return items

    def four_eyes_required(
        self, findings: tuple[Finding, ...] | list[Finding], case: ReviewCase | None
    ) -> bool:
        kinds = set(self.settings.review_four_eyes_kinds)
        return (case is not None and case.four_eyes) or any(
            x.kind in kinds for x in blocking_or_warning(findings)
        )

    def overdue(self, waiting_since: datetime) -> bool:
        return self.repo.now() - waiting_since > self.sla()

    # --- one case ---

    def _presign(self, bucket: str, key: str | None) -> str | None:
        if not key:
            return None
        try:
            return self.store.presigned_get(bucket, key, expires_s=self.settings.review_media_url_ttl_s)
        except ValueError:
            return None  # an invalid key is shown as missing, never followed

    def case(self, job_id: uuid.UUID) -> CaseView:
        job = self.jobs.get(job_id)
        if job is None:
            raise CaseNotFound(f"no job {job_id}")
        decisions = self.results.history(job_id)
        result = decisions[-1] if decisions else None
        findings = list(result.findings) if result else []
        staging = self.settings.bucket_staging
        media = [
            MediaFinding(
                f, self._presign(staging, str(f.evidence["crop_key"])) if f.evidence.get("crop_key") else None
            )
            for f in findings
        ]
        consents: dict[str, list[ConsentView]] = {}
        for use in job.request.subjects:
            consents[use.subject_id] = [
                ConsentView(r, self._presign(self.settings.bucket_assets, r.evidence_key))
                for r in self.consents.records(use.subject_id)
            ]
        case = self.repo.case(job_id)
        waiting = result.created_at if result and job.state == JobState.NEEDS_REVIEW else None
        return CaseView(
            job=job,
            result=result,
            findings=media,
            consents=consents,
            history=self.jobs.history(job_id),
            decisions=decisions,
            audit=self.repo.audit_log(job_id),
            case=case,
            lease=self.repo.lease(job_id),
            clip_url=self._presign(staging, job.staging_key),
            poster_url=self._presign(staging, job.poster_key),
            four_eyes=self.four_eyes_required(findings, case),
            waiting_since=waiting,
            overdue=waiting is not None and self.overdue(waiting),
            can_reopen=self._reopenable(job, result),
        )

    def claim(self, job_id: uuid.UUID, who: SessionInfo) -> Lease:
        job = self.jobs.get(job_id)
        if job is None:
            raise CaseNotFound(f"no job {job_id}")
        if job.state != JobState.NEEDS_REVIEW:
            raise Conflict(f"case {job_id} is not waiting for review (state {job.state.value})")
        case = self.repo.case(job_id)
        if case is not None and case.pending_approval_by == who.reviewer:
            raise Forbidden("you gave the first approval: a different lead must give the second")
        lease = self.repo.acquire_lease(job_id, who.reviewer, self.settings.review_lease_s)
        if lease is None:
            held = self.repo.lease(job_id)
            by = held.reviewer if held else "another reviewer"
            raise Conflict(f"case {job_id} is held by {by}")
        return lease

    def release(self, job_id: uuid.UUID, who: SessionInfo) -> bool:
        """Give back my lease (False when there was none); another reviewer's lease is
        Forbidden and stays."""
        if self.repo.release_lease(job_id, who.reviewer):
            return True
        held = self.repo.lease(job_id)
        if held is not None and held.reviewer != who.reviewer:
            self.repo.audit(job_id, who.reviewer, "release_refused", "", holder=held.reviewer)
            raise Forbidden(f"case {job_id} is held by {held.reviewer}: only they can release it")
        return False

    def decide(self, job_id: uuid.UUID, who: SessionInfo, approve: bool, reason: str) -> Outcome:
        reason = reason.strip()
        if not reason:
            raise InvalidInput("a decision needs a reason")
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidInput(f"a reason is at most {MAX_REASON_CHARS} characters")
        job = self.jobs.get(job_id)
        if job is None:
            raise CaseNotFound(f"no job {job_id}")
        if job.state != JobState.NEEDS_REVIEW:
            raise Conflict(f"case {job_id} is already decided (state {job.state.value})")
        lease = self.repo.lease(job_id)
        if lease is None or lease.reviewer != who.reviewer or not lease.live(self.repo.now()):
            raise Conflict(f"claim case {job_id} first (you hold no live lease on it)")
        result = self.results.latest(job_id)
        findings = result.findings if result else ()
        case = self.repo.case(job_id)
        four_eyes = self.four_eyes_required(findings, case)
        detail: dict[str, Any] = {"role": who.role, "four_eyes": four_eyes}
        if not approve:
            won = self.repo.decide(
                job_id,
                who.reviewer,
                Decision.REJECTED,
                reason,
                findings,
                audit_action="rejected",
                detail=detail,
            )
            if not won:
                raise Conflict(f"case {job_id} was decided or taken over meanwhile")
            self._announce(job, Decision.REJECTED, findings, who.reviewer, reason)
            return Outcome(job_id, "rejected", who.reviewer)
        pending = case.pending_approval_by if case else None
        if four_eyes and pending is None:
            if not self.repo.record_first_approval(job_id, who.reviewer, reason, detail=detail):
                raise Conflict(f"case {job_id} was decided or taken over meanwhile")
            return Outcome(job_id, "pending_second_approval", who.reviewer)
        if four_eyes:
            if who.role != "lead":
                raise Forbidden("this case needs a second approval by a lead")
            if pending == who.reviewer:
                raise Forbidden("the second approval must come from a different lead")
            detail["first_approval_by"] = pending
            full_reason = (
                f"{reason} (first approval by {pending}: {case.pending_approval_reason if case else ''})"
            )
        else:
            full_reason = reason
        won = self.repo.decide(
            job_id,
            who.reviewer,
            Decision.APPROVED,
            full_reason,
            findings,
            audit_action="approved",
            require_pending_by_other=four_eyes,
            detail=detail,
        )
        if not won:
            raise Conflict(f"case {job_id} was decided or taken over meanwhile")
        self._announce(job, Decision.APPROVED, findings, who.reviewer, full_reason)
        return Outcome(job_id, "approved", who.reviewer)

    def _announce(
        self, job: JobRecord, decision: Decision, findings: tuple[Finding, ...], reviewer: str, reason: str
    ) -> None:
        """moderation.decisions: the publisher acts on an approval. The decision is already
        committed; if the bus is down the error surfaces to the reviewer and
        `reannounce` (or the SLA sweep) sends it again."""
        self.events.publish(
            MODERATION_DECISIONS,
            ModerationDecided(
                job_id=job.job_id,
                campaign_id=job.campaign_id,
                decision=decision,
                findings=findings,
                decided_by=f"review:{reviewer}",
                reason=reason[: MAX_REASON_CHARS * 2],
            ),
            key=str(job.job_id),
            event_id=decision_event_id(job.job_id, decision, self.results.latest(job.job_id)),
        )

    def reannounce_stuck(self, older_than_s: float = 300.0) -> list[uuid.UUID]:
        """Approved by a human but not picked up by the publisher after `older_than_s`
        (the announcement was lost): send the decision again. Idempotent downstream."""
        now = self.repo.now()
        out = []
        for job in self.jobs.list_jobs(states=[JobState.APPROVED], limit=1000):
            if (now - job.updated_at).total_seconds() < older_than_s:
                continue
            last = self.results.latest(job.job_id)
            if last is None or not last.decided_by.startswith("review:"):
                continue
            self._announce(
                job, Decision.APPROVED, last.findings, last.decided_by.removeprefix("review:"), last.reason
            )
            out.append(job.job_id)
        return out

    # --- appeals ---

    def _reopenable(self, job: JobRecord, result: ModerationResult | None) -> bool:
        """A rejection can be appealed only when likeness alone caused it: consent and
        label failures are re-checked by the publisher anyway."""
        if job.state != JobState.REJECTED or result is None or result.decision != Decision.REJECTED:
            return False
        blocking = [f for f in result.findings if f.severity == Severity.BLOCK]
        if result.decided_by.startswith("review:"):
            return False  # a human rejection stands; no ping-pong
        return bool(blocking) and all(f.kind in LIKENESS_KINDS for f in blocking)

    def reopen(self, job_id: uuid.UUID, who: SessionInfo, reason: str) -> Outcome:
        if who.role != "lead":
            raise Forbidden("only a lead can reopen a rejected case")
        reason = reason.strip()
        if not reason:
            raise InvalidInput("reopening needs a reason")
        job = self.jobs.get(job_id)
        if job is None:
            raise CaseNotFound(f"no job {job_id}")
        result = self.results.latest(job_id)
        if result is None or not self._reopenable(job, result):
            raise Conflict("only an automatic rejection for likeness alone can be reopened")
        if not self.repo.reopen(job_id, who.reviewer, reason[:MAX_REASON_CHARS], result.findings):
            raise Conflict(f"case {job_id} changed meanwhile")
        return Outcome(job_id, "reopened", who.reviewer)

    # --- SLA ---

    def escalate_overdue(self) -> list[uuid.UUID]:
        """Flag every case waiting longer than the SLA (once each, with an audit record)."""
        now = self.repo.now()
        sla = self.sla()
        out = []
        for item in self.repo.queue(older_than=now - sla, limit=10_000):
            if item.case is not None and item.case.escalated_at is not None:
                continue
            waited = (now - item.waiting_since).total_seconds()
            reason = f"waiting {waited / 3600:.1f} h, over the {self.settings.review_sla_hours:g} h SLA"
            if self.repo.escalate(item.job.job_id, reason, waited_s=waited):
                log.warning("review SLA: case %s escalated (%s)", item.job.job_id, reason)
                out.append(item.job.job_id)
        return out
