"""Webhooks: endpoints of API tenants and of briefs, events turned into deliveries, and
the loop that sends due deliveries (signed, through the SSRF guard, retried with
backoff until `webhook_max_age_s`, then dead-lettered)."""

from __future__ import annotations

import json
import logging
import random
import secrets
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from pipeline import metrics
from pipeline.errors import GreetflowError
from pipeline.settings import Settings
from pipeline.webhooks.repository import Attempt, Delivery, Endpoint, JobOwner, WebhookRepository
from pipeline.webhooks.signing import HEADER, signature_header
from pipeline.webhooks.ssrf import (
    GuardedSender,
    Resolver,
    Unresolvable,
    UnsafeUrl,
    check_url,
    system_resolver,
)
from schemas.common import utcnow
from schemas.events import ClipPublished, ClipTakenDown, Envelope
from schemas.jobs import FINAL_STATES, JobState

log = logging.getLogger(__name__)

JOB_PUBLISHED = "job.published"
JOB_FAILED = "job.failed"
JOB_REJECTED = "job.rejected"
JOB_TAKEN_DOWN = "job.taken_down"
CAMPAIGN_COMPLETED = "campaign.completed"
EVENT_TYPES: tuple[str, ...] = (JOB_PUBLISHED, JOB_FAILED, JOB_REJECTED, JOB_TAKEN_DOWN, CAMPAIGN_COMPLETED)

# job_events rows into these states become job.failed / job.rejected (the scan's source).
_SCANNED = {JobState.FAILED.value: JOB_FAILED, JobState.REJECTED.value: JOB_REJECTED}
_SCAN_CURSOR = "job_events"
# Scanned rows younger than this are read again on the next passes (a transaction that
# committed a lower id late is not skipped); the delivery key makes that harmless.
_SCAN_SETTLE_S = 10.0
_NS = uuid.UUID("6f0d3a52-54c4-4e43-9d0a-5d1c9f3e8b21")


class WebhookError(GreetflowError):
    """A request about webhooks that cannot be honoured (bad URL or events); one line."""


class EndpointNotFound(WebhookError):
    pass


class DeadLetterStore(Protocol):
    def put_bytes(self, bucket: str, key: str, data: bytes, *, content_type: str) -> None: ...


@dataclass(frozen=True)
class Registered:
    """A new (or rotated) endpoint and its secret, shown to its owner once."""

    endpoint: Endpoint
    secret: str


def new_secret() -> str:
    return "whsec_" + secrets.token_hex(32)


def event_body(event_id: uuid.UUID, event_type: str, created_at: datetime, data: dict[str, Any]) -> str:
    return json.dumps(
        {"id": str(event_id), "type": event_type, "created_at": created_at.isoformat(), "data": data},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )


