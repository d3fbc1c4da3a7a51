"""Database adapter: SQLAlchemy 2 engine, session factory, ORM models and Alembic migrations.

One code path for both backends: PostgreSQL (production, psycopg 3) and a SQLite file
(embedded default, WAL). Every timestamp is stored as UTC and read back UTC-aware.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_MS = 10_000
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def migrations_dir() -> Path:
    """The Alembic script directory shipped inside the `pipeline` package."""
    return Path(str(resources.files("pipeline").joinpath("migrations")))


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

    __table_args__ = (
        Index("ix_jobs_campaign_id_state", "campaign_id", "state"),
        Index("ix_jobs_state", "state"),
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

    __table_args__ = (Index("ix_job_events_job_id", "job_id"),)


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

    def migrate(self, revision: str = "head") -> None:
        """Alembic `upgrade <revision>` on this engine (and its search_path), in one transaction."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(migrations_dir()))
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                if self.schema is not None:
                    conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                # Workers that start together must not race on the DDL.
                conn.execute(text("SELECT pg_advisory_xact_lock(7301880313)"))
                current = conn.execute(text("SELECT current_schema()")).scalar()
                if current is None:
                    raise RuntimeError(
                        "the connection's search_path names no existing schema; create it first"
                    )
                cfg.attributes["version_table_schema"] = current
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        self.engine.dispose()
