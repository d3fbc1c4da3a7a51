"""Prometheus metrics, and the `/metrics`, `/healthz` and `/readyz` endpoints of a process.

Every metric lives in one registry (`REGISTRY`); the metric names are a contract with the
dashboards and the Kubernetes manifests (docs/operations.md, "Metrics, logs and traces").
Instrumented code imports the metric objects from here and touches them where things
happen; nothing here imports a service.

Values that cost a query (jobs by state, consumer lag) are refreshed in a background
thread and served from a cache, so a scrape never waits on the database or the broker.
Readiness is probed the same way: each dependency (broker, object store, database) is
probed every `interval_s` with a short timeout in its own thread, and `/readyz` reports
the last results.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# `*_created` series double every counter's exposition and no dashboard here reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_HANDLER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

MESSAGES_CONSUMED = Counter(
    "greetflow_messages_consumed_total", "Records taken from a topic (redeliveries included).",
    ["topic"], registry=REGISTRY,
)  # fmt: skip
MESSAGES_SUCCEEDED = Counter(
    "greetflow_messages_succeeded_total", "Records whose handler returned.", ["topic"], registry=REGISTRY
)
MESSAGES_RETRIED = Counter(
    "greetflow_messages_retried_total", "Handler re-runs after a failure of the message itself.",
    ["topic"], registry=REGISTRY,
)  # fmt: skip
MESSAGES_DEAD_LETTERED = Counter(
    "greetflow_messages_dead_lettered_total", "Records sent to <topic>.dlq (or spilled).",
    ["topic"], registry=REGISTRY,
)  # fmt: skip
HANDLER_SECONDS = Histogram(
    "greetflow_handler_seconds", "Duration of one handler call.", ["step"],
    buckets=_HANDLER_BUCKETS, registry=REGISTRY,
)  # fmt: skip
RENDER_PHASE_SECONDS = Histogram(
    "greetflow_render_phase_seconds", "Duration of one phase of a render.", ["phase"],
    buckets=_PHASE_BUCKETS, registry=REGISTRY,
)  # fmt: skip
SEGMENT_CACHE = Counter(
    "greetflow_segment_cache_total", "Shared-segment cache look-ups.", ["result"], registry=REGISTRY
)
MODERATION_DECISIONS = Counter(
    "greetflow_moderation_decisions_total", "Moderation decisions recorded.", ["outcome"], registry=REGISTRY
)
PUBLISHED = Counter("greetflow_published_total", "Clips published.", registry=REGISTRY)
TAKEN_DOWN = Counter("greetflow_taken_down_total", "Published clips taken down.", registry=REGISTRY)
WEBHOOK_DELIVERIES = Counter(
    "greetflow_webhook_deliveries_total", "Webhook deliveries.", ["outcome"], registry=REGISTRY
)
STEP_TAKEOVERS = Counter(
    "greetflow_step_takeovers_total", "Jobs taken over after another worker's lease expired.",
    ["step"], registry=REGISTRY,
)  # fmt: skip
SWEEPS = Counter("greetflow_sweeps_total", "Sweeper actions on stuck jobs.", ["action"], registry=REGISTRY)
WORKER_READY = Gauge("greetflow_worker_ready", "1 while /readyz answers ready.", registry=REGISTRY)

RENDER_PHASES = ("generate", "draw", "encode", "mix", "upload")
STEP_OF_WORKING_STATE = {"rendering": "render", "moderating": "moderate", "publishing": "publish"}


def init_topic(topic: str, step: str) -> None:
    """Create the label sets of one consumer's series, so they read 0 before the first message."""
    for counter in (MESSAGES_CONSUMED, MESSAGES_SUCCEEDED, MESSAGES_RETRIED, MESSAGES_DEAD_LETTERED):
        counter.labels(topic=topic)
    HANDLER_SECONDS.labels(step=step)


# --------------------------------------------------------------------------- cached gauges


