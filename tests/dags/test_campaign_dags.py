"""The campaign DAG file: parsing, one DAG per brief, schedules, invalid briefs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from tests.dags.airflow_env import DAGS_FOLDER, REPO

TIMEZONES = ["Asia/Hong_Kong", "Asia/Shanghai", "Europe/London", "America/New_York", "UTC"]
CAMPAIGN_TASKS = [
    "validate_brief",
    "resolve_audience",
    "prewarm_segments",
    "publish_requests",
    "wait_for_jobs",
    "write_report",
    "check_complete",
]


def brief_dict(i: int, recipients: int = 20) -> dict[str, object]:
    return {
        "campaign_id": f"gen-{i:03d}",
        "title": f"Generated campaign {i} 新春",
        "template": {"name": "lunar-new-year", "version": "1"},
        "default_locale": "zh-Hant-HK",
        "schedule": {
            "cron": f"{i % 60} 20 5 2 *",
            "timezone": TIMEZONES[i % len(TIMEZONES)],
            "start_date": "2027-01-01T00:00:00",
            "end_date": "2027-02-06T00:00:00",
        },
        "recipients": [
            {"id": f"r-{i}-{j}", "name": f"Recipient {j}", "locale": ["zh-Hant-HK", "en"][j % 2]}
            for j in range(recipients)
        ],
    }


def write_briefs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if i % 5 == 0:
            (folder / f"gen-{i:03d}.json").write_text(json.dumps(brief_dict(i)), encoding="utf-8")
        else:
            (folder / f"gen-{i:03d}.yaml").write_text(
                yaml.safe_dump(brief_dict(i), allow_unicode=True), encoding="utf-8"
            )


def parse(monkeypatch: pytest.MonkeyPatch, folder: Path):  # type: ignore[no-untyped-def]
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("GREETFLOW_CAMPAIGNS_DIR", str(folder))
    return DagBag(dag_folder=str(DAGS_FOLDER))


def test_fifty_briefs_parse_without_import_errors_and_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "campaigns"
    write_briefs(folder, 50)
    parse(monkeypatch, tmp_path / "empty")  # warm up: Airflow's own lazy imports
    t0 = time.perf_counter()
    bag = parse(monkeypatch, folder)
    elapsed = time.perf_counter() - t0
    print(f"\nDagBag parse of dags/ with 50 brief files: {elapsed:.3f} s")
    assert bag.import_errors == {}
    campaign_ids = sorted(d for d in bag.dag_ids if d.startswith("campaign_"))
    assert campaign_ids == [f"campaign_gen-{i:03d}" for i in range(50)]
    # The acceptance figure is 2 s; the bound here only catches a gross regression.
    assert elapsed < 10, f"parsing 50 briefs took {elapsed:.2f} s"


def test_dag_shape_and_schedule_follow_the_brief(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "campaigns"
    write_briefs(folder, 1)
    bag = parse(monkeypatch, folder)
    dag = bag.dags["campaign_gen-000"]
    assert dag is not None
    assert sorted(t.task_id for t in dag.tasks) == sorted(CAMPAIGN_TASKS)
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert "greetflow" in dag.tags
    tt = dag.timetable
    assert type(tt).__name__ == "CronTriggerTimetable"
    assert tt.expression == "0 20 5 2 *"
    assert str(tt.timezone) == "Asia/Hong_Kong"
    # Naive brief dates are in the schedule's time zone (Hong Kong is UTC+8).
    assert dag.start_date == datetime(2026, 12, 31, 16, 0, tzinfo=UTC)
    assert dag.end_date == datetime(2027, 2, 5, 16, 0, tzinfo=UTC)
    wait = dag.get_task("wait_for_jobs")
    assert wait.mode == "reschedule"
    assert dag.get_task("publish_requests").upstream_task_ids >= {"resolve_audience", "prewarm_segments"}
    assert dag.get_task("write_report").trigger_rule == "all_done_min_one_success"
    assert dag.get_task("check_complete").upstream_task_ids == {"wait_for_jobs", "write_report"}


def test_brief_without_schedule_is_manual_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "campaigns"
    folder.mkdir()
    data = brief_dict(7)
    del data["schedule"]
    (folder / "manual.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    dag = parse(monkeypatch, folder).dags["campaign_gen-007"]
    assert dag is not None
    assert type(dag.timetable).__name__ == "NullTimetable"


def test_invalid_and_duplicate_briefs_become_failing_dags_not_import_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "campaigns"
    write_briefs(folder, 2)
    (folder / "broken.yaml").write_text("campaign_id: [unclosed\n", encoding="utf-8")
    bad_cron = brief_dict(3)
    bad_cron["schedule"] = {"cron": "not a cron at all", "timezone": "UTC"}
    (folder / "bad-cron.yaml").write_text(yaml.safe_dump(bad_cron), encoding="utf-8")
    bad_tz = brief_dict(4)
    bad_tz["schedule"] = {"cron": "0 20 * * *", "timezone": "Mars/Olympus"}
    (folder / "bad-tz.yaml").write_text(yaml.safe_dump(bad_tz), encoding="utf-8")
    (folder / "zz-dup.yaml").write_text(yaml.safe_dump(brief_dict(1)), encoding="utf-8")
    (folder / "notes.txt").write_text("not a brief", encoding="utf-8")
    bag = parse(monkeypatch, folder)
    assert bag.import_errors == {}
    assert sorted(d for d in bag.dag_ids if d.startswith("campaign_")) == [
        "campaign_gen-000",
        "campaign_gen-001",
        "campaign_invalid_bad-cron",
        "campaign_invalid_bad-tz",
        "campaign_invalid_broken",
        "campaign_invalid_zz-dup",
    ]
    invalid = bag.dags["campaign_invalid_bad-tz"]
    assert type(invalid.timetable).__name__ == "NullTimetable"
    assert [t.task_id for t in invalid.tasks] == ["validate_brief"]
    assert "invalid-brief" in invalid.tags


def test_parsing_imports_no_service_clients() -> None:
    """Parse time reads the campaigns folder and nothing else: no Kafka, S3 or our DB code."""
    code = (
        "import runpy, sys, json;"
        f"runpy.run_path({str(DAGS_FOLDER / 'greetflow_campaigns.py')!r});"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kafka', 'minio', 'pyarrow', 'pipeline'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, timeout=300
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert "kafka" not in loaded and "minio" not in loaded and "pyarrow" not in loaded
    # settings, and the intake file loader (pure: yaml/json, no clients) with its errors
    assert [m for m in loaded if m.startswith("pipeline")] == [
        "pipeline",
        "pipeline.briefs",
        "pipeline.errors",
        "pipeline.settings",
    ]


def test_sample_brief_in_repo_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("GREETFLOW_CAMPAIGNS_DIR", raising=False)
    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    dag = bag.dags["campaign_lny-2027-airflow-sample"]
    assert dag is not None
    assert dag.start_date is not None and dag.start_date < dag.end_date  # type: ignore[operator]
    assert dag.end_date - dag.start_date < timedelta(days=60)  # type: ignore[operator]
