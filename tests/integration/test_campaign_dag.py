"""`dag.test()` of a campaign DAG against the real local stack, with the real render,
moderation and publish workers running in threads: 20 recipients end published, a
report lands in the reports bucket, and a second run publishes nothing new."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.dags.airflow_env import DAGS_FOLDER, airflow_db, configure

configure()  # before anything imports airflow

from pipeline.bootstrap import Container  # noqa: E402
from pipeline.topics import RENDER_REQUESTS  # noqa: E402
from schemas.jobs import JobState  # noqa: E402
from tests.dags.campaign_helpers import end_offsets, greetflow_env, workers_running, write_campaign  # noqa: E402

pytestmark = pytest.mark.integration

CAMPAIGN = "dagtest-lny"
DAG_ID = f"campaign_{CAMPAIGN}"
RECIPIENTS = 20


def load_dag(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag.dags[DAG_ID]


def test_campaign_dag_publishes_every_clip_reports_and_reruns_idempotently(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: Path
) -> None:
    settings = container.settings
    campaigns = tmp_path / "campaigns"
    write_campaign(campaigns, RECIPIENTS, CAMPAIGN)
    dag = load_dag(monkeypatch, greetflow_env(settings, campaigns))

    with workers_running(container):
        t0 = time.monotonic()
        run = dag.test()
        first_s = time.monotonic() - t0
    print(f"\ndag.test() of {DAG_ID} with {RECIPIENTS} recipients: {first_s:.1f} s")
    assert run.state == "success"

    jobs = container.jobs.list_jobs(campaign_id=CAMPAIGN)
    assert len(jobs) == RECIPIENTS
    assert {j.state for j in jobs} == {JobState.PUBLISHED}
    dist = settings.bucket_distribution
    clips = sorted(k for k in container.store.list_keys(dist) if k.endswith(".mp4"))
    assert len(clips) == RECIPIENTS
    assert clips == sorted(j.published_key for j in jobs if j.published_key)

    reports = container.store.list_keys(settings.bucket_reports, f"campaigns/{CAMPAIGN}/")
    assert len([k for k in reports if k.endswith("/report.json")]) == 1
    assert len([k for k in reports if k.endswith("/report.csv")]) == 1
    report = json.loads(
        container.store.get_bytes(settings.bucket_reports, reports[0].rsplit("/", 1)[0] + "/report.json")
    )
    assert report["complete"] is True
    assert report["total"] == RECIPIENTS
    assert report["counts"]["published"] == RECIPIENTS
    assert report["moderation"]["approved"] == RECIPIENTS
    assert report["failures"] == []
    assert sorted(p["url"] for p in report["published"]) == sorted(j.url for j in jobs if j.url)
    csv_key = next(k for k in reports if k.endswith("/report.csv"))
    csv_text = container.store.get_bytes(settings.bucket_reports, csv_key).decode("utf-8-sig")
    assert len(csv_text.strip().splitlines()) == RECIPIENTS + 1

    # --- the same campaign again: nothing new is requested, rendered or published ---
    requests_before = end_offsets(settings, RENDER_REQUESTS)
    history_before = {j.job_id: len(container.jobs.history(j.job_id)) for j in jobs}
    etags_before = {k: container.store.stat(dist, k).etag for k in clips}  # type: ignore[union-attr]
    with workers_running(container):
        t0 = time.monotonic()
        again = dag.test()
        second_s = time.monotonic() - t0
    print(f"dag.test() re-run of {DAG_ID}: {second_s:.1f} s")
    assert again.state == "success"
    assert end_offsets(settings, RENDER_REQUESTS) == requests_before
    assert {j.job_id: len(container.jobs.history(j.job_id)) for j in jobs} == history_before
    assert sorted(k for k in container.store.list_keys(dist) if k.endswith(".mp4")) == clips
    assert {k: container.store.stat(dist, k).etag for k in clips} == etags_before  # type: ignore[union-attr]
    sent = [
        ti.xcom_pull(task_ids="publish_requests", map_indexes=ti.map_index)
        for ti in again.get_task_instances()
        if ti.task_id == "publish_requests"
    ]
    assert sent and all(s["requested"] == 0 and s["created"] == 0 for s in sent), sent
    reports = container.store.list_keys(settings.bucket_reports, f"campaigns/{CAMPAIGN}/")
    assert len([k for k in reports if k.endswith("/report.json")]) == 2


def test_campaign_past_its_deadline_reports_and_fails(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, airflow_db: Path
) -> None:
    """No workers run: the jobs never settle, the wait gives up at the deadline, the report
    is still written (complete: false) and the run ends failed."""
    settings = container.settings
    campaigns = tmp_path / "campaigns"
    write_campaign(campaigns, 2, CAMPAIGN)
    dag = load_dag(monkeypatch, greetflow_env(settings, campaigns))
    run = dag.test(run_conf={"deadline_s": 1})
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["publish_requests"] == "success"
    assert states["wait_for_jobs"] == "failed"
    assert states["write_report"] == "success"
    assert states["check_complete"] == "upstream_failed"
    keys = container.store.list_keys(settings.bucket_reports, f"campaigns/{CAMPAIGN}/")
    report = json.loads(
        container.store.get_bytes(settings.bucket_reports, next(k for k in keys if k.endswith(".json")))
    )
    assert report["complete"] is False and report["deadline_passed"] is True
    assert report["counts"]["requested"] == 2