class Refresher:
    """Calls `fetch` every `interval_s` in a daemon thread and keeps the last result; a
    failing fetch keeps the previous value (logged once per failure streak)."""

    def __init__(self, name: str, fetch: Callable[[], Any], *, interval_s: float) -> None:
        self.name = name
        self._fetch = fetch
        self.interval_s = interval_s
        self.value: Any = None
        self.updated_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def refresh(self) -> None:
        try:
            self.value = self._fetch()
        except Exception as exc:
            if not self._failing:
                log.warning("metrics: could not refresh %s: %s: %s", self.name, type(exc).__name__, exc)
            self._failing = True
            return
        self._failing = False
        self.updated_at = time.monotonic()

    def start(self) -> Refresher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"metrics-{self.name}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)


class JobsCollector(Collector):
    """`greetflow_jobs{campaign_id,state}` from the last (campaign, state, count) rows."""

    def __init__(self, refresher: Refresher) -> None:
        self._refresher = refresher

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "greetflow_jobs",
            "Jobs per campaign and state (non-final jobs, and jobs that changed recently).",
            labels=["campaign_id", "state"],
        )
        for campaign_id, state, n in self._refresher.value or ():
            family.add_metric([campaign_id, state], n)
        yield family


class LagCollector(Collector):
    """`greetflow_consumer_lag{group,topic,partition}` from the last `group_lag` sample."""

    def __init__(self, refresher: Refresher) -> None:
        self._refresher = refresher

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "greetflow_consumer_lag",
            "Log end offset minus the group's committed offset.",
            labels=["group", "topic", "partition"],
        )
        for group, topic, partition, lag in self._refresher.value or ():
            family.add_metric([group, topic, str(partition)], lag)
        yield family


# --------------------------------------------------------------------------- readiness probes

Probe = Callable[[float], None]  # raises when the dependency does not answer within timeout_s


def _host_port(hostport: str, default_port: int) -> tuple[str, int]:
    host, sep, port = hostport.strip().rpartition(":")
    if not sep:
        return hostport.strip(), default_port
    return host.strip("[]"), int(port)


def broker_probe(bootstrap: str, client_id: str = "greetflow-probe") -> Probe:
    """One Kafka ApiVersions (v0) round trip to any bootstrap server. A stopped broker still
    accepts TCP connections (the kernel does), so only an answer counts."""
    servers = [_host_port(s, 9092) for s in bootstrap.split(",") if s.strip()]
    cid = client_id.encode()

    def probe(timeout_s: float) -> None:
        errors = []
        for host, port in servers:
            try:
                with socket.create_connection((host, port), timeout=timeout_s) as sock:
                    sock.settimeout(timeout_s)
                    body = struct.pack(">hhih", 18, 0, 7, len(cid)) + cid
                    sock.sendall(struct.pack(">i", len(body)) + body)
                    head = _recv_exactly(sock, 8)
                    _size, correlation = struct.unpack(">ii", head)
                    if correlation != 7:
                        raise ConnectionError(f"unexpected correlation id {correlation}")
                    return
            except (OSError, ValueError) as exc:
                errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
        raise ConnectionError("; ".join(errors) or "no bootstrap servers")

    return probe


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def s3_probe(endpoint: str, bucket: str) -> Probe:
    """HEAD of a bucket: any HTTP answer below 500 means the object store is serving."""
    url = urlsplit(endpoint)
    secure = url.scheme == "https"
    host = url.hostname or "127.0.0.1"
    port = url.port or (443 if secure else 80)
    path = f"{url.path.rstrip('/')}/{bucket}"

    def probe(timeout_s: float) -> None:
        cls = http.client.HTTPSConnection if secure else http.client.HTTPConnection
        conn = cls(host, port, timeout=timeout_s)
        try:
            conn.request("HEAD", path)
            status = conn.getresponse().status
        finally:
            conn.close()
        if status >= 500:
            raise ConnectionError(f"HTTP {status}")

    return probe


def sql_probe(connect: Callable[[], Any]) -> Probe:
    """`SELECT 1` on a fresh connection of the engine (`connect` is `engine.connect`). The
    timeout is enforced by the caller (the probe runs in its own thread)."""
    from sqlalchemy import text

    def probe(_timeout_s: float) -> None:
        with connect() as conn:
            conn.execute(text("SELECT 1"))

    return probe


@dataclass(frozen=True)
class Check:
    ok: bool
    detail: str
    at: float


