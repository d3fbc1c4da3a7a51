"""moto's S3 server behind an access gate, for the embedded dev stack.

moto checks an anonymous client only on requests for an existing object; listings,
bucket creation, policy writes and new keys go through, and it never verifies a presigned
URL. This module serves moto's WSGI application in-process (as ``python -m moto.server``
does) behind :class:`S3Gate`, which makes anonymous access behave as on S3 and MinIO:

* an unsigned request (no ``Authorization`` header, no ``X-Amz-Signature`` or
  ``X-Amz-Credential`` query parameter) is served only when the bucket policy has an
  ``Allow`` for ``Principal: "*"`` covering the request's S3 action and resource (or, for
  ``s3:GetObject``, the object's ACL is public-read), and no ``Deny`` for it. Anything the
  gate cannot map to an S3 action (moto's own ``/moto-api``, other AWS services, SigV2,
  virtual-hosted addressing, browser POST uploads, unknown sub-resources) is refused;
* a presigned (query-string SigV4) request is served only when its signature, computed
  with botocore's signer and the stack's credentials, matches and it has not expired;
* a request with an ``Authorization`` header is passed through unchanged. moto accepts any
  credentials there, so a client that sends one is trusted: the embedded stack is for
  loopback development, never a shared network.

Run as ``python -m pipeline.dev.s3gate -H HOST -p PORT --credentials-file FILE``; the
file (JSON: access_key, secret_key, region) is read and deleted at start-up.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote
from xml.sax.saxutils import escape

__all__ = [
    "Credentials",
    "S3Gate",
    "S3Request",
    "anonymous_allowed",
    "main",
    "policy_allows_anonymous",
    "policy_verdict",
    "s3_actions",
    "verify_presigned",
    "write_credentials",
]

log = logging.getLogger("greetflow.s3gate")

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
Verdict = Literal["allow", "deny", "none"]

# SigV4 query-string URLs are valid for at most seven days; a clock may be this far ahead.
MAX_PRESIGN_EXPIRES_S = 7 * 86_400
CLOCK_SKEW_S = 15 * 60
_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    region: str


@dataclass(frozen=True)
class S3Request:
    """What the gate needs to know about a request: path-style bucket and key (decoded),
    the query parameters and the headers that change the action."""

    method: str
    bucket: str
    key: str
    query: Mapping[str, str]
    copy_source: str | None = None


# --------------------------------------------------------------------------- actions

# Query parameters that only shape the answer of the action they come with.
_LIST_PARAMS = frozenset(
    {
        "list-type",
        "prefix",
        "delimiter",
        "max-keys",
        "marker",
        "continuation-token",
        "start-after",
        "fetch-owner",
        "encoding-type",
    }
)
# No response-* overrides: S3 refuses them on anonymous requests (they would let anyone serve
# a public object as text/html from the bucket's origin).
_GET_PARAMS = frozenset({"partNumber"})
# botocore adds the operation name to some URLs.
_ALWAYS_OK = frozenset({"x-id"})

# (method, sub-resource) -> action, on a bucket.
_BUCKET_ACTIONS: dict[tuple[str, str], str] = {
    ("GET", ""): "s3:ListBucket",
    ("HEAD", ""): "s3:ListBucket",
    ("PUT", ""): "s3:CreateBucket",
    ("DELETE", ""): "s3:DeleteBucket",
    ("GET", "policy"): "s3:GetBucketPolicy",
    ("PUT", "policy"): "s3:PutBucketPolicy",
    ("DELETE", "policy"): "s3:DeleteBucketPolicy",
    ("GET", "policyStatus"): "s3:GetBucketPolicyStatus",
    ("GET", "acl"): "s3:GetBucketAcl",
    ("PUT", "acl"): "s3:PutBucketAcl",
    ("GET", "location"): "s3:GetBucketLocation",
    ("GET", "versioning"): "s3:GetBucketVersioning",
    ("PUT", "versioning"): "s3:PutBucketVersioning",
    ("GET", "versions"): "s3:ListBucketVersions",
    ("GET", "uploads"): "s3:ListBucketMultipartUploads",
    ("GET", "cors"): "s3:GetBucketCORS",
    ("PUT", "cors"): "s3:PutBucketCORS",
    ("DELETE", "cors"): "s3:PutBucketCORS",
    ("GET", "lifecycle"): "s3:GetLifecycleConfiguration",
    ("PUT", "lifecycle"): "s3:PutLifecycleConfiguration",
    ("DELETE", "lifecycle"): "s3:PutLifecycleConfiguration",
    ("GET", "tagging"): "s3:GetBucketTagging",
    ("PUT", "tagging"): "s3:PutBucketTagging",
    ("DELETE", "tagging"): "s3:PutBucketTagging",
    ("GET", "notification"): "s3:GetBucketNotification",
    ("PUT", "notification"): "s3:PutBucketNotification",
    ("GET", "encryption"): "s3:GetEncryptionConfiguration",
    ("PUT", "encryption"): "s3:PutEncryptionConfiguration",
    ("GET", "object-lock"): "s3:GetBucketObjectLockConfiguration",
    ("PUT", "object-lock"): "s3:PutBucketObjectLockConfiguration",
    ("GET", "publicAccessBlock"): "s3:GetBucketPublicAccessBlock",
    ("PUT", "publicAccessBlock"): "s3:PutBucketPublicAccessBlock",
    ("DELETE", "publicAccessBlock"): "s3:PutBucketPublicAccessBlock",
    ("GET", "ownershipControls"): "s3:GetBucketOwnershipControls",
    ("PUT", "ownershipControls"): "s3:PutBucketOwnershipControls",
    ("GET", "website"): "s3:GetBucketWebsite",
    ("PUT", "website"): "s3:PutBucketWebsite",
    ("DELETE", "website"): "s3:DeleteBucketWebsite",
    ("GET", "logging"): "s3:GetBucketLogging",
    ("PUT", "logging"): "s3:PutBucketLogging",
}
# Extra parameters each bucket action accepts besides its sub-resource.
_BUCKET_PARAMS: dict[str, frozenset[str]] = {
    "s3:ListBucket": _LIST_PARAMS,
    "s3:ListBucketVersions": frozenset(
        {"prefix", "delimiter", "max-keys", "key-marker", "version-id-marker", "encoding-type"}
    ),
    "s3:ListBucketMultipartUploads": frozenset(
        {"prefix", "delimiter", "max-uploads", "key-marker", "upload-id-marker", "encoding-type"}
    ),
}

# (method, sub-resource) -> action, on an object; "" is the object itself.
_OBJECT_ACTIONS: dict[tuple[str, str], str] = {
    ("GET", ""): "s3:GetObject",
    ("HEAD", ""): "s3:GetObject",
    ("PUT", ""): "s3:PutObject",
    ("DELETE", ""): "s3:DeleteObject",
    ("GET", "acl"): "s3:GetObjectAcl",
    ("PUT", "acl"): "s3:PutObjectAcl",
    ("GET", "tagging"): "s3:GetObjectTagging",
    ("PUT", "tagging"): "s3:PutObjectTagging",
    ("DELETE", "tagging"): "s3:DeleteObjectTagging",
    ("GET", "attributes"): "s3:GetObjectAttributes",
    ("GET", "retention"): "s3:GetObjectRetention",
    ("PUT", "retention"): "s3:PutObjectRetention",
    ("GET", "legal-hold"): "s3:GetObjectLegalHold",
    ("PUT", "legal-hold"): "s3:PutObjectLegalHold",
    # Multipart uploads: create, upload a part, complete, abort, list parts.
    ("POST", "uploads"): "s3:PutObject",
    ("PUT", "uploadId"): "s3:PutObject",
    ("POST", "uploadId"): "s3:PutObject",
    ("DELETE", "uploadId"): "s3:AbortMultipartUpload",
    ("GET", "uploadId"): "s3:ListMultipartUploadParts",
}
_OBJECT_PARAMS: dict[tuple[str, str], frozenset[str]] = {
    ("GET", ""): _GET_PARAMS,
    ("HEAD", ""): frozenset({"partNumber"}),
    ("PUT", "uploadId"): frozenset({"partNumber"}),
    ("GET", "uploadId"): frozenset({"max-parts", "part-number-marker"}),
}
_VERSIONED = {
    "s3:GetObject": "s3:GetObjectVersion",
    "s3:DeleteObject": "s3:DeleteObjectVersion",
    "s3:GetObjectAcl": "s3:GetObjectVersionAcl",
    "s3:PutObjectAcl": "s3:PutObjectVersionAcl",
    "s3:GetObjectTagging": "s3:GetObjectVersionTagging",
    "s3:PutObjectTagging": "s3:PutObjectVersionTagging",
    "s3:DeleteObjectTagging": "s3:DeleteObjectVersionTagging",
}


# Wider than S3's rules (moto accepts legacy names), but never "/", "%" or a leading dot.
_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def _arn(bucket: str, key: str | None = None) -> str:
    return f"arn:aws:s3:::{bucket}" if key is None else f"arn:aws:s3:::{bucket}/{key}"


def _one_subresource(
    query: Mapping[str, str], table: Mapping[tuple[str, str], str], method: str
) -> str | None:
    """The request's sub-resource ("" for none), or None when it names more than one."""
    subs = [name for name in query if (method, name) in table and name]
    if len(subs) > 1:
        return None
    return subs[0] if subs else ""


