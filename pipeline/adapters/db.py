"""Database adapter: SQLAlchemy 2 engine, session factory, ORM models and Alembic migrations.

One code path for both backends: PostgreSQL (production, psycopg 3) and a SQLite file
(embedded default, WAL). Every timestamp is stored as UTC and read back UTC-aware.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Connection,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from pipeline.errors import GreetflowError

SQLITE_BUSY_TIMEOUT_MS = 10_000
# pg advisory lock key taken around migrations (one per database, any schema).
MIGRATION_LOCK_KEY = 7301880313
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def migrations_dir() -> Path:
    """The Alembic script directory shipped inside the `pipeline` package."""
    return Path(str(resources.files("pipeline").joinpath("migrations")))


def _scripts() -> Any:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(cfg)


def head_revision() -> str:
    """The newest revision of the shipped migrations (what the code expects)."""
    head: str | None = _scripts().get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RuntimeError(f"no migrations under {migrations_dir()}")
    return head


def known_revisions() -> frozenset[str]:
    """Every revision of the shipped migrations. A database at another one was migrated by
    a newer release (this code running during a rollback): it is left as it is."""
    return frozenset(str(s.revision) for s in _scripts().walk_revisions())


class MigrationError(GreetflowError):
    """The schema could not be brought to (or did not reach) the code's head revision."""


@dataclass(frozen=True)
class MigrationOutcome:
    """What one process did about the schema: applied the migrations under the lock, or
    found them applied (at once, or after waiting for the process that held the lock)."""

    before: str | None
    after: str | None
    head: str
    applied: bool
    waited_s: float

    @property
    def newer(self) -> bool:
        """The schema is at a revision this code does not ship (a newer release's)."""
        return self.after is not None and self.after != self.head and self.after not in known_revisions()

    def describe(self) -> str:
        if self.newer:
            return (
                f"schema at {self.after}, newer than this code's head {self.head} "
                "(migrated by a newer release); nothing applied"
            )
        if self.applied:
            return (
                f"applied migrations {self.before or 'none'} -> {self.after} under the migration lock "
                f"(waited {self.waited_s:.1f} s for it)"
            )
        if self.waited_s >= 0.05:
            return f"waited {self.waited_s:.1f} s for the schema; it is current at {self.after}"
        return f"schema current at {self.after}; nothing to apply"


class UtcDateTime(TypeDecorator[datetime]):
    """TIMESTAMP WITH TIME ZONE that only accepts aware datetimes and always returns UTC-aware ones.

    SQLite has no time zone type: values are stored as naive UTC text (fixed-width, so
    string comparison is chronological) and re-tagged as UTC on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type() -> JSON:
    return JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    campaign_id: Mapped[str] = mapped_column(String(64))
    recipient_id: Mapped[str] = mapped_column(String(64))
    template_name: Mapped[str] = mapped_column(String(64))
    template_version: Mapped[str] = mapped_column(String(64))
    locale: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    request_json: Mapped[dict[str, Any]] = mapped_column(json_type())
    staging_key: Mapped[str | None] = mapped_column(String(512))
    poster_key: Mapped[str | None] = mapped_column(String(512))
    published_key: Mapped[str | None] = mapped_column(String(512))
    url: Mapped[str | None] = mapped_column(String(2048))
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # Migration 0004: sweeps since the job's last state change, sweeps ever, the last sweep.
    sweeps: Mapped[int] = mapped_column(Integer, default=0)
    sweeps_total: Mapped[int] = mapped_column(Integer, default=0)
    swept_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # Migration 0006: the API tenant that requested the job; None: the CLI or a DAG.
    owner: Mapped[str | None] = mapped_column(String(64))

    # Migration 0008: every index is one a query of pipeline/repositories.py walks
    # (docs/job-store.md has their plans on PostgreSQL).
    __table_args__ = (
        # A campaign's counts by state (GROUP BY), and its stale jobs in one state.
        Index("ix_jobs_campaign_id_state_updated_at", "campaign_id", "state", "updated_at"),
        # A campaign's jobs in keyset pages: `greetflow jobs --campaign`, the report.
        Index("ix_jobs_campaign_id_created_at_job_id", "campaign_id", "created_at", "job_id"),
        # Every job in keyset pages: `greetflow jobs`.
        Index("ix_jobs_created_at_job_id", "created_at", "job_id"),
        # The sweeper (oldest first per state) and the recently-final count of the metrics.
        Index("ix_jobs_state_updated_at", "state", "updated_at"),
    )


class LockRow(Base):
    """A named lease lock (migration 0004), claimed by compare-and-set: the job sweeper's."""

    __tablename__ = "locks"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class JobEventRow(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_job_events_job_id", "job_id"),
        # Migration 0008: the jobs that reached a final state lately (progress throughput).
        Index("ix_job_events_to_state_at", "to_state", "at"),
        # Migration 0008: the dead-lettered jobs (rare: a partial index stays tiny).
        Index(
            "ix_job_events_dlq_job_id",
            "job_id",
            postgresql_where=text("actor = 'dlq'"),
            sqlite_where=text("actor = 'dlq'"),
        ),
    )


