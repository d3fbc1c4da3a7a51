"""`/v1/webhooks`: a tenant's webhook endpoints, their secrets and delivery logs.

The app puts the WebhookService on `app.state.webhooks` (pipeline/api/app.py)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from pipeline.api.auth import ApiPrincipal, ApiProblem, require_scope
from pipeline.api.deps import ERRORS, PROBLEM_MEDIA_TYPE
from pipeline.api.models import Problem
from pipeline.webhooks.repository import Attempt, Delivery, Endpoint
from pipeline.webhooks.service import EVENT_TYPES, EndpointNotFound, WebhookError, WebhookService

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=ERRORS)

Writer = Annotated[ApiPrincipal, Depends(require_scope("webhooks:write"))]
Reader = Annotated[ApiPrincipal, Depends(require_scope("webhooks:read"))]


def _service(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


Service = Annotated[WebhookService, Depends(_service)]

REFUSED: dict[int | str, dict[str, object]] = {
    400: {
        "model": Problem,
        "description": "the URL is refused (SSRF rules, docs/api.md) or an event type is unknown",
        "content": {PROBLEM_MEDIA_TYPE: {}},
    }
}


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="https URL that receives the events")
    events: list[str] | None = Field(
        default=None,
        max_length=len(EVENT_TYPES),
        description=f"event types to send (default: all of {', '.join(EVENT_TYPES)})",
    )


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    events: list[str]
    created_at: datetime
    previous_secret_expires_at: datetime | None = Field(
        default=None, description="until then the previous secret signs too (a second v1=)"
    )


class WebhookCreated(WebhookOut):
    secret: str = Field(description="the signing secret; shown only now")


class AttemptOut(BaseModel):
    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class DeliveryOut(BaseModel):
    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    state: str = Field(description="pending, delivered or dead")
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    created_at: datetime


def _out(e: Endpoint) -> WebhookOut:
    return WebhookOut(
        id=e.id,
        url=e.url,
        events=list(e.events),
        created_at=e.created_at,
        previous_secret_expires_at=e.previous_secret_expires_at,
    )


def _created(e: Endpoint, secret: str) -> WebhookCreated:
    return WebhookCreated(**_out(e).model_dump(), secret=secret)


def _delivery(d: Delivery, attempts: list[Attempt]) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        event_id=d.event_id,
        event_type=d.event_type,
        state=d.state,
        attempts=[
            AttemptOut(
                attempt=a.attempt,
                at=a.at,
                status_code=a.status_code,
                error=a.error,
                duration_ms=a.duration_ms,
            )
            for a in attempts
        ],
        next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
        created_at=d.created_at,
    )


def _problem(exc: WebhookError) -> ApiProblem:
    if isinstance(exc, EndpointNotFound):
        return ApiProblem(404, "Not Found", str(exc))
    return ApiProblem(400, "Bad Request", str(exc), slug="invalid-webhook")


@router.post(
    "",
    status_code=201,
    response_model=WebhookCreated,
    responses=REFUSED,
    summary="register a webhook endpoint",
)
def create_webhook(body: WebhookIn, who: Writer, service: Service) -> WebhookCreated:
    try:
        registered = service.register(who.tenant, body.url, body.events)
    except WebhookError as exc:
        raise _problem(exc) from None
    return _created(registered.endpoint, registered.secret)


@router.get("", response_model=list[WebhookOut], summary="the tenant's webhook endpoints")
def list_webhooks(who: Reader, service: Service) -> list[WebhookOut]:
    return [_out(e) for e in service.endpoints(who.tenant)]


@router.get(
    "/{webhook_id}/deliveries",
    response_model=list[DeliveryOut],
    summary="recent deliveries and their attempts",
)
def list_deliveries(webhook_id: uuid.UUID, who: Reader, service: Service) -> list[DeliveryOut]:
    try:
        return [_delivery(d, a) for d, a in service.deliveries(who.tenant, webhook_id)]
    except WebhookError as exc:
        raise _problem(exc) from None


@router.post(
    "/{webhook_id}/rotate",
    response_model=WebhookCreated,
    summary="new signing secret; the previous one keeps signing during the grace period",
)
def rotate_webhook(webhook_id: uuid.UUID, who: Writer, service: Service) -> WebhookCreated:
    try:
        registered = service.rotate(who.tenant, webhook_id)
    except WebhookError as exc:
        raise _problem(exc) from None
    return _created(registered.endpoint, registered.secret)


@router.delete(
    "/{webhook_id}", status_code=204, response_class=Response, summary="stop sending to an endpoint"
)
def delete_webhook(webhook_id: uuid.UUID, who: Writer, service: Service) -> Response:
    try:
        service.delete(who.tenant, webhook_id)
    except WebhookError as exc:
        raise _problem(exc) from None
    return Response(status_code=204)
