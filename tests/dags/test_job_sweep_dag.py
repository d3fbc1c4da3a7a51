"""The job sweep DAG parses, runs every five minutes and stays thin."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dags.test_campaign_dags import parse


def test_job_sweep_dag_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bag = parse(monkeypatch, tmp_path / "empty")
    assert bag.import_errors == {}
    dag = bag.dags["job_sweep"]
    assert [t.task_id for t in dag.tasks] == ["sweep_stuck_jobs"]
    assert dag.catchup is False and "greetflow" in dag.tags
    source = (Path(__file__).parents[2] / "dags" / "job_sweep.py").read_text()
    assert "import pipeline" not in source.split("@dag")[0]  # pipeline is imported inside the task
