"""API keys on requests: `Authorization: Bearer <key>`, scopes, per-key rate limits.

`require_scope(scope)` is a FastAPI dependency: 401 without a valid key, 403 when the key
lacks the scope, 429 with Retry-After over the key's rate limit. Errors are raised as
`ApiProblem`, which the app renders as application/problem+json.

The rate limit is a token bucket per key held in this process: N API processes behind a
load balancer allow up to N times the limit in total. That is the documented trade-off
(no database write per request); put a shared limiter in front for a hard global limit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

SCOPES: frozenset[str] = frozenset(
    {
        "renders:write",
        "jobs:read",
        "campaigns:write",
        "campaigns:read",
        "assets:write",
        "consent:write",
        "consent:read",
        "webhooks:write",
        "webhooks:read",
    }
)


@dataclass(frozen=True)
class ApiPrincipal:
    key_id: str
    tenant: str
    scopes: frozenset[str]


class ApiProblem(HTTPException):
    """An error answered as an RFC 9457 problem: `type` is a short slug under /problems/."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=headers)
        self.title = title
        self.slug = slug or title.lower().replace(" ", "-")


class KeyLookup(Protocol):
    """Resolves a bearer token to its principal and its own rate limit (None: default)."""

    def __call__(self, token: str) -> tuple[ApiPrincipal, int | None] | None: ...


class RateLimiter:
    """Token buckets per key: `per_min` requests a minute, bursts of up to `burst`."""

    def __init__(self, per_min: int, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_min = per_min
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)

    def take(self, key_id: str, per_min: int | None = None) -> float:
        """0 when the request may go ahead, else the seconds until it may."""
        rate = (per_min or self.per_min) / 60.0
        cap = float(min(self.burst, per_min) if per_min else self.burst)
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (cap, now))
            tokens = min(cap, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


_bearer = HTTPBearer(auto_error=False)


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, "Unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="greetflow"'})


def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiPrincipal:
    """The principal of the request's key, rate limited (any scope)."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("send an API key as 'Authorization: Bearer <key>'")
    lookup: KeyLookup = request.app.state.key_lookup
    found = lookup(credentials.credentials.strip())
    if found is None:
        raise _unauthorized("the API key is unknown or revoked")
    principal, per_min = found
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.take(principal.key_id, per_min)
    if wait > 0:
        raise ApiProblem(
            429,
            "Too Many Requests",
            f"rate limit of key {principal.key_id} exceeded; retry in {math.ceil(wait)} s",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    return principal


def require_scope(scope: str) -> Callable[..., ApiPrincipal]:
    """A dependency giving the request's principal when its key has `scope`."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    def dependency(principal: Annotated[ApiPrincipal, Depends(authenticate)]) -> ApiPrincipal:
        if scope not in principal.scopes:
            raise ApiProblem(403, "Forbidden", f"the API key lacks scope {scope}")
        return principal

    dependency.__name__ = f"require_{scope.replace(':', '_')}"
    return dependency


def parse_scopes(text: str) -> frozenset[str]:
    """`renders:write,jobs:read` -> the scopes; ValueError naming an unknown one."""
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    if not scopes:
        raise ValueError("give at least one scope")
    unknown = sorted(scopes - SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(sorted(SCOPES))}")
    return scopes
