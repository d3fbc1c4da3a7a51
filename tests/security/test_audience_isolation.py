"""SQL audiences never reach Greetflow's own database or tables, and CSV audiences are
data, never formulas. SQLite and PostgreSQL (the server at GREETFLOW_TEST_POSTGRES_URL),
plus the real stack (moto S3, Tansu) for the CSV report."""

from __future__ import annotations

import csv
import io
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import text

from pipeline.audience import AudienceError, iter_audience
from pipeline.bootstrap import Container
from pipeline.campaign_runs import CampaignRunService
from pipeline.reports import csv_cell
from pipeline.settings import Settings
from schemas.brief import CampaignBrief
from tests.integration.db_fixtures import postgres_database, postgres_url, scratch_postgres_database

pytestmark = pytest.mark.integration

HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo"
STEAL = "SELECT name AS id, password_hash AS name FROM reviewers"
STEAL_JOINED = (
    "SELECT c.cid AS id, r.password_hash AS name FROM customers c JOIN (SELECT * FROM Reviewers) r ON 1=1"
)
GOOD = "SELECT cid AS id, full_name AS name FROM customers ORDER BY cid"


class Store:
    """The assets bucket as the audience resolver sees it: one query object."""

    def __init__(self, query: str) -> None:
        self.query = query

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.query.encode()


def brief() -> CampaignBrief:
    return CampaignBrief.model_validate(
        {
            "campaign_id": "iso",
            "title": "Iso",
            "template": {"name": "lunar-new-year"},
            "audience_key": "q/a.sql",
        }
    )


def resolve(query: str, settings: Settings) -> list[Any]:
    return [r for c in iter_audience(brief(), store=Store(query), settings=settings, chunk_size=7) for r in c]  # type: ignore[arg-type]


@contextmanager
def external_db(backend: str, tmp_path: Path, rows: int = 20) -> Iterator[str]:
    """A CRM database (not Greetflow's) holding customers and, to tempt the query, a table
    named like one of ours; yields its URL."""
    ddl = [
        "CREATE TABLE customers (cid TEXT, full_name TEXT)",
        "CREATE TABLE reviewers (name TEXT, password_hash TEXT)",
    ]
    if backend == "sqlite":
        path = tmp_path / "crm.db"
        with sqlite3.connect(path) as conn:
            for stmt in ddl:
                conn.execute(stmt)
            conn.executemany(
                "INSERT INTO customers VALUES (?, ?)", [(f"c-{i:03d}", f"Customer {i}") for i in range(rows)]
            )
            conn.execute("INSERT INTO reviewers VALUES ('amy', ?)", (HASH,))
        yield f"sqlite:///{path}"
        return
    with scratch_postgres_database() as engine:
        with engine.begin() as conn:
            for stmt in ddl:
                conn.execute(text(stmt))
            conn.execute(
                text(
                    "INSERT INTO customers SELECT 'c-' || lpad(i::text, 3, '0'), 'Customer ' || i "
                    "FROM generate_series(0, :n) i"
                ),
                {"n": rows - 1},
            )
            conn.execute(text("INSERT INTO reviewers VALUES ('amy', :h)"), {"h": HASH})
        yield engine.url.render_as_string(hide_password=False)


