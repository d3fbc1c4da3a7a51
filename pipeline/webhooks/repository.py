"""Reads and writes of the webhook tables (migration 0007); no rules."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from pipeline.adapters.db import (
    CampaignRow,
    Database,
    JobEventRow,
    JobRow,
    WebhookAttemptRow,
    WebhookCursorRow,
    WebhookDeliveryRow,
    WebhookEndpointRow,
)
from schemas.common import utcnow

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Endpoint:
    id: uuid.UUID
    tenant: str | None
    campaign_id: str | None
    url: str
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    events: tuple[str, ...]
    created_at: datetime
    disabled_at: datetime | None

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets to sign with now: the current one, and the previous during its grace."""
        secrets = [self.secret]
        if self.previous_secret and self.previous_secret_expires_at and self.previous_secret_expires_at > now:
            secrets.append(self.previous_secret)
        return secrets

    @classmethod
    def _from_row(cls, r: WebhookEndpointRow) -> Endpoint:
        return cls(
            id=uuid.UUID(r.id),
            tenant=r.tenant,
            campaign_id=r.campaign_id,
            url=r.url,
            secret=r.secret,
            previous_secret=r.previous_secret,
            previous_secret_expires_at=r.previous_secret_expires_at,
            events=tuple(r.events),
            created_at=r.created_at,
            disabled_at=r.disabled_at,
        )


@dataclass(frozen=True)
class Attempt:
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


@dataclass(frozen=True)
class Delivery:
    id: uuid.UUID
    endpoint_id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    payload: str
    attempts: int
    next_attempt_at: datetime
    state: str
    last_status: int | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def _from_row(cls, r: WebhookDeliveryRow) -> Delivery:
        return cls(
            id=uuid.UUID(r.id),
            endpoint_id=uuid.UUID(r.endpoint_id),
            event_id=uuid.UUID(r.event_id),
            event_type=r.event_type,
            payload=r.payload,
            attempts=r.attempts,
            next_attempt_at=r.next_attempt_at,
            state=r.state,
            last_status=r.last_status,
            last_error=r.last_error,
            created_at=r.created_at,
            updated_at=r.updated_at,
        )


@dataclass(frozen=True)
class JobOwner:
    """What routing an event needs to know about its job."""

    job_id: uuid.UUID
    campaign_id: str
    recipient_id: str
    state: str
    reason: str | None
    url: str | None
    tenants: frozenset[str]  # the job's owner and its campaign's owner


