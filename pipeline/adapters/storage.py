"""Object-store adapter over the MinIO SDK (MinIO in production, moto's S3 server locally)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import quote, urlparse

from pipeline.errors import ConfigError, PermanentError
from pipeline.settings import Settings

if TYPE_CHECKING:
    from minio import Minio

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,1023}$")


def validate_key(key: str) -> str:
    """Object keys come from ids we validated; this is the last line of defence."""
    if not _KEY_RE.match(key) or ".." in key or "//" in key:
        raise PermanentError(f"unsafe object key {key!r}")
    return key


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    metadata: dict[str, str]


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = s3_client(settings)

    def put_file(
        self,
        bucket: str,
        key: str,
        path: Path,
        *,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.client.fput_object(
            bucket,
            validate_key(key),
            str(path),
            content_type=content_type,
            metadata=dict(metadata) if metadata else None,
        )

    def put_bytes(self, bucket: str, key: str, data: bytes, *, content_type: str) -> None:
        import io

        self.client.put_object(
            bucket, validate_key(key), io.BytesIO(data), len(data), content_type=content_type
        )

    def put_fileobj(self, bucket: str, key: str, data: IO[bytes], *, content_type: str) -> None:
        """Upload a seekable file object from its start, in parts of 5 MiB (the smallest
        S3 takes; a multipart upload past one part), so a large file is never whole in memory."""
        data.seek(0, 2)
        length = data.tell()
        data.seek(0)
        self.client.put_object(
            bucket,
            validate_key(key),
            cast(BinaryIO, data),
            length,
            content_type=content_type,
            part_size=5 << 20,
            num_parallel_uploads=1,  # one part in memory at a time
        )

    def put_if_absent(
        self, bucket: str, key: str, data: bytes, *, content_type: str = "application/json"
    ) -> bool:
        """Create `key` only if no object has it (`If-None-Match: *`, honoured by MinIO, S3
        and moto); False when it already exists. minio-py's public put_object cannot send
        the header, so this goes through its PutObject call."""
        from minio.error import S3Error

        try:
            self.client._put_object(
                bucket,
                validate_key(key),
                data,
                headers={"If-None-Match": "*", "Content-Type": content_type},
            )
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def get_versioned(self, bucket: str, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and the ETag of exactly those bytes (one GET), or None when
        there is no such object."""
        from minio.error import S3Error

        try:
            resp = self.client.get_object(bucket, validate_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        try:
            return bytes(resp.read()), str(resp.headers.get("ETag", "")).strip('"')
        finally:
            resp.close()
            resp.release_conn()

    def replace_if_match(
        self, bucket: str, key: str, data: bytes, etag: str, *, content_type: str = "application/json"
    ) -> bool:
        """Overwrite `key` only while it still has `etag` (`If-Match`, honoured by MinIO, S3
        and moto); False when another writer changed or removed it first."""
        from minio.error import S3Error

        try:
            self.client._put_object(
                bucket,
                validate_key(key),
                data,
                headers={"If-Match": f'"{etag}"', "Content-Type": content_type},
            )
        except S3Error as exc:
            if exc.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return False
            raise
        return True

    def get_file(self, bucket: str, key: str, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.fget_object(bucket, validate_key(key), str(path))
        return path

    def get_bytes(self, bucket: str, key: str) -> bytes:
        resp = self.client.get_object(bucket, validate_key(key))
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()

    def stat(self, bucket: str, key: str) -> ObjectInfo | None:
        from minio.error import S3Error

        try:
            st = self.client.stat_object(bucket, validate_key(key))
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise
        meta: dict[str, str] = {}
        for k, v in (st.metadata or {}).items():
            lk = str(k).lower()
            if lk.startswith("x-amz-meta-"):
                meta[lk.removeprefix("x-amz-meta-")] = str(v)
        return ObjectInfo(key=key, size=int(st.size or 0), etag=str(st.etag), metadata=meta)

    def exists(self, bucket: str, key: str) -> bool:
        return self.stat(bucket, key) is not None

    def copy(self, src_bucket: str, src_key: str, dst_bucket: str, dst_key: str) -> None:
        from minio.commonconfig import CopySource

        self.client.copy_object(
            dst_bucket, validate_key(dst_key), CopySource(src_bucket, validate_key(src_key))
        )

    def remove(self, bucket: str, key: str) -> None:
        self.client.remove_object(bucket, validate_key(key))

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        return [
            str(o.object_name)
            for o in self.client.list_objects(bucket, prefix=prefix or None, recursive=True)
        ]

    def list_sizes(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """Key -> size in bytes of every object under `prefix` (one listing, no reads)."""
        return {
            str(o.object_name): int(o.size or 0)
            for o in self.client.list_objects(bucket, prefix=prefix or None, recursive=True)
        }

    def presigned_get(self, bucket: str, key: str, *, expires_s: int = 3600) -> str:
        return str(
            self.client.presigned_get_object(bucket, validate_key(key), expires=timedelta(seconds=expires_s))
        )

    def public_url(self, key: str) -> str:
        return f"{self.settings.resolved_distribution_base_url}/{quote(validate_key(key))}"

    def distribution_url(self, key: str) -> str:
        """The URL a published object is recorded and announced with, for its audience: under
        the public base URL when the distribution bucket is public-read, else a presigned
        GET valid for `distribution_url_ttl_s` (against s3_endpoint: the host is signed)."""
        if self.settings.distribution_access == "presigned":
            return self.presigned_get(
                self.settings.bucket_distribution, key, expires_s=self.settings.distribution_url_ttl_s
            )
        return self.public_url(key)

    def health(self) -> dict[str, Any]:
        return {"buckets": [b.name for b in self.client.list_buckets()]}


# --------------------------------------------------------------------------- admin

_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


def s3_client(settings: Settings, endpoint: str | None = None, *, timeout_s: float | None = None) -> Minio:
    """A MinIO client for `endpoint` (default `settings.s3_endpoint`). With `timeout_s`, a
    request fails after that long and is not retried: for health checks."""
    from minio import Minio

    url = urlparse(endpoint or settings.s3_endpoint)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ConfigError(
            f"GREETFLOW_S3_ENDPOINT must be an http(s) URL like http://host:port, got {url.geturl()!r}"
        )
    http_client = None
    if timeout_s is not None:
        import urllib3

        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 2.0), read=timeout_s),
            retries=urllib3.Retry(total=0),
        )
    return Minio(
        url.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=url.scheme == "https",
        region=settings.s3_region,
        http_client=http_client,
    )


