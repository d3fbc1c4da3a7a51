"""Bucket policies on the real S3 server of the embedded stack (moto behind the access gate
of pipeline.dev.s3gate), probed with anonymous (unsigned) HTTP requests: private buckets
refuse them, a published clip is readable by its audience in public-read mode and only
through its presigned URL in presigned mode, bucket-level requests and new keys are refused
everywhere, and a presigned URL works only untampered, unexpired and signed with the stack's
credentials.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from minio import Minio
from minio.error import S3Error

from pipeline.adapters.storage import bucket_access, ensure_buckets, public_read_policy, sha256_file
from pipeline.bootstrap import Container
from pipeline.dev.stack import DevStack
from pipeline.keys import clip_key
from pipeline.settings import Settings
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.events import Decision, Envelope, ModerationDecided
from schemas.jobs import JobState
from tests.clips import frame, still_clip
from tests.integration.db_fixtures import render_request
from tests.integration.pipeline_fixtures import stack_settings
from tests.review_support import CAMPAIGN, grant

pytestmark = pytest.mark.integration

EVIDENCE_KEY = "consent-evidence/grandma/evidence.mp4"
PRIVATE_BYTES = b"private bytes"


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One embedded stack for the module (each test leaves the policies as setup made them)."""
    settings = stack_settings(tmp_path_factory.mktemp("buckets") / "data")
    with DevStack(settings, log=lambda _m: None):
        yield settings


@pytest.fixture
def container(s3_stack: Settings) -> Iterator[Container]:
    c = Container(s3_stack)
    yield c
    c.close()


@pytest.fixture
def seeded(container: Container) -> Iterator[dict[str, str]]:
    """One private object in every private bucket (consent evidence in the assets bucket)."""
    keys = {b: EVIDENCE_KEY if b == container.settings.bucket_assets else "lny-2026/r-1/x.bin"
            for b, mode in bucket_access(container.settings).items() if mode == "private"}  # fmt: skip
    for bucket, key in keys.items():
        container.store.put_bytes(bucket, key, PRIVATE_BYTES, content_type="application/octet-stream")
    yield keys


def published_job(c: Container, tmp_path: Path, recipient: str) -> tuple[str, str]:
    """A consented, approved job through the real publish step: (recorded URL, object key)."""
    grant(c, "grandma")
    req = render_request(
        CAMPAIGN, recipient, subjects=(SubjectUse(subject_id="grandma", scopes=frozenset({Scope.FACE})),)
    )
    c.jobs.create_if_absent(req)
    video = still_clip(tmp_path / f"{recipient}.mp4", frame(), 1.0)
    key = clip_key(CAMPAIGN, recipient, req.job_id)
    c.store.put_file(
        c.settings.bucket_staging,
        key,
        video,
        content_type="video/mp4",
        metadata={"sha256": sha256_file(video)},
    )
    prev = JobState.REQUESTED
    for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING, JobState.APPROVED):
        extra = {"staging_key": key} if st == JobState.RENDERED else {}
        assert c.jobs.transition(req.job_id, to_state=st, expected=prev, actor="test", **extra)
        prev = st
    c.publish_service("publish-test").handle(
        Envelope.wrap(ModerationDecided(job_id=req.job_id, campaign_id=CAMPAIGN, decision=Decision.APPROVED))
    )
    job = c.jobs.get(req.job_id)
    assert job is not None and job.state == JobState.PUBLISHED, job
    assert job.url and job.published_key
    return job.url, job.published_key


def anon(method: str, url: str, content: bytes | None = None) -> int:
    return httpx.request(method, url, content=content, timeout=10).status_code


def test_policies_as_the_server_reports_them(container: Container) -> None:
    client, s = container.store.client, container.settings
    assert json.loads(client.get_bucket_policy(s.bucket_distribution)) == public_read_policy(
        s.bucket_distribution
    )
    for bucket in (s.bucket_assets, s.bucket_staging, s.bucket_reports):
        with pytest.raises(Exception, match="NoSuchBucketPolicy"):
            client.get_bucket_policy(bucket)


def test_private_objects_refuse_anonymous_access(container: Container, seeded: dict[str, str]) -> None:
    base = container.settings.s3_endpoint
    for bucket, key in seeded.items():
        url = f"{base}/{bucket}/{key}"
        assert anon("GET", url) == 403, url
        assert anon("HEAD", url) == 403, url
        assert anon("PUT", url, b"overwritten") == 403, url
        assert anon("DELETE", url) == 403, url
        assert container.store.get_bytes(bucket, key) == PRIVATE_BYTES  # unchanged
        # A signed presigned GET is how the review app shows these: it works.
        assert httpx.get(container.store.presigned_get(bucket, key, expires_s=60)).content == PRIVATE_BYTES


def test_published_clip_public_read(container: Container, tmp_path: Path) -> None:
    url, key = published_job(container, tmp_path, "r-1")
    assert url.startswith(container.settings.resolved_distribution_base_url + "/")
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    assert r.content == container.store.get_bytes(container.settings.bucket_distribution, key)
    # Read-only: the anonymous audience can neither replace nor delete the clip.
    assert anon("PUT", url, b"defaced") == 403
    assert anon("DELETE", url) == 403
    assert httpx.get(url, timeout=10).content == r.content
    # Nor have it served as a web page from the bucket's origin.
    assert refused("GET", f"{url}?response-content-type=text/html")