BACKENDS = ["sqlite", "postgresql"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_valid_external_audience_works_and_reading_our_tables_is_refused(
    backend: str, tmp_path: Path
) -> None:
    with external_db(backend, tmp_path) as url:
        s = Settings(data_dir=tmp_path / "gf", audience_database_url=url)
        got = resolve(GOOD, s)
        assert [r.id for r in got] == [f"c-{i:03d}" for i in range(20)]
        for query in (STEAL, STEAL_JOINED):
            with pytest.raises(AudienceError, match=r"reads Greetflow's own table\(s\) reviewers") as err:
                resolve(query, s)
            assert HASH not in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_row_cap_and_the_statement_timeout_hold(backend: str, tmp_path: Path) -> None:
    with external_db(backend, tmp_path) as url:
        capped = Settings(data_dir=tmp_path / "gf", audience_database_url=url, audience_max_rows=19)
        with pytest.raises(AudienceError, match="more than 19 rows"):
            resolve(GOOD, capped)
        assert len(resolve(GOOD, capped.model_copy(update={"audience_max_rows": 20}))) == 20

        slow = capped.model_copy(update={"audience_statement_timeout_s": 0.5, "audience_max_rows": 10**9})
        if backend == "sqlite":
            query = (
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                "SELECT 'x' AS id, 'X' AS name FROM n WHERE i < 0"
            )
        else:
            query = "SELECT cid AS id, full_name AS name FROM customers, pg_sleep(5)"
        t0 = time.monotonic()
        with pytest.raises(AudienceError, match=r"ran longer than 0\.5 s"):
            resolve(query, slow)
        assert time.monotonic() - t0 < 4


def test_sqlite_audiences_never_run_on_the_greetflow_database(tmp_path: Path) -> None:
    from tests.integration.db_fixtures import sqlite_database

    with sqlite_database(tmp_path) as gf:
        own = gf.engine.url.render_as_string(hide_password=False)
        with pytest.raises(AudienceError, match="set GREETFLOW_AUDIENCE_DATABASE_URL"):
            resolve(GOOD, Settings(database_url=own))
        with pytest.raises(AudienceError, match="names the Greetflow database"):
            resolve(GOOD, Settings(database_url=own, audience_database_url=own))
        # A copy (another path) still holds our schema: refused before any query runs.
        copy = tmp_path / "copy.db"
        with sqlite3.connect(tmp_path / "greetflow.db") as src, sqlite3.connect(copy) as dst:
            src.backup(dst)  # the live file is in WAL mode: copy through SQLite
        with pytest.raises(AudienceError, match="holds Greetflow's own tables"):
            resolve(
                "SELECT job_id AS id, recipient_id AS name FROM jobs",
                Settings(audience_database_url=f"sqlite:///{copy}"),
            )


def test_postgresql_audiences_never_run_on_the_greetflow_database(tmp_path: Path) -> None:
    with postgres_database() as gf:
        own = gf.url.render_as_string(hide_password=False)
        with pytest.raises(AudienceError, match="names the Greetflow database"):
            resolve(GOOD, Settings(database_url=own, audience_database_url=postgres_url()))
        # Greetflow configured elsewhere, but the target database holds a Greetflow schema.
        with pytest.raises(AudienceError, match="holds Greetflow's own tables"):
            resolve(STEAL, Settings(data_dir=tmp_path, audience_database_url=postgres_url()))


def test_a_formula_cell_is_stored_as_text_and_neutralized_in_the_csv_report(
    container: Container, tmp_path: Path
) -> None:
    names = ["=1+2", "@SUM(A1)", "+Ann", "-Ann-", "Plain Name"]
    rows = "id,name,locale\n" + "".join(f"f-{i},{n},en\n" for i, n in enumerate(names))
    s = container.settings
    container.store.put_bytes(
        s.bucket_assets, "audiences/formulas.csv", rows.encode(), content_type="text/csv"
    )
    path = tmp_path / "formulas.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "campaign_id": "formulas",
                "title": "Formulas",
                "template": {"name": "lunar-new-year", "version": "1"},
                "audience_key": "audiences/formulas.csv",
            }
        ),
        encoding="utf-8",
    )
    svc: CampaignRunService = container.campaign_run_service()
    run = svc.start(path, "manual__formulas")
    parts = svc.resolve(run)
    for part in parts.parts:
        svc.submit_part(run, part.key)
    jobs = {j.recipient_id: j for j in container.jobs.list_jobs(campaign_id="formulas")}
    # Stored exactly as given: text, nothing evaluated or rewritten.
    assert {rid: j.request.recipient.name for rid, j in jobs.items()} == {
        f"f-{i}": n for i, n in enumerate(names)
    }
    _, written = svc.report(run)
    body = container.store.get_bytes(s.bucket_reports, written.csv_key).decode("utf-8-sig")
    by_id = {r["recipient_id"]: r for r in csv.DictReader(io.StringIO(body))}
    assert by_id["f-0"]["name"] == "'=1+2"
    assert by_id["f-1"]["name"] == "'@SUM(A1)"
    assert by_id["f-2"]["name"] == "'+Ann"
    assert by_id["f-3"]["name"] == "'-Ann-"
    assert by_id["f-4"]["name"] == "Plain Name"
    for row in by_id.values():
        assert not any(str(v).startswith(("=", "+", "-", "@", "\t", "\r")) for v in row.values()), row


def test_csv_cell_neutralizes_every_formula_start() -> None:
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert csv_cell(f"{start}cmd|' /C calc'!A0") == f"'{start}cmd|' /C calc'!A0"
    assert csv_cell("Ann") == "Ann" and csv_cell(None) == "" and csv_cell(3) == "3"
