"""The campaign-run steps against the real S3 server, broker and database, without
Airflow: a CSV and a Parquet audience in the assets bucket are resolved into chunks,
submitted, tracked and reported."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from sqlalchemy import text

from pipeline.audience import AudienceError, iter_audience
from pipeline.bootstrap import Container
from pipeline.campaign_runs import CampaignRunService
from pipeline.campaigns import BriefError
from pipeline.settings import Settings
from pipeline.topics import RENDER_REQUESTS
from schemas.brief import CampaignBrief
from schemas.jobs import JobState
from tests.integration.db_fixtures import scratch_postgres_database
from tests.integration.pipeline_fixtures import consume_all

pytestmark = pytest.mark.integration


def write_brief(folder: Path, campaign_id: str, audience_key: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{campaign_id}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "campaign_id": campaign_id,
                "title": "中秋 Mid-Autumn",
                "template": {"name": "mid-autumn", "version": "1"},
                "default_locale": "zh-Hans-CN",
                "audience_key": audience_key,
            },
            allow_unicode=True,
        ),
        encoding="utf-8",
    )
    return path


def parquet_bytes(n: int) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.table({"id": [f"p-{i}" for i in range(n)], "name": [f"月{i}" for i in range(n)]})
    pq.write_table(table, buf)
    return buf.getvalue()


def test_csv_and_parquet_audiences_resolve_submit_track_and_report(
    container: Container, tmp_path: Path
) -> None:
    s = container.settings.model_copy(update={"campaign_chunk_size": 4})
    store = container.store
    csv_rows = "id,name,locale\n" + "".join(f"c-{i},Name {i},{'en' if i % 2 else ''}\n" for i in range(10))
    store.put_bytes(s.bucket_assets, "audiences/mid.csv", csv_rows.encode(), content_type="text/csv")
    store.put_bytes(
        s.bucket_assets, "audiences/mid.parquet", parquet_bytes(5), content_type="application/x-parquet"
    )
    svc = CampaignRunService(s, store, container.jobs, container.campaigns(), container.prewarm)

    cases = (
        ("mid-csv", "csv", "audiences/mid.csv", 10, 3),
        ("mid-pq", "parquet", "audiences/mid.parquet", 5, 2),
    )
    for campaign_id, kind, key, n, chunks in cases:
        brief_file = write_brief(tmp_path, campaign_id, key)
        run = svc.start(brief_file, f"manual__{campaign_id}", expect_campaign_id=campaign_id)
        assert run.audience == f"{kind}:{key}"
        resolved = svc.resolve(run)
        assert resolved.recipients == n and len(resolved.parts) == chunks
        assert svc.prewarm(run, resolved.locales)["failed"] == {}
        sent = [svc.submit_part(run, p.key) for p in resolved.parts]
        assert sum(x["created"] for x in sent) == n and sum(x["requested"] for x in sent) == n

        progress = svc.progress(run)
        assert (progress.total, progress.unsettled, progress.counts) == (n, n, {"requested": n})
        report, written = svc.report(run)
        assert report.complete is False and report.counts["requested"] == n
        data = json.loads(store.get_bytes(s.bucket_reports, written.json_key))
        assert data["audience"] == {"source": run.audience, "recipients": n}

        # Submitted again on a first try (a re-run) the chunk creates and requests nothing:
        # its jobs are fresh, not lost. A retry (the try before may have died between its
        # rows and its sends) requests every job of the chunk that is not final; the render
        # worker treats a repeated request as a no-op.
        rerun = svc.submit_part(run, resolved.parts[0].key)
        assert (rerun["created"], rerun["requested"]) == (0, 0)
        again = svc.submit_part(run, resolved.parts[0].key, retry=True)
        assert (again["created"], again["requested"]) == (0, 4)

    messages = consume_all(s, RENDER_REQUESTS, expect=10 + 4 + 5 + 4)
    assert len(messages) == 23 and len({m.key for m in messages}) == 15

    jobs = container.jobs.list_jobs(campaign_id="mid-csv")
    assert len(jobs) == 10 and {j.template_version for j in jobs} == {"1"}
    assert {j.locale.value for j in jobs} == {"en", "zh-Hans-CN"}
    assert {j.state for j in jobs} == {JobState.REQUESTED}


def test_a_missing_audience_object_fails_validation(container: Container, tmp_path: Path) -> None:
    svc = container.campaign_run_service()
    with pytest.raises(AudienceError, match="not found"):
        svc.start(write_brief(tmp_path, "mid-missing", "audiences/nope.csv"), "manual__x")


def test_sql_audience_on_postgresql_streams_and_is_read_only() -> None:
    """A `.sql` audience against an external PostgreSQL database: streamed in chunks, in a
    read-only transaction."""
    with scratch_postgres_database() as crm:
        with crm.begin() as conn:
            conn.execute(text("CREATE TABLE crm_customers (cid TEXT, full_name TEXT, lang TEXT)"))
            conn.execute(
                text(
                    "INSERT INTO crm_customers SELECT 'c-' || i, '客戶 ' || i, 'en' "
                    "FROM generate_series(1, 9) i"
                )
            )
            conn.execute(text("CREATE SEQUENCE crm_seq"))
        settings = Settings(audience_database_url=crm.url.render_as_string(hide_password=False))
        brief = CampaignBrief.model_validate(
            {"campaign_id": "pg", "title": "PG", "template": {"name": "t"}, "audience_key": "q/a.sql"}
        )

        class Store:
            def __init__(self, query: str) -> None:
                self.query = query

            def get_bytes(self, bucket: str, key: str) -> bytes:
                return self.query.encode()

        select = "SELECT cid AS id, full_name AS name, lang AS locale FROM crm_customers ORDER BY cid"
        chunks = list(iter_audience(brief, store=Store(select), settings=settings, chunk_size=4))  # type: ignore[arg-type]
        assert [len(c) for c in chunks] == [4, 4, 1]
        assert chunks[0][0].name == "客戶 1"

        # Passes the one-SELECT check but writes (nextval): the read-only transaction refuses it.
        sneaky = "SELECT cid AS id, full_name AS name FROM crm_customers WHERE nextval('crm_seq') > 0"
        with pytest.raises(AudienceError, match="read-only transaction"):
            list(iter_audience(brief, store=Store(sneaky), settings=settings))  # type: ignore[arg-type]
        with crm.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM crm_customers")).scalar() == 9


def test_a_brief_for_an_unknown_template_fails_validation(container: Container, tmp_path: Path) -> None:
    svc = container.campaign_run_service()
    path = write_brief(tmp_path, "mid-unknown", "audiences/any.csv")
    text = path.read_text(encoding="utf-8").replace("version: '1'", "version: '9'")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BriefError, match="no template mid-autumn@9"):
        svc.start(path, "manual__y")


def test_a_scheduled_run_registers_its_brief_webhook_once_and_the_operator_prints_the_secret(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A DAG run has nobody to show a new endpoint's secret to: `start` registers the
    brief's webhook_url, and `greetflow webhook secret` rotates and prints it."""
    from pipeline.cli import main

    s = container.settings.model_copy(
        update={"webhook_allow_loopback": True, "intake_allow_loopback_webhooks": True}
    )
    hooked = Container(s)
    try:
        s3 = hooked.store
        s3.put_bytes(s.bucket_assets, "audiences/hook.csv", b"id,name\nh-1,Ada\n", content_type="text/csv")
        path = write_brief(tmp_path, "mid-hook", "audiences/hook.csv")
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump({**data, "webhook_url": "http://127.0.0.1:9/hook"}), encoding="utf-8")
        svc = hooked.campaign_run_service()
        svc.start(path, "scheduled__1")
        svc.start(path, "scheduled__2")  # the next run keeps the endpoint and its secret
        (endpoint,) = hooked.webhook_repository.endpoints_of_campaign("mid-hook")
        assert endpoint.url == "http://127.0.0.1:9/hook"

        monkeypatch.setattr("pipeline.cli.webhooks.get_settings", lambda: s)
        assert main(["webhook", "secret", "mid-hook"]) == 0
        out = capsys.readouterr().out
        (rotated,) = hooked.webhook_repository.endpoints_of_campaign("mid-hook")
        shown = f"signing secret (shown only now; the previous one stays valid for 86400 s): {rotated.secret}"
        assert shown in out
        assert rotated.previous_secret == endpoint.secret != rotated.secret

        assert main(["webhook", "secret", "nobody"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            "error: campaign nobody has no webhook endpoint "
            "(its brief names no webhook_url, or it was never submitted or run)"
        ]
    finally:
        hooked.close()
