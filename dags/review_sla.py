"""`review_sla`: hourly, flag and escalate the review cases waiting longer than the SLA
(GREETFLOW_REVIEW_SLA_HOURS), and re-send human approvals the publisher never picked up.

Thin: each task calls the ReviewService of a Container (pipeline.bootstrap.airflow_container,
imported inside the task) from Airflow connections / variables / GREETFLOW_ env. See docs/review-queue.md.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task


@dag(
    dag_id="review_sla",
    description="Escalate review cases past their SLA",
    schedule=timedelta(hours=1),
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "greetflow", "retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["greetflow", "review"],
)
def review_sla() -> None:
    @task
    def escalate_overdue() -> list[str]:
        from pipeline.bootstrap import airflow_container

        with airflow_container() as c:
            return [str(j) for j in c.review_service().escalate_overdue()]

    @task
    def reannounce_approvals() -> list[str]:
        from pipeline.bootstrap import airflow_container

        with airflow_container(migrate=False) as c:
            return [str(j) for j in c.review_service().reannounce_stuck()]

    escalate_overdue() >> reannounce_approvals()


review_sla()