def s3_actions(req: S3Request) -> list[tuple[str, str]] | None:
    """The (action, resource ARN) pairs a request needs, all of them; None when the gate
    does not know the request (it is then refused)."""
    if not _BUCKET_RE.fullmatch(req.bucket):
        # "" is ListAllMyBuckets, an account permission no bucket policy can grant.
        return None
    params = set(req.query) - _ALWAYS_OK
    if not req.key:
        sub = _one_subresource(req.query, _BUCKET_ACTIONS, req.method)
        if sub is None or (req.method, sub) not in _BUCKET_ACTIONS:
            return None
        action = _BUCKET_ACTIONS[(req.method, sub)]
        if params - {sub} - _BUCKET_PARAMS.get(action, frozenset()):
            return None
        return [(action, _arn(req.bucket))]

    sub = _one_subresource(req.query, _OBJECT_ACTIONS, req.method)
    if sub is None or (req.method, sub) not in _OBJECT_ACTIONS:
        return None
    action = _OBJECT_ACTIONS[(req.method, sub)]
    allowed = {sub} | _OBJECT_PARAMS.get((req.method, sub), frozenset())
    if "versionId" in params and action in _VERSIONED:
        action = _VERSIONED[action]
        allowed.add("versionId")
    if params - allowed:
        return None
    needed = [(action, _arn(req.bucket, req.key))]
    if req.copy_source is not None:
        if (req.method, sub) != ("PUT", ""):
            return None
        source = unquote(req.copy_source.split("?versionId=")[0]).lstrip("/")
        src_bucket, _, src_key = source.partition("/")
        if not src_bucket or not src_key:
            return None
        needed.append(("s3:GetObject", _arn(src_bucket, src_key)))
    return needed


