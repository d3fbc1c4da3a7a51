"""The render API app: every route under /v1, OpenAPI at /v1/openapi.json, every error an
RFC 9457 problem (application/problem+json), never a traceback."""

from __future__ import annotations

import logging
import uuid
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.adapters.db import Database
from pipeline.adapters.storage import ObjectStore
from pipeline.api import (
    routes_assets,
    routes_campaigns,
    routes_consent,
    routes_jobs,
    routes_renders,
    routes_webhooks,
)
from pipeline.api.auth import ApiProblem, RateLimiter
from pipeline.api.deps import PROBLEM_MEDIA_TYPE
from pipeline.api.repository import ApiKeyRepository, CampaignOwners, IdempotencyRepository
from pipeline.api.service import ApiError, ApiService
from pipeline.campaigns import CampaignService
from pipeline.consent.service import ConsentService
from pipeline.errors import GreetflowError, PermanentError
from pipeline.metrics import Readiness
from pipeline.probes import add_probe_routes
from pipeline.repositories import JobRepository
from pipeline.settings import Settings
from pipeline.webhooks.service import WebhookService
from schemas.brief import CampaignBrief


class Container(Protocol):
    """What the app takes of the wiring (pipeline.bootstrap.Container)."""

    settings: Settings

    @property
    def db(self) -> Database: ...
    @property
    def jobs(self) -> JobRepository: ...
    @property
    def store(self) -> ObjectStore: ...
    def campaigns(self) -> CampaignService: ...
    def consent_service(self) -> ConsentService: ...
    def webhook_service(self, owner: str) -> WebhookService: ...


log = logging.getLogger(__name__)

_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or _PHRASES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


class BodyLimit:
    """Refuses (413) a request body over `max_bytes`, declared or streamed, before a route
    or the multipart parser buffers it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                resp = problem(413, f"the request body is over the limit of {self.max_bytes} bytes")
                await resp(scope, receive, send)
                return
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiProblem(
                        413,
                        "Content Too Large",
                        f"the request body is over the limit of {self.max_bytes} bytes",
                    )
            return message

        await self.app(scope, capped, send)


def _validation_errors(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    errors = []
    for err in exc.errors()[:20]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "(body)"
        errors.append({"loc": loc, "msg": str(err.get("msg", "invalid"))})
    summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5]) or "invalid request"
    return f"the request is not valid: {summary}", errors


def create_app(container: Container, *, readiness: Readiness | None = None) -> FastAPI:
    """The API over the container's services. `readiness`: the probes behind /readyz
    (started here); None: ready while serving."""
    settings = container.settings
    service = ApiService(
        settings,
        jobs=container.jobs,
        campaigns=container.campaigns,
        keys=ApiKeyRepository(container.db),
        idempotency=IdempotencyRepository(container.db, ttl_s=settings.api_idempotency_ttl_s),
        owners=CampaignOwners(container.db),
        store=container.store,
        consent=container.consent_service,
    )
    app = build_app(settings, service, readiness=readiness)
    app.state.webhooks = container.webhook_service("api")
    return app


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document, without connecting to anything (`greetflow schema export`)."""
    return build_app(settings, None).openapi()


def build_app(
    settings: Settings, service: ApiService | None, *, readiness: Readiness | None = None
) -> FastAPI:
    app = FastAPI(
        title="Greetflow render API",
        version="1",
        description="Request personalized greeting clips, follow their jobs, upload photos, record consent.",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.api_service = service
    app.state.key_lookup = service.lookup_key if service is not None else (lambda _token: None)
    app.state.rate_limiter = RateLimiter(settings.api_rate_limit_per_min, settings.api_rate_burst)
    # Consent grants carry the evidence and the photo: room for two uploads and the form.
    app.add_middleware(BodyLimit, max_bytes=2 * settings.api_upload_max_bytes + 65_536)
    if readiness is not None:
        readiness.start()

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return problem(exc.status, exc.detail, title=exc.title)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        title = exc.title if isinstance(exc, ApiProblem) else None
        detail = str(exc.detail) if exc.detail else _PHRASES.get(exc.status_code, "error")
        if exc.status_code == 404 and not isinstance(exc, ApiProblem) and detail == "Not Found":
            detail = "no such resource"
        if exc.status_code == 405 and detail == "Method Not Allowed":
            detail = "the method is not allowed on this resource"
        return problem(exc.status_code, detail, title=title, headers=dict(exc.headers or {}) or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        detail, errors = _validation_errors(exc)
        return problem(422, detail, errors=errors)

    @app.exception_handler(PermanentError)
    async def permanent_error(_: Request, exc: PermanentError) -> Response:
        return problem(422, str(exc).splitlines()[0] if str(exc) else "the request cannot be processed")

    @app.exception_handler(GreetflowError)
    async def greetflow_error(_: Request, exc: GreetflowError) -> Response:
        ref = uuid.uuid4().hex[:12]
        log.error("api error %s: %s: %s", ref, type(exc).__name__, exc)
        return problem(503, f"the service cannot handle the request now (reference {ref})")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        ref = uuid.uuid4().hex[:12]
        log.exception("api internal error %s", ref, exc_info=exc)
        return problem(500, f"internal error (reference {ref})")

    add_probe_routes(app, readiness)

    for module in (
        routes_renders,
        routes_jobs,
        routes_campaigns,
        routes_assets,
        routes_consent,
        routes_webhooks,
    ):
        app.include_router(module.router)

    _add_brief_schema(app)
    return app


def _add_brief_schema(app: FastAPI) -> None:
    """POST /v1/campaigns reads its body itself (capped); its schema is the brief's."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        brief = CampaignBrief.model_json_schema(ref_template="#/components/schemas/{model}")
        defs = brief.pop("$defs", {})
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for name, d in defs.items():
            schemas.setdefault(name, d)
        schemas["CampaignBrief"] = brief
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
