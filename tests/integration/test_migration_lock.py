"""Six real worker processes started at once on a fresh database (SQLite, then a fresh
PostgreSQL database): exactly one applies the migrations under the migration lock, the
others wait for it, every one comes up, and none prints a traceback."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pipeline.adapters.db import normalize_url
from pipeline.bench_faults import WorkerProcs
from pipeline.dev.stack import DevStack
from pipeline.settings import Settings
from tests.integration.db_fixtures import _admin_engine, postgres_url
from tests.integration.pipeline_fixtures import stack_settings

pytestmark = pytest.mark.integration

ROLES = ("render", "render", "moderate", "publish", "takedown", "sweep")
APPLIED = re.compile(r"database schema: applied migrations none -> \w+ under the migration lock")
WAITED = re.compile(r"database schema: (waited [\d.]+ s for the schema|schema current at \w+)")


@pytest.fixture(scope="module")
def broker_and_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = stack_settings(tmp_path_factory.mktemp("stack") / "data")
    with DevStack(settings, log=lambda _m: None):
        yield settings


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A uniquely named, empty PostgreSQL database, dropped afterwards."""
    admin = _admin_engine(postgres_url()).execution_options(isolation_level="AUTOCOMMIT")
    name = f"gf_miglock_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(normalize_url(postgres_url())).set(database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _start_all_and_check(settings: Settings, log_dir: Path) -> None:
    with WorkerProcs(settings, log_dir) as procs:
        started = time.monotonic()
        workers = [procs.start(role) for role in ROLES]
        deadline = time.monotonic() + 120
        pending = list(workers)
        while pending and time.monotonic() < deadline:
            procs.check_alive()
            for wp in list(pending):
                log = wp.log_path.read_text(errors="replace")
                up = "database schema:" in log and (wp.role == "sweep" or "consuming" in log)
                if up:
                    print(f"{wp.role} pid {wp.pid} up after {time.monotonic() - started:.1f} s")
                    pending.remove(wp)
            time.sleep(0.5)
        assert not pending, "not up within 120 s: " + "; ".join(
            f"{wp.role} pid {wp.pid}:\n{wp.log_tail(2000)}" for wp in pending
        )
        procs.check_alive()
        # Coming up is what is tested here (clean SIGTERM stops are tested elsewhere).
        for wp in workers:
            procs.kill9(wp)
    logs = {f"{wp.role}-{wp.pid}": wp.log_path.read_text(errors="replace") for wp in workers}
    for name, log in logs.items():
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"
    applied = [name for name, log in logs.items() if APPLIED.search(log)]
    waited = [name for name, log in logs.items() if WAITED.search(log)]
    assert len(applied) == 1, f"exactly one applies the migrations, got {applied}"
    assert len(waited) == len(ROLES) - 1, f"the others wait for it, got {waited}"
    print(f"applied by {applied[0]}; waited: {', '.join(waited)}")


def test_six_workers_on_a_fresh_sqlite_database(broker_and_s3: Settings, tmp_path: Path) -> None:
    settings = broker_and_s3.model_copy(update={"data_dir": tmp_path / "data"})
    _start_all_and_check(settings, tmp_path / "logs")
    assert (tmp_path / "data" / "greetflow.db.migrate.lock").exists()


def test_six_workers_on_a_fresh_postgresql_database(
    broker_and_s3: Settings, fresh_postgres_url: str, tmp_path: Path
) -> None:
    settings = broker_and_s3.model_copy(
        update={"data_dir": tmp_path / "data", "database_url": fresh_postgres_url}
    )
    _start_all_and_check(settings, tmp_path / "logs")


def test_a_held_lock_times_out_with_one_line(tmp_path: Path, fresh_postgres_url: str) -> None:
    """Whoever holds the lock past migration_wait_s: the waiter gives up with a MigrationError
    (one `error:` line from the CLI), and applies nothing."""
    from filelock import FileLock
    from sqlalchemy import create_engine

    from pipeline.adapters.db import MIGRATION_LOCK_KEY, Database, MigrationError

    sqlite = Database(f"sqlite:///{tmp_path / 'greetflow.db'}")
    assert sqlite.migration_lock_path == tmp_path / "greetflow.db.migrate.lock"
    with FileLock(str(sqlite.migration_lock_path)), pytest.raises(MigrationError, match="migration lock"):
        sqlite.migrate(lock_timeout_s=0.5)
    assert sqlite.current_revision() is None
    sqlite.dispose()

    holder = create_engine(normalize_url(fresh_postgres_url))
    pg = Database(fresh_postgres_url)
    try:
        with holder.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
            with pytest.raises(MigrationError, match="advisory lock"):
                pg.migrate(lock_timeout_s=0.5)
            assert pg.current_revision() is None
        holder.dispose()  # the session, and with it its advisory lock, ends
        assert pg.migrate(lock_timeout_s=10).applied
    finally:
        pg.dispose()
        holder.dispose()


def test_a_schema_from_a_newer_release_is_left_alone(tmp_path: Path) -> None:
    """Rolled-back workers meet a schema migrated by a newer release: they start, apply
    nothing and say so, instead of failing on the unknown revision."""
    from pipeline.adapters.db import Database

    db = Database(f"sqlite:///{tmp_path / 'greetflow.db'}")
    try:
        assert db.migrate().applied
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
        outcome = db.migrate(lock_timeout_s=5)
        assert not outcome.applied and outcome.newer
        assert "newer than this code's head" in outcome.describe()
        assert db.wait_for_head(timeout_s=1).newer
        assert db.current_revision() == "9999_from_the_future"
    finally:
        db.dispose()
