"""What a worker process runs for its operators, put together from settings: the
`/metrics`, `/healthz` and `/readyz` endpoints, the readiness probes of the broker, the
object store and the database, the cached lag and job gauges, and the trace exporter."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pipeline.adapters.db import Database
from pipeline.adapters.kafka import group_lag
from pipeline.errors import ConfigError
from pipeline.metrics import (
    JobsCollector,
    LagCollector,
    MetricsServer,
    Probe,
    Readiness,
    Refresher,
    Telemetry,
    broker_probe,
    lag_rows,
    s3_probe,
    sql_probe,
)
from pipeline.repositories import JobRepository
from pipeline.settings import Settings
from pipeline.tracing import setup_tracing

log = logging.getLogger(__name__)


def metrics_port(settings: Settings, role: str) -> int:
    """The role's port: `metrics_role_ports[role]` when listed, else `metrics_port` (0: off)."""
    return int(settings.metrics_role_ports.get(role, settings.metrics_port))


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the broker probe when Kafka speaks SSL / SASL_SSL."""
    protocol = str(getattr(settings, "kafka_security_protocol", "PLAINTEXT"))
    if protocol not in ("SSL", "SASL_SSL"):
        return None
    cafile = getattr(settings, "kafka_ssl_cafile", None)
    ctx = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    ctx.check_hostname = bool(getattr(settings, "kafka_ssl_check_hostname", True))
    certfile = getattr(settings, "kafka_ssl_certfile", None)
    if certfile:
        keyfile = getattr(settings, "kafka_ssl_keyfile", None)
        password = getattr(settings, "kafka_ssl_key_password", None)
        secret = password.get_secret_value() if password is not None else ""
        ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile else None, secret or None)
    return ctx


def _broker_probe(settings: Settings) -> Probe:
    tls = _tls_context(settings)
    if tls is None:
        return broker_probe(settings.kafka_bootstrap)
    first = settings.kafka_bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")

    def probe(timeout_s: float) -> None:
        # A TLS handshake is an answer of the broker process (a stopped one never completes it).
        with (
            socket.create_connection((host.strip("[]"), int(port or 9093)), timeout=timeout_s) as raw,
            tls.wrap_socket(raw, server_hostname=host.strip("[]")),
        ):
            return

    return probe


def build_telemetry(
    settings: Settings,
    *,
    role: str,
    db: Callable[[], Database],
    jobs: Callable[[], JobRepository],
    consumer: tuple[str, str] | None = None,
    consumer_ready: Callable[[], bool] | None = None,
    consumer_live: Callable[[], bool] | None = None,
) -> Telemetry:
    """The telemetry of one worker process of `role`. `consumer`: its (group id, topic);
    `consumer_ready`: in its group and not waiting out an outage; `consumer_live`: its loop
    still polls (/healthz). With the port at 0
    only tracing (when OTEL_TRACES_EXPORTER asks for it) is set up."""
    provider = setup_tracing(f"greetflow-{role}")
    hooks: tuple[Callable[[], object], ...] = (provider.shutdown,) if provider is not None else ()
    port = metrics_port(settings, role)
    if port == 0:
        return Telemetry(shutdown_hooks=hooks)

    def db_connect() -> Any:
        return db().engine.connect()

    probes: dict[str, Probe] = {
        "broker": _broker_probe(settings),
        "s3": s3_probe(settings.s3_endpoint, settings.bucket_staging),
        "database": sql_probe(db_connect),
    }
    extra = {"consumer": consumer_ready} if consumer_ready is not None else {}
    readiness = Readiness(
        probes, interval_s=settings.readiness_interval_s, timeout_s=settings.readiness_timeout_s, extra=extra
    )
    window = settings.metrics_jobs_window_s
    job_counts = Refresher(
        "jobs",
        lambda: jobs().counts_by_campaign_state(final_within_s=window),
        interval_s=settings.metrics_jobs_interval_s,
    )
    refreshers = [job_counts]
    collectors: list[Any] = [JobsCollector(job_counts)]
    if consumer is not None:
        lag = Refresher(
            "lag",
            lambda: lag_rows(group_lag(settings, [consumer], sample_s=0)),
            interval_s=settings.metrics_lag_interval_s,
        )
        refreshers.append(lag)
        collectors.append(LagCollector(lag))
    try:
        server = MetricsServer(settings.metrics_host, port, readiness, live=consumer_live or (lambda: True))
    except OSError as exc:
        raise ConfigError(
            f"{role}: cannot serve metrics on {settings.metrics_host}:{port} ({exc.strerror or exc}); "
            "give each worker its own GREETFLOW_METRICS_PORT"
        ) from exc
    return Telemetry(
        server=server,
        readiness=readiness,
        refreshers=tuple(refreshers),
        collectors=tuple(collectors),
        shutdown_hooks=hooks,
    )


def readiness_for(settings: Settings, db: Callable[[], Database], *, broker: bool = True) -> Readiness:
    """The probes of a process that serves its own routes (the review app): the database,
    the object store and (unless `broker` is False) the broker. Not started."""
    probes: dict[str, Probe] = {
        "database": sql_probe(lambda: db().engine.connect()),
        "s3": s3_probe(settings.s3_endpoint, settings.bucket_staging),
    }
    if broker:
        probes["broker"] = _broker_probe(settings)
    return Readiness(probes, interval_s=settings.readiness_interval_s, timeout_s=settings.readiness_timeout_s)
