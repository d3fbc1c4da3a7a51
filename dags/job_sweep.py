"""`job_sweep`: every five minutes, re-drive the jobs nothing else will move on (expired
lease, or no progress for GREETFLOW_SWEEP_STALE_AFTER_S) and fail those swept
GREETFLOW_SWEEP_MAX_ATTEMPTS times without progress.

Thin: the task calls `Container.sweep_jobs` (pipeline.bootstrap.airflow_container, imported
inside the task), which holds the database lock `job-sweeper` for the pass, so it never
double-drives a job with a `greetflow worker sweep` loop. See docs/operations.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import dag, task


@dag(
    dag_id="job_sweep",
    description="Re-drive stuck jobs; fail the ones that never progress",
    schedule=timedelta(minutes=5),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "greetflow", "retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["greetflow", "maintenance"],
)
def job_sweep() -> None:
    @task
    def sweep_stuck_jobs() -> dict[str, Any]:
        from pipeline.bootstrap import airflow_container

        with airflow_container() as c:
            return c.sweep_jobs().to_dict()

    sweep_stuck_jobs()


job_sweep()
