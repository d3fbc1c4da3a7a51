"""`consent_sweep`: daily, expire consents past expires_at and take their clips down.

Thin: the task runs the consent sweep of a Container (pipeline.bootstrap.airflow_container,
imported inside the task) from Airflow connections / variables / GREETFLOW_ env. It also
re-checks every live clip, so a lost consent.events message cannot leave a clip up.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task


@dag(
    dag_id="consent_sweep",
    description="Expire consents past expires_at and take their clips down",
    schedule="0 2 * * *",
    start_date=datetime(2025, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "greetflow", "retries": 2, "retry_delay": timedelta(minutes=5)},
    tags=["greetflow", "consent"],
)
def consent_sweep() -> None:
    @task
    def expire_and_take_down() -> dict[str, object]:
        from pipeline.bootstrap import airflow_container

        with airflow_container() as c:
            report = c.consent_expiry()
        return {
            "summary": report.summary(),
            "expired_subjects": list(report.expired_subjects),
            "taken_down": [str(j) for j in report.taken_down],
        }

    expire_and_take_down()


consent_sweep()
