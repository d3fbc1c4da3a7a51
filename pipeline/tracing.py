"""Traces: the envelope's trace id as a W3C `traceparent` Kafka header, and one
OpenTelemetry span per step whose trace id is the envelope's.

Export is off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`, or
any exporter registered under the `opentelemetry_traces_exporter` entry point group;
several separated by commas). `otlp` speaks http/protobuf unless
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` say `grpc`; the
exporter itself reads `OTEL_EXPORTER_OTLP_ENDPOINT` and the other standard variables.
Without export the spans are non-recording, and the headers still carry the trace id.

An envelope trace id that is not 32 hex digits (an app may send its own) is mapped to
one by hashing, so the header and the span always carry a valid W3C trace id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACER = "greetflow"


def w3c_trace_id(trace_id: str) -> str:
    """The envelope's trace id when it is a valid W3C one (32 lowercase hex, not all zero);
    otherwise the first 32 hex digits of its SHA-256."""
    tid = trace_id.strip().lower().replace("-", "")
    if _HEX32.match(tid) and int(tid, 16) != 0:
        return tid
    return hashlib.sha256(trace_id.encode()).hexdigest()[:32]


def _span_id() -> str:
    while True:
        sid = secrets.token_hex(8)
        if int(sid, 16):
            return sid


def traceparent(trace_id: str, span_id: str | None = None) -> str:
    """`00-<trace id>-<span id>-01`. The span id: `span_id`, else the current span's when it
    belongs to this trace, else a fresh one."""
    tid = w3c_trace_id(trace_id)
    if span_id is None:
        ctx = trace.get_current_span().get_span_context()
        same_trace = ctx.is_valid and f"{ctx.trace_id:032x}" == tid
        span_id = f"{ctx.span_id:016x}" if same_trace else _span_id()
    return f"00-{tid}-{span_id}-01"


def parse_traceparent(value: str | bytes | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a W3C traceparent; None when absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _TRACEPARENT.match(value.strip())
    if m is None:
        return None
    version, tid, sid, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or int(tid, 16) == 0 or int(sid, 16) == 0:
        return None
    return tid, sid


def header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> bytes | None:
    """The last value of a Kafka header (names compared case-insensitively)."""
    found = None
    for k, v in headers or ():
        if k.lower() == name:
            found = v
    return found


def headers_for(trace_id: str) -> list[tuple[str, bytes]]:
    """The Kafka headers a produced envelope carries."""
    return [(TRACEPARENT, traceparent(trace_id).encode())]


@contextmanager
def step_span(
    step: str,
    *,
    trace_id: str,
    parent: str | bytes | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """The span of one step on one message, current while the body runs: its trace id is the
    envelope's; its parent the producer's span named in `parent` (a traceparent) when that
    belongs to the same trace."""
    tid = w3c_trace_id(trace_id)
    parsed = parse_traceparent(parent)
    parent_sid = parsed[1] if parsed is not None and parsed[0] == tid else _span_id()
    remote = SpanContext(
        trace_id=int(tid, 16),
        span_id=int(parent_sid, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    ctx = trace.set_span_in_context(NonRecordingSpan(remote))
    tracer = trace.get_tracer(_TRACER)
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer.start_as_current_span(step, context=ctx, kind=SpanKind.CONSUMER, attributes=attrs) as span:
        yield span


def _exporter(name: str) -> Any:
    if name == "otlp":
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
    if not found:
        known = sorted({e.name for e in entry_points(group="opentelemetry_traces_exporter")} | {"otlp"})
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} is installed (known: {', '.join(known)})"
        )
    return found[0].load()()


def setup_tracing(service_name: str, *, environ: Mapping[str, str] | None = None) -> Any | None:
    """Install a TracerProvider exporting to what `OTEL_TRACES_EXPORTER` names (batched);
    None, and nothing installed, when it is unset or `none`. Returns the provider (call its
    `shutdown()` on exit to flush)."""
    env = os.environ if environ is None else environ
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names:
        return None
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    log.info("tracing: exporting spans with %s", ", ".join(names))
    return provider
