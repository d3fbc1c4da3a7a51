"""Tables of the review queue (migration 0003): reviewers, sessions, case leases, case
flags and the append-only audit log.

Every state change that two reviewers could race on is one compare-and-set UPDATE:

- a lease is taken only when nobody holds it or the holder's lease expired;
- a decision moves the job out of `needs_review` only if the decider holds a live lease,
  in the same transaction that writes the moderation result, the job event and the audit
  record (so the job state, the record and the audit never disagree);
- the first approval of a four-eyes case is recorded only if none is pending, and the
  final approval only if one is pending by somebody else.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import case, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.adapters.db import (
    Database,
    JobRow,
    ModerationResultRow,
    ReviewAuditRow,
    ReviewCaseRow,
    ReviewerRow,
    ReviewLeaseRow,
    ReviewLoginThrottleRow,
    ReviewSessionRow,
)
from pipeline.repositories import Clock, JobRecord, JobRepository, ModerationResult, _job_key, _rowcount
from schemas.common import utcnow
from schemas.events import Decision, Finding
from schemas.jobs import JobState

Role = Literal["reviewer", "lead"]
ROLES: tuple[Role, ...] = ("reviewer", "lead")
ThrottleScope = Literal["account", "ip"]
# (scope, failures so far) -> (seconds to block further tries, whether that is a lockout),
# or None for no block.
BlockRule = Callable[[ThrottleScope, int], "tuple[float, bool] | None"]


def parse_role(value: str) -> Role:
    if value == "reviewer":
        return "reviewer"
    if value == "lead":
        return "lead"
    raise ValueError(f"unknown role {value!r}: use reviewer or lead")


@dataclass(frozen=True)
class Reviewer:
    name: str
    role: Role
    password_hash: str
    created_at: datetime
    disabled_at: datetime | None

    @classmethod
    def _from_row(cls, r: ReviewerRow) -> Reviewer:
        return cls(r.name, parse_role(r.role), r.password_hash, r.created_at, r.disabled_at)


@dataclass(frozen=True)
class SessionInfo:
    reviewer: str
    role: Role
    csrf_token: str
    expires_at: datetime


@dataclass(frozen=True)
class Lease:
    job_id: uuid.UUID
    reviewer: str
    acquired_at: datetime
    expires_at: datetime

    def live(self, at: datetime) -> bool:
        return self.expires_at > at

    @classmethod
    def _from_row(cls, r: ReviewLeaseRow) -> Lease:
        return cls(uuid.UUID(r.job_id), r.reviewer, r.acquired_at, r.expires_at)


@dataclass(frozen=True)
class ReviewCase:
    job_id: uuid.UUID
    four_eyes: bool
    escalated_at: datetime | None
    escalation_reason: str | None
    pending_approval_by: str | None
    pending_approval_at: datetime | None
    pending_approval_reason: str | None

    @classmethod
    def _from_row(cls, r: ReviewCaseRow) -> ReviewCase:
        return cls(
            uuid.UUID(r.job_id),
            bool(r.four_eyes),
            r.escalated_at,
            r.escalation_reason,
            r.pending_approval_by,
            r.pending_approval_at,
            r.pending_approval_reason,
        )


@dataclass(frozen=True)
class AuditEntry:
    id: int
    job_id: uuid.UUID | None
    actor: str
    action: str
    reason: str
    detail: dict[str, Any]
    at: datetime

    @classmethod
    def _from_row(cls, r: ReviewAuditRow) -> AuditEntry:
        return cls(
            r.id,
            uuid.UUID(r.job_id) if r.job_id else None,
            r.actor,
            r.action,
            r.reason,
            dict(r.detail),
            r.at,
        )


@dataclass(frozen=True)
class Throttle:
    """Tries of this account or IP are refused until `until` (a lockout when `locked`)."""

    scope: ThrottleScope
    key: str
    until: datetime
    locked: bool
    failures: int


@dataclass(frozen=True)
class Attempt:
    """A login try counted in advance (see `ReviewRepository.reserve_login_attempt`)."""

    failures: dict[ThrottleScope, int]
    locked_now: tuple[ThrottleScope, ...]


class _Recount(Exception):
    pass


class _Blocked(Exception):
    def __init__(self, throttle: Throttle) -> None:
        super().__init__(throttle.scope)
        self.throttle = throttle


@dataclass(frozen=True)
class QueueItem:
    job: JobRecord
    result: ModerationResult
    case: ReviewCase | None
    lease: Lease | None

    @property
    def waiting_since(self) -> datetime:
        """When the job entered needs_review (its latest moderation result)."""
        return self.result.created_at


def _audit_row(
    job_id: str | None, actor: str, action: str, reason: str, detail: dict[str, Any], at: datetime
) -> ReviewAuditRow:
    return ReviewAuditRow(job_id=job_id, actor=actor, action=action, reason=reason, detail=detail, at=at)


class ReviewRepository:
    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock
        # Job states change only through JobRepository (can_transition), here inside the
        # transaction that also writes the review records.
        self._jobs = JobRepository(db, clock=clock)

    def now(self) -> datetime:
        return self._clock()

    # --- reviewers and sessions ---

    def upsert_reviewer(self, name: str, role: Role, password_hash: str) -> bool:
        """Create the reviewer, or set a new role and password. True when created."""
        now = self._clock()
        with self._db.session() as s:
            row = s.get(ReviewerRow, name)
            if row is None:
                s.add(ReviewerRow(name=name, role=role, password_hash=password_hash, created_at=now))
                created = True
            else:
                row.role, row.password_hash, row.disabled_at = role, password_hash, None
                # Changing a password ends every session of that reviewer.
                s.execute(
                    update(ReviewSessionRow)
                    .where(ReviewSessionRow.reviewer == name, ReviewSessionRow.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
                created = False
            s.add(
                _audit_row(None, "admin", "reviewer_added" if created else "reviewer_updated", "",
                           {"reviewer": name, "role": role}, now)
            )  # fmt: skip
        return created

    def get_reviewer(self, name: str) -> Reviewer | None:
        with self._db.session() as s:
            row = s.get(ReviewerRow, name)
            return Reviewer._from_row(row) if row is not None else None

    def set_password_hash(self, name: str, password_hash: str) -> None:
        """Re-hash on login when the KDF parameters changed (no session is ended)."""
        with self._db.session() as s:
            s.execute(update(ReviewerRow).where(ReviewerRow.name == name).values(password_hash=password_hash))

    def create_session(self, reviewer: str, token_sha256: str, csrf_token: str, ttl_s: float) -> datetime:
        now = self._clock()
        expires = now + timedelta(seconds=ttl_s)
        with self._db.session() as s:
            s.add(
                ReviewSessionRow(
                    token_sha256=token_sha256,
                    reviewer=reviewer,
                    csrf_token=csrf_token,
                    created_at=now,
                    expires_at=expires,
                )
            )
            s.add(_audit_row(None, reviewer, "login", "", {}, now))
        return expires

    def get_session(self, token_sha256: str) -> SessionInfo | None:
        """The live session of an enabled reviewer, or None."""
        now = self._clock()
        with self._db.session() as s:
            found = s.execute(
                select(ReviewSessionRow, ReviewerRow)
                .join(ReviewerRow, ReviewerRow.name == ReviewSessionRow.reviewer)
                .where(
                    ReviewSessionRow.token_sha256 == token_sha256,
                    ReviewSessionRow.revoked_at.is_(None),
                    ReviewSessionRow.expires_at > now,
                    ReviewerRow.disabled_at.is_(None),
                )
            ).first()
            if found is None:
                return None
            sess, rev = found
            return SessionInfo(rev.name, parse_role(rev.role), sess.csrf_token, sess.expires_at)

    def revoke_session(self, token_sha256: str) -> bool:
        now = self._clock()
        with self._db.session() as s:
            result = s.execute(
                update(ReviewSessionRow)
                .where(ReviewSessionRow.token_sha256 == token_sha256, ReviewSessionRow.revoked_at.is_(None))
                .values(revoked_at=now)
                .returning(ReviewSessionRow.reviewer)
            )
            who = result.scalar()
            if who is None:
                return False
            s.add(_audit_row(None, who, "logout", "", {}, now))
        return True

    # --- login throttling ---

    def reserve_login_attempt(
        self, keys: Sequence[tuple[ThrottleScope, str]], *, window_s: float, block_for: BlockRule
    ) -> Attempt | Throttle:
        """Count a login try as a failure of every (scope, key) BEFORE the password is
        checked, so parallel tries cannot all slip in under the limit, and set the block
        that the new count calls for. When one of them is blocked now, nothing is counted
        and its Throttle is returned. One transaction; each count is an atomic UPDATE
        (serialised by the row lock on PostgreSQL, the write lock on SQLite)."""
        now = self._clock()
        window_start = now - timedelta(seconds=window_s)
        t = ReviewLoginThrottleRow
        for _ in range(10):
            try:
                with self._db.session() as s:
                    return self._reserve(s, keys, now, window_start, block_for)
            except _Blocked as blocked:
                return blocked.throttle
            except (IntegrityError, _Recount):
                continue  # a concurrent first failure created the row: count again
        raise RuntimeError(f"could not count a login try in {t.__tablename__}")

    def _reserve(
        self,
        s: Session,
        keys: Sequence[tuple[ThrottleScope, str]],
        now: datetime,
        window_start: datetime,
        block_for: BlockRule,
    ) -> Attempt:
        t = ReviewLoginThrottleRow
        counts: dict[ThrottleScope, int] = {}
        locked_now: list[ThrottleScope] = []
        for scope, key in keys:
            failures = s.execute(
                update(t)
                .where(
                    t.scope == scope,
                    t.key == key,
                    t.blocked_until.is_(None) | (t.blocked_until <= now),
                )
                .values(
                    failures=case((t.last_failure_at <= window_start, 1), else_=t.failures + 1),
                    last_failure_at=now,
                )
                .returning(t.failures)
                .execution_options(synchronize_session=False)
            ).scalar()
            if failures is None:
                row = s.get(t, (scope, key))
                if row is not None and row.blocked_until is not None and row.blocked_until > now:
                    raise _Blocked(Throttle(scope, key, row.blocked_until, bool(row.locked), row.failures))
                if row is not None:
                    raise _Recount  # created by a concurrent try after our UPDATE looked
                failures = 1
                s.add(t(scope=scope, key=key, failures=1, last_failure_at=now, locked=False))
                s.flush()
            block = block_for(scope, failures)
            s.execute(
                update(t)
                .where(t.scope == scope, t.key == key)
                .values(
                    blocked_until=now + timedelta(seconds=block[0]) if block else None,
                    locked=bool(block and block[1]),
                )
                .execution_options(synchronize_session=False)
            )
            counts[scope] = failures
            if block and block[1]:
                locked_now.append(scope)
        return Attempt(counts, tuple(locked_now))

    def login_failed(self, keys: Sequence[tuple[ThrottleScope, str]], *, block_for: BlockRule) -> None:
        """After a failed check: the block its count calls for runs from now (the one set in
        advance ran from before the password check)."""
        now = self._clock()
        t = ReviewLoginThrottleRow
        with self._db.session() as s:
            for scope, key in keys:
                failures = s.execute(select(t.failures).where(t.scope == scope, t.key == key)).scalar()
                block = block_for(scope, failures) if failures is not None else None
                if block is None:
                    continue
                until = now + timedelta(seconds=block[0])
                s.execute(
                    update(t)
                    .where(
                        t.scope == scope,
                        t.key == key,
                        t.blocked_until.is_(None) | (t.blocked_until < until),
                    )
                    .values(blocked_until=until, locked=block[1])
                    .execution_options(synchronize_session=False)
                )

    def login_succeeded(self, account: str, ip: str | None) -> None:
        """The account's failures are forgotten; the IP's count loses the one try that
        was counted in advance (its block, if any, stays)."""
        t = ReviewLoginThrottleRow
        with self._db.session() as s:
            s.execute(delete(t).where(t.scope == "account", t.key == account))
            if ip is not None:
                s.execute(
                    update(t)
                    .where(t.scope == "ip", t.key == ip, t.failures > 0)
                    .values(failures=t.failures - 1)
                    .execution_options(synchronize_session=False)
                )

    # --- audit ---

    def audit(
        self, job_id: uuid.UUID | str | None, actor: str, action: str, reason: str = "", **detail: Any
    ) -> None:
        with self._db.session() as s:
            s.add(
                _audit_row(_job_key(job_id) if job_id else None, actor, action, reason, detail, self._clock())
            )

    def audit_log(self, job_id: uuid.UUID | str | None = None, *, limit: int = 500) -> list[AuditEntry]:
        q = select(ReviewAuditRow)
        if job_id is not None:
            q = q.where(ReviewAuditRow.job_id == _job_key(job_id))
        with self._db.session() as s:
            rows = s.scalars(q.order_by(ReviewAuditRow.id.desc()).limit(limit))
            return [AuditEntry._from_row(r) for r in reversed(list(rows))]

    # --- cases ---

    def case(self, job_id: uuid.UUID | str) -> ReviewCase | None:
        with self._db.session() as s:
            row = s.get(ReviewCaseRow, _job_key(job_id))
            return ReviewCase._from_row(row) if row is not None else None

    def lease(self, job_id: uuid.UUID | str) -> Lease | None:
        with self._db.session() as s:
            row = s.get(ReviewLeaseRow, _job_key(job_id))
            return Lease._from_row(row) if row is not None else None

    def _ensure_case(self, s: Session, key: str, *, four_eyes: bool, now: datetime) -> None:
        if s.get(ReviewCaseRow, key) is None:
            s.add(ReviewCaseRow(job_id=key, four_eyes=four_eyes, updated_at=now))
            s.flush()

    def ensure_case(self, job_id: uuid.UUID | str, *, four_eyes: bool) -> None:
        key = _job_key(job_id)
        try:
            with self._db.session() as s:
                self._ensure_case(s, key, four_eyes=four_eyes, now=self._clock())
        except IntegrityError:
            pass  # created concurrently: same content

    def queue(
        self,
        *,
        campaign_id: str | None = None,
        older_than: datetime | None = None,
        newer_than: datetime | None = None,
        limit: int = 200,
    ) -> list[QueueItem]:
        """Jobs in needs_review, the longest waiting first, with their latest moderation
        result, review flags and lease."""
        latest = (
            select(ModerationResultRow.job_id, func.max(ModerationResultRow.id).label("last_id"))
            .group_by(ModerationResultRow.job_id)
            .subquery()
        )
        q = (
            select(JobRow, ModerationResultRow, ReviewCaseRow, ReviewLeaseRow)
            .join(latest, latest.c.job_id == JobRow.job_id)
            .join(ModerationResultRow, ModerationResultRow.id == latest.c.last_id)
            .outerjoin(ReviewCaseRow, ReviewCaseRow.job_id == JobRow.job_id)
            .outerjoin(ReviewLeaseRow, ReviewLeaseRow.job_id == JobRow.job_id)
            .where(JobRow.state == JobState.NEEDS_REVIEW.value)
        )
        if campaign_id:
            q = q.where(JobRow.campaign_id == campaign_id)
        if older_than is not None:
            q = q.where(ModerationResultRow.created_at <= older_than)
        if newer_than is not None:
            q = q.where(ModerationResultRow.created_at >= newer_than)
        q = q.order_by(ModerationResultRow.created_at, ModerationResultRow.id).limit(limit)
        with self._db.session() as s:
            return [
                QueueItem(
                    JobRecord._from_row(j),
                    ModerationResult._from_row(m),
                    ReviewCase._from_row(c) if c is not None else None,
                    Lease._from_row(le) if le is not None else None,
                )
                for j, m, c, le in s.execute(q)
            ]

    # --- leases ---

    def acquire_lease(self, job_id: uuid.UUID | str, reviewer: str, lease_s: float) -> Lease | None:
        """Take (or renew) the case for `reviewer`; None when someone else holds a live lease
        or the job is not waiting for review."""
        key = _job_key(job_id)
        now = self._clock()
        expires = now + timedelta(seconds=lease_s)
        with self._db.session() as s:
            state = s.execute(select(JobRow.state).where(JobRow.job_id == key)).scalar()
            if state != JobState.NEEDS_REVIEW.value:
                return None
            result = s.execute(
                update(ReviewLeaseRow)
                .where(
                    ReviewLeaseRow.job_id == key,
                    (ReviewLeaseRow.reviewer == reviewer) | (ReviewLeaseRow.expires_at <= now),
                )
                .values(reviewer=reviewer, acquired_at=now, expires_at=expires)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) == 1:
                s.add(_audit_row(key, reviewer, "claimed", "", {"expires_at": expires.isoformat()}, now))
                return Lease(uuid.UUID(key), reviewer, now, expires)
        try:
            with self._db.session() as s:
                s.add(ReviewLeaseRow(job_id=key, reviewer=reviewer, acquired_at=now, expires_at=expires))
                s.flush()
                s.add(_audit_row(key, reviewer, "claimed", "", {"expires_at": expires.isoformat()}, now))
        except IntegrityError:
            return None  # another reviewer inserted the lease first
        return Lease(uuid.UUID(key), reviewer, now, expires)

    def release_lease(self, job_id: uuid.UUID | str, reviewer: str) -> bool:
        key = _job_key(job_id)
        now = self._clock()
        with self._db.session() as s:
            result = s.execute(
                delete(ReviewLeaseRow)
                .where(ReviewLeaseRow.job_id == key, ReviewLeaseRow.reviewer == reviewer)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            s.add(_audit_row(key, reviewer, "released", "", {}, now))
        return True

    def _holds_lease(self, key: str, reviewer: str, now: datetime) -> Any:
        return exists().where(
            ReviewLeaseRow.job_id == key, ReviewLeaseRow.reviewer == reviewer, ReviewLeaseRow.expires_at > now
        )

    # --- decisions ---

    def record_first_approval(
        self, job_id: uuid.UUID | str, reviewer: str, reason: str, *, detail: dict[str, Any]
    ) -> bool:
        """The first of two approvals of a four-eyes case: pending, the job stays in
        needs_review and the lease is given back so that a lead can take the case."""
        key = _job_key(job_id)
        now = self._clock()
        with self._db.session() as s:
            self._ensure_case(s, key, four_eyes=True, now=now)
            result = s.execute(
                update(ReviewCaseRow)
                .where(
                    ReviewCaseRow.job_id == key,
                    ReviewCaseRow.pending_approval_by.is_(None),
                    self._holds_lease(key, reviewer, now),
                    exists().where(JobRow.job_id == key, JobRow.state == JobState.NEEDS_REVIEW.value),
                )
                .values(
                    four_eyes=True,
                    pending_approval_by=reviewer,
                    pending_approval_at=now,
                    pending_approval_reason=reason,
                    updated_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            s.execute(delete(ReviewLeaseRow).where(ReviewLeaseRow.job_id == key))
            s.add(_audit_row(key, reviewer, "approval_pending", reason, detail, now))
        return True

    def decide(
        self,
        job_id: uuid.UUID | str,
        reviewer: str,
        decision: Decision,
        reason: str,
        findings: Sequence[Finding],
        *,
        audit_action: str,
        require_pending_by_other: bool = False,
        detail: dict[str, Any] | None = None,
    ) -> bool:
        """The final decision: needs_review -> approved / rejected, compare-and-set on the
        state AND on the decider's live lease (and, for the second approval of a four-eyes
        case, on a pending first approval by somebody else). One transaction writes the
        job state, its event, the moderation result and the audit record."""
        if decision not in (Decision.APPROVED, Decision.REJECTED):
            raise ValueError("a review decision is approved or rejected")
        key = _job_key(job_id)
        now = self._clock()
        to_state = JobState(decision.value)
        guards = [self._holds_lease(key, reviewer, now)]
        if require_pending_by_other:
            guards.append(
                exists().where(
                    ReviewCaseRow.job_id == key,
                    ReviewCaseRow.pending_approval_by.is_not(None),
                    ReviewCaseRow.pending_approval_by != reviewer,
                )
            )
        actor = f"review:{reviewer}"
        with self._db.session() as s:
            if not self._jobs.transition(
                key,
                to_state=to_state,
                expected=JobState.NEEDS_REVIEW,
                reason=reason,
                actor=actor,
                session=s,
                where=guards,
                at=now,
            ):
                return False
            s.add(
                ModerationResultRow(
                    job_id=key,
                    decision=decision.value,
                    findings=[f.model_dump(mode="json") for f in findings],
                    decided_by=actor,
                    reason=reason,
                    created_at=now,
                )
            )
            s.execute(delete(ReviewLeaseRow).where(ReviewLeaseRow.job_id == key))
            s.add(_audit_row(key, reviewer, audit_action, reason, detail or {}, now))
        return True

    def reopen(self, job_id: uuid.UUID | str, lead: str, reason: str, findings: Sequence[Finding]) -> bool:
        """An appeal: rejected -> needs_review (CAS), as a four-eyes case."""
        key = _job_key(job_id)
        now = self._clock()
        actor = f"review:{lead}"
        with self._db.session() as s:
            if not self._jobs.transition(
                key,
                to_state=JobState.NEEDS_REVIEW,
                expected=JobState.REJECTED,
                reason=reason,
                actor=actor,
                session=s,
                at=now,
            ):
                return False
            s.add(
                ModerationResultRow(
                    job_id=key,
                    decision=Decision.NEEDS_REVIEW.value,
                    findings=[f.model_dump(mode="json") for f in findings],
                    decided_by=actor,
                    reason=f"appeal: {reason}",
                    created_at=now,
                )
            )
            row = s.get(ReviewCaseRow, key)
            if row is None:
                s.add(ReviewCaseRow(job_id=key, four_eyes=True, updated_at=now))
            else:
                row.four_eyes = True
                row.escalated_at = row.escalation_reason = None
                row.pending_approval_by = row.pending_approval_at = row.pending_approval_reason = None
                row.updated_at = now
            s.execute(delete(ReviewLeaseRow).where(ReviewLeaseRow.job_id == key))
            s.add(_audit_row(key, lead, "reopened", reason, {"from": "rejected"}, now))
        return True

    def escalate(self, job_id: uuid.UUID | str, reason: str, *, waited_s: float) -> bool:
        """Flag the case as overdue once (CAS on escalated_at IS NULL), with an audit record."""
        key = _job_key(job_id)
        now = self._clock()
        with self._db.session() as s:
            self._ensure_case(s, key, four_eyes=False, now=now)
            result = s.execute(
                update(ReviewCaseRow)
                .where(ReviewCaseRow.job_id == key, ReviewCaseRow.escalated_at.is_(None))
                .values(escalated_at=now, escalation_reason=reason, updated_at=now)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            s.add(_audit_row(key, "sla", "escalated", reason, {"waited_s": round(waited_s)}, now))
        return True
