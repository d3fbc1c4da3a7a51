"""The two maintenance DAGs parse, are scheduled as documented, and stay thin."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dags.test_campaign_dags import parse


@pytest.mark.parametrize(
    ("dag_id", "tasks"),
    [
        ("consent_sweep", ["expire_and_take_down"]),
        ("review_sla", ["escalate_overdue", "reannounce_approvals"]),
    ],
)
def test_maintenance_dag_loads(
    dag_id: str, tasks: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bag = parse(monkeypatch, tmp_path / "empty")
    assert bag.import_errors == {}
    dag = bag.dags[dag_id]
    assert sorted(t.task_id for t in dag.tasks) == sorted(tasks)
    assert dag.catchup is False
    assert "greetflow" in dag.tags


def test_consent_sweep_runs_daily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dag = parse(monkeypatch, tmp_path / "empty").dags["consent_sweep"]
    assert "0 2 * * *" in str(getattr(dag.timetable, "summary", dag.timetable))