_NO_POLICY_CODES = frozenset({"NoSuchBucketPolicy"})


def managed_buckets(settings: Settings) -> list[str]:
    """Every bucket Greetflow writes: assets, staging, distribution, reports and, when it
    is a bucket of its own, the dead-letter spill bucket."""
    names = list(settings.buckets)
    if settings.dead_letter_bucket and settings.dead_letter_bucket not in names:
        names.append(settings.dead_letter_bucket)
    return names


def public_read_policy(bucket: str) -> dict[str, Any]:
    """Anonymous GetObject on the bucket's objects, nothing else: no listing, no writes."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "GreetflowPublicReadObjects",
                "Effect": "Allow",
                "Principal": {"AWS": ["*"]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/*"],
            }
        ],
    }


def bucket_access(settings: Settings) -> dict[str, str]:
    """What each managed bucket should allow anonymous clients: "public-read" (objects
    only) for the distribution bucket in public-read mode, "private" for everything else."""
    access = {name: "private" for name in managed_buckets(settings)}
    if settings.distribution_access == "public-read":
        dist = settings.bucket_distribution
        if settings.buckets.count(dist) > 1 or settings.dead_letter_bucket == dist:
            raise ConfigError(
                f"the public-read distribution bucket {dist} is also used as a private bucket: "
                "give it its own name or set GREETFLOW_DISTRIBUTION_ACCESS=presigned"
            )
        access[dist] = "public-read"
    return access


def apply_bucket_policies(
    settings: Settings, *, endpoint: str | None = None, client: Minio | None = None
) -> dict[str, str]:
    """Make each managed bucket's policy what `bucket_access` says (idempotent): the
    public-read policy on the distribution bucket in public-read mode, and no policy at all
    (so no anonymous access) on every other bucket, removing one found there. Returns
    bucket -> access."""
    from minio.error import S3Error

    client = client or s3_client(settings, endpoint)
    access = bucket_access(settings)
    for bucket, mode in access.items():
        if mode == "public-read":
            client.set_bucket_policy(bucket, json.dumps(public_read_policy(bucket)))
            continue
        try:
            client.delete_bucket_policy(bucket)
        except S3Error as exc:
            if exc.code not in _NO_POLICY_CODES:
                raise
    return access


def ensure_buckets(settings: Settings, *, endpoint: str | None = None) -> list[str]:
    """Create every managed bucket that is missing and apply the bucket policies
    (idempotent), at `endpoint` (default `settings.s3_endpoint`). Returns the names created."""
    from minio.error import S3Error

    client = s3_client(settings, endpoint)
    bucket_access(settings)  # a bad combination fails before anything is created
    created: list[str] = []
    for bucket in managed_buckets(settings):
        if client.bucket_exists(bucket):
            continue
        try:
            client.make_bucket(bucket)
        except S3Error as exc:
            if exc.code in _BUCKET_EXISTS_CODES:
                continue
            raise
        created.append(bucket)
    apply_bucket_policies(settings, client=client)
    return created
