"""Repositories: the only code that reads and writes the tables in pipeline.adapters.db.

Services get and pass plain frozen dataclasses, never ORM objects. Job state changes are
compare-and-set UPDATEs guarded by schemas.jobs.can_transition, so two workers racing on
one job cannot both win.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple, TypedDict, Unpack

from sqlalchemy import and_, delete, extract, func, literal, or_, select, true, tuple_, union_all, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql.elements import ColumnElement

from pipeline.adapters.db import (
    ConsentChallengeRow,
    ConsentRow,
    Database,
    JobEventRow,
    JobRow,
    JobSubjectRow,
    LockRow,
    ModerationResultRow,
    ProtectedFaceRow,
    PublishedClipRow,
    SubjectFaceRow,
    UtcDateTime,
)
from schemas.brief import SubjectUse
from schemas.common import Locale, Scope, utcnow
from schemas.events import Decision, Finding, RenderRequested
from schemas.jobs import FINAL_STATES, JobState, can_transition

Clock = Callable[[], datetime]
ConsentAction = Literal["grant", "revoke", "expire"]


class JobFields(TypedDict, total=False):
    """Columns that `JobRepository.transition` may set besides the state."""

    staging_key: str | None
    poster_key: str | None
    published_key: str | None
    url: str | None


JOB_FIELDS: frozenset[str] = frozenset(JobFields.__annotations__)


def _job_key(job_id: uuid.UUID | str) -> str:
    # Also validates: a malformed id raises ValueError instead of silently matching nothing.
    return str(job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id)))


def _rowcount(result: Any) -> int:
    return int(result.rowcount)


@dataclass(frozen=True)
class JobRecord:
    job_id: uuid.UUID
    campaign_id: str
    recipient_id: str
    template_name: str
    template_version: str
    locale: Locale
    state: JobState
    reason: str | None
    request_json: dict[str, Any] = field(hash=False, compare=False)
    staging_key: str | None
    poster_key: str | None
    published_key: str | None
    url: str | None
    claim_token: str | None
    claimed_by: str | None
    lease_expires_at: datetime | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    sweeps: int = 0  # sweeps since the last state change (pipeline/sweeper.py)
    sweeps_total: int = 0
    swept_at: datetime | None = None
    owner: str | None = None  # the API tenant that requested it; None: the CLI or a DAG

    @property
    def request(self) -> RenderRequested:
        return RenderRequested.model_validate(self.request_json)

    @classmethod
    def _from_row(cls, r: JobRow) -> JobRecord:
        return cls(
            job_id=uuid.UUID(r.job_id),
            campaign_id=r.campaign_id,
            recipient_id=r.recipient_id,
            template_name=r.template_name,
            template_version=r.template_version,
            locale=Locale(r.locale),
            state=JobState(r.state),
            reason=r.reason,
            request_json=dict(r.request_json),
            staging_key=r.staging_key,
            poster_key=r.poster_key,
            published_key=r.published_key,
            url=r.url,
            claim_token=r.claim_token,
            claimed_by=r.claimed_by,
            lease_expires_at=r.lease_expires_at,
            attempts=r.attempts,
            created_at=r.created_at,
            updated_at=r.updated_at,
            sweeps=r.sweeps or 0,
            sweeps_total=r.sweeps_total or 0,
            swept_at=r.swept_at,
            owner=r.owner,
        )


@dataclass(frozen=True)
class JobEvent:
    id: int
    job_id: uuid.UUID
    from_state: JobState | None  # None: the job was created
    to_state: JobState
    reason: str | None
    actor: str
    at: datetime

    @classmethod
    def _from_row(cls, r: JobEventRow) -> JobEvent:
        return cls(
            id=r.id,
            job_id=uuid.UUID(r.job_id),
            from_state=JobState(r.from_state) if r.from_state is not None else None,
            to_state=JobState(r.to_state),
            reason=r.reason,
            actor=r.actor,
            at=r.at,
        )


@dataclass(frozen=True)
class JobLineRow:
    """The columns of one job that a campaign report shows (JobRepository.iter_campaign_lines)."""

    job_id: uuid.UUID
    recipient_id: str
    locale: str
    state: JobState
    reason: str | None
    url: str | None
    sweeps_total: int
    name: str  # the recipient's display name from the request
    created_at: datetime


_STATE: dict[str, JobState] = {st.value: st for st in JobState}


class CursorNotFound(LookupError):
    """A page cursor that names no job."""


def _utc(at: datetime) -> datetime:
    # Aggregates (min, max) bypass the column type: SQLite hands back naive text-parsed times.
    if isinstance(at, str):
        at = datetime.fromisoformat(at)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class ConsentRecord:
    """One entry of the append-only consent ledger.

    `granted_at` is when the record takes effect, whatever its action (for a revoke: the
    moment of revocation). `supersedes` names an earlier record of the same subject that
    this one ends (a revoke of one grant, or a grant that replaces an older one).
    """

    subject_id: str
    action: ConsentAction
    scopes: frozenset[Scope]
    purpose: str
    recorded_by: str
    granted_at: datetime = field(default_factory=utcnow)
    expires_at: datetime | None = None
    evidence_sha256: str | None = None
    evidence_key: str | None = None
    challenge_code: str | None = None
    supersedes: uuid.UUID | None = None
    record_id: uuid.UUID = field(default_factory=uuid.uuid4)
    created_at: datetime = field(default_factory=utcnow)

    def active_at(self, at: datetime) -> bool:
        return self.granted_at <= at and (self.expires_at is None or at < self.expires_at)

    @classmethod
    def _from_row(cls, r: ConsentRow) -> ConsentRecord:
        action: ConsentAction
        if r.action == "grant":
            action = "grant"
        elif r.action == "revoke":
            action = "revoke"
        elif r.action == "expire":
            action = "expire"
        else:
            raise ValueError(f"unknown consent action {r.action!r} in record {r.record_id}")
        return cls(
            record_id=uuid.UUID(r.record_id),
            subject_id=r.subject_id,
            action=action,
            scopes=frozenset(Scope(s) for s in r.scopes),
            purpose=r.purpose,
            granted_at=r.granted_at,
            expires_at=r.expires_at,
            evidence_sha256=r.evidence_sha256,
            evidence_key=r.evidence_key,
            challenge_code=r.challenge_code,
            recorded_by=r.recorded_by,
            created_at=r.created_at,
            supersedes=uuid.UUID(r.supersedes) if r.supersedes is not None else None,
        )


@dataclass(frozen=True)
class PublishedClip:
    job_id: uuid.UUID
    object_key: str
    url: str
    sha256: str
    published_at: datetime
    taken_down_at: datetime | None
    takedown_reason: str | None

    @property
    def live(self) -> bool:
        return self.taken_down_at is None

    @classmethod
    def _from_row(cls, r: PublishedClipRow) -> PublishedClip:
        return cls(
            job_id=uuid.UUID(r.job_id),
            object_key=r.object_key,
            url=r.url,
            sha256=r.sha256,
            published_at=r.published_at,
            taken_down_at=r.taken_down_at,
            takedown_reason=r.takedown_reason,
        )


class InvalidChallenge(ValueError):
    """A consent challenge code that is unknown for the subject, expired or already used."""


@dataclass(frozen=True)
class ConsentChallenge:
    challenge_id: uuid.UUID
    subject_id: str
    code: str
    issued_by: str
    issued_at: datetime
    expires_at: datetime
    used_at: datetime | None
    used_by_record: uuid.UUID | None

    @classmethod
    def _from_row(cls, r: ConsentChallengeRow) -> ConsentChallenge:
        return cls(
            challenge_id=uuid.UUID(r.challenge_id),
            subject_id=r.subject_id,
            code=r.code,
            issued_by=r.issued_by,
            issued_at=r.issued_at,
            expires_at=r.expires_at,
            used_at=r.used_at,
            used_by_record=uuid.UUID(r.used_by_record) if r.used_by_record else None,
        )


@dataclass(frozen=True)
class FaceEmbedding:
    """A 128-d face descriptor, the model that made it and the hash of the source image."""

    values: tuple[float, ...]
    model: str
    source_sha256: str


@dataclass(frozen=True)
class ProtectedFace:
    id: int
    name: str
    subject_id: str | None
    embedding: tuple[float, ...]
    model: str
    source_sha256: str
    enrolled_by: str
    created_at: datetime

    @classmethod
    def _from_row(cls, r: ProtectedFaceRow) -> ProtectedFace:
        return cls(
            id=r.id,
            name=r.name,
            subject_id=r.subject_id,
            embedding=tuple(float(v) for v in r.embedding),
            model=r.model,
            source_sha256=r.source_sha256,
            enrolled_by=r.enrolled_by,
            created_at=r.created_at,
        )


@dataclass(frozen=True)
class ModerationResult:
    id: int
    job_id: uuid.UUID
    decision: Decision
    findings: tuple[Finding, ...]
    decided_by: str
    reason: str
    created_at: datetime

    @classmethod
    def _from_row(cls, r: ModerationResultRow) -> ModerationResult:
        return cls(
            id=r.id,
            job_id=uuid.UUID(r.job_id),
            decision=Decision(r.decision),
            findings=tuple(Finding.model_validate(f) for f in r.findings),
            decided_by=r.decided_by,
            reason=r.reason,
            created_at=r.created_at,
        )


class JobRepository:
    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def create_if_absent(
        self, req: RenderRequested, *, actor: str = "system", owner: str | None = None
    ) -> bool:
        """Insert the job in state `requested` (`owner`: the API tenant requesting it); False,
        writing nothing, if the job id exists."""
        key = _job_key(req.job_id)
        now = self._clock()
        try:
            with self._db.session() as s:
                if s.get(JobRow, key) is not None:
                    return False
                s.add(
                    JobRow(
                        job_id=key,
                        campaign_id=req.campaign_id,
                        recipient_id=req.recipient.id,
                        template_name=req.template.name,
                        template_version=req.template.version,
                        locale=str(req.locale),
                        state=JobState.REQUESTED.value,
                        request_json=req.model_dump(mode="json"),
                        attempts=0,
                        sweeps=0,
                        sweeps_total=0,
                        created_at=now,
                        updated_at=now,
                        owner=owner,
                    )
                )
                s.flush()  # the job row first: job_events references it
                s.add(_event(key, None, JobState.REQUESTED, None, actor, now))
        except IntegrityError:
            # A concurrent insert of the same job won; anything else is a real error.
            if self.get(key) is None:
                raise
            return False
        return True

    def get(self, job_id: uuid.UUID | str) -> JobRecord | None:
        with self._db.session() as s:
            row = s.get(JobRow, _job_key(job_id))
            return JobRecord._from_row(row) if row is not None else None

    def claim(
        self,
        job_id: uuid.UUID | str,
        *,
        to_state: JobState,
        from_states: Iterable[JobState],
        owner: str,
        lease_s: float,
    ) -> JobRecord | None:
        """Move the job into a working state under a lease; None when another worker holds it.

        Wins when the job is in one of `from_states`, or already in `to_state` with an
        expired (or no) lease: its previous owner died. Leases are timed by this process's
        clock, so keep worker clocks in sync (NTP) and leases well above the skew. The
        returned record carries the fresh `claim_token` to pass to `transition`.
        """
        sources = frozenset(JobState(f) for f in from_states)
        for src in sources:
            if not can_transition(src, to_state):
                raise ValueError(f"illegal transition {src} -> {to_state}")
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        key = _job_key(job_id)
        now = self._clock()
        token = uuid.uuid4().hex
        with self._db.session() as s:
            current = s.execute(select(JobRow.state).where(JobRow.job_id == key)).scalar()
            if current is None:
                return None
            prev = JobState(current)
            if prev in sources:
                guard = JobRow.state == prev.value
            elif prev == to_state:
                # No lease at all (moved there without a claim) counts as expired.
                guard = (JobRow.state == prev.value) & or_(
                    JobRow.lease_expires_at.is_(None), JobRow.lease_expires_at < now
                )
            else:
                return None
            values: dict[str, Any] = {
                "state": to_state.value,
                "claim_token": token,
                "claimed_by": owner,
                "lease_expires_at": now + timedelta(seconds=lease_s),
                "attempts": JobRow.attempts + 1,
                "updated_at": now,
            }
            if prev != to_state:
                values["sweeps"] = 0  # progress: the sweep count starts again
            result = s.execute(
                update(JobRow)
                .where(JobRow.job_id == key, guard)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return None
            if prev != to_state:
                s.add(_event(key, prev, to_state, None, owner, now))
            s.flush()
            row = s.execute(
                select(JobRow).where(JobRow.job_id == key).execution_options(populate_existing=True)
            ).scalar_one()
            return JobRecord._from_row(row)

    def transition(
        self,
        job_id: uuid.UUID | str,
        *,
        to_state: JobState,
        expected: JobState,
        claim_token: str | None = None,
        reason: str | None = None,
        actor: str = "system",
        session: Session | None = None,
        where: Sequence[ColumnElement[bool]] = (),
        at: datetime | None = None,
        **fields: Unpack[JobFields],
    ) -> bool:
        """CAS `expected` -> `to_state` (and the claim token, when given); releases the lease.

        `fields` may set staging_key, poster_key, published_key and url. Returns whether
        this call won. With `session`, the change is part of the caller's transaction, so
        that other writes commit or roll back with it; `where` adds conditions the UPDATE
        must also meet (e.g. a reviewer's live lease); `at` is the time recorded (default:
        the clock).
        """
        if not can_transition(expected, to_state):
            raise ValueError(f"illegal transition {expected} -> {to_state}")
        unknown = set(fields) - JOB_FIELDS
        if unknown:
            raise TypeError(f"transition() cannot set {sorted(unknown)}; allowed: {sorted(JOB_FIELDS)}")
        key = _job_key(job_id)
        now = at or self._clock()
        conds = [JobRow.job_id == key, JobRow.state == expected.value, *where]
        if claim_token is not None:
            conds.append(JobRow.claim_token == claim_token)
        values: dict[str, Any] = {
            "state": to_state.value,
            "claim_token": None,
            "claimed_by": None,
            "lease_expires_at": None,
            "updated_at": now,
            "sweeps": 0,
            **fields,
        }
        if reason is not None:
            values["reason"] = reason
        with nullcontext(session) if session is not None else self._db.session() as s:
            result = s.execute(
                update(JobRow).where(*conds).values(**values).execution_options(synchronize_session=False)
            )
            if _rowcount(result) != 1:
                return False
            s.add(_event(key, expected, to_state, reason, actor, now))
        return True

    def renew(self, job_id: uuid.UUID | str, *, claim_token: str, lease_s: float) -> bool:
        """Extend a live claim: the lease now ends `lease_s` from now. False when the claim
        is gone (released, transitioned, or taken over after its lease expired)."""
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        now = self._clock()
        with self._db.session() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.job_id == _job_key(job_id), JobRow.claim_token == claim_token)
                .values(lease_expires_at=now + timedelta(seconds=lease_s))
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def release(self, job_id: uuid.UUID | str, *, claim_token: str) -> bool:
        """Give up a claim and keep the state: the lease ends now, so a retry of the same
        message (by any worker) can claim the job again at once. False if the token is stale."""
        with self._db.session() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.job_id == _job_key(job_id), JobRow.claim_token == claim_token)
                .values(claim_token=None, claimed_by=None, lease_expires_at=None, updated_at=self._clock())
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def fail(self, job_id: uuid.UUID | str, reason: str, actor: str = "system") -> bool:
        """Any non-final state -> failed. False if the job is missing or already final."""
        if not reason:
            raise ValueError("a failure needs a reason")
        key = _job_key(job_id)
        # Retry when a concurrent transition moves the job between two non-final states.
        for _ in range(10):
            with self._db.session() as s:
                current = s.execute(select(JobRow.state).where(JobRow.job_id == key)).scalar()
                if current is None or JobState(current) in FINAL_STATES:
                    return False
                prev = JobState(current)
                now = self._clock()
                result = s.execute(
                    update(JobRow)
                    .where(JobRow.job_id == key, JobRow.state == prev.value)
                    .values(
                        state=JobState.FAILED.value,
                        reason=reason,
                        claim_token=None,
                        claimed_by=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(result) == 1:
                    s.add(_event(key, prev, JobState.FAILED, reason, actor, now))
                    return True
        return False

    def stuck(self, states: Iterable[JobState], *, stale_after_s: float, limit: int = 500) -> list[JobRecord]:
        """Jobs in `states` whose lease expired, or that made no progress (updated_at) for
        `stale_after_s`, and that were not swept within `stale_after_s`; oldest first."""
        now = self._clock()
        stale = now - timedelta(seconds=stale_after_s)
        q = (
            select(JobRow)
            .where(
                JobRow.state.in_([JobState(st).value for st in states]),
                or_(JobRow.swept_at.is_(None), JobRow.swept_at < stale),
                or_(
                    JobRow.lease_expires_at < now,
                    JobRow.updated_at < stale,
                ),
            )
            .order_by(JobRow.updated_at, JobRow.job_id)
            .limit(limit)
        )
        with self._db.session() as s:
            return [JobRecord._from_row(r) for r in s.scalars(q)]

    def has_live_claim(self, state: JobState) -> bool:
        """Whether some job is in `state` under a live lease (a worker is at it right now)."""
        now = self._clock()
        with self._db.session() as s:
            found = s.execute(
                select(JobRow.job_id)
                .where(JobRow.state == JobState(state).value, JobRow.lease_expires_at > now)
                .limit(1)
            ).first()
            return found is not None

    def mark_swept(self, job: JobRecord) -> bool:
        """Count one sweep of the job as read (compare-and-set on its state and sweep count,
        so a job that moved on meanwhile is not counted). The state and updated_at stay."""
        with self._db.session() as s:
            result = s.execute(
                update(JobRow)
                .where(
                    JobRow.job_id == _job_key(job.job_id),
                    JobRow.state == job.state.value,
                    JobRow.sweeps == job.sweeps,
                )
                .values(
                    sweeps=JobRow.sweeps + 1, sweeps_total=JobRow.sweeps_total + 1, swept_at=self._clock()
                )
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def history(self, job_id: uuid.UUID | str) -> list[JobEvent]:
        with self._db.session() as s:
            rows = s.scalars(
                select(JobEventRow).where(JobEventRow.job_id == _job_key(job_id)).order_by(JobEventRow.id)
            )
            return [JobEvent._from_row(r) for r in rows]

    def list_jobs(
        self,
        campaign_id: str | None = None,
        states: Iterable[JobState] | None = None,
        limit: int = 1000,
        *,
        after: uuid.UUID | str | None = None,
    ) -> list[JobRecord]:
        """One page of jobs in (created_at, job_id) order, the order of the keyset indexes;
        `after`: the last job of the previous page (CursorNotFound if there is no such job)."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        q = select(JobRow)
        if campaign_id is not None:
            q = q.where(JobRow.campaign_id == campaign_id)
        if states is not None:
            q = q.where(JobRow.state.in_([JobState(st).value for st in states]))
        with self._db.session() as s:
            if after is not None:
                key = _job_key(after)
                created = s.scalar(select(JobRow.created_at).where(JobRow.job_id == key))
                if created is None:
                    raise CursorNotFound(f"no job {key} to continue after")
                q = q.where(
                    tuple_(JobRow.created_at, JobRow.job_id) > tuple_(literal(created, UtcDateTime()), key)
                )
            q = q.order_by(JobRow.created_at, JobRow.job_id).limit(limit)
            return [JobRecord._from_row(r) for r in s.scalars(q)]

    def counts_by_state(self, campaign_id: str) -> dict[JobState, int]:
        """Job count per state for the campaign; every state is present (0 when none)."""
        counts = dict.fromkeys(JobState, 0)
        with self._db.session() as s:
            rows = s.execute(
                select(JobRow.state, func.count())
                .where(JobRow.campaign_id == campaign_id)
                .group_by(JobRow.state)
            )
            for state, n in rows:
                counts[JobState(state)] = int(n)
        return counts

    def campaign_activity(self, campaign_id: str, *, since: datetime) -> tuple[datetime | None, int, int]:
        """(when the campaign's first job was created, how many of its jobs reached a final
        state since `since`, how many were failed by a dead letter): three aggregates for the
        progress view (pipeline/progress.py)."""
        final = [st.value for st in FINAL_STATES]
        # Both counts start from the few matching events (ix_job_events_to_state_at, the
        # partial ix_job_events_dlq_job_id) and check the campaign by the jobs' primary key.
        events = select(func.count(func.distinct(JobEventRow.job_id))).join(
            JobRow, JobRow.job_id == JobEventRow.job_id
        )
        with self._db.session() as s:
            first = s.scalar(select(func.min(JobRow.created_at)).where(JobRow.campaign_id == campaign_id))
            settled = s.scalar(
                events.where(
                    JobRow.campaign_id == campaign_id,
                    JobEventRow.to_state.in_(final),
                    JobEventRow.at >= since,
                )
            )
            dead = s.scalar(events.where(JobRow.campaign_id == campaign_id, JobEventRow.actor == "dlq"))
        if first is not None and first.tzinfo is None:
            first = first.replace(tzinfo=since.tzinfo)
        return first, int(settled or 0), int(dead or 0)

    def counts_by_campaign_state(self, *, final_within_s: float) -> list[tuple[str, str, int]]:
        """(campaign id, state, count) of every non-final job and of the final jobs that
        changed within `final_within_s` (one GROUP BY; bounds the metric's label sets)."""
        since = self._clock() - timedelta(seconds=final_within_s)
        working = [st.value for st in JobState if st not in FINAL_STATES]
        final = [st.value for st in FINAL_STATES]
        # Two ranges of ix_jobs_state_updated_at, not an OR that would read every job.
        picked = union_all(
            select(JobRow.campaign_id, JobRow.state).where(JobRow.state.in_(working)),
            select(JobRow.campaign_id, JobRow.state).where(
                JobRow.state.in_(final), JobRow.updated_at >= since
            ),
        ).subquery()
        with self._db.session() as s:
            rows = s.execute(
                select(picked.c.campaign_id, picked.c.state, func.count()).group_by(
                    picked.c.campaign_id, picked.c.state
                )
            )
            return [(str(c), str(st), int(n)) for c, st, n in rows]

    # --- streamed reads of one campaign (reports, in bounded memory: pipeline/reports.py) ---

    def iter_campaign_lines(self, campaign_id: str, *, page_size: int = 2_000) -> Iterator[list[JobLineRow]]:
        """The campaign's jobs in (created_at, job_id) order, in keyset pages of `page_size`
        (each page one short query on ix_jobs_campaign_id_created_at_job_id), with only
        the columns a report shows."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        name = JobRow.request_json[("recipient", "name")].as_string()
        q = select(
            JobRow.job_id,
            JobRow.recipient_id,
            JobRow.locale,
            JobRow.state,
            JobRow.reason,
            JobRow.url,
            JobRow.sweeps_total,
            name,
            JobRow.created_at,
        ).where(JobRow.campaign_id == campaign_id)
        cursor: tuple[datetime, str] | None = None
        while True:
            page = q
            if cursor is not None:
                page = page.where(
                    tuple_(JobRow.created_at, JobRow.job_id)
                    > tuple_(literal(cursor[0], UtcDateTime()), cursor[1])
                )
            page = page.order_by(JobRow.created_at, JobRow.job_id).limit(page_size)
            with self._db.engine.connect() as conn:
                rows = [
                    JobLineRow(
                        job_id=uuid.UUID(job_id),
                        recipient_id=recipient_id,
                        locale=locale,
                        state=_STATE[state],
                        reason=reason,
                        url=url,
                        sweeps_total=int(sweeps_total or 0),
                        name="" if name is None else str(name),
                        created_at=created_at,
                    )
                    for job_id, recipient_id, locale, state, reason, url, sweeps_total, name, created_at in (
                        conn.execute(page)
                    )
                ]
            if not rows:
                return
            yield rows
            if len(rows) < page_size:
                return
            cursor = (rows[-1].created_at, str(rows[-1].job_id))

    def campaign_event_span(self, campaign_id: str) -> tuple[datetime, datetime] | None:
        """The first and the last event time of the campaign's jobs; None without events."""
        with self._db.session() as s:
            first, last = s.execute(
                select(func.min(JobEventRow.at), func.max(JobEventRow.at))
                .join(JobRow, JobRow.job_id == JobEventRow.job_id)
                .where(JobRow.campaign_id == campaign_id)
            ).one()
        if first is None or last is None:
            return None
        return _utc(first), _utc(last)

    def campaign_state_flow(
        self, campaign_id: str, *, origin: datetime, width_s: float
    ) -> list[tuple[int, JobState | None, JobState, int]]:
        """(time bucket, from state, to state, events) of the campaign's jobs: one GROUP BY
        over their events; bucket b holds the events at [origin + b*width, origin + (b+1)*width)."""
        if width_s <= 0:
            raise ValueError("width_s must be positive")
        start = literal(origin, UtcDateTime())
        if self._db.is_sqlite:
            seconds: Any = (func.julianday(JobEventRow.at) - func.julianday(start)) * 86400.0
        else:
            seconds = extract("epoch", JobEventRow.at - start)
        bucket = func.floor(seconds / width_s).label("bucket")
        q = (
            select(bucket, JobEventRow.from_state, JobEventRow.to_state, func.count())
            .join(JobRow, JobRow.job_id == JobEventRow.job_id)
            .where(JobRow.campaign_id == campaign_id)
            .group_by(bucket, JobEventRow.from_state, JobEventRow.to_state)
        )
        with self._db.session() as s:
            return [
                (max(int(b), 0), JobState(src) if src is not None else None, JobState(dst), int(n))
                for b, src, dst, n in s.execute(q)
            ]

    # --- batched reads for campaign runs and reports (pipeline/campaign_runs.py) ---
    _IN_CHUNK = 500  # ids per IN (...) list: well inside SQLite's and PostgreSQL's limits

    def states_of(self, job_ids: Iterable[uuid.UUID | str]) -> dict[uuid.UUID, JobState]:
        """The current state of each existing job among `job_ids` (two columns, chunked IN)."""
        keys = [_job_key(j) for j in job_ids]
        out: dict[uuid.UUID, JobState] = {}
        with self._db.session() as s:
            for i in range(0, len(keys), self._IN_CHUNK):
                rows = s.execute(
                    select(JobRow.job_id, JobRow.state).where(JobRow.job_id.in_(keys[i : i + self._IN_CHUNK]))
                )
                for job_id, state in rows:
                    out[uuid.UUID(job_id)] = JobState(state)
        return out

    def get_many(self, job_ids: Iterable[uuid.UUID | str]) -> list[JobRecord]:
        """The existing jobs among `job_ids`, in the order given."""
        keys = [_job_key(j) for j in job_ids]
        found: dict[str, JobRecord] = {}
        with self._db.session() as s:
            for i in range(0, len(keys), self._IN_CHUNK):
                for row in s.scalars(select(JobRow).where(JobRow.job_id.in_(keys[i : i + self._IN_CHUNK]))):
                    found[row.job_id] = JobRecord._from_row(row)
        return [found[k] for k in keys if k in found]

    def history_many(
        self, job_ids: Iterable[uuid.UUID | str], *, to_states: Iterable[JobState] | None = None
    ) -> dict[uuid.UUID, list[JobEvent]]:
        """Every job's events, oldest first (jobs without events are absent); `to_states`:
        only the events into these states (picked here: the read is by job id either way,
        which keeps the planner on ix_job_events_job_id)."""
        keys = [_job_key(j) for j in job_ids]
        wanted = None if to_states is None else frozenset(JobState(st).value for st in to_states)
        out: dict[uuid.UUID, list[JobEvent]] = {}
        e = JobEventRow
        q = select(e.id, e.job_id, e.from_state, e.to_state, e.reason, e.actor, e.at)
        with self._db.engine.connect() as conn:
            for i in range(0, len(keys), self._IN_CHUNK):
                rows = conn.execute(q.where(e.job_id.in_(keys[i : i + self._IN_CHUNK])).order_by(e.id))
                for ev_id, job_id, src, dst, reason, actor, at in rows:
                    if wanted is not None and dst not in wanted:
                        continue
                    ev = JobEvent(
                        id=ev_id,
                        job_id=uuid.UUID(job_id),
                        from_state=_STATE[src] if src is not None else None,
                        to_state=_STATE[dst],
                        reason=reason,
                        actor=actor,
                        at=at,
                    )
                    out.setdefault(ev.job_id, []).append(ev)
        return out

    # --- batched intake of a campaign chunk (pipeline/campaigns.py) ---
    _SQLITE_ROWS_PER_INSERT = 2_000  # 14 parameters a row: inside SQLite's 32766 variables
    _EXISTING_IN_CHUNK = 10_000  # ids per IN (...) of the existing-rows read

    def create_many(
        self, jobs: Sequence[NewJob], *, owner: str | None = None, actor: str = "system"
    ) -> CreatedJobs:
        """Create a chunk of jobs in state `requested`, each with its first job_events row,
        in one transaction and a constant number of statements: one batched insert with ON
        CONFLICT DO NOTHING, then one read (by primary key) of the rows it did not insert.
        PostgreSQL: COPY into a temporary table, then one INSERT ... SELECT whose RETURNING
        feeds the job_events insert of the same statement; SQLite: multi-row
        INSERT ... RETURNING, then one executemany of the events. A fresh chunk costs the
        insert alone.

        Returns the ids it created and the rows that were there already (also a row that a
        concurrent intake inserted in between: it counts as existing, not created)."""
        if not jobs:
            return CreatedJobs(frozenset(), ())
        now = self._clock()
        with self._db.engine.begin() as conn:
            if self._db.is_sqlite:
                created = self._insert_sqlite(conn, jobs, now=now, owner=owner, actor=actor)
            else:
                created = self._insert_postgres(conn, jobs, now=now, owner=owner, actor=actor)
            lost = [j.job_id for j in jobs if j.job_id not in created]
            existing = self._existing_jobs(conn, lost) if lost else []
        return CreatedJobs(frozenset(created), tuple(existing))

    def existing_jobs(self, job_ids: Sequence[str]) -> list[ExistingJob]:
        """The rows of these job ids that exist (primary-key lookups, one query per 10,000)."""
        if not job_ids:
            return []
        with self._db.engine.connect() as conn:
            return self._existing_jobs(conn, job_ids)

    def has_jobs(self, campaign_id: str) -> bool:
        """Whether the campaign has any job row (one index probe)."""
        with self._db.engine.connect() as conn:
            found = conn.execute(select(JobRow.job_id).where(JobRow.campaign_id == campaign_id).limit(1))
            return found.first() is not None

    def existing_ids(self, job_ids: Sequence[str]) -> set[str]:
        """Which of these job ids have a row (primary-key lookups, one query per 10,000)."""
        out: set[str] = set()
        with self._db.engine.connect() as conn:
            for i in range(0, len(job_ids), self._EXISTING_IN_CHUNK):
                part = job_ids[i : i + self._EXISTING_IN_CHUNK]
                out.update(
                    str(k)
                    for k in conn.execute(select(JobRow.job_id).where(JobRow.job_id.in_(part))).scalars()
                )
        return out

    def _existing_jobs(self, conn: Any, keys: Sequence[str]) -> list[ExistingJob]:
        out: list[ExistingJob] = []
        cols = (
            JobRow.job_id,
            JobRow.state,
            JobRow.owner,
            JobRow.request_json,
            JobRow.updated_at,
            JobRow.swept_at,
        )
        for i in range(0, len(keys), self._EXISTING_IN_CHUNK):
            part = keys[i : i + self._EXISTING_IN_CHUNK]
            for job_id, state, own, request_json, updated_at, swept_at in conn.execute(
                select(*cols).where(JobRow.job_id.in_(part))
            ):
                out.append(ExistingJob(job_id, JobState(state), own, request_json, updated_at, swept_at))
        return out

    def _insert_postgres(
        self, conn: Any, new: Sequence[NewJob], *, now: datetime, owner: str | None, actor: str
    ) -> set[str]:
        cur = conn.connection.driver_connection.cursor()
        try:
            cur.execute(
                "CREATE TEMPORARY TABLE greetflow_intake (LIKE jobs INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            with cur.copy(f"COPY greetflow_intake ({_NEW_JOB_COLUMNS}) FROM STDIN") as copy:
                for j in new:
                    request = j.request_text or _json(j.request_json)
                    copy.write_row(
                        (
                            j.job_id, j.campaign_id, j.recipient_id, j.template_name, j.template_version,
                            j.locale, JobState.REQUESTED.value, request, 0, 0, 0, now, now, owner,
                        )
                    )  # fmt: skip
            cur.execute(
                f"WITH created AS (INSERT INTO jobs ({_NEW_JOB_COLUMNS}) "
                f"SELECT {_NEW_JOB_COLUMNS} FROM greetflow_intake ON CONFLICT DO NOTHING RETURNING job_id) "
                "INSERT INTO job_events (job_id, from_state, to_state, reason, actor, at) "
                "SELECT job_id, NULL, %s, NULL, %s, %s FROM created RETURNING job_id",
                (JobState.REQUESTED.value, actor, now),
            )
            return {str(r[0]) for r in cur.fetchall()}
        finally:
            cur.close()

    def _insert_sqlite(
        self, conn: Any, new: Sequence[NewJob], *, now: datetime, owner: str | None, actor: str
    ) -> set[str]:
        process = JobRow.__table__.c.created_at.type.bind_processor(conn.dialect)
        at = process(now) if process is not None else now
        raw = conn.connection.driver_connection
        created: set[str] = set()
        row = "(" + ",".join("?" * 14) + ")"
        step = self._SQLITE_ROWS_PER_INSERT
        for i in range(0, len(new), step):
            part = new[i : i + step]
            params: list[Any] = []
            for j in part:
                params.extend(
                    (
                        j.job_id, j.campaign_id, j.recipient_id, j.template_name, j.template_version,
                        j.locale, JobState.REQUESTED.value, j.request_text or _json(j.request_json), 0, 0, 0,
                        at, at, owner,
                    )
                )  # fmt: skip
            sql = (
                f"INSERT INTO jobs ({_NEW_JOB_COLUMNS}) VALUES {','.join([row] * len(part))} "
                "ON CONFLICT DO NOTHING RETURNING job_id"
            )
            created.update(str(r[0]) for r in raw.execute(sql, params).fetchall())
        raw.executemany(
            "INSERT INTO job_events (job_id, from_state, to_state, reason, actor, at) "
            "VALUES (?, NULL, ?, NULL, ?, ?)",
            [(k, JobState.REQUESTED.value, actor, at) for k in created],
        )
        return created


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_NEW_JOB_COLUMNS = (
    "job_id, campaign_id, recipient_id, template_name, template_version, locale, state, "
    "request_json, attempts, sweeps, sweeps_total, created_at, updated_at, owner"
)


class NewJob(NamedTuple):
    """One job of a batched intake (`JobRepository.create_many`): its keyed id and the
    render request it holds, as a JSON-ready dict (serialized only when it is inserted)."""

    job_id: str
    campaign_id: str
    recipient_id: str
    template_name: str
    template_version: str
    locale: str
    request_json: dict[str, Any]
    # request_json as its canonical JSON text, when the caller has it (the intake serializes
    # a request once, for its row and for its signed message); "": serialized on insert.
    request_text: str = ""


@dataclass(frozen=True)
class ExistingJob:
    """What intake needs of a job that existed already: whether it is final, whose it is,
    what it holds, and whether it looks lost (updated and swept long ago)."""

    job_id: str
    state: JobState
    owner: str | None
    request_json: dict[str, Any] = field(hash=False, compare=False)
    updated_at: datetime
    swept_at: datetime | None


@dataclass(frozen=True)
class CreatedJobs:
    created: frozenset[str]  # job ids inserted by this call
    existing: tuple[ExistingJob, ...]  # rows of the chunk that were there already


def _event(
    key: str, src: JobState | None, dst: JobState, reason: str | None, actor: str, at: datetime
) -> JobEventRow:
    return JobEventRow(
        job_id=key,
        from_state=src.value if src is not None else None,
        to_state=dst.value,
        reason=reason,
        actor=actor,
        at=at,
    )


class LockRepository:
    """Named lease locks (table `locks`): at most one live owner per name. Claimed by
    compare-and-set, so it works the same on SQLite and PostgreSQL."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def acquire(self, name: str, owner: str, *, ttl_s: float) -> bool:
        """Take or renew the lock for `ttl_s` from now: True when `owner` holds it now
        (it held it already, or the previous owner's lease expired, or nobody had it)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = self._clock()
        until = now + timedelta(seconds=ttl_s)
        with self._db.session() as s:
            result = s.execute(
                update(LockRow)
                .where(LockRow.name == name, or_(LockRow.owner == owner, LockRow.expires_at < now))
                .values(owner=owner, expires_at=until)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) == 1:
                return True
        try:
            with self._db.session() as s:
                if s.get(LockRow, name) is not None:
                    return False
                s.add(LockRow(name=name, owner=owner, expires_at=until))
        except IntegrityError:
            return False  # a concurrent first insert won
        return True

    def release(self, name: str, owner: str) -> bool:
        """End the lock now, if `owner` holds it."""
        with self._db.session() as s:
            result = s.execute(
                update(LockRow)
                .where(LockRow.name == name, LockRow.owner == owner)
                .values(expires_at=self._clock() - timedelta(microseconds=1))
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1

    def holder(self, name: str) -> tuple[str, datetime] | None:
        """The live owner of the lock and its expiry; None when nobody holds it."""
        with self._db.session() as s:
            row = s.get(LockRow, name)
            if row is None or row.expires_at <= self._clock():
                return None
            return row.owner, row.expires_at


class ConsentRepository:
    """The append-only consent ledger. Nothing is updated in place (the database refuses it)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def append(self, record: ConsentRecord) -> None:
        _validate_consent(record)
        with self._db.session() as s:
            _add_consent(s, record)

    def append_grant(
        self,
        record: ConsentRecord,
        *,
        challenge_code: str | None,
        faces: Sequence[FaceEmbedding] = (),
        at: datetime | None = None,
    ) -> None:
        """Append a grant, redeem its challenge and store its reference faces, all or nothing.

        Raises InvalidChallenge (nothing written) when the code is unknown for the subject,
        expired or already used.
        """
        if record.action != "grant":
            raise ValueError("append_grant() appends grants only")
        _validate_consent(record)
        now = at or utcnow()
        with self._db.session() as s:
            _add_consent(s, record)
            s.flush()  # the consent row first: the challenge and the faces reference it
            if challenge_code is not None:
                result = s.execute(
                    update(ConsentChallengeRow)
                    .where(
                        ConsentChallengeRow.subject_id == record.subject_id,
                        ConsentChallengeRow.code == challenge_code,
                        ConsentChallengeRow.used_at.is_(None),
                        ConsentChallengeRow.expires_at > now,
                    )
                    .values(used_at=now, used_by_record=str(record.record_id))
                    .execution_options(synchronize_session=False)
                )
                if _rowcount(result) != 1:
                    raise InvalidChallenge(
                        f"challenge code {challenge_code!r} is not valid for subject "
                        f"{record.subject_id!r} (unknown, expired or already used)"
                    )
            for face in faces:
                s.add(
                    SubjectFaceRow(
                        subject_id=record.subject_id,
                        consent_record_id=str(record.record_id),
                        embedding=[float(v) for v in face.values],
                        model=face.model,
                        source_sha256=face.source_sha256,
                        created_at=now,
                    )
                )

    def issue_challenge(
        self, subject_id: str, code: str, *, issued_by: str, ttl_s: float, at: datetime | None = None
    ) -> ConsentChallenge:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = at or utcnow()
        ch = ConsentChallenge(
            challenge_id=uuid.uuid4(),
            subject_id=subject_id,
            code=code,
            issued_by=issued_by,
            issued_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            used_at=None,
            used_by_record=None,
        )
        with self._db.session() as s:
            s.add(
                ConsentChallengeRow(
                    challenge_id=str(ch.challenge_id),
                    subject_id=subject_id,
                    code=code,
                    issued_by=issued_by,
                    issued_at=ch.issued_at,
                    expires_at=ch.expires_at,
                )
            )
        return ch

    def challenges(self, subject_id: str) -> list[ConsentChallenge]:
        with self._db.session() as s:
            rows = s.scalars(
                select(ConsentChallengeRow)
                .where(ConsentChallengeRow.subject_id == subject_id)
                .order_by(ConsentChallengeRow.issued_at)
            )
            return [ConsentChallenge._from_row(r) for r in rows]

    def get(self, record_id: uuid.UUID | str) -> ConsentRecord | None:
        with self._db.session() as s:
            row = s.get(ConsentRow, str(uuid.UUID(str(record_id))))
            return ConsentRecord._from_row(row) if row is not None else None

    def subject_faces(self, record_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[tuple[float, ...]]]:
        """Reference embeddings stored with the given grants."""
        keys = [str(r) for r in record_ids]
        out: dict[uuid.UUID, list[tuple[float, ...]]] = {}
        if not keys:
            return out
        with self._db.session() as s:
            rows = s.scalars(
                select(SubjectFaceRow)
                .where(SubjectFaceRow.consent_record_id.in_(keys))
                .order_by(SubjectFaceRow.id)
            )
            for r in rows:
                emb = tuple(float(v) for v in r.embedding)
                out.setdefault(uuid.UUID(r.consent_record_id), []).append(emb)
        return out

    def face_record_ids(self, subject_id: str) -> set[uuid.UUID]:
        """Grants of the subject that still have reference faces stored."""
        with self._db.session() as s:
            rows = s.scalars(
                select(SubjectFaceRow.consent_record_id)
                .where(SubjectFaceRow.subject_id == subject_id)
                .distinct()
            )
            return {uuid.UUID(r) for r in rows}

    def delete_subject_faces(self, record_ids: Iterable[uuid.UUID]) -> int:
        """Delete the reference faces of these grants (biometric data no longer needed)."""
        keys = [str(r) for r in record_ids]
        if not keys:
            return 0
        with self._db.session() as s:
            result = s.execute(
                delete(SubjectFaceRow)
                .where(SubjectFaceRow.consent_record_id.in_(keys))
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result)

    def due_expiries(self, at: datetime) -> list[ConsentRecord]:
        """Grants whose expires_at has passed and that no later record ended yet."""
        ended = select(ConsentRow.supersedes).where(ConsentRow.supersedes.is_not(None))
        with self._db.session() as s:
            rows = s.scalars(
                select(ConsentRow)
                .where(
                    ConsentRow.action == "grant",
                    ConsentRow.expires_at.is_not(None),
                    ConsentRow.expires_at <= at,
                    ConsentRow.record_id.not_in(ended),
                )
                .order_by(ConsentRow.expires_at, ConsentRow.record_id)
            )
            return [ConsentRecord._from_row(r) for r in rows]

    def records(self, subject_id: str) -> list[ConsentRecord]:
        """Every record of the subject, oldest first."""
        with self._db.session() as s:
            rows = s.scalars(
                select(ConsentRow)
                .where(ConsentRow.subject_id == subject_id)
                .order_by(ConsentRow.created_at, ConsentRow.granted_at, ConsentRow.record_id)
            )
            return [ConsentRecord._from_row(r) for r in rows]

    def list_subjects(self) -> list[str]:
        with self._db.session() as s:
            return list(s.scalars(select(ConsentRow.subject_id).distinct().order_by(ConsentRow.subject_id)))


def _validate_consent(record: ConsentRecord) -> None:
    if record.action not in ("grant", "revoke", "expire"):
        raise ValueError(f"unknown consent action {record.action!r}")
    if record.action == "grant" and not record.scopes:
        raise ValueError("a grant needs at least one scope")
    if record.action != "grant" and record.supersedes is None and not record.scopes:
        raise ValueError(f"a {record.action} record needs scopes or supersedes")
    if not record.purpose:
        raise ValueError("purpose must not be empty (use '*' for any purpose)")
    if record.expires_at is not None and record.expires_at <= record.granted_at:
        raise ValueError("expires_at must be after granted_at")


def _add_consent(s: Session, record: ConsentRecord) -> None:
    if record.supersedes is not None:
        prior = s.get(ConsentRow, str(record.supersedes))
        if prior is None or prior.subject_id != record.subject_id:
            raise ValueError(
                f"supersedes={record.supersedes} is not a record of subject {record.subject_id!r}"
            )
    s.add(
        ConsentRow(
            record_id=str(record.record_id),
            subject_id=record.subject_id,
            action=record.action,
            scopes=sorted(Scope(sc).value for sc in record.scopes),
            purpose=record.purpose,
            granted_at=record.granted_at,
            expires_at=record.expires_at,
            evidence_sha256=record.evidence_sha256,
            evidence_key=record.evidence_key,
            challenge_code=record.challenge_code,
            recorded_by=record.recorded_by,
            created_at=record.created_at,
            supersedes=str(record.supersedes) if record.supersedes is not None else None,
        )
    )


class PublishedClipRepository:
    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def record(self, job_id: uuid.UUID | str, object_key: str, url: str, sha256: str) -> bool:
        """Record the publication once. False if this job's clip is already recorded."""
        key = _job_key(job_id)
        try:
            with self._db.session() as s:
                if s.get(PublishedClipRow, key) is not None:
                    return False
                s.add(
                    PublishedClipRow(
                        job_id=key,
                        object_key=object_key,
                        url=url,
                        sha256=sha256,
                        published_at=self._clock(),
                    )
                )
        except IntegrityError:
            # Lost a race on the same job: idempotent. An object key reused by another job,
            # or an unknown job id, is a real error.
            if self.get(key) is None:
                raise
            return False
        return True

    def get(self, job_id: uuid.UUID | str) -> PublishedClip | None:
        with self._db.session() as s:
            row = s.get(PublishedClipRow, _job_key(job_id))
            return PublishedClip._from_row(row) if row is not None else None

    def mark_taken_down(self, job_id: uuid.UUID | str, reason: str) -> bool:
        """False if the clip is not recorded or already taken down (the first reason stays)."""
        with self._db.session() as s:
            result = s.execute(
                update(PublishedClipRow)
                .where(
                    PublishedClipRow.job_id == _job_key(job_id),
                    PublishedClipRow.taken_down_at.is_(None),
                )
                .values(taken_down_at=self._clock(), takedown_reason=reason)
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result) == 1


class LikenessGallery:
    """The protected-persons gallery: faces of public figures a clip must not show."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def protect(
        self, name: str, faces: Sequence[FaceEmbedding], *, enrolled_by: str, subject_id: str | None = None
    ) -> int:
        """Enrol faces under `name`; a photo already enrolled for the name is skipped.
        Returns how many faces were added."""
        if not name.strip():
            raise ValueError("a protected person needs a name")
        added = 0
        now = self._clock()
        with self._db.session() as s:
            known = set(
                s.scalars(select(ProtectedFaceRow.source_sha256).where(ProtectedFaceRow.name == name))
            )
            for face in faces:
                if face.source_sha256 in known:
                    continue
                known.add(face.source_sha256)
                s.add(
                    ProtectedFaceRow(
                        name=name,
                        subject_id=subject_id,
                        embedding=[float(v) for v in face.values],
                        model=face.model,
                        source_sha256=face.source_sha256,
                        enrolled_by=enrolled_by,
                        created_at=now,
                    )
                )
                added += 1
        return added

    def unprotect(self, name: str) -> int:
        with self._db.session() as s:
            result = s.execute(
                delete(ProtectedFaceRow)
                .where(ProtectedFaceRow.name == name)
                .execution_options(synchronize_session=False)
            )
            return _rowcount(result)

    def faces(self) -> list[ProtectedFace]:
        with self._db.session() as s:
            return [
                ProtectedFace._from_row(r)
                for r in s.scalars(select(ProtectedFaceRow).order_by(ProtectedFaceRow.id))
            ]


class ModerationResultRepository:
    """Append-only moderation results (automatic and human) for the review queue."""

    def __init__(self, db: Database, *, clock: Clock = utcnow) -> None:
        self._db = db
        self._clock = clock

    def record(
        self,
        job_id: uuid.UUID | str,
        decision: Decision,
        findings: Sequence[Finding],
        *,
        decided_by: str,
        reason: str = "",
    ) -> ModerationResult:
        with self._db.session() as s:
            row = ModerationResultRow(
                job_id=_job_key(job_id),
                decision=Decision(decision).value,
                findings=[f.model_dump(mode="json") for f in findings],
                decided_by=decided_by,
                reason=reason,
                created_at=self._clock(),
            )
            s.add(row)
            s.flush()
            return ModerationResult._from_row(row)

    def history(self, job_id: uuid.UUID | str) -> list[ModerationResult]:
        with self._db.session() as s:
            rows = s.scalars(
                select(ModerationResultRow)
                .where(ModerationResultRow.job_id == _job_key(job_id))
                .order_by(ModerationResultRow.id)
            )
            return [ModerationResult._from_row(r) for r in rows]

    def latest(self, job_id: uuid.UUID | str) -> ModerationResult | None:
        with self._db.session() as s:
            row = s.scalars(
                select(ModerationResultRow)
                .where(ModerationResultRow.job_id == _job_key(job_id))
                .order_by(ModerationResultRow.id.desc())
                .limit(1)
            ).first()
            return ModerationResult._from_row(row) if row is not None else None

    def review_queue(self, *, limit: int = 100) -> list[tuple[JobRecord, ModerationResult]]:
        """Jobs waiting for a human, oldest decision first, each with its latest result.

        Starts from the jobs in needs_review (ix_jobs_state_updated_at) and finds each one's
        latest result by ix_moderation_results_job_id_id, never grouping every result."""
        if self._db.is_sqlite:
            inner = ModerationResultRow.__table__.alias("mr_latest")
            last_id = select(func.max(inner.c.id)).where(inner.c.job_id == JobRow.job_id).scalar_subquery()
            mr: Any = ModerationResultRow
            q = select(JobRow, mr).join(mr, and_(mr.job_id == JobRow.job_id, mr.id == last_id))
        else:
            # LATERAL: one backward step of ix_moderation_results_job_id_id per queued job.
            latest = (
                select(ModerationResultRow)
                .where(ModerationResultRow.job_id == JobRow.job_id)
                .order_by(ModerationResultRow.id.desc())
                .limit(1)
                .lateral("latest")
            )
            mr = aliased(ModerationResultRow, latest)
            q = select(JobRow, mr).join(mr, true())
        q = q.where(JobRow.state == JobState.NEEDS_REVIEW.value).order_by(mr.created_at, mr.id).limit(limit)
        with self._db.session() as s:
            return [(JobRecord._from_row(j), ModerationResult._from_row(m)) for j, m in s.execute(q)]


class JobSubjectRepository:
    """Which subjects each clip uses, so that a revocation finds every clip of a subject."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def index(self, job_id: uuid.UUID | str, subjects: Iterable[SubjectUse]) -> int:
        """Record the job's subjects (idempotent). Returns how many rows were added."""
        key = _job_key(job_id)
        added = 0
        with self._db.session() as s:
            have = set(s.scalars(select(JobSubjectRow.subject_id).where(JobSubjectRow.job_id == key)))
            for use in subjects:
                if use.subject_id in have:
                    continue
                have.add(use.subject_id)
                s.add(
                    JobSubjectRow(
                        job_id=key, subject_id=use.subject_id, scopes=sorted(sc.value for sc in use.scopes)
                    )
                )
                added += 1
        return added

    def jobs_using(self, subject_id: str, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        q = (
            select(JobRow)
            .join(JobSubjectRow, JobSubjectRow.job_id == JobRow.job_id)
            .where(JobSubjectRow.subject_id == subject_id)
        )
        if states is not None:
            q = q.where(JobRow.state.in_([JobState(st).value for st in states]))
        with self._db.session() as s:
            return [JobRecord._from_row(r) for r in s.scalars(q.order_by(JobRow.created_at, JobRow.job_id))]

    def jobs_with_subjects(self, states: Iterable[JobState]) -> list[JobRecord]:
        """Jobs in `states` whose clip uses at least one subject (the consent sweep)."""
        ids = select(JobSubjectRow.job_id).distinct()
        q = (
            select(JobRow)
            .where(JobRow.job_id.in_(ids), JobRow.state.in_([JobState(st).value for st in states]))
            .order_by(JobRow.created_at, JobRow.job_id)
        )
        with self._db.session() as s:
            return [JobRecord._from_row(r) for r in s.scalars(q)]
