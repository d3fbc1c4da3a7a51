"""Every test here runs against a private, temporary Airflow home (set before import)."""

from tests.dags.airflow_env import airflow_db, configure

configure()