class WebhookRepository:
    def __init__(self, db: Database | Callable[[], Database], *, clock: Clock = utcnow) -> None:
        self._db_source = db
        self._clock = clock

    @property
    def _db(self) -> Database:
        return self._db_source if isinstance(self._db_source, Database) else self._db_source()

    # --- endpoints ---

    def add_endpoint(
        self, *, tenant: str | None, campaign_id: str | None, url: str, secret: str, events: Iterable[str]
    ) -> Endpoint:
        row = WebhookEndpointRow(
            id=str(uuid.uuid4()),
            tenant=tenant,
            campaign_id=campaign_id,
            url=url,
            secret=secret,
            previous_secret=None,
            previous_secret_expires_at=None,
            events=sorted(set(events)),
            created_at=self._clock(),
            disabled_at=None,
        )
        with self._db.session() as s:
            s.add(row)
        return Endpoint._from_row(row)

    def endpoint(self, endpoint_id: uuid.UUID | str) -> Endpoint | None:
        with self._db.session() as s:
            row = s.get(WebhookEndpointRow, str(endpoint_id))
            return Endpoint._from_row(row) if row is not None else None

    def endpoints_of_tenant(self, tenant: str) -> list[Endpoint]:
        with self._db.session() as s:
            rows = s.scalars(
                select(WebhookEndpointRow)
                .where(WebhookEndpointRow.tenant == tenant, WebhookEndpointRow.disabled_at.is_(None))
                .order_by(WebhookEndpointRow.created_at)
            ).all()
            return [Endpoint._from_row(r) for r in rows]

    def endpoints_of_campaign(self, campaign_id: str) -> list[Endpoint]:
        with self._db.session() as s:
            rows = s.scalars(
                select(WebhookEndpointRow).where(
                    WebhookEndpointRow.campaign_id == campaign_id,
                    WebhookEndpointRow.tenant.is_(None),
                    WebhookEndpointRow.disabled_at.is_(None),
                )
            ).all()
            return [Endpoint._from_row(r) for r in rows]

    def matching(self, *, tenants: Iterable[str], campaign_id: str | None, event_type: str) -> list[Endpoint]:
        """Live endpoints of any of `tenants` or of the campaign's brief that take `event_type`."""
        names = sorted(set(tenants))
        clauses: list[ColumnElement[bool]] = []
        if names:
            clauses.append(WebhookEndpointRow.tenant.in_(names))
        if campaign_id is not None:
            clauses.append(
                and_(WebhookEndpointRow.tenant.is_(None), WebhookEndpointRow.campaign_id == campaign_id)
            )
        if not clauses:
            return []
        with self._db.session() as s:
            rows = s.scalars(
                select(WebhookEndpointRow).where(or_(*clauses), WebhookEndpointRow.disabled_at.is_(None))
            ).all()
            return [Endpoint._from_row(r) for r in rows if event_type in r.events]

    def rotate(self, endpoint_id: uuid.UUID, new_secret: str, *, grace_s: float) -> Endpoint | None:
        now = self._clock()
        with self._db.session() as s:
            row = s.get(WebhookEndpointRow, str(endpoint_id))
            if row is None or row.disabled_at is not None:
                return None
            row.previous_secret = row.secret
            row.previous_secret_expires_at = now + timedelta(seconds=grace_s)
            row.secret = new_secret
            return Endpoint._from_row(row)

    def disable(self, endpoint_id: uuid.UUID) -> bool:
        with self._db.session() as s:
            result = s.execute(
                update(WebhookEndpointRow)
                .where(WebhookEndpointRow.id == str(endpoint_id), WebhookEndpointRow.disabled_at.is_(None))
                .values(disabled_at=self._clock())
                .execution_options(synchronize_session=False)
            )
            return bool(getattr(result, "rowcount", 0))

    # --- deliveries ---

    def add_delivery(
        self, endpoint_id: uuid.UUID, event_id: uuid.UUID, event_type: str, payload: str
    ) -> bool:
        """One delivery per (endpoint, event): False when it exists already (a redelivery)."""
        delivery_id = uuid.uuid5(endpoint_id, str(event_id))
        now = self._clock()
        try:
            with self._db.session() as s:
                if s.get(WebhookDeliveryRow, str(delivery_id)) is not None:
                    return False
                s.add(
                    WebhookDeliveryRow(
                        id=str(delivery_id),
                        endpoint_id=str(endpoint_id),
                        event_id=str(event_id),
                        event_type=event_type,
                        payload=payload,
                        attempts=0,
                        next_attempt_at=now,
                        state="pending",
                        created_at=now,
                        updated_at=now,
                    )
                )
        except IntegrityError:
            return False
        return True

    def claim_due(self, owner: str, *, lease_s: float, limit: int) -> list[Delivery]:
        """Pending deliveries due now that nobody holds, each claimed by compare-and-set."""
        now = self._clock()
        free = or_(WebhookDeliveryRow.lease_expires_at.is_(None), WebhookDeliveryRow.lease_expires_at < now)
        with self._db.session() as s:
            ids = s.scalars(
                select(WebhookDeliveryRow.id)
                .where(WebhookDeliveryRow.state == "pending", WebhookDeliveryRow.next_attempt_at <= now, free)
                .order_by(WebhookDeliveryRow.next_attempt_at)
                .limit(limit)
            ).all()
        claimed: list[Delivery] = []
        for delivery_id in ids:
            with self._db.session() as s:
                result = s.execute(
                    update(WebhookDeliveryRow)
                    .where(WebhookDeliveryRow.id == delivery_id, WebhookDeliveryRow.state == "pending", free)
                    .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_s))
                    .execution_options(synchronize_session=False)
                )
                if getattr(result, "rowcount", 0) == 1:
                    row = s.get(WebhookDeliveryRow, delivery_id)
                    if row is not None:
                        claimed.append(Delivery._from_row(row))
        return claimed

    def record_attempt(
        self,
        delivery: Delivery,
        owner: str,
        *,
        status_code: int | None,
        error: str | None,
        duration_ms: int,
        state: str,
        next_attempt_at: datetime,
    ) -> bool:
        """Append the attempt and move the delivery on, only while `owner` still holds it."""
        now = self._clock()
        n = delivery.attempts + 1
        with self._db.session() as s:
            result = s.execute(
                update(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.id == str(delivery.id), WebhookDeliveryRow.lease_owner == owner)
                .values(
                    attempts=n,
                    state=state,
                    last_status=status_code,
                    last_error=error,
                    next_attempt_at=next_attempt_at,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                )
                .execution_options(synchronize_session=False)
            )
            if getattr(result, "rowcount", 0) != 1:
                return False
            s.add(
                WebhookAttemptRow(
                    delivery_id=str(delivery.id),
                    attempt=n,
                    at=now,
                    status_code=status_code,
                    error=error,
                    duration_ms=duration_ms,
                )
            )
        return True

    def deliveries(self, endpoint_id: uuid.UUID, *, limit: int = 100) -> list[tuple[Delivery, list[Attempt]]]:
        with self._db.session() as s:
            rows = s.scalars(
                select(WebhookDeliveryRow)
                .where(WebhookDeliveryRow.endpoint_id == str(endpoint_id))
                .order_by(WebhookDeliveryRow.created_at.desc())
                .limit(limit)
            ).all()
            ids = [r.id for r in rows]
            attempts: dict[str, list[Attempt]] = {i: [] for i in ids}
            if ids:
                for a in s.scalars(
                    select(WebhookAttemptRow)
                    .where(WebhookAttemptRow.delivery_id.in_(ids))
                    .order_by(WebhookAttemptRow.attempt)
                ).all():
                    attempts[a.delivery_id].append(
                        Attempt(a.attempt, a.at, a.status_code, a.error, a.duration_ms)
                    )
            return [(Delivery._from_row(r), attempts[r.id]) for r in rows]

    def delivery(self, delivery_id: uuid.UUID) -> Delivery | None:
        with self._db.session() as s:
            row = s.get(WebhookDeliveryRow, str(delivery_id))
            return Delivery._from_row(row) if row is not None else None

    def attempts(self, delivery_id: uuid.UUID) -> list[Attempt]:
        with self._db.session() as s:
            return [
                Attempt(a.attempt, a.at, a.status_code, a.error, a.duration_ms)
                for a in s.scalars(
                    select(WebhookAttemptRow)
                    .where(WebhookAttemptRow.delivery_id == str(delivery_id))
                    .order_by(WebhookAttemptRow.attempt)
                ).all()
            ]

    # --- what events need to know about jobs and campaigns ---

    def job(self, job_id: uuid.UUID | str) -> JobOwner | None:
        with self._db.session() as s:
            row = s.get(JobRow, str(job_id))
            if row is None:
                return None
            tenants = {row.owner} if row.owner else set()
            campaign_owner = s.scalar(
                select(CampaignRow.owner).where(CampaignRow.campaign_id == row.campaign_id)
            )
            if campaign_owner:
                tenants.add(campaign_owner)
            return JobOwner(
                job_id=uuid.UUID(row.job_id),
                campaign_id=row.campaign_id,
                recipient_id=row.recipient_id,
                state=row.state,
                reason=row.reason,
                url=row.url,
                tenants=frozenset(tenants),
            )

    def campaign_counts(self, campaign_id: str) -> tuple[dict[str, int], frozenset[str]]:
        """Jobs of the campaign by state, and the tenants owning any of them (or the campaign)."""
        with self._db.session() as s:
            counts = {
                state: int(n)
                for state, n in s.execute(
                    select(JobRow.state, func.count())
                    .where(JobRow.campaign_id == campaign_id)
                    .group_by(JobRow.state)
                ).all()
            }
            owners = {
                o
                for o in s.scalars(
                    select(JobRow.owner)
                    .where(JobRow.campaign_id == campaign_id, JobRow.owner.is_not(None))
                    .distinct()
                ).all()
                if o
            }
            campaign_owner = s.scalar(select(CampaignRow.owner).where(CampaignRow.campaign_id == campaign_id))
            if campaign_owner:
                owners.add(campaign_owner)
            return counts, frozenset(owners)

    # --- the job_events scan (job.failed, job.rejected) ---

    def cursor(self, name: str) -> int | None:
        with self._db.session() as s:
            row = s.get(WebhookCursorRow, name)
            return int(row.position) if row is not None else None

    def set_cursor(self, name: str, position: int) -> None:
        with self._db.session() as s:
            row = s.get(WebhookCursorRow, name)
            if row is None:
                s.add(WebhookCursorRow(name=name, position=position))
            elif position > row.position:
                row.position = position

    def last_job_event_id(self) -> int:
        with self._db.session() as s:
            return int(s.scalar(select(func.max(JobEventRow.id))) or 0)

    def job_events_after(
        self, position: int, states: Iterable[str], *, limit: int = 500
    ) -> list[tuple[int, str, str, datetime]]:
        """(id, job id, to_state, at) of job_events past `position` into one of `states`."""
        with self._db.session() as s:
            rows = s.execute(
                select(JobEventRow.id, JobEventRow.job_id, JobEventRow.to_state, JobEventRow.at)
                .where(JobEventRow.id > position, JobEventRow.to_state.in_(list(states)))
                .order_by(JobEventRow.id)
                .limit(limit)
            ).all()
            return [(int(i), str(j), str(t), at) for i, j, t, at in rows]