# --------------------------------------------------------------------------- policies

# moto ships an evaluator (moto.iam.access_control.IAMPolicy), but it ignores Principal
# unless given one, fails on `"Principal": "*"` when given one, and turns wildcards into
# unescaped regular expressions; anonymous access needs all three right.


def _glob(pattern: str, value: str, *, ignore_case: bool) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL) is not None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _matches(statement: Mapping[str, Any], field: str, value: str, *, ignore_case: bool) -> bool:
    """Whether the statement's Action/Resource (or NotAction/NotResource) covers value."""
    if field in statement:
        return any(
            isinstance(p, str) and _glob(p, value, ignore_case=ignore_case)
            for p in _as_list(statement[field])
        )
    negated = "Not" + field
    if negated in statement:
        return not any(
            isinstance(p, str) and _glob(p, value, ignore_case=ignore_case)
            for p in _as_list(statement[negated])
        )
    return False


def _names_everyone(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, Mapping):
        return "*" in _as_list(principal.get("AWS"))
    return False


def policy_verdict(policy: Mapping[str, Any], action: str, resource: str) -> Verdict:
    """What a bucket policy says to an anonymous client doing ``action`` on ``resource``:
    "deny" when a Deny applies, else "allow" when an Allow does, else "none". A statement
    with a Condition cannot be evaluated here, so its Allow grants nothing and its Deny
    always applies."""
    verdict: Verdict = "none"
    for statement in _as_list(policy.get("Statement", [])):
        if not isinstance(statement, Mapping):
            continue
        effect = statement.get("Effect")
        if "NotPrincipal" in statement:
            applies = effect == "Deny"  # anonymous is not among the few it exempts
        else:
            applies = _names_everyone(statement.get("Principal"))
        if not applies:
            continue
        if not _matches(statement, "Action", action, ignore_case=True):
            continue
        if not _matches(statement, "Resource", resource, ignore_case=False):
            continue
        if effect == "Deny":
            return "deny"
        if effect == "Allow" and "Condition" not in statement:
            verdict = "allow"
    return verdict


