"""The one place that decides permanent vs outage vs ordinary failure."""

from __future__ import annotations

import errno
import socket

import pytest
from kafka import errors as ke
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError, OperationalError
from urllib3.exceptions import MaxRetryError, NewConnectionError

from pipeline.errors import MessageTooLarge, PermanentError, classify, is_outage, is_permanent


class _M(BaseModel):
    n: int


def _validation_error() -> ValidationError:
    try:
        _M.model_validate({"n": "x"})
    except ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def _wrapped(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise RuntimeError("the service wraps it") from exc
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        PermanentError("no such template"),
        _validation_error(),
        Image.DecompressionBombError("too many pixels"),
        Image.DecompressionBombWarning("too many pixels"),
        UnidentifiedImageError("cannot identify image file"),
        MessageTooLarge("2 MB"),
        ke.MessageSizeTooLargeError("2 MB"),
        _wrapped(UnidentifiedImageError("cannot identify image file")),
    ],
)
def test_permanent(exc: BaseException) -> None:
    assert is_permanent(exc) and not is_outage(exc)


@pytest.mark.parametrize(
    "exc",
    [
        OperationalError("SELECT 1", {}, Exception("connection refused")),
        DBAPIError("SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        TimeoutError("timed out"),
        OSError(errno.EHOSTUNREACH, "no route to host"),
        socket.gaierror(-2, "Name or service not known"),
        MaxRetryError(None, "/bucket/key"),  # type: ignore[arg-type]
        NewConnectionError(None, "refused"),  # type: ignore[arg-type]
        ke.KafkaTimeoutError("no ack"),
        ke.NotLeaderForPartitionError(),
        _wrapped(ConnectionResetError(errno.ECONNRESET, "reset")),
    ],
)
def test_outage(exc: BaseException) -> None:
    assert is_outage(exc) and not is_permanent(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("ffmpeg exited with status 1"),
        FileNotFoundError(errno.ENOENT, "missing.png"),
        DBAPIError("INSERT", {}, Exception("unique violation")),
        ke.CommitFailedError(),
    ],
)
def test_neither(exc: BaseException) -> None:
    assert classify(exc) is None


def test_nearest_link_decides() -> None:
    try:
        try:
            raise ConnectionError("db down")
        except ConnectionError as exc:
            raise PermanentError("job row unreadable") from exc
    except PermanentError as outer:
        assert is_permanent(outer)