class ConsentRow(Base):
    __tablename__ = "consents"

    record_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(8))
    scopes: Mapped[list[str]] = mapped_column(json_type())
    purpose: Mapped[str] = mapped_column(String(128))
    granted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    evidence_sha256: Mapped[str | None] = mapped_column(String(64))
    evidence_key: Mapped[str | None] = mapped_column(String(512))
    challenge_code: Mapped[str | None] = mapped_column(String(64))
    recorded_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    supersedes: Mapped[str | None] = mapped_column(String(36), ForeignKey("consents.record_id"))

    __table_args__ = (
        CheckConstraint("action IN ('grant', 'revoke', 'expire')", name="ck_consents_action"),
        Index("ix_consents_subject_id_created_at", "subject_id", "created_at"),
    )


class PublishedClipRow(Base):
    __tablename__ = "published_clips"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"), primary_key=True)
    object_key: Mapped[str] = mapped_column(String(512), unique=True)
    url: Mapped[str] = mapped_column(String(2048))
    sha256: Mapped[str] = mapped_column(String(64))
    published_at: Mapped[datetime] = mapped_column(UtcDateTime())
    taken_down_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    takedown_reason: Mapped[str | None] = mapped_column(Text)


# --- consent verification, likeness, moderation results (migration 0002) ---


class ConsentChallengeRow(Base):
    """A short-lived code issued to a subject; a grant redeems it (once)."""

    __tablename__ = "consent_challenges"

    challenge_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64))
    code: Mapped[str] = mapped_column(String(32))
    issued_by: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    used_by_record: Mapped[str | None] = mapped_column(String(36), ForeignKey("consents.record_id"))

    __table_args__ = (Index("ix_consent_challenges_subject_id_code", "subject_id", "code"),)


class SubjectFaceRow(Base):
    """A reference face embedding of a subject, computed from the photo of one grant.

    Biometric data: deleted as soon as no grant in force covers the face any more.
    """

    __tablename__ = "subject_faces"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    subject_id: Mapped[str] = mapped_column(String(64))
    consent_record_id: Mapped[str] = mapped_column(String(36), ForeignKey("consents.record_id"))
    embedding: Mapped[list[float]] = mapped_column(json_type())
    model: Mapped[str] = mapped_column(String(64))
    source_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_subject_faces_subject_id", "subject_id"),
        Index("ix_subject_faces_consent_record_id", "consent_record_id"),
    )


class ProtectedFaceRow(Base):
    """One face of the protected-persons gallery (public figures). A match rejects a clip
    unless the person is linked to a subject with a valid face consent for the job."""

    __tablename__ = "protected_faces"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    name: Mapped[str] = mapped_column(String(128))
    subject_id: Mapped[str | None] = mapped_column(String(64))
    embedding: Mapped[list[float]] = mapped_column(json_type())
    model: Mapped[str] = mapped_column(String(64))
    source_sha256: Mapped[str] = mapped_column(String(64))
    enrolled_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_protected_faces_name", "name"),
        # The same photo enrolled twice for one person is one entry.
        Index("ux_protected_faces_name_source", "name", "source_sha256", unique=True),
    )


class ModerationResultRow(Base):
    """Append-only: every automatic or human decision of a job with its findings.

    The review queue lists jobs in needs_review, oldest first, with their latest row.
    """

    __tablename__ = "moderation_results"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"))
    decision: Mapped[str] = mapped_column(String(16))
    findings: Mapped[list[dict[str, Any]]] = mapped_column(json_type())
    decided_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        CheckConstraint(
            "decision IN ('approved', 'rejected', 'needs_review')", name="ck_moderation_results_decision"
        ),
        Index("ix_moderation_results_job_id_id", "job_id", "id"),
        Index("ix_moderation_results_decision_created_at", "decision", "created_at"),
    )


class JobSubjectRow(Base):
    """Which subjects (and scopes) a job's clip uses: revocation finds the clips here."""

    __tablename__ = "job_subjects"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"), primary_key=True)
    subject_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    scopes: Mapped[list[str]] = mapped_column(json_type())

    __table_args__ = (Index("ix_job_subjects_subject_id", "subject_id"),)


# --- review queue: reviewers, sessions, case leases, case flags, audit log (migration 0003) ---


class ReviewerRow(Base):
    __tablename__ = "reviewers"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (CheckConstraint("role IN ('reviewer', 'lead')", name="ck_reviewers_role"),)