def test_presigned_mode(container: Container, s3_stack: Settings, tmp_path: Path) -> None:
    settings = s3_stack.model_copy(update={"distribution_access": "presigned", "distribution_url_ttl_s": 600})
    ensure_buckets(settings)  # switching mode removes the public-read policy
    with pytest.raises(Exception, match="NoSuchBucketPolicy"):
        container.store.client.get_bucket_policy(settings.bucket_distribution)
    c = Container(settings)
    try:
        url, key = published_job(c, tmp_path, "r-2")
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200
        assert r.content == c.store.get_bytes(settings.bucket_distribution, key)
        plain = f"{settings.s3_endpoint}/{settings.bucket_distribution}/{key}"
        assert anon("GET", plain) == 403  # the bucket is private now
    finally:
        c.close()
        ensure_buckets(s3_stack)  # back to public-read
    assert anon("GET", plain) == 200  # public-read again


def refused(method: str, url: str, content: bytes | None = None) -> bool:
    """An anonymous request answered 403 with S3's AccessDenied error (no body for HEAD)."""
    r = httpx.request(method, url, content=content, timeout=10)
    if r.status_code != 403:
        return False
    return method == "HEAD" or "<Code>AccessDenied</Code>" in r.text


def test_anonymous_listing_refused(container: Container, seeded: dict[str, str]) -> None:
    base = container.settings.s3_endpoint
    assert refused("GET", f"{base}/")  # ListAllMyBuckets
    for bucket in bucket_access(container.settings):
        for query in ("?list-type=2", "", "?versions", "?uploads", "?list-type=2&prefix=consent-evidence/"):
            assert refused("GET", f"{base}/{bucket}{query}"), (bucket, query)
        assert refused("HEAD", f"{base}/{bucket}"), bucket
        assert refused("GET", f"{base}/{bucket}?policy"), bucket
    # Signed clients still list.
    assert EVIDENCE_KEY in container.store.list_keys(container.settings.bucket_assets)


def test_anonymous_new_keys_refused(container: Container) -> None:
    s, store = container.settings, container.store
    base = s.s3_endpoint
    for bucket in bucket_access(s):
        assert refused("PUT", f"{base}/{bucket}/planted.txt", b"planted"), bucket
        assert refused("POST", f"{base}/{bucket}/planted.txt?uploads"), bucket
        assert not store.exists(bucket, "planted.txt"), bucket


def test_anonymous_bucket_admin_refused(container: Container) -> None:
    s, client = container.settings, container.store.client
    base = s.s3_endpoint
    assert refused("PUT", f"{base}/planted-bucket")
    assert not client.bucket_exists("planted-bucket")
    grant_all = {"Effect": "Allow", "Principal": "*", "Action": "s3:*", "Resource": "arn:aws:s3:::*"}
    everything = json.dumps({"Version": "2012-10-17", "Statement": [grant_all]}).encode()
    for bucket in bucket_access(s):
        assert refused("PUT", f"{base}/{bucket}?policy", everything), bucket
        assert refused("DELETE", f"{base}/{bucket}?policy"), bucket
        assert refused("DELETE", f"{base}/{bucket}"), bucket
    # The policies are as setup made them, and the distribution bucket still serves.
    assert json.loads(client.get_bucket_policy(s.bucket_distribution)) == public_read_policy(
        s.bucket_distribution
    )
    with pytest.raises(S3Error, match="NoSuchBucketPolicy"):
        client.get_bucket_policy(s.bucket_assets)
    # moto's own control API (reset wipes every bucket) is not reachable anonymously either.
    assert refused("POST", f"{base}/moto-api/reset")
    assert client.bucket_exists(s.bucket_assets)
    # Nor are moto's other AWS services: this form body sends moto to STS, even on the path
    # of a public object.
    r = httpx.request(
        "GET",
        f"{base}/{s.bucket_distribution}/some/clip.mp4",
        content=b"Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/x"
        b"&RoleSessionName=x&WebIdentityToken=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=10,
    )
    assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text, r.text


def test_tampered_presigned_url_refused(container: Container, seeded: dict[str, str]) -> None:
    s, store = container.settings, container.store
    bucket, key = next(iter(seeded.items()))
    url = store.presigned_get(bucket, key, expires_s=60)
    assert httpx.get(url, timeout=10).content == PRIVATE_BYTES
    sig = url.split("X-Amz-Signature=")[1][:64]

    def denied(u: str, code: str) -> None:
        r = httpx.get(u, timeout=10)
        assert r.status_code == 403 and f"<Code>{code}</Code>" in r.text, (u, r.status_code, r.text)

    denied(url.replace(sig, "0" * 64), "SignatureDoesNotMatch")
    denied(url.replace(sig, ""), "AuthorizationQueryParametersError")
    # The same signature for another key, or with a longer lifetime.
    other = next(k for b, k in seeded.items() if b != bucket)
    denied(url.replace(f"/{bucket}/{key}", f"/{bucket}/{other}"), "SignatureDoesNotMatch")
    denied(url.replace("X-Amz-Expires=60", "X-Amz-Expires=604800"), "SignatureDoesNotMatch")
    # Signed long ago (expired) or far in the future, with the right key.
    past = store.client.presigned_get_object(
        bucket, key, expires=timedelta(seconds=60), request_date=datetime.now(UTC) - timedelta(hours=1)
    )
    denied(past, "AccessDenied")
    future = store.client.presigned_get_object(
        bucket, key, expires=timedelta(seconds=60), request_date=datetime.now(UTC) + timedelta(hours=1)
    )
    denied(future, "AccessDenied")
    # Signed with credentials other than the stack's.
    host = s.s3_endpoint.split("//", 1)[1]
    for access_key, secret, code in (
        (s.s3_access_key, "not-the-secret", "SignatureDoesNotMatch"),
        ("someone-else", s.s3_secret_key.get_secret_value(), "InvalidAccessKeyId"),
    ):
        forged = Minio(host, access_key=access_key, secret_key=secret, secure=False, region=s.s3_region)
        denied(forged.presigned_get_object(bucket, key, expires=timedelta(seconds=60)), code)
