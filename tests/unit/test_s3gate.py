"""The dev stack's S3 access gate, as pure logic: request -> S3 action, bucket policy ->
verdict for an anonymous client, presigned URL -> verified or not."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from minio import Minio

from pipeline.adapters.storage import public_read_policy
from pipeline.dev.s3gate import (
    Credentials,
    S3Gate,
    S3Request,
    anonymous_allowed,
    policy_verdict,
    s3_actions,
    verify_presigned,
)

CREDS = Credentials("greetflow", "greetflow-secret", "us-east-1")
SIGNED_AT = datetime(2026, 12, 2, 8, 0, 0, tzinfo=UTC)


def req(method: str, path: str, query: dict[str, str] | None = None, copy: str | None = None) -> S3Request:
    bucket, _, key = path.lstrip("/").partition("/")
    return S3Request(method, bucket, key, query or {}, copy)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/b", {"list-type": "2", "prefix": "x/"}, [("s3:ListBucket", "arn:aws:s3:::b")]),
        ("HEAD", "/b", {}, [("s3:ListBucket", "arn:aws:s3:::b")]),
        ("PUT", "/b", {}, [("s3:CreateBucket", "arn:aws:s3:::b")]),
        ("PUT", "/b", {"policy": ""}, [("s3:PutBucketPolicy", "arn:aws:s3:::b")]),
        ("GET", "/b", {"versions": ""}, [("s3:ListBucketVersions", "arn:aws:s3:::b")]),
        ("GET", "/b/k/1.mp4", {"partNumber": "1"}, [("s3:GetObject", "arn:aws:s3:::b/k/1.mp4")]),
        ("HEAD", "/b/k", {}, [("s3:GetObject", "arn:aws:s3:::b/k")]),
        ("GET", "/b/k", {"versionId": "v1"}, [("s3:GetObjectVersion", "arn:aws:s3:::b/k")]),
        ("PUT", "/b/k", {}, [("s3:PutObject", "arn:aws:s3:::b/k")]),
        ("PUT", "/b/k", {"uploadId": "u", "partNumber": "1"}, [("s3:PutObject", "arn:aws:s3:::b/k")]),
        ("POST", "/b/k", {"uploads": ""}, [("s3:PutObject", "arn:aws:s3:::b/k")]),
        ("DELETE", "/b/k", {}, [("s3:DeleteObject", "arn:aws:s3:::b/k")]),
        ("GET", "/b/k", {"acl": "", "x-id": "GetObjectAcl"}, [("s3:GetObjectAcl", "arn:aws:s3:::b/k")]),
    ],
)
def test_actions(method: str, path: str, query: dict[str, str], expected: list[tuple[str, str]]) -> None:
    assert s3_actions(req(method, path, query)) == expected


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", "/", {}),  # ListAllMyBuckets: no bucket policy grants it
        ("GET", "/b", {"list-type": "2", "surprise": ""}),
        ("GET", "/b/k", {"Signature": "x", "AWSAccessKeyId": "a", "Expires": "1"}),  # SigV2
        ("GET", "/b/k", {"acl": "", "tagging": ""}),
        ("POST", "/b", {"delete": ""}),
        ("POST", "/b", {}),  # browser form upload
        ("PATCH", "/b/k", {}),
        ("GET", "/b/k", {"torrent": ""}),
        ("GET", "/b/k", {"response-content-type": "text/html"}),  # S3 refuses these anonymously
        ("GET", "/b%2Fx/k", {}),
        ("GET", "/.b/k", {}),
    ],
)
def test_unknown_requests_have_no_action(method: str, path: str, query: dict[str, str]) -> None:
    assert s3_actions(req(method, path, query)) is None


def test_copy_needs_read_on_the_source() -> None:
    assert s3_actions(req("PUT", "/dst/k", copy="/src/a%2Fb.txt")) == [
        ("s3:PutObject", "arn:aws:s3:::dst/k"),
        ("s3:GetObject", "arn:aws:s3:::src/a/b.txt"),
    ]
    assert s3_actions(req("PUT", "/dst/k", copy="nokey")) is None


def statement(**fields: Any) -> dict[str, Any]:
    """A public GetObject statement with ``fields`` replaced (None removes one)."""
    base = {"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/*"}
    return {k: v for k, v in (base | fields).items() if v is not None}


@pytest.mark.parametrize(
    ("statements", "action", "resource", "verdict"),
    [
        ([statement()], "s3:GetObject", "arn:aws:s3:::b/k", "allow"),
        ([statement(Principal={"AWS": "*"})], "s3:GetObject", "arn:aws:s3:::b/k", "allow"),
        (
            [statement(Principal={"AWS": ["arn:aws:iam::1:root", "*"]})],
            "s3:GetObject",
            "arn:aws:s3:::b/k",
            "allow",
        ),
        ([statement(Principal={"AWS": "arn:aws:iam::1:root"})], "s3:GetObject", "arn:aws:s3:::b/k", "none"),
        (
            [statement(Principal={"Service": "cloudfront.amazonaws.com"})],
            "s3:GetObject",
            "arn:aws:s3:::b/k",
            "none",
        ),
        ([statement()], "s3:PutObject", "arn:aws:s3:::b/k", "none"),
        ([statement()], "s3:ListBucket", "arn:aws:s3:::b", "none"),
        ([statement()], "s3:GetObject", "arn:aws:s3:::other/k", "none"),
        ([statement(Action="s3:*")], "s3:putobject", "arn:aws:s3:::b/k", "allow"),  # actions: any case
        ([statement(Resource="arn:aws:s3:::B/*")], "s3:GetObject", "arn:aws:s3:::b/k", "none"),  # ARNs: exact
        (
            [statement(Resource="arn:aws:s3:::b.x/*")],
            "s3:GetObject",
            "arn:aws:s3:::bzx/k",
            "none",
        ),  # no regex
        ([statement(Resource="arn:aws:s3:::b/?")], "s3:GetObject", "arn:aws:s3:::b/k", "allow"),
        ([statement(Action=None, NotAction="s3:Delete*")], "s3:PutObject", "arn:aws:s3:::b/k", "allow"),
        ([statement(Action=None, NotAction="s3:Delete*")], "s3:DeleteObject", "arn:aws:s3:::b/k", "none"),
        ([statement(), statement(Effect="Deny")], "s3:GetObject", "arn:aws:s3:::b/k", "deny"),
        (
            [statement(Condition={"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}})],
            "s3:GetObject",
            "arn:aws:s3:::b/k",
            "none",
        ),
        (
            [statement(), statement(Effect="Deny", Condition={"Bool": {"aws:SecureTransport": "false"}})],
            "s3:GetObject",
            "arn:aws:s3:::b/k",
            "deny",
        ),
        (
            [
                statement(),
                statement(Effect="Deny", Principal=None, NotPrincipal={"AWS": "arn:aws:iam::1:root"}),
            ],
            "s3:GetObject",
            "arn:aws:s3:::b/k",
            "deny",
        ),
    ],
)
def test_policy_verdict(statements: list[dict[str, Any]], action: str, resource: str, verdict: str) -> None:
    assert policy_verdict({"Version": "2012-10-17", "Statement": statements}, action, resource) == verdict


class FakeAcl:
    def __init__(self, public_read: bool) -> None:
        self.public_read = public_read


class FakeKey:
    def __init__(self, public_read: bool) -> None:
        self.acl = FakeAcl(public_read)


class FakeBucket:
    def __init__(self, policy: dict[str, Any] | bytes | None, keys: dict[str, FakeKey] | None = None) -> None:
        self.policy = json.dumps(policy).encode() if isinstance(policy, dict) else policy
        self.keys = keys or {}


def test_anonymous_allowed_with_the_public_read_policy() -> None:
    buckets = {"dist": FakeBucket(public_read_policy("dist")), "assets": FakeBucket(None)}
    lookup = buckets.get
    assert anonymous_allowed(req("GET", "/dist/c/1.mp4"), lookup)
    assert anonymous_allowed(req("HEAD", "/dist/c/1.mp4"), lookup)
    assert not anonymous_allowed(req("GET", "/dist", {"list-type": "2"}), lookup)
    assert not anonymous_allowed(req("PUT", "/dist/c/1.mp4"), lookup)
    assert not anonymous_allowed(req("GET", "/assets/evidence.mp4"), lookup)
    assert not anonymous_allowed(req("GET", "/missing/k"), lookup)
    # A copy into the public bucket out of a private one needs both.
    assert not anonymous_allowed(req("PUT", "/dist/x", copy="/assets/evidence.mp4"), lookup)


def test_object_acl_and_broken_policies() -> None:
    public_key = {"k": FakeKey(public_read=True), "p": FakeKey(public_read=False)}
    assert anonymous_allowed(req("GET", "/b/k"), {"b": FakeBucket(None, public_key)}.get)
    assert not anonymous_allowed(req("GET", "/b/p"), {"b": FakeBucket(None, public_key)}.get)
    deny_all = {"Statement": [statement(Effect="Deny", Action="s3:*", Resource="*")]}
    assert not anonymous_allowed(req("GET", "/b/k"), {"b": FakeBucket(deny_all, public_key)}.get)
    assert not anonymous_allowed(req("GET", "/b/k"), {"b": FakeBucket(b"{not json", public_key)}.get)


def presigned_environ(url: str, method: str = "GET") -> dict[str, Any]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return {"REQUEST_METHOD": method, "RAW_URI": target, "HTTP_HOST": parts.netloc}


def presign(key: str = "k/1.mp4", expires_s: int = 600, creds: Credentials = CREDS) -> str:
    client = Minio("127.0.0.1:9", access_key=creds.access_key, secret_key=creds.secret_key,
                   secure=False, region=creds.region)  # fmt: skip
    return str(
        client.presigned_get_object(
            "bucket", key, expires=timedelta(seconds=expires_s), request_date=SIGNED_AT
        )
    )


def test_presigned_url_verified() -> None:
    url = presign()
    now = SIGNED_AT + timedelta(seconds=30)
    assert verify_presigned(presigned_environ(url), CREDS, now) is None
    sig = url.split("X-Amz-Signature=")[1]
    assert verify_presigned(presigned_environ(url.replace(sig, "0" * 64)), CREDS, now) == (
        "SignatureDoesNotMatch",
        "the request signature does not match",
    )
    tampered = [
        url.replace("/bucket/k/1.mp4", "/bucket/k/2.mp4"),
        url.replace("X-Amz-Expires=600", "X-Amz-Expires=6000"),
        url.replace("127.0.0.1:9", "127.0.0.1:10"),
        url + "&response-content-type=text/html",
    ]
    for u in tampered:
        assert verify_presigned(presigned_environ(u), CREDS, now) is not None, u
    assert verify_presigned(presigned_environ(url, method="PUT"), CREDS, now) is not None
    other = Credentials("greetflow", "other-secret", "us-east-1")
    assert verify_presigned(presigned_environ(url), other, now) is not None


def test_presigned_url_expiry() -> None:
    url = presign(expires_s=60)
    env = presigned_environ(url)
    assert verify_presigned(env, CREDS, SIGNED_AT + timedelta(seconds=60)) is None
    assert verify_presigned(env, CREDS, SIGNED_AT + timedelta(seconds=61)) == (
        "AccessDenied",
        "Request has expired",
    )
    early = verify_presigned(env, CREDS, SIGNED_AT - timedelta(hours=1))
    assert early == ("AccessDenied", "Request is not valid yet")


def test_presigned_url_malformed() -> None:
    url = presign()
    now = SIGNED_AT
    for u in (
        url.replace("X-Amz-Algorithm=AWS4-HMAC-SHA256", "X-Amz-Algorithm=AWS4-HMAC-SHA512"),
        url.replace("&X-Amz-Date=", "&X-Amz-Date=junk&X-Amz-Date="),
        url.replace("X-Amz-Expires=600", "X-Amz-Expires=999999999"),
        url.split("&X-Amz-Signature=")[0],
        url.replace("greetflow%2F", "intruder%2F"),
    ):
        result = verify_presigned(presigned_environ(u), CREDS, now)
        assert result is not None and result[0] in (
            "AuthorizationQueryParametersError",
            "InvalidAccessKeyId",
        ), (u, result)


def gate_status(target: str, method: str = "GET", host: str = "127.0.0.1:9000", **headers: str) -> int:
    """The status the gate answers with (200: passed on to the app behind it)."""
    buckets = {"dist": FakeBucket(public_read_policy("dist")), "assets": FakeBucket(None)}
    statuses: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"moto"]

    gate = S3Gate(app, CREDS, s3_only=lambda environ: True, bucket_lookup=buckets.get)
    environ = {"REQUEST_METHOD": method, "RAW_URI": target, "HTTP_HOST": host} | {
        "HTTP_" + k.upper(): v for k, v in headers.items()
    }
    body = b"".join(gate(environ, lambda status, _headers: statuses.append(status)))
    assert (body == b"moto") == statuses[0].startswith("200")
    return int(statuses[0].split()[0])


def test_gate_parses_targets_as_moto_does() -> None:
    assert gate_status("/dist/a/b.mp4") == 200
    assert gate_status("/dist/a/b.mp4", method="HEAD") == 200
    assert gate_status("/dist/a/b.mp4", method="OPTIONS") == 200  # CORS preflight
    assert gate_status("/dist/a/b.mp4", authorization="AWS4-HMAC-SHA256 Credential=x") == 200
    for target in (
        "/dist/a/b.mp4?response-content-type=text/html",
        "//dist/a/b.mp4",
        "/dist%2Fa/b.mp4",
        "http://127.0.0.1:9000/dist/a/b.mp4",
        "/dist",
        "/dist?list-type=2",
        "/",
        "/assets/consent-evidence/x.mp4",
        "/dist/a/b.mp4?X-Amz-Credential=greetflow",
    ):
        assert gate_status(target) == 403, target
    assert gate_status("/dist/a/b.mp4", method="PUT") == 403
    assert gate_status("/dist/a/b.mp4", method="DELETE") == 403
    # Virtual-hosted addressing (bucket in the Host header) is refused to anonymous clients.
    assert gate_status("/a/b.mp4", host="dist.example.com") == 403
    assert gate_status("/dist/a/b.mp4", host="localhost:9000") == 200