class ReviewSessionRow(Base):
    """A login session. Only the SHA-256 of the cookie value is stored."""

    __tablename__ = "review_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(64), ForeignKey("reviewers.name"))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_review_sessions_reviewer", "reviewer"),)


class ReviewLeaseRow(Base):
    """Who holds a case now (one row per job; taken over only once expired)."""

    __tablename__ = "review_leases"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"), primary_key=True)
    reviewer: Mapped[str] = mapped_column(String(64), ForeignKey("reviewers.name"))
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ReviewCaseRow(Base):
    """Review state of a job beside its job state: SLA escalation and the pending first
    approval of a four-eyes case."""

    __tablename__ = "review_cases"

    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.job_id"), primary_key=True)
    four_eyes: Mapped[bool] = mapped_column(Boolean, default=False)
    escalated_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    escalation_reason: Mapped[str | None] = mapped_column(Text)
    pending_approval_by: Mapped[str | None] = mapped_column(String(64))
    pending_approval_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    pending_approval_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ReviewAuditRow(Base):
    """Append-only: every reviewer action (who, when, what, why)."""

    __tablename__ = "review_audit"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str | None] = mapped_column(String(36))
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(json_type())
    at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_review_audit_job_id_id", "job_id", "id"),
        Index("ix_review_audit_at", "at"),
    )


class ReviewLoginThrottleRow(Base):
    """Recent failed logins of one account or one client IP (migration 0005), and until
    when further tries are refused without checking the password."""

    __tablename__ = "review_login_throttle"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime] = mapped_column(UtcDateTime())
    blocked_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    locked: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (CheckConstraint("scope IN ('account', 'ip')", name="ck_review_login_throttle_scope"),)


class CampaignRow(Base):
    """A campaign id claimed by an API tenant (migration 0006); owner None: the CLI or a DAG."""

    __tablename__ = "campaigns"

    campaign_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_campaigns_owner", "owner"),)


class ApiKeyRow(Base):
    """An API key (migration 0006): only the SHA-256 of the token is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(json_type())
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    rate_limit_per_min: Mapped[int | None] = mapped_column(Integer)


class IdempotencyKeyRow(Base):
    """An Idempotency-Key of one tenant (migration 0006): the request it came with and the job."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)


class WebhookEndpointRow(Base):
    """A webhook endpoint (migration 0007) of an API tenant or of one campaign's brief."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str | None] = mapped_column(String(64))
    campaign_id: Mapped[str | None] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    previous_secret: Mapped[str | None] = mapped_column(String(128))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    events: Mapped[list[str]] = mapped_column(json_type())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    disabled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        CheckConstraint("tenant IS NOT NULL OR campaign_id IS NOT NULL", name="ck_webhook_endpoints_owner"),
        Index("ix_webhook_endpoints_tenant", "tenant"),
        Index("ix_webhook_endpoints_campaign_id", "campaign_id"),
    )


class WebhookDeliveryRow(Base):
    """One event for one endpoint (migration 0007); `payload` is the exact body sent."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(String(36), ForeignKey("webhook_endpoints.id"))
    event_id: Mapped[str] = mapped_column(String(36))
    event_type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    state: Mapped[str] = mapped_column(String(16))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (
        UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        CheckConstraint("state IN ('pending', 'delivered', 'dead')", name="ck_webhook_deliveries_state"),
        Index("ix_webhook_deliveries_state_next", "state", "next_attempt_at"),
    )


class WebhookAttemptRow(Base):
    """One try of a delivery (migration 0007): the answer's status, or the error."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    delivery_id: Mapped[str] = mapped_column(String(36), ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UtcDateTime())
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempts_delivery_attempt"),
    )


class WebhookCursorRow(Base):
    """How far a webhook scan has read an append-only table (migration 0007): job_events for job.failed."""

    __tablename__ = "webhook_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)


def normalize_url(url: str | URL) -> URL:
    """`postgresql://` (and `postgres://`, `postgresql+psycopg2://`) -> `postgresql+psycopg://`."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    elif backend != "sqlite":
        raise ValueError(f"unsupported database backend {backend!r}: use postgresql or sqlite")
    return u


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
    finally:
        cur.close()


