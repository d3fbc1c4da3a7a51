"""Error classes that decide what a worker does with a failing message."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Literal


class GreetflowError(Exception):
    """Base of our own errors."""


class PermanentError(GreetflowError):
    """Retrying cannot help (bad input, a missing template, a font without the glyphs):
    the message goes straight to the DLQ and the job is marked failed."""


class ConfigError(GreetflowError):
    """The settings or the environment are wrong; the message says what to change."""


class WorkerOutage(GreetflowError):
    """A service the worker needs (database, broker, object store) stayed unreachable past
    ``outage_max_wait_s``. The worker stops without committing; its supervisor restarts it
    and the message is redelivered."""


class MessageTooLarge(PermanentError):
    """A record is larger than the producer may send (``kafka_max_request_bytes``) or than
    the broker accepts (``message.max.bytes``)."""


# --------------------------------------------------------------------------- classification
#
# A failing message is either at fault itself (permanent: dead-letter it at once), or the
# worker is cut off from a service it needs (outage: keep the message and wait), or neither
# (retry it a few times, then dead-letter it). Services wrap the errors of the libraries
# they call, so the whole __cause__ / __context__ chain is examined; the link nearest to
# the raised exception that is either permanent or an outage decides.

_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.ENETRESET,
        errno.ETIMEDOUT,
        errno.EPIPE,
    }
)
_S3_TRANSIENT_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"}
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        link = todo.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        todo.extend(e for e in (link.__cause__, link.__context__) if e is not None)


def _permanent_link(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, PermanentError | ValidationError) or is_too_large(exc):
        return True
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return False
    undecodable = Image.DecompressionBombError | Image.DecompressionBombWarning | UnidentifiedImageError
    return isinstance(exc, undecodable)


def _outage_link(exc: BaseException) -> bool:
    import socket

    if isinstance(exc, TimeoutError | ConnectionError | socket.gaierror):
        return True
    if isinstance(exc, OSError) and exc.errno in _CONNECTION_ERRNOS:
        return True
    from sqlalchemy import exc as sa

    if isinstance(exc, sa.OperationalError | sa.InterfaceError | sa.DisconnectionError | sa.TimeoutError):
        return True
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    from urllib3 import exceptions as u3

    if isinstance(exc, u3.MaxRetryError | u3.ProtocolError | u3.NewConnectionError | u3.TimeoutError):
        return True
    from kafka import errors as ke

    if isinstance(exc, ke.KafkaTimeoutError | ke.KafkaConnectionError):
        return True
    if isinstance(exc, ke.KafkaError) and bool(getattr(exc, "retriable", False)):
        return True
    from minio.error import S3Error, ServerError

    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, S3Error):
        status = int(getattr(exc.response, "status", 0) or 0)
        return status >= 500 or exc.code in _S3_TRANSIENT_CODES
    return _botocore_outage(exc)


def _botocore_outage(exc: BaseException) -> bool:
    try:
        from botocore import exceptions as bc
    except ImportError:  # botocore only comes with the dev tools (moto)
        return False
    if isinstance(exc, bc.ConnectionError | bc.HTTPClientError):
        return True
    if isinstance(exc, bc.ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or exc.response.get("Error", {}).get("Code") in _S3_TRANSIENT_CODES
    return False


def is_too_large(exc: BaseException) -> bool:
    """The record itself is too large for the producer or the broker."""
    from kafka import errors as ke

    return any(
        isinstance(link, MessageTooLarge | ke.MessageSizeTooLargeError | ke.RecordListTooLargeError)
        for link in _chain(exc)
    )


def classify(exc: BaseException) -> Literal["permanent", "outage"] | None:
    for link in _chain(exc):
        if _permanent_link(link):
            return "permanent"
        if _outage_link(link):
            return "outage"
    return None


def is_permanent(exc: BaseException) -> bool:
    """No retry can cure it (invalid input, an undecodable or oversized image, a record too
    large for the broker): the message is dead-lettered at once."""
    return classify(exc) == "permanent"


def is_outage(exc: BaseException) -> bool:
    """A service is unreachable or failing (connection refused, timeout, 5xx): the fault
    is the worker's surroundings, not the message, so it is waited out, never dead-lettered."""
    return classify(exc) == "outage"