def policy_allows_anonymous(policy: Mapping[str, Any], action: str, resource: str) -> bool:
    return policy_verdict(policy, action, resource) == "allow"


def _moto_bucket(name: str) -> Any | None:
    """The bucket in moto's in-process S3 backend, whichever account holds it."""
    from moto.s3.models import s3_backends

    found = s3_backends.bucket_accounts.get(name)
    if found is None:
        return None
    partition, account_id = found
    return s3_backends[account_id][partition].buckets.get(name)


def anonymous_allowed(req: S3Request, bucket_lookup: Callable[[str], Any | None] = _moto_bucket) -> bool:
    """Whether an unsigned request may go to moto: every action it needs is granted by the
    bucket policy or, for s3:GetObject, by a public-read object ACL the policy does not deny."""
    needed = s3_actions(req)
    if needed is None:
        return False
    for action, resource in needed:
        bucket = bucket_lookup(resource.removeprefix("arn:aws:s3:::").split("/", 1)[0])
        if bucket is None:
            return False
        policy = _bucket_policy(bucket)
        verdict = "none" if policy is None else policy_verdict(policy, action, resource)
        if verdict == "allow":
            continue
        if verdict == "none" and action == "s3:GetObject" and _object_public_read(bucket, resource):
            continue
        return False
    return True


def _bucket_policy(bucket: Any) -> dict[str, Any] | None:
    raw = getattr(bucket, "policy", None)
    if not raw:
        return None
    try:
        policy = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        policy = None
    if not isinstance(policy, dict):
        return {"Statement": [{"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"}]}
    return policy


def _object_public_read(bucket: Any, resource: str) -> bool:
    key_name = resource.split("/", 1)[1] if "/" in resource else ""
    keys = getattr(bucket, "keys", None)
    key = keys.get(key_name) if keys is not None else None
    acl = getattr(key, "acl", None)
    return bool(acl is not None and acl.public_read)


# --------------------------------------------------------------------------- presigned


def _environ_header(environ: Mapping[str, Any], name: str) -> str | None:
    lname = name.lower()
    if lname == "host":
        value = environ.get("HTTP_HOST")
    elif lname in ("content-type", "content-length"):
        value = environ.get(lname.upper().replace("-", "_")) or environ.get(
            "HTTP_" + lname.upper().replace("-", "_")
        )
    else:
        value = environ.get("HTTP_" + lname.upper().replace("-", "_"))
    return None if value is None else str(value)


def _raw_target(environ: Mapping[str, Any]) -> tuple[str, str]:
    """The request target as the client sent it: (path, query), still percent-encoded."""
    target = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or "")
    if not target:
        query = str(environ.get("QUERY_STRING", ""))
        return str(environ.get("PATH_INFO", "/")), query
    path, _, query = target.partition("?")
    return path, query