class WebhookService:
    def __init__(
        self,
        settings: Settings,
        repo: WebhookRepository,
        *,
        owner: str,
        store: DeadLetterStore | None = None,
        resolver: Resolver = system_resolver,
        clock: Callable[[], datetime] = utcnow,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.owner = owner
        self.store = store
        self.resolver = resolver
        self.clock = clock
        self.jitter = jitter
        self._sender: GuardedSender | None = None

    # ------------------------------------------------------------------ endpoints

    def check_url(self, url: str) -> str:
        """A brief's webhook_url, stripped, when the guard accepts it; WebhookError (one line)
        otherwise. A name that does not resolve now passes (a DNS hiccup must not refuse a
        campaign): every delivery checks it again."""
        return self._check(url, unresolvable_ok=True)

    def _check(self, url: str, *, unresolvable_ok: bool = False) -> str:
        url = url.strip()
        if len(url) > 2000:
            raise WebhookError("url: longer than 2000 characters")
        try:
            check_url(url, allow_loopback=self.settings.webhook_allow_loopback, resolver=self.resolver)
        except Unresolvable as exc:
            if not unresolvable_ok:
                raise WebhookError(f"url: {exc}") from None
        except UnsafeUrl as exc:
            raise WebhookError(f"url: {exc}") from None
        return url

    @staticmethod
    def _events(events: Sequence[str] | None) -> tuple[str, ...]:
        if events is None:
            return EVENT_TYPES
        unknown = sorted(set(events) - set(EVENT_TYPES))
        if unknown:
            raise WebhookError(f"events: unknown {', '.join(unknown)} (known: {', '.join(EVENT_TYPES)})")
        if not events:
            raise WebhookError("events: name at least one event type")
        return tuple(sorted(set(events)))

    def register(self, tenant: str, url: str, events: Sequence[str] | None = None) -> Registered:
        """An endpoint of an API tenant (`POST /v1/webhooks`); WebhookError for a refused URL."""
        checked = self._check(url)
        secret = new_secret()
        endpoint = self.repo.add_endpoint(
            tenant=tenant, campaign_id=None, url=checked, secret=secret, events=self._events(events)
        )
        log.info("webhook endpoint %s registered for tenant %s", endpoint.id, tenant)
        return Registered(endpoint, secret)

    def register_brief(self, campaign_id: str, url: str) -> str | None:
        """The endpoint of a brief's `webhook_url`: its new secret, or None when the campaign
        already has an endpoint at that URL (re-submitting a brief keeps its secret). A
        brief with another URL replaces the endpoint (and gets a new secret)."""
        checked = self._check(url, unresolvable_ok=True)
        existing = self.repo.endpoints_of_campaign(campaign_id)
        if any(e.url == checked for e in existing):
            return None
        for e in existing:
            self.repo.disable(e.id)
        secret = new_secret()
        endpoint = self.repo.add_endpoint(
            tenant=None, campaign_id=campaign_id, url=checked, secret=secret, events=EVENT_TYPES
        )
        log.info("webhook endpoint %s registered for campaign %s", endpoint.id, campaign_id)
        return secret

    def rotate_campaign(self, campaign_id: str) -> Registered:
        """A new secret for the endpoint of a campaign's brief `webhook_url` (the previous one
        stays valid for the grace period). How an operator learns the secret of an endpoint
        that a scheduled run registered, where nobody was there to be shown it."""
        live = self.repo.endpoints_of_campaign(campaign_id)
        if not live:
            raise EndpointNotFound(
                f"campaign {campaign_id} has no webhook endpoint "
                "(its brief names no webhook_url, or it was never submitted or run)"
            )
        rotated = self.repo.rotate(live[0].id, new_secret(), grace_s=self.settings.webhook_secret_grace_s)
        if rotated is None:
            raise EndpointNotFound(f"campaign {campaign_id} has no webhook endpoint")
        return Registered(rotated, rotated.secret)

    def endpoints(self, tenant: str) -> list[Endpoint]:
        return self.repo.endpoints_of_tenant(tenant)

    def endpoint(self, tenant: str, endpoint_id: uuid.UUID) -> Endpoint:
        """The tenant's live endpoint; another tenant's (or a deleted) one is not found."""
        endpoint = self.repo.endpoint(endpoint_id)
        if endpoint is None or endpoint.tenant != tenant or endpoint.disabled_at is not None:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id}")
        return endpoint

    def rotate(self, tenant: str, endpoint_id: uuid.UUID) -> Registered:
        self.endpoint(tenant, endpoint_id)
        secret = new_secret()
        rotated = self.repo.rotate(endpoint_id, secret, grace_s=self.settings.webhook_secret_grace_s)
        if rotated is None:
            raise EndpointNotFound(f"no webhook endpoint {endpoint_id}")
        return Registered(rotated, secret)

    def delete(self, tenant: str, endpoint_id: uuid.UUID) -> None:
        self.endpoint(tenant, endpoint_id)
        self.repo.disable(endpoint_id)

    def deliveries(self, tenant: str, endpoint_id: uuid.UUID) -> list[tuple[Delivery, list[Attempt]]]:
        self.endpoint(tenant, endpoint_id)
        return self.repo.deliveries(endpoint_id)

    # ------------------------------------------------------------------ events -> deliveries

    def handle(self, env: Envelope[Any]) -> None:
        """clips.published and clips.taken_down envelopes (the webhook worker's topics)."""
        payload = env.payload
        job = self.repo.job(payload.job_id)
        if job is None:
            log.warning("webhook: %s for unknown job %s; nothing to send", env.type, payload.job_id)
            return
        if isinstance(payload, ClipPublished):
            data = {**_job_data(job), "state": JobState.PUBLISHED.value, "url": str(payload.url),
                    "sha256": payload.sha256,
                    "captions_url": str(payload.captions_url) if payload.captions_url else None}  # fmt: skip
            self.emit(job, JOB_PUBLISHED, env.id, data, payload.published_at)
        elif isinstance(payload, ClipTakenDown):
            data = {**_job_data(job), "state": JobState.TAKEN_DOWN.value, "reason": payload.reason}
            self.emit(job, JOB_TAKEN_DOWN, env.id, data, payload.taken_down_at)
        else:
            log.warning("webhook: no event for %s", env.type)
            return
        self.campaign_completed(job.campaign_id)

    def emit(
        self, job: JobOwner, event_type: str, event_id: uuid.UUID, data: dict[str, Any], at: datetime
    ) -> int:
        endpoints = self.repo.matching(
            tenants=job.tenants, campaign_id=job.campaign_id, event_type=event_type
        )
        return self._fan_out(endpoints, event_type, event_id, data, at)

    def _fan_out(
        self,
        endpoints: Iterable[Endpoint],
        event_type: str,
        event_id: uuid.UUID,
        data: dict[str, Any],
        at: datetime,
    ) -> int:
        body = event_body(event_id, event_type, at, data)
        created = 0
        for endpoint in endpoints:
            if self.repo.add_delivery(endpoint.id, event_id, event_type, body):
                created += 1
        return created

    def campaign_completed(self, campaign_id: str) -> int:
        """campaign.completed once every job of the campaign is final (its id: the campaign
        and its job count, so a campaign that grows later completes again)."""
        counts, tenants = self.repo.campaign_counts(campaign_id)
        total = sum(counts.values())
        if total == 0 or any(JobState(s) not in FINAL_STATES for s in counts):
            return 0
        event_id = uuid.uuid5(_NS, f"campaign.completed:{campaign_id}:{total}")
        endpoints = self.repo.matching(
            tenants=tenants, campaign_id=campaign_id, event_type=CAMPAIGN_COMPLETED
        )
        data = {"campaign_id": campaign_id, "jobs": total, "states": dict(sorted(counts.items()))}
        return self._fan_out(endpoints, CAMPAIGN_COMPLETED, event_id, data, self.clock())

    def scan_job_events(self, *, limit: int = 500) -> int:
        """job.failed and job.rejected from the jobs' transition log (job_events): every way a
        job fails (a dead letter, the sweeper, the render step) or is rejected (the
        moderator, a reviewer, the publisher's consent re-check) appends a row there.
        A first run starts at the end of the log (no replay of history)."""
        position = self.repo.cursor(_SCAN_CURSOR)
        if position is None:
            self.repo.set_cursor(_SCAN_CURSOR, self.repo.last_job_event_id())
            return 0
        rows = self.repo.job_events_after(position, _SCANNED, limit=limit)
        settled_before = self.clock() - timedelta(seconds=_SCAN_SETTLE_S)
        advance = position
        settling = False
        emitted = 0
        campaigns: set[str] = set()
        for event_row_id, job_id, to_state, at in rows:
            job = self.repo.job(job_id)
            if job is not None:
                data = {**_job_data(job), "state": to_state, "reason": job.reason}
                event_id = uuid.uuid5(_NS, f"job_event:{event_row_id}")
                emitted += self.emit(job, _SCANNED[to_state], event_id, data, at)
                campaigns.add(job.campaign_id)
            if at > settled_before:
                settling = True
            if not settling:
                advance = event_row_id
        if advance > position:
            self.repo.set_cursor(_SCAN_CURSOR, advance)
        for campaign_id in sorted(campaigns):
            emitted += self.campaign_completed(campaign_id)
        return emitted

    # ------------------------------------------------------------------ sending

    @property
    def sender(self) -> GuardedSender:
        if self._sender is None:
            self._sender = GuardedSender(
                timeout_s=self.settings.webhook_timeout_s,
                allow_loopback=self.settings.webhook_allow_loopback,
                max_redirects=self.settings.webhook_max_redirects,
                resolver=self.resolver,
            )
        return self._sender

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def tick(self) -> None:
        """One pass of the webhook worker's loop: scan job_events, send what is due."""
        self.scan_job_events()
        self.deliver_due()

    def deliver_due(self) -> int:
        """Claim (under a lease) and send the deliveries that are due; returns how many were sent."""
        claimed = self.repo.claim_due(
            self.owner, lease_s=self.settings.webhook_lease_s, limit=self.settings.webhook_batch
        )
        for delivery in claimed:
            self._deliver(delivery)
        return len(claimed)

    def _deliver(self, delivery: Delivery) -> None:
        endpoint = self.repo.endpoint(delivery.endpoint_id)
        now = self.clock()
        if endpoint is None or endpoint.disabled_at is not None:
            self._finish(delivery, None, "endpoint deleted", 0, "dead", now, outcome="dead")
            return
        body = delivery.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Greetflow-Webhooks/1",
            HEADER: signature_header(endpoint.signing_secrets(now), body, timestamp=int(now.timestamp())),
            "Greetflow-Delivery": str(delivery.id),
            "Greetflow-Event": delivery.event_type,
        }
        result = self.sender.post(endpoint.url, body, headers)
        duration_ms = int(result.duration_s * 1000)
        now = self.clock()
        if result.ok:
            self._finish(delivery, result.status, None, duration_ms, "delivered", now, outcome="delivered")
            return
        error = result.error or f"HTTP {result.status}"
        if result.refused:
            # Retrying an address the guard refuses only repeats the refusal.
            self._finish(delivery, result.status, error, duration_ms, "dead", now, outcome="refused")
            return
        delay = self.backoff_s(delivery.attempts + 1)
        next_at = now + timedelta(seconds=delay)
        if next_at > delivery.created_at + timedelta(seconds=self.settings.webhook_max_age_s):
            self._finish(delivery, result.status, error, duration_ms, "dead", now, outcome="dead")
            return
        self._finish(delivery, result.status, error, duration_ms, "pending", next_at, outcome="retry")

    def backoff_s(self, attempt: int) -> float:
        """Delay after failed attempt n: base * 2^(n-1) capped at max, the upper half jittered."""
        ceiling: float = min(
            self.settings.webhook_backoff_max_s, self.settings.webhook_backoff_base_s * 2 ** (attempt - 1)
        )
        return ceiling / 2 + float(self.jitter()) * ceiling / 2

    def _finish(
        self,
        delivery: Delivery,
        status: int | None,
        error: str | None,
        duration_ms: int,
        state: str,
        next_at: datetime,
        *,
        outcome: str,
    ) -> None:
        if not self.repo.record_attempt(
            delivery, self.owner, status_code=status, error=error, duration_ms=duration_ms,
            state=state, next_attempt_at=next_at,
        ):  # fmt: skip
            log.warning("webhook delivery %s: lost its lease before recording attempt", delivery.id)
            return
        metrics.WEBHOOK_DELIVERIES.labels(outcome=outcome).inc()
        if state == "dead":
            log.warning(
                "webhook delivery %s (%s) is dead after %d attempts: %s",
                delivery.id, delivery.event_type, delivery.attempts + 1, error,
            )  # fmt: skip
            self._dead_letter(delivery, error)
        elif state == "pending":
            log.info("webhook delivery %s: %s; next attempt at %s", delivery.id, error, next_at.isoformat())

    def _dead_letter(self, delivery: Delivery, error: str | None) -> None:
        """`<dead_letter_prefix>/webhooks/<delivery id>.json` in the dead-letter bucket."""
        if self.store is None:
            return
        bucket = self.settings.dead_letter_bucket or self.settings.bucket_staging
        key = f"{self.settings.dead_letter_prefix}/webhooks/{delivery.id}.json"
        record = {
            "delivery_id": str(delivery.id),
            "endpoint_id": str(delivery.endpoint_id),
            "event_id": str(delivery.event_id),
            "event_type": delivery.event_type,
            "error": error,
            "created_at": delivery.created_at.isoformat(),
            "attempts": [
                {"attempt": a.attempt, "at": a.at.isoformat(), "status_code": a.status_code, "error": a.error}
                for a in self.repo.attempts(delivery.id)
            ],
            "payload": json.loads(delivery.payload),
        }
        try:
            self.store.put_bytes(bucket, key, json.dumps(record).encode(), content_type="application/json")
        except Exception:
            log.exception(
                "webhook delivery %s: could not write its dead letter to %s/%s", delivery.id, bucket, key
            )


def _job_data(job: JobOwner) -> dict[str, Any]:
    return {
        "job_id": str(job.job_id),
        "campaign_id": job.campaign_id,
        "recipient_id": job.recipient_id,
        "url": job.url,
    }
