"""Logging: one JSON object per line for machines, today's one-line format for people.

`GREETFLOW_LOG_FORMAT` (setting `log_format`): `json`, `console`, or `auto` (console on
a terminal, JSON otherwise). JSON lines carry `timestamp`, `level`, `logger`, `message`,
the context bound for the message or step being worked on (`job_id`, `campaign_id`,
`trace_id`, `worker`, `step`; see `bind`), and `exception` when there is one. The
context lives in contextvars (structlog's), so it follows the code that runs for one
message, and a thread started for it with `contextvars.copy_context()`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_FORMATS = ("auto", "json", "console")
CONTEXT_FIELDS = ("job_id", "campaign_id", "trace_id", "worker", "step")


def _drop_terminal_only(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    event.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
    return event


def json_formatter() -> logging.Formatter:
    """A stdlib formatter that writes each record as one JSON object (structlog)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.add_log_level,
            structlog.stdlib.ExtraAdder(),
            _drop_terminal_only,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(ensure_ascii=False, default=str),
        ],
    )


def resolve_format(fmt: str | None, stream: TextIO | None = None) -> str:
    """`json` or `console`: `auto` (and an unknown value) picks console on a TTY."""
    value = (fmt or "auto").strip().lower()
    if value in ("json", "console"):
        return value
    out = stream or sys.stderr
    isatty = getattr(out, "isatty", None)
    return "console" if callable(isatty) and isatty() else "json"


def setup_logging(level: str | None = None, fmt: str | None = None, *, stream: TextIO | None = None) -> None:
    """Configure the root logger once (like `logging.basicConfig`: a root logger that already
    has handlers only gets the level)."""
    raw_fmt = fmt or os.environ.get("GREETFLOW_LOG_FORMAT", "auto")
    handler = logging.StreamHandler(stream)
    if resolve_format(raw_fmt, stream) == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter(CONSOLE_FORMAT))
    logging.basicConfig(
        level=(level or os.environ.get("GREETFLOW_LOG_LEVEL", "INFO")).upper(), handlers=[handler]
    )
    if raw_fmt.strip().lower() not in LOG_FORMATS:
        logging.getLogger(__name__).warning(
            "GREETFLOW_LOG_FORMAT=%r is not one of %s; using auto", raw_fmt, ", ".join(LOG_FORMATS)
        )
    for noisy in ("kafka", "urllib3", "botocore", "werkzeug", "moto", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python 3's IO thread warns whenever one of its steps takes > 0.1 s. In a worker
    # that renders or decodes video in the same process that is GIL contention, not a stuck
    # coroutine, and it fires on every busy minute; the consumer's own errors still show.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Bind log context fields (None values are left out) for the body, restoring the
    previous values afterwards."""
    values = {k: str(v) for k, v in fields.items() if v is not None}
    with structlog.contextvars.bound_contextvars(**values):
        yield


def bound() -> dict[str, Any]:
    """The log context fields bound now."""
    return dict(structlog.contextvars.get_contextvars())
