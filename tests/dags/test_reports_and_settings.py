"""Campaign reports (pipeline/reports.py), run keys, and settings from Airflow
connections and variables (pipeline/adapters/airflow.py), without any service."""

from __future__ import annotations

import csv
import io
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pipeline.adapters.airflow import airflow_settings, overrides_from_airflow
from pipeline.adapters.storage import validate_key
from pipeline.campaign_runs import run_key_for
from pipeline.errors import ConfigError
from pipeline.reports import build_report, moderation_of
from pipeline.repositories import JobEvent, JobRecord
from schemas.common import Locale
from schemas.jobs import JobState

T0 = datetime(2027, 2, 5, 12, 0, tzinfo=UTC)


def record(i: int, state: JobState, reason: str | None = None, url: str | None = None) -> JobRecord:
    return JobRecord(
        job_id=uuid.UUID(int=i),
        campaign_id="c",
        recipient_id=f"r-{i}",
        template_name="t",
        template_version="1",
        locale=Locale.EN,
        state=state,
        reason=reason,
        request_json={},
        staging_key=None,
        poster_key=None,
        published_key=None,
        url=url,
        claim_token=None,
        claimed_by=None,
        lease_expires_at=None,
        attempts=0,
        created_at=T0,
        updated_at=T0,
    )


def events(i: int, *path: tuple[JobState | None, JobState, str, str | None]) -> list[JobEvent]:
    return [
        JobEvent(id=n, job_id=uuid.UUID(int=i), from_state=a, to_state=b, reason=why, actor=who, at=T0)
        for n, (a, b, who, why) in enumerate(path)
    ]


M, R, A, NR, RJ = (
    JobState.MODERATING,
    JobState.RENDERED,
    JobState.APPROVED,
    JobState.NEEDS_REVIEW,
    JobState.REJECTED,
)


def test_report_counts_failures_moderation_and_urls() -> None:
    recs = [
        record(1, JobState.PUBLISHED, url="https://cdn/x/1.mp4"),
        record(2, JobState.REJECTED, reason="no consent for grandma-chan"),
        record(3, JobState.FAILED, reason="RenderError: font missing"),
        record(4, JobState.NEEDS_REVIEW, reason="unknown face"),
        record(5, JobState.PUBLISHED, url="https://cdn/x/5.mp4"),
    ]
    hist = {
        uuid.UUID(int=1): events(1, (R, M, "mod", None), (M, A, "mod@h:1", None)),
        uuid.UUID(int=2): events(2, (M, RJ, "mod@h:1", "no consent for grandma-chan")),
        uuid.UUID(int=4): events(4, (M, NR, "mod@h:1", "unknown face")),
        uuid.UUID(int=5): events(5, (M, NR, "mod@h:1", "unknown face"), (NR, A, "reviewer:amy", "ok")),
    }
    ids = [uuid.UUID(int=i) for i in range(1, 7)]  # 6 has no record yet
    rep = build_report(
        campaign_id="c",
        title="T",
        run_id="manual__x",
        run_key="manual-x",
        template={"name": "t", "version": "1"},
        audience={"source": "inline", "recipients": 6},
        job_ids=ids,
        records=recs,
        history=hist,
        deadline=T0 + timedelta(hours=1),
        now=T0,
    )
    assert rep.complete is False  # job 6 is missing
    assert rep.counts["published"] == 2 and rep.counts["missing"] == 1 and rep.counts["needs_review"] == 1
    assert rep.moderation == {
        "approved": 1,
        "needs_review": 1,
        "rejected": 1,
        "human_approved": 1,
        "human_rejected": 0,
        "not_moderated": 1,  # the failed job
    }
    assert [(f["recipient_id"], f["state"], f["reason"]) for f in rep.failures] == [
        ("r-2", "rejected", "no consent for grandma-chan"),
        ("r-3", "failed", "RenderError: font missing"),
    ]
    assert rep.pending_review == [
        {"job_id": str(uuid.UUID(int=4)), "recipient_id": "r-4", "reason": "unknown face"}
    ]
    assert [p["url"] for p in rep.published] == ["https://cdn/x/1.mp4", "https://cdn/x/5.mp4"]
    assert rep.deadline_passed is False

    data = json.loads(rep.to_json())
    assert data["total"] == 6 and len(data["jobs"]) == 6
    rows = list(csv.DictReader(io.StringIO(rep.to_csv().decode("utf-8-sig"))))
    assert len(rows) == 6
    assert rows[4]["moderation"] == "approved" and rows[4]["reviewed"] == "yes"
    assert rows[4]["moderated_by"] == "reviewer:amy"