class Database:
    """An engine plus a session factory for one database.

    `schema` (PostgreSQL only) pins the connection's search_path, e.g. to isolate tests;
    a search_path given in the URL (`?options=-csearch_path%3Dmy_schema`) or in
    `connect_args={"options": ...}` works the same way.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        schema: str | None = None,
        echo: bool = False,
        connect_args: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = normalize_url(url)
        self.schema = schema
        args: dict[str, Any] = dict(connect_args or {})
        kwargs: dict[str, Any] = {"echo": echo, "future": True}

        if self.is_sqlite:
            if schema is not None:
                raise ValueError("schema= is only supported for PostgreSQL")
            database = self.url.database or ""
            if database in ("", ":memory:") or database.startswith("file:"):
                # One shared in-memory database for every thread.
                args.setdefault("check_same_thread", False)
                kwargs["poolclass"] = StaticPool
            else:
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        else:
            if schema is not None:
                if not _SCHEMA_NAME.match(schema):
                    raise ValueError(f"invalid schema name {schema!r}")
                extra = f"-csearch_path={schema}"
                args["options"] = f"{args['options']} {extra}" if args.get("options") else extra
            kwargs["pool_pre_ping"] = True

        self.engine: Engine = create_engine(self.url, connect_args=args, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.url.get_backend_name() == "sqlite"

    def __repr__(self) -> str:
        return f"Database({self.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed if the block succeeds, else rolled back."""
        with self._sessions() as s, s.begin():
            yield s

    def migrate(self, revision: str = "head", *, lock_timeout_s: float = 300.0) -> MigrationOutcome:
        """Alembic `upgrade <revision>` on this engine (and its search_path), under the
        migration lock: a PostgreSQL advisory lock, or a file lock beside the SQLite file.

        Processes that start together never race on the DDL: the first takes the lock and
        applies; the others wait for it, then find the schema current and apply nothing.
        """
        target = head_revision() if revision == "head" else revision
        known = known_revisions()
        before = self.current_revision()
        if before == target or (before is not None and before not in known):
            return MigrationOutcome(before, before, target, applied=False, waited_s=0.0)
        started = time.monotonic()
        with self._migration_lock(lock_timeout_s) as conn:
            waited = time.monotonic() - started
            before = self._revision_on(conn)
            if before == target or (before is not None and before not in known):
                conn.commit()
                return MigrationOutcome(before, before, target, applied=False, waited_s=waited)
            self._upgrade(conn, revision)
            after = self._revision_on(conn)
            conn.commit()
        return MigrationOutcome(before, after, target, applied=True, waited_s=waited)

    def wait_for_head(self, *, timeout_s: float = 300.0, poll_s: float = 1.0) -> MigrationOutcome:
        """Wait until another process (`greetflow stack init`, the stack-init Job) has
        migrated the schema to head; MigrationError after `timeout_s`."""
        started = time.monotonic()
        target = head_revision()
        known = known_revisions()
        while True:
            current = self.current_revision()
            if current == target or (current is not None and current not in known):
                return MigrationOutcome(
                    current, current, target, applied=False, waited_s=time.monotonic() - started
                )
            if time.monotonic() - started >= timeout_s:
                raise MigrationError(
                    f"database schema still at {current or 'nothing'} after {timeout_s:g} s, code "
                    f"expects {target}: run `greetflow stack init` (or `greetflow db migrate`)"
                )
            time.sleep(poll_s)

    @contextmanager
    def _migration_lock(self, timeout_s: float) -> Iterator[Connection]:
        """A connection that holds the migration lock for as long as the block runs."""
        if self.is_sqlite:
            lock_path = self.migration_lock_path
            lock: AbstractContextManager[object] = nullcontext()
            if lock_path is not None:
                lock = FileLock(str(lock_path), timeout=timeout_s)
            try:
                with lock, self.engine.connect() as conn:
                    yield conn
            except Timeout:
                raise MigrationError(
                    f"another process held the migration lock {lock_path} for over {timeout_s:g} s"
                ) from None
            return
        with self.engine.connect() as conn:
            deadline = time.monotonic() + timeout_s
            while not conn.execute(
                text("SELECT pg_try_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY}
            ).scalar():
                conn.commit()
                if time.monotonic() >= deadline:
                    raise MigrationError(
                        f"another session held the migration lock (pg advisory lock {MIGRATION_LOCK_KEY}) "
                        f"for over {timeout_s:g} s"
                    )
                time.sleep(0.2)
            conn.commit()
            try:
                yield conn
            finally:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
                conn.commit()

    @property
    def migration_lock_path(self) -> Path | None:
        """The SQLite migration lock file (`<database>.migrate.lock`); None in memory."""
        if not self.is_sqlite:
            return None
        database = self.url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            return None
        path = Path(database).expanduser().resolve()
        return path.with_name(path.name + ".migrate.lock")

    def _upgrade(self, conn: Connection, revision: str) -> None:
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        if not self.is_sqlite:
            if self.schema is not None:
                conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            current = conn.execute(text("SELECT current_schema()")).scalar()
            if current is None:
                raise RuntimeError("the connection's search_path names no existing schema; create it first")
            cfg.attributes["version_table_schema"] = current
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    @staticmethod
    def _revision_on(conn: Connection) -> str | None:
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return self._revision_on(conn)

    def dispose(self) -> None:
        self.engine.dispose()