class Readiness:
    """The last result of every probe, refreshed every `interval_s` in the background.

    A probe that has not answered within `timeout_s` is a failure at once (its thread is
    left to finish; the next round does not start a second one). `extra` checks (the
    consumer in its group, not waiting out an outage) are evaluated at each question."""

    def __init__(
        self,
        probes: Mapping[str, Probe],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
        extra: Mapping[str, Callable[[], bool]] | None = None,
    ) -> None:
        self.probes = dict(probes)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.extra = dict(extra or {})
        self.checks: dict[str, Check] = {
            name: Check(False, "not probed yet", time.monotonic()) for name in self.probes
        }
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.probes)), thread_name_prefix="probe")
        self._inflight: dict[str, Future[None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Readiness:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="readiness", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def probe_once(self) -> None:
        started = time.monotonic()
        futures: dict[str, Future[None]] = {}
        for name, probe in self.probes.items():
            prev = self._inflight.get(name)
            if prev is not None and not prev.done():
                self.checks[name] = Check(False, "previous probe still waiting", started)
                continue
            futures[name] = self._inflight[name] = self._pool.submit(probe, self.timeout_s)
        for name, fut in futures.items():
            left = max(0.0, self.timeout_s - (time.monotonic() - started))
            try:
                fut.result(timeout=left)
            except TimeoutError:
                self.checks[name] = Check(False, f"no answer within {self.timeout_s:g} s", time.monotonic())
            except Exception as exc:
                self.checks[name] = Check(False, f"{type(exc).__name__}: {exc}"[:300], time.monotonic())
            else:
                self.checks[name] = Check(True, "ok", time.monotonic())
        WORKER_READY.set(1 if self.ready() else 0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.probe_once()
            except Exception:  # pragma: no cover - a bug here must not kill the thread
                log.exception("readiness: probe round failed")
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def report(self) -> dict[str, Any]:
        checks: dict[str, dict[str, Any]] = {
            name: {"ok": c.ok, "detail": c.detail} for name, c in self.checks.items()
        }
        for name, fn in self.extra.items():
            try:
                ok = bool(fn())
            except Exception as exc:
                checks[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            checks[name] = {"ok": ok, "detail": "ok" if ok else "not yet"}
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}

    def ready(self) -> bool:
        return bool(self.report()["ready"])


# --------------------------------------------------------------------------- HTTP endpoints


def render_metrics(accept: str | None = None, registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format the scraper asked for."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class MetricsServer:
    """`/metrics`, `/healthz` and `/readyz` on (host, port) in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        readiness: Readiness | None,
        *,
        live: Callable[[], bool] = lambda: True,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = render_metrics(self.headers.get("Accept"), registry)
                    self._send(200, body, ctype)
                elif path == "/healthz":
                    alive = live()
                    self._send(200 if alive else 503, b"ok\n" if alive else b"not live\n", "text/plain")
                elif path == "/readyz":
                    doc = server.readiness.report() if server.readiness else {"ready": True, "checks": {}}
                    WORKER_READY.set(1 if doc["ready"] else 0)
                    self._send(200 if doc["ready"] else 503, json.dumps(doc).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return  # scrapes every few seconds would drown the worker's own log

        self.readiness = readiness
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Telemetry:
    """What one process runs for its operators: the endpoints and the background refreshers."""

    server: MetricsServer | None = None
    readiness: Readiness | None = None
    refreshers: tuple[Refresher, ...] = ()
    collectors: tuple[Collector, ...] = ()
    shutdown_hooks: tuple[Callable[[], object], ...] = ()

    def start(self) -> Telemetry:
        for c in self.collectors:
            REGISTRY.register(c)
        for r in self.refreshers:
            r.start()
        if self.readiness is not None:
            self.readiness.start()
        if self.server is not None:
            self.server.start()
            log.info("metrics: /metrics, /healthz and /readyz on port %d", self.server.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.readiness is not None:
            self.readiness.stop()
        for r in self.refreshers:
            r.stop()
        for c in self.collectors:
            REGISTRY.unregister(c)
        for hook in self.shutdown_hooks:
            try:
                hook()
            except Exception:
                log.exception("telemetry: shutdown hook failed")


def lag_rows(sample: Iterable[Any]) -> list[tuple[str, str, int, int]]:
    """(group, topic, partition, lag) rows from `group_lag` results."""
    return [(g.group_id, g.topic, p, n) for g in sample for p, n in sorted(g.lag.items())]