def test_needs_review_is_settled_unless_the_run_waits_for_review() -> None:
    recs = [record(1, JobState.NEEDS_REVIEW), record(2, JobState.PUBLISHED)]
    ids = [r.job_id for r in recs]
    common: dict[str, Any] = dict(
        campaign_id="c",
        title="T",
        run_id="r",
        run_key="r",
        template={},
        audience={},
        job_ids=ids,
        records=recs,
        history={},
    )
    assert build_report(**common).complete is True
    from schemas.jobs import FINAL_STATES

    assert build_report(**common, settled=FINAL_STATES).complete is False


def test_moderation_of_takes_the_human_decision_over_the_automatic_one() -> None:
    assert moderation_of([]).outcome is None
    m = moderation_of(events(1, (M, NR, "mod", "x"), (NR, RJ, "reviewer:bo", "fake face")))
    assert (m.outcome, m.decided_by, m.reviewed, m.reason) == ("rejected", "reviewer:bo", True, "fake face")


@pytest.mark.parametrize(
    "run_id",
    ["manual__2026-11-25T09:33:01.310807+00:00", "scheduled__2027-02-05T12:00:00+00:00", "../../etc", "雪"],
)
def test_run_keys_are_safe_object_key_segments_and_unique(run_id: str) -> None:
    key = run_key_for(run_id)
    assert validate_key(f"campaigns/c/{key}/report.json")
    assert "/" not in key and ".." not in key
    assert run_key_for(run_id + "x") != key


# --------------------------------------------------------------------------- settings


@dataclass
class Conn:
    conn_type: str | None = None
    host: str | None = None
    schema: str | None = None
    login: str | None = None
    password: str | None = None
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def extra_dejson(self) -> dict[str, Any]:
        return self.extra


def test_connections_and_variable_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREETFLOW_KAFKA_BOOTSTRAP", "env:1")
    monkeypatch.setenv("GREETFLOW_BUCKET_REPORTS", "env-reports")
    monkeypatch.setenv("GREETFLOW_RENDER_FPS", "24")
    conns = {
        "greetflow_kafka": Conn(extra={"bootstrap_servers": "k1:9092,k2:9092"}),
        "greetflow_s3": Conn(
            conn_type="aws",
            login="AKIA",
            password="s3cr3t",
            extra={"endpoint_url": "https://minio.internal:9000", "region_name": "ap-east-1"},
        ),
        "greetflow_db": Conn(
            conn_type="postgres", host="db", port=5432, login="gf", password="p@ss", schema="gf"
        ),
        "greetflow_audience_db": Conn(extra={"url": "postgresql+psycopg://ro@crm/crm"}),
    }
    s = airflow_settings(
        fetch_connection=conns.get,  # type: ignore[arg-type]
        fetch_variable=lambda: {"bucket_reports": "var-reports", "campaign_deadline_s": 60},
    )
    assert s.kafka_bootstrap == "k1:9092,k2:9092"
    assert s.s3_endpoint == "https://minio.internal:9000" and s.s3_region == "ap-east-1"
    assert s.s3_access_key == "AKIA" and s.s3_secret_key.get_secret_value() == "s3cr3t"
    assert s.database_url == "postgresql+psycopg://gf:p%40ss@db:5432/gf"
    assert s.audience_database_url.get_secret_value() == "postgresql+psycopg://ro@crm/crm"
    assert s.bucket_reports == "var-reports" and s.campaign_deadline_s == 60
    assert s.render_fps == 24  # untouched by Airflow: the environment still applies


def test_no_connections_means_environment_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GREETFLOW_KAFKA_BOOTSTRAP", "env:1")
    s = airflow_settings(fetch_connection=lambda _c: None, fetch_variable=lambda: None)
    assert s.kafka_bootstrap == "env:1"
    assert overrides_from_airflow({}, None) == {}


def test_host_style_connections_and_bad_input() -> None:
    out = overrides_from_airflow(
        {"greetflow_kafka": Conn(host="broker", port=19092), "greetflow_s3": Conn(host="s3", port=19000)},
        None,
    )
    assert out == {"kafka_bootstrap": "broker:19092", "s3_endpoint": "http://s3:19000"}
    with pytest.raises(ConfigError, match="unknown settings"):
        overrides_from_airflow({}, {"no_such_setting": 1})
    with pytest.raises(ConfigError, match="greetflow_db"):
        overrides_from_airflow({"greetflow_db": Conn(conn_type="mysql", host="x")}, None)
