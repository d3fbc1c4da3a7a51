"""Airflow adapter: Greetflow settings from Airflow connections and variables, on top of
the GREETFLOW_ environment. The DAGs in dags/ get a Container on these settings from
`pipeline.bootstrap.airflow_container`.

Precedence, highest first:

1. the Airflow connections below, when defined;
2. the Airflow variable `greetflow_settings`: a JSON object of Settings fields,
   e.g. `{"campaign_deadline_s": 7200, "bucket_reports": "gf-reports"}`;
3. GREETFLOW_* environment variables;
4. the defaults in pipeline/settings.py.

- `greetflow_kafka` -> `kafka_bootstrap`: host and port, or extra
  `{"bootstrap_servers": "a:9092,b:9092"}`;
- `greetflow_s3` -> `s3_endpoint`, `s3_access_key`, `s3_secret_key`, `s3_region`: type `aws`
  (login, password, extra `endpoint_url`, `region_name`), or host/port with schema `https`
  for TLS;
- `greetflow_db` -> `database_url`: type `postgres`, or extra `{"url": "<SQLAlchemy URL>"}`;
- `greetflow_audience_db` -> `audience_database_url`: as `greetflow_db`; the database
  that `.sql` audiences run against.

Secrets therefore live in Airflow's secrets backend (or its AIRFLOW_CONN_* variables),
never in a DAG file. Airflow is imported lazily: only call `airflow_settings` from inside
a running task (connections and variables are fetched through the task's supervisor).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from sqlalchemy.engine import URL

from pipeline.errors import ConfigError
from pipeline.settings import Settings

SETTINGS_VARIABLE = "greetflow_settings"
CONN_KAFKA = "greetflow_kafka"
CONN_S3 = "greetflow_s3"
CONN_DB = "greetflow_db"
CONN_AUDIENCE_DB = "greetflow_audience_db"
CONNECTION_IDS = (CONN_KAFKA, CONN_S3, CONN_DB, CONN_AUDIENCE_DB)


class ConnLike(Protocol):
    """The fields of an Airflow Connection that we read."""

    conn_type: str | None
    host: str | None
    schema: str | None
    login: str | None
    password: str | None
    port: int | None

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


def _kafka(conn: ConnLike) -> dict[str, Any]:
    servers = conn.extra_dejson.get("bootstrap_servers")
    if servers:
        return {"kafka_bootstrap": str(servers)}
    if not conn.host:
        raise ConfigError(f"connection {CONN_KAFKA}: set host (and port) or extra.bootstrap_servers")
    return {"kafka_bootstrap": f"{conn.host}:{conn.port or 9092}" if ":" not in conn.host else conn.host}


def _s3(conn: ConnLike) -> dict[str, Any]:
    extra = conn.extra_dejson
    out: dict[str, Any] = {}
    endpoint = extra.get("endpoint_url") or extra.get("endpoint")
    if not endpoint and conn.host:
        if "://" in conn.host:
            endpoint = conn.host
        else:
            scheme = conn.schema if conn.schema in ("http", "https") else "http"
            endpoint = f"{scheme}://{conn.host}" + (f":{conn.port}" if conn.port else "")
    if endpoint:
        out["s3_endpoint"] = str(endpoint)
    if conn.login:
        out["s3_access_key"] = conn.login
    if conn.password:
        out["s3_secret_key"] = conn.password
    region = extra.get("region_name") or extra.get("region")
    if region:
        out["s3_region"] = str(region)
    return out


def _db_url(conn: ConnLike, conn_id: str) -> str:
    url = conn.extra_dejson.get("url") or conn.extra_dejson.get("sqlalchemy_url")
    if url:
        return str(url)
    ctype = (conn.conn_type or "").lower()
    if ctype in ("postgres", "postgresql"):
        return URL.create(
            "postgresql+psycopg",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
        ).render_as_string(hide_password=False)
    if ctype == "sqlite" and conn.host:
        return f"sqlite:///{conn.host}"
    raise ConfigError(f"connection {conn_id}: use type postgres, or set extra.url to a SQLAlchemy URL")


def overrides_from_airflow(
    connections: Mapping[str, ConnLike | None], variable: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Settings keyword overrides from already-fetched connections and the settings variable."""
    out: dict[str, Any] = {}
    if variable:
        unknown = sorted(set(variable) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(f"variable {SETTINGS_VARIABLE}: unknown settings {', '.join(unknown)}")
        out.update(variable)
    if (c := connections.get(CONN_KAFKA)) is not None:
        out.update(_kafka(c))
    if (c := connections.get(CONN_S3)) is not None:
        out.update(_s3(c))
    if (c := connections.get(CONN_DB)) is not None:
        out["database_url"] = _db_url(c, CONN_DB)
    if (c := connections.get(CONN_AUDIENCE_DB)) is not None:
        out["audience_database_url"] = _db_url(c, CONN_AUDIENCE_DB)
    return out


def _fetch_connection(conn_id: str) -> ConnLike | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn: ConnLike = Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    return conn


def _fetch_variable() -> dict[str, Any] | None:
    from airflow.sdk import Variable

    raw = Variable.get(SETTINGS_VARIABLE, default=None)
    if raw in (None, ""):
        return None
    data = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise ConfigError(f"variable {SETTINGS_VARIABLE} must be a JSON object")
    return data


def airflow_settings(
    *,
    fetch_connection: Callable[[str], ConnLike | None] = _fetch_connection,
    fetch_variable: Callable[[], Mapping[str, Any] | None] = _fetch_variable,
) -> Settings:
    """A fresh Settings: Airflow connections > the settings variable > GREETFLOW_ env > defaults."""
    conns = {cid: fetch_connection(cid) for cid in CONNECTION_IDS}
    return Settings(**overrides_from_airflow(conns, fetch_variable()))
