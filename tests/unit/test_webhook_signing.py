"""The webhook signature helper receivers use: it accepts exactly what Greetflow signs."""

from __future__ import annotations

import ast
import hashlib
import hmac
from pathlib import Path

from pipeline.webhooks import signing
from pipeline.webhooks.signing import signature_header, verify_signature

BODY = b'{"id":"e1","type":"job.published"}'
NOW = 1_800_000_000


def test_signature_is_hmac_of_timestamp_dot_body() -> None:
    header = signature_header(["s3cret"], BODY, timestamp=NOW)
    expected = hmac.new(b"s3cret", f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={NOW},v1={expected}"
    assert verify_signature("s3cret", header, BODY, 300, now=NOW + 10)


def test_wrong_secret_body_or_stale_timestamp_fails() -> None:
    header = signature_header(["s3cret"], BODY, timestamp=NOW)
    assert not verify_signature("other", header, BODY, 300, now=NOW)
    assert not verify_signature("s3cret", header, BODY + b" ", 300, now=NOW)
    assert not verify_signature("s3cret", header, BODY, 300, now=NOW + 301)
    assert not verify_signature("s3cret", header, BODY, 300, now=NOW - 301)
    # A replayed signature with a fresh timestamp does not verify: t is signed.
    forged = header.replace(f"t={NOW}", f"t={NOW + 1000}")
    assert not verify_signature("s3cret", forged, BODY, 300, now=NOW + 1000)


def test_two_signatures_during_rotation_each_verify() -> None:
    header = signature_header(["new", "old"], BODY, timestamp=NOW)
    assert header.count("v1=") == 2
    assert verify_signature("new", header, BODY, 300, now=NOW)
    assert verify_signature("old", header, BODY, 300, now=NOW)
    assert not verify_signature("third", header, BODY, 300, now=NOW)


def test_malformed_headers_are_refused_not_raised() -> None:
    for header in (
        "",
        "v1=abc",
        "t=abc,v1=00",
        f"t={NOW}",
        f"t={NOW},t={NOW},v1=00",
        "garbage",
        f"t={NOW},v1",
    ):
        assert not verify_signature("s3cret", header, BODY, 300, now=NOW)
    assert not verify_signature("", signature_header(["x"], BODY, timestamp=NOW), BODY, 300, now=NOW)


def test_helper_needs_only_the_standard_library() -> None:
    tree = ast.parse(Path(signing.__file__).read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module or "")
    assert all(
        m.split(".")[0] in {"__future__", "hashlib", "hmac", "time", "collections"} for m in modules
    ), modules
