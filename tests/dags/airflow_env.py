"""A private Airflow environment for the tests: set before anything imports airflow.

Airflow reads AIRFLOW_HOME and its configuration once, at import, so every test module
that needs Airflow calls `configure()` at import time (tests/dags/conftest.py does it
for tests/dags/). The metadata database is a SQLite file in a temporary AIRFLOW_HOME,
created once per test session by the `airflow_db` fixture.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
_MARK = "GREETFLOW_TEST_AIRFLOW_HOME"


def configure() -> Path:
    """Point Airflow at a fresh temporary home (idempotent within one process)."""
    if os.environ.get(_MARK):
        return Path(os.environ[_MARK])
    if "airflow" in sys.modules:
        raise RuntimeError("airflow was imported before tests.dags.airflow_env.configure()")
    home = Path(tempfile.mkdtemp(prefix="greetflow-airflow-test-"))
    atexit.register(shutil.rmtree, home, True)
    os.environ.update(
        {
            _MARK: str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    return home


@pytest.fixture(scope="session")
def airflow_db() -> Iterator[Path]:
    """Airflow's metadata tables in the session's SQLite file (fails if Airflow is missing)."""
    home = configure()
    from airflow.utils import db

    db.initdb()
    yield home
