"""Database fixtures: a migrated `Database` on SQLite and on PostgreSQL.

Registered for every test module through `pytest_plugins` in tests/conftest.py.

PostgreSQL tests run in a fresh schema each (search_path pinned through the connection
options) that is dropped afterwards. An unreachable server FAILS the test, never skips it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from pipeline.adapters.db import Database, normalize_url
from schemas.brief import Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, job_id_for
from schemas.events import RenderRequested

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def postgres_url() -> str:
    return os.environ.get("GREETFLOW_TEST_POSTGRES_URL") or DEFAULT_TEST_POSTGRES_URL


def _admin_engine(url: str) -> Engine:
    engine = create_engine(normalize_url(url), connect_args={"connect_timeout": 5})
    error: OperationalError | None = None
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        error = exc
    if error is not None:
        engine.dispose()
        shown = normalize_url(url).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL not reachable at {shown}: start it or set GREETFLOW_TEST_POSTGRES_URL "
            f"({error.orig})",
            pytrace=False,
        )
    return engine


@contextmanager
def sqlite_database(directory: Path) -> Iterator[Database]:
    """A migrated SQLite database in `directory`, disposed afterwards."""
    database = Database(f"sqlite:///{directory / 'greetflow.db'}")
    try:
        database.migrate()
        yield database
    finally:
        database.dispose()


@contextmanager
def postgres_database(url: str | None = None) -> Iterator[Database]:
    """A migrated PostgreSQL database in a throwaway schema, dropped afterwards."""
    url = url or postgres_url()
    admin = _admin_engine(url)
    schema = f"gf_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        database = Database(url, schema=schema)
        try:
            database.migrate()
            yield database
        finally:
            database.dispose()
            with admin.begin() as conn:
                # A connection the test left open holds locks: fail in seconds, not hang.
                conn.execute(text("SET LOCAL lock_timeout = '30s'"))
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        admin.dispose()


@contextmanager
def scratch_postgres_database(url: str | None = None) -> Iterator[Engine]:
    """A fresh, empty PostgreSQL database on the test server (not a schema of `test`: an
    external database such as a CRM, for SQL audiences), dropped afterwards."""
    url = url or postgres_url()
    admin = _admin_engine(url)
    name = f"gf_ext_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine = create_engine(normalize_url(url).set(database=name))
        try:
            yield engine
        finally:
            engine.dispose()
            with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated `Database`, once on SQLite (a file under tmp_path) and once on PostgreSQL."""
    if request.param == "sqlite":
        with sqlite_database(tmp_path) as database:
            yield database
    else:
        with postgres_database() as database:
            yield database


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite database only, for SQLite-specific tests."""
    with sqlite_database(tmp_path) as database:
        yield database


@pytest.fixture
def postgres_db() -> Iterator[Database]:
    """A migrated PostgreSQL database only (throwaway schema), for PostgreSQL-specific tests."""
    with postgres_database() as database:
        yield database


# The job id key of requests built here (the stack's own key is in its data_dir).
TEST_JOB_ID_KEY = b"greetflow-tests-job-id-key-0123456789"


def render_request(
    campaign_id: str = "lny-2026",
    recipient_id: str = "r-0001",
    *,
    template: str = "lunar-new-year",
    version: str = "1",
    name: str = "陳大文",
    locale: Locale = Locale.ZH_HANT_HK,
    subjects: tuple[SubjectUse, ...] = (),
) -> RenderRequested:
    """A valid RenderRequested with the deterministic job id."""
    return RenderRequested(
        job_id=job_id_for(TEST_JOB_ID_KEY, campaign_id, recipient_id, template, version),
        campaign_id=campaign_id,
        recipient=Recipient(id=recipient_id, name=name, locale=locale, subjects=subjects),
        template=TemplateRef(name=template, version=version),
        locale=locale,
    )


__all__ = [
    "BACKENDS",
    "DEFAULT_TEST_POSTGRES_URL",
    "TEST_JOB_ID_KEY",
    "db",
    "postgres_database",
    "postgres_db",
    "postgres_url",
    "render_request",
    "sqlite_database",
    "sqlite_db",
]