def verify_presigned(
    environ: Mapping[str, Any], creds: Credentials, now: datetime | None = None
) -> tuple[str, str] | None:
    """None when the presigned (query-string SigV4) request is genuine and current, else
    (S3 error code, message)."""
    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as BotoCredentials

    path, raw_query = _raw_target(environ)
    params: dict[str, list[str]] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        params.setdefault(name, []).append(value)

    def single(name: str) -> str | None:
        values = params.get(name, [])
        return values[0] if len(values) == 1 else None

    names = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Signature",
             "X-Amz-SignedHeaders")  # fmt: skip
    values = [single(name) or "" for name in names]
    if not all(values):
        return "AuthorizationQueryParametersError", "missing, empty or repeated X-Amz-* query parameters"
    algorithm, credential, amz_date, expires, signature, signed = values
    if algorithm != "AWS4-HMAC-SHA256":
        return "AuthorizationQueryParametersError", "only AWS4-HMAC-SHA256 is supported"
    scope = credential.split("/")
    if len(scope) != 5 or scope[3] != "s3" or scope[4] != "aws4_request" or scope[1] != amz_date[:8]:
        return "AuthorizationQueryParametersError", "malformed X-Amz-Credential"
    access_key, _, region = scope[0], scope[1], scope[2]
    if not hmac.compare_digest(access_key.encode(), creds.access_key.encode()):
        return "InvalidAccessKeyId", "the access key in the URL is not the stack's"
    try:
        signed_at = datetime.strptime(amz_date, _AMZ_DATE_FORMAT).replace(tzinfo=UTC)
        ttl = int(expires)
    except ValueError:
        return "AuthorizationQueryParametersError", "malformed X-Amz-Date or X-Amz-Expires"
    if not 1 <= ttl <= MAX_PRESIGN_EXPIRES_S:
        return "AuthorizationQueryParametersError", f"X-Amz-Expires must be 1..{MAX_PRESIGN_EXPIRES_S}"
    current = now or datetime.now(UTC)
    if current > signed_at + timedelta(seconds=ttl):
        return "AccessDenied", "Request has expired"
    if signed_at > current + timedelta(seconds=CLOCK_SKEW_S):
        return "AccessDenied", "Request is not valid yet"

    headers: dict[str, str] = {}
    for name in signed.split(";"):
        header = _environ_header(environ, name)
        if not name or header is None:
            return "SignatureDoesNotMatch", f"signed header {name!r} is missing"
        headers[name] = header
    if "host" not in headers:
        return "SignatureDoesNotMatch", "the host header must be signed"
    unsigned_query = "&".join(p for p in raw_query.split("&") if p.partition("=")[0] != "X-Amz-Signature")
    request = AWSRequest(
        method=str(environ.get("REQUEST_METHOD", "GET")),
        url=f"http://{headers['host']}{path}" + (f"?{unsigned_query}" if unsigned_query else ""),
        headers=headers,
    )
    request.context["timestamp"] = amz_date
    signer = S3SigV4QueryAuth(BotoCredentials(creds.access_key, creds.secret_key), "s3", region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        return "SignatureDoesNotMatch", "the request signature does not match"
    return None


# --------------------------------------------------------------------------- the gate


def _is_virtual_hosted(environ: Mapping[str, Any]) -> bool:
    from moto.s3.responses import S3Response

    @dataclass
    class _Probe:
        headers: dict[str, str]
        url: str

    host = str(environ.get("HTTP_HOST", ""))
    return bool(S3Response.subdomain_based_buckets(_Probe({"host": host}, f"http://{host}/")))


def _s3_request(environ: Mapping[str, Any]) -> S3Request:
    raw_path, raw_query = _raw_target(environ)
    # Split before decoding, as moto does: "/a%2Fb/k" names bucket "a%2Fb", not "a".
    # A target that is not "/bucket[/key]" (absolute-form, "//...") leaves no valid bucket.
    raw_bucket, _, raw_key = raw_path.removeprefix("/").partition("/")
    bucket = raw_bucket if raw_path.startswith("/") else ""
    key = unquote(raw_key.encode("latin-1", errors="replace").decode("utf-8", errors="replace"))
    query: dict[str, str] = {}
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        query.setdefault(name, value)
    return S3Request(
        method=str(environ.get("REQUEST_METHOD", "GET")).upper(),
        bucket=bucket,
        key=key,
        query=query,
        copy_source=environ.get("HTTP_X_AMZ_COPY_SOURCE"),
    )


class S3Gate:
    """WSGI middleware in front of moto's dispatcher (see the module docstring)."""

    def __init__(
        self,
        app: WSGIApp,
        creds: Credentials,
        *,
        s3_only: Callable[[dict[str, Any]], bool],
        bucket_lookup: Callable[[str], Any | None] = _moto_bucket,
    ) -> None:
        self.app = app
        self.creds = creds
        self._s3_only = s3_only
        self._bucket_lookup = bucket_lookup

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        refusal = self._refusal(environ)
        if refusal is None:
            return self.app(environ, start_response)
        code, message = refusal
        req = _s3_request(environ)
        resource = f"/{req.bucket}/{req.key}" if req.key else f"/{req.bucket}"
        log.warning("refused %s %s: %s (%s)", req.method, environ.get("RAW_URI", resource), code, message)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>greetflow-s3gate</RequestId></Error>"
        ).encode()
        headers = [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
        start_response("403 Forbidden", headers)
        return [b""] if req.method == "HEAD" else [body]

    def _refusal(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        if str(environ.get("HTTP_AUTHORIZATION", "")).strip():
            return None
        _, raw_query = _raw_target(environ)
        names = {name for name, _ in parse_qsl(raw_query, keep_blank_values=True)}
        if names & {"X-Amz-Signature", "X-Amz-Credential"}:
            return verify_presigned(environ, self.creds)
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        if method == "OPTIONS":
            return None  # a CORS preflight never carries credentials; moto answers from the CORS rules
        if not self._s3_only(environ) or _is_virtual_hosted(environ):
            return "AccessDenied", "Access Denied"
        if not anonymous_allowed(_s3_request(environ), self._bucket_lookup):
            return "AccessDenied", "Access Denied"
        return None


def _moto_app() -> tuple[WSGIApp, Callable[[dict[str, Any]], bool]]:
    """moto's server application, and a test of whether it sends a request to S3."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    dispatcher = DomainDispatcherApplication(create_backend_app)

    def s3_only(environ: dict[str, Any]) -> bool:
        path = str(environ.get("PATH_INFO", ""))
        if path.startswith(("/moto-api", "/latest/")) or path == "/favicon.ico":
            return False
        try:
            host = dispatcher.infer_service_region_host(environ, path) or "s3.us-east-1.amazonaws.com"
            return bool(dispatcher.get_backend_for_host(host) == "s3")
        except Exception:  # a request moto cannot place is no S3 request
            log.debug("cannot tell which moto backend serves %s", path, exc_info=True)
            return False

    return dispatcher, s3_only


def _read_credentials(path: Path) -> Credentials:
    try:
        data = json.loads(path.read_text())
        creds = Credentials(str(data["access_key"]), str(data["secret_key"]), str(data["region"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: cannot read the S3 credentials file {path}: {exc}") from exc
    path.unlink(missing_ok=True)
    return creds


def write_credentials(path: Path, access_key: str, secret_key: str, region: str) -> Path:
    """Write the file ``main`` reads: owner-only, as it holds the secret key, and created
    afresh (a file or link left at ``path`` is replaced, never written through)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"access_key": access_key, "secret_key": secret_key, "region": region}, fh)
    return path


def _exit(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dev.s3gate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--credentials-file", type=Path, required=True)
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from werkzeug.serving import run_simple

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    creds = _read_credentials(args.credentials_file)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit)
    dispatcher, s3_only = _moto_app()
    run_simple(
        args.host,
        args.port,
        S3Gate(dispatcher, creds, s3_only=s3_only),
        threaded=True,
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    main()
