"""API keys, Idempotency-Keys and API campaign ownership in the database."""

from __future__ import annotations

import hashlib
import random
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from pipeline.adapters.db import ApiKeyRow, CampaignRow, Database, IdempotencyKeyRow
from schemas.common import utcnow

TOKEN_PREFIX = "gf_"


def hash_token(token: str) -> str:
    """SHA-256 of an API key. The key is 32 random bytes, so a fast hash is enough: nobody
    can guess such a key by brute force however fast the hash is, which is why password
    hashes (argon2, bcrypt) are slow and these are not; a slow hash here would only cost
    every request tens of milliseconds and make each request a denial-of-service lever."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    tenant: str
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None
    rate_limit_per_min: int | None

    @classmethod
    def _from_row(cls, r: ApiKeyRow) -> ApiKey:
        return cls(
            key_id=r.id,
            name=r.name,
            tenant=r.tenant,
            scopes=frozenset(r.scopes),
            created_at=r.created_at,
            revoked_at=r.revoked_at,
            rate_limit_per_min=r.rate_limit_per_min,
        )


class ApiKeyRepository:
    def __init__(self, db: Database) -> None:
        self._db = db

    def create(
        self, *, name: str, tenant: str, scopes: frozenset[str], rate_limit_per_min: int | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its token; the token is returned here once and never stored."""
        token = new_token()
        row = ApiKeyRow(
            id=uuid.uuid4().hex[:16],
            name=name,
            tenant=tenant,
            scopes=sorted(scopes),
            key_hash=hash_token(token),
            created_at=utcnow(),
            revoked_at=None,
            rate_limit_per_min=rate_limit_per_min,
        )
        with self._db.session() as s:
            s.add(row)
        return ApiKey._from_row(row), token

    def by_token(self, token: str) -> ApiKey | None:
        """The live (not revoked) key of this token, or None."""
        with self._db.session() as s:
            row = s.scalars(select(ApiKeyRow).where(ApiKeyRow.key_hash == hash_token(token))).first()
            if row is None or row.revoked_at is not None:
                return None
            return ApiKey._from_row(row)

    def revoke(self, key_id: str) -> bool:
        with self._db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            return True

    def list(self) -> list[ApiKey]:
        with self._db.session() as s:
            return [ApiKey._from_row(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]


@dataclass(frozen=True)
class IdempotencyHit:
    request_hash: str
    job_id: uuid.UUID


class IdempotencyRepository:
    """Idempotency-Keys per tenant, each remembered `ttl_s` (expired ones are replaced)."""

    def __init__(self, db: Database, *, ttl_s: float) -> None:
        self._db = db
        self._ttl = timedelta(seconds=ttl_s)

    def get(self, tenant: str, key: str) -> IdempotencyHit | None:
        with self._db.session() as s:
            row = s.get(IdempotencyKeyRow, (tenant, key))
            if row is None or row.created_at < utcnow() - self._ttl:
                return None
            return IdempotencyHit(row.request_hash, uuid.UUID(row.job_id))

    def remember(self, tenant: str, key: str, request_hash: str, job_id: uuid.UUID) -> IdempotencyHit:
        """Store the key; when a concurrent request stored it first, that one's entry.
        About one call in a hundred also deletes the expired keys of every tenant."""
        if random.random() < 0.01:
            self.purge()
        now = utcnow()
        try:
            with self._db.session() as s:
                row = s.get(IdempotencyKeyRow, (tenant, key))
                if row is not None and row.created_at >= now - self._ttl:
                    return IdempotencyHit(row.request_hash, uuid.UUID(row.job_id))
                if row is not None:
                    s.delete(row)
                    s.flush()
                s.add(IdempotencyKeyRow(tenant=tenant, key=key, request_hash=request_hash,
                                        job_id=str(job_id), created_at=now))  # fmt: skip
        except IntegrityError:
            hit = self.get(tenant, key)
            if hit is None:
                raise
            return hit
        return IdempotencyHit(request_hash, job_id)

    def forget(self, tenant: str, key: str) -> None:
        with self._db.session() as s:
            s.execute(
                delete(IdempotencyKeyRow).where(
                    IdempotencyKeyRow.tenant == tenant, IdempotencyKeyRow.key == key
                )
            )

    def purge(self) -> int:
        with self._db.session() as s:
            cutoff = utcnow() - self._ttl
            res = s.execute(delete(IdempotencyKeyRow).where(IdempotencyKeyRow.created_at < cutoff))
            return int(getattr(res, "rowcount", 0) or 0)


class CampaignOwners:
    """Which tenant a campaign id belongs to. A campaign id the API has not seen yet is
    claimed by the first tenant that uses it; one used by the CLI or a DAG (jobs without
    an owner) or by another tenant is not available."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def owner(self, campaign_id: str) -> tuple[bool, str | None]:
        """(known, owner)."""
        with self._db.session() as s:
            row = s.get(CampaignRow, campaign_id)
            return (row is not None, row.owner if row is not None else None)

    def claim(self, campaign_id: str, tenant: str | None) -> bool:
        """True when the campaign is (now) the tenant's."""
        try:
            with self._db.session() as s:
                row = s.get(CampaignRow, campaign_id)
                if row is not None:
                    return row.owner == tenant
                s.add(CampaignRow(campaign_id=campaign_id, owner=tenant, created_at=utcnow()))
        except IntegrityError:
            known, owner = self.owner(campaign_id)
            return known and owner == tenant
        return True
