"""JSON log lines with the bound context, the console format, traceparent round trips,
step spans carrying the envelope's trace id, and the readiness bookkeeping."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.errors import ConfigError
from pipeline.logs import CONSOLE_FORMAT, bind, json_formatter, resolve_format, setup_logging
from pipeline.metrics import REGISTRY, Readiness, render_metrics
from pipeline.tracing import (
    headers_for,
    parse_traceparent,
    setup_tracing,
    step_span,
    traceparent,
    w3c_trace_id,
)


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-logs-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger, out


def test_json_lines_carry_the_bound_context() -> None:
    logger, out = _logger(json_formatter())
    job = uuid.uuid4()
    with bind(job_id=job, campaign_id="lny", trace_id="ab" * 16, worker="render@h:1", step="render"):
        logger.info("rendered %s in %.1fs", "clip", 1.25)
        with bind(step="upload"):
            logger.warning("inner")
    logger.info("after")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    first, inner, after = lines
    assert first["message"] == "rendered clip in 1.2s"
    assert first["level"] == "info" and first["logger"] == logger.name and first["timestamp"].endswith("Z")
    assert first["job_id"] == str(job) and first["campaign_id"] == "lny" and first["trace_id"] == "ab" * 16
    assert first["worker"] == "render@h:1" and first["step"] == "render"
    assert inner["step"] == "upload" and inner["job_id"] == str(job)
    assert "job_id" not in after and "step" not in after


def test_json_context_follows_a_copied_context_into_a_thread() -> None:
    import contextvars

    logger, out = _logger(json_formatter())
    with bind(job_id="j-1"):
        ctx = contextvars.copy_context()
    t = threading.Thread(target=ctx.run, args=(logger.info, "from the handler thread"))
    t.start()
    t.join()
    assert json.loads(out.getvalue())["job_id"] == "j-1"


def test_json_exception_is_a_string_field_without_locals() -> None:
    logger, out = _logger(json_formatter())
    secret = "hunter2-password"  # a local of the failing frame must not be logged
    try:
        raise ValueError(f"bad {len(secret)}")
    except ValueError:
        logger.exception("failed")
    doc = json.loads(out.getvalue())
    assert doc["message"] == "failed" and doc["level"] == "error"
    assert "ValueError: bad 16" in doc["exception"]
    assert secret not in out.getvalue()


def test_non_ascii_stays_readable() -> None:
    logger, out = _logger(json_formatter())
    logger.info("陳大文 %s", "🎉")
    assert json.loads(out.getvalue())["message"] == "陳大文 🎉"
    assert "陳大文" in out.getvalue()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_format_is_console_on_a_terminal_and_json_otherwise() -> None:
    assert resolve_format("auto", _Tty()) == "console"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", _Tty()) == "json"
    assert resolve_format("console", io.StringIO()) == "console"


def test_setup_logging_console_format_is_the_human_one(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    out = _Tty()
    try:
        monkeypatch.setenv("GREETFLOW_LOG_FORMAT", "auto")
        setup_logging("INFO", stream=out)
        (handler,) = root.handlers
        assert handler.formatter is not None and handler.formatter._fmt == CONSOLE_FORMAT
        logging.getLogger("pipeline.test").info("hello")
        assert out.getvalue().rstrip().endswith("INFO    pipeline.test: hello")
        root.handlers = []
        plain = io.StringIO()
        setup_logging("INFO", "json", stream=plain)
        logging.getLogger("pipeline.test").info("hello")
        assert json.loads(plain.getvalue())["message"] == "hello"
    finally:
        root.handlers, level = saved
        root.setLevel(level)


# --------------------------------------------------------------------------- traceparent


def test_traceparent_round_trip() -> None:
    tid = uuid.uuid4().hex
    value = traceparent(tid)
    parsed = parse_traceparent(value.encode())
    assert parsed is not None
    assert parsed[0] == tid and len(parsed[1]) == 16 and value.endswith("-01")
    assert parse_traceparent(traceparent(tid, "00f067aa0ba902b7")) == (tid, "00f067aa0ba902b7")
    (name, raw), *_ = headers_for(tid)
    assert name == "traceparent" and parse_traceparent(raw) is not None


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"\xff\xfe",
        "",
        "garbage",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 has 4 fields
    ],
)
def test_malformed_traceparent_is_ignored(value: str | bytes | None) -> None:
    assert parse_traceparent(value) is None


def test_non_w3c_envelope_trace_ids_map_to_a_stable_valid_one() -> None:
    tid = uuid.uuid4().hex
    assert w3c_trace_id(tid) == tid
    assert w3c_trace_id(str(uuid.UUID(tid))) == tid  # dashed form
    odd = w3c_trace_id("order-12345")
    assert odd == w3c_trace_id("order-12345") and len(odd) == 32 and int(odd, 16)
    assert w3c_trace_id("0" * 32) != "0" * 32


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    # The global provider can be set once per process: patch the tracer lookup instead.
    original = trace.get_tracer

    def get_tracer(name: str, *args: object, **kwargs: object) -> trace.Tracer:
        return provider.get_tracer(name)

    trace.get_tracer = get_tracer  # type: ignore[assignment]
    try:
        yield exporter
    finally:
        trace.get_tracer = original
        provider.shutdown()


def test_step_span_has_the_envelope_trace_id_and_the_producer_as_parent(
    spans: InMemorySpanExporter,
) -> None:
    tid = uuid.uuid4().hex
    upstream = traceparent(tid, "1111111111111111")
    with step_span("render", trace_id=tid, parent=upstream.encode(), attributes={"greetflow.job_id": "j"}):
        produced = parse_traceparent(traceparent(tid))  # what a publish inside the step sends
    (span,) = spans.get_finished_spans()
    ctx = span.get_span_context()
    assert ctx is not None
    assert span.name == "render" and f"{ctx.trace_id:032x}" == tid
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "1111111111111111"
    assert produced == (tid, f"{ctx.span_id:016x}")  # downstream's parent is this span
    assert span.attributes is not None and span.attributes["greetflow.job_id"] == "j"


def test_step_span_ignores_a_parent_from_another_trace(spans: InMemorySpanExporter) -> None:
    tid = uuid.uuid4().hex
    with step_span("publish", trace_id=tid, parent=traceparent(uuid.uuid4().hex, "2222222222222222")):
        pass
    (span,) = spans.get_finished_spans()
    ctx = span.get_span_context()
    assert ctx is not None and f"{ctx.trace_id:032x}" == tid
    assert span.parent is not None and f"{span.parent.span_id:016x}" != "2222222222222222"


def test_tracing_is_off_by_default_and_unknown_exporters_are_one_line_errors() -> None:
    assert setup_tracing("greetflow-test", environ={}) is None
    assert setup_tracing("greetflow-test", environ={"OTEL_TRACES_EXPORTER": "none"}) is None
    with pytest.raises(ConfigError, match="no trace exporter 'zipkin-nope'"):
        setup_tracing("greetflow-test", environ={"OTEL_TRACES_EXPORTER": "zipkin-nope"})


# --------------------------------------------------------------------------- readiness, metrics


def test_readiness_fails_fast_on_a_hanging_probe_and_recovers() -> None:
    gate = threading.Event()
    calls = {"n": 0}

    def hanging(timeout_s: float) -> None:
        calls["n"] += 1
        gate.wait(5)

    def refusing(timeout_s: float) -> None:
        raise ConnectionRefusedError("refused")

    r = Readiness({"db": hanging, "s3": lambda _t: None}, timeout_s=0.2, extra={"consumer": lambda: True})
    started = time.monotonic()
    r.probe_once()
    assert time.monotonic() - started < 1.0
    report = r.report()
    assert not report["ready"] and "no answer within 0.2 s" in report["checks"]["db"]["detail"]
    r.probe_once()  # the first probe is still stuck: no second one is started
    assert calls["n"] == 1 and r.report()["checks"]["db"]["detail"] == "previous probe still waiting"
    gate.set()
    time.sleep(0.05)
    r.probe_once()
    assert r.ready()
    r.probes["s3"] = refusing
    r.probe_once()
    assert r.report()["checks"]["s3"] == {"ok": False, "detail": "ConnectionRefusedError: refused"}
    r.stop()


def test_metric_names_are_the_agreed_ones() -> None:
    body, content_type = render_metrics()
    text = body.decode()
    assert content_type.startswith("text/plain")
    for name in (
        "greetflow_messages_consumed_total",
        "greetflow_messages_succeeded_total",
        "greetflow_messages_retried_total",
        "greetflow_messages_dead_lettered_total",
        "greetflow_handler_seconds",
        "greetflow_render_phase_seconds",
        "greetflow_segment_cache_total",
        "greetflow_moderation_decisions_total",
        "greetflow_published_total",
        "greetflow_taken_down_total",
        "greetflow_webhook_deliveries_total",
        "greetflow_step_takeovers_total",
        "greetflow_sweeps_total",
        "greetflow_worker_ready",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert REGISTRY.get_sample_value("greetflow_published_total") is not None


def test_liveness_follows_the_consumer_loop() -> None:
    from pipeline.adapters.kafka import ConsumerWorker
    from pipeline.settings import Settings
    from schemas.events import RenderRequested

    worker = ConsumerWorker(
        Settings(),
        name="render@host:1",
        topic="render.requests",
        group_id="g",
        payload_type=RenderRequested,
        handler=lambda _env: None,
        bus=None,  # type: ignore[arg-type]  # never used: the loop is not started
    )
    assert worker.step == "render" and worker.is_live
    worker.last_poll = time.monotonic() - 121
    assert not worker.is_live


def test_endpoints_answer_and_report_liveness() -> None:
    import urllib.error
    import urllib.request

    from pipeline.metrics import MetricsServer

    live = {"ok": True}
    r = Readiness({"db": lambda _t: None}, timeout_s=0.5)
    r.probe_once()
    server = MetricsServer("127.0.0.1", 0, r, live=lambda: live["ok"]).start()

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return int(err.code)

    try:
        assert (status("/healthz"), status("/readyz"), status("/metrics"), status("/x")) == (
            200,
            200,
            200,
            404,
        )
        live["ok"] = False
        r.probes["db"] = lambda _t: (_ for _ in ()).throw(OSError("down"))
        r.probe_once()
        assert (status("/healthz"), status("/readyz")) == (503, 503)
    finally:
        server.stop()
        r.stop()
