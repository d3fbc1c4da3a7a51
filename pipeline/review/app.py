"""The review queue web app: server-rendered pages and a JSON API under /api.

Security model:

- a session is a random 256-bit cookie value (only its SHA-256 is stored), HttpOnly,
  SameSite=Strict, Secure unless `review_cookie_secure` is off (plain-http local use);
- every state-changing request needs the session AND its CSRF token (form field
  `csrf_token`, or header `X-CSRF-Token` for the API); the login form uses a
  double-submit token in its own cookie;
- every template is autoescaped, and the Content-Security-Policy allows no script at
  all, so text from the outside world (recipient names, messages) can only show as text.
"""

from __future__ import annotations

import hmac
import secrets
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, Header, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ConfigDict, Field

from pipeline.metrics import Readiness
from pipeline.probes import add_probe_routes
from pipeline.review.repository import AuditEntry, QueueItem, SessionInfo
from pipeline.review.service import (
    CaseView,
    LoginBusy,
    LoginThrottled,
    Outcome,
    QueueFilters,
    ReviewError,
    ReviewService,
    blocking_or_warning,
)
from schemas.common import utcnow

SESSION_COOKIE = "gf_review_session"
LOGIN_CSRF_COOKIE = "gf_review_login_csrf"
HERE = Path(__file__).resolve().parent

NOTICES = {
    "approved": "Approved: the clip goes to the publisher.",
    "rejected": "Rejected.",
    "pending_second_approval": "First approval recorded: a second approval by a lead is needed.",
    "reopened": "Reopened: the case is back in the queue as a four-eyes case.",
    "released": "Case released.",
    "logged_out": "Logged out.",
}


# --- API models ---


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class DecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject"]
    reason: str = Field(min_length=1, max_length=2000)


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


class SessionOut(BaseModel):
    reviewer: str
    role: str
    csrf_token: str
    expires_at: datetime


class CaseSummaryOut(BaseModel):
    job_id: uuid.UUID
    campaign_id: str
    recipient_id: str
    recipient_name: str
    waiting_since: datetime
    age_s: float
    overdue: bool
    escalated: bool
    four_eyes: bool
    pending_approval_by: str | None
    leased_by: str | None
    lease_expires_at: datetime | None
    findings: list[dict[str, Any]]


class LeaseOut(BaseModel):
    job_id: uuid.UUID
    reviewer: str
    expires_at: datetime


class OutcomeOut(BaseModel):
    job_id: uuid.UUID
    status: str
    by: str


class AuditOut(BaseModel):
    id: int
    job_id: uuid.UUID | None
    actor: str
    action: str
    reason: str
    detail: dict[str, Any]
    at: datetime


def _audit_out(a: AuditEntry) -> AuditOut:
    return AuditOut(
        id=a.id, job_id=a.job_id, actor=a.actor, action=a.action, reason=a.reason, detail=a.detail, at=a.at
    )


def _outcome_out(o: Outcome) -> OutcomeOut:
    return OutcomeOut(job_id=o.job_id, status=o.status, by=o.by)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    d, rem = divmod(seconds, 86_400)
    h, rem = divmod(rem, 3600)
    m = rem // 60
    if d:
        return f"{d} d {h} h"
    if h:
        return f"{h} h {m} min"
    return f"{m} min"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = _age
    env.filters["when"] = _when
    return Jinja2Templates(env=env)


def _client_ip(request: Request) -> str | None:
    """The peer address (with `--proxy-headers`, uvicorn puts the forwarded client here)."""
    return request.client.host if request.client is not None else None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# --- dependencies (module level: FastAPI resolves the annotations from the module) ---


def _service(request: Request) -> ReviewService:
    svc: ReviewService = request.app.state.service
    return svc


def _optional_session(request: Request) -> SessionInfo | None:
    return _service(request).session(request.cookies.get(SESSION_COOKIE))


def require_session(request: Request) -> SessionInfo:
    who = _optional_session(request)
    if who is None:
        raise HTTPException(status_code=401, detail="log in first", headers={"WWW-Authenticate": "Cookie"})
    return who


def _check_csrf(who: SessionInfo, token: str | None) -> None:
    if not token or not hmac.compare_digest(token.encode(), who.csrf_token.encode()):
        raise HTTPException(status_code=403, detail="missing or wrong CSRF token")


def api_write(
    who: Annotated[SessionInfo, Depends(require_session)],
    x_csrf_token: Annotated[str | None, Header()] = None,
) -> SessionInfo:
    """A state-changing API call: the session and its CSRF token (header X-CSRF-Token)."""
    _check_csrf(who, x_csrf_token)
    return who


Api = Annotated[SessionInfo, Depends(require_session)]
ApiWrite = Annotated[SessionInfo, Depends(api_write)]


def create_app(service: ReviewService, *, readiness: Readiness | None = None) -> FastAPI:
    """`readiness`: the probes behind /readyz (started here); None: ready while serving."""
    settings = service.settings
    templates = _templates()
    media_origin = _origin(settings.s3_endpoint)
    csp = (
        "default-src 'none'; script-src 'none'; style-src 'self'; "
        f"img-src 'self' {media_origin}; media-src {media_origin}; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    )

    app = FastAPI(
        title="Greetflow review queue",
        version="1",
        description="Human review of the clips the automatic moderation could not decide.",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    app.state.service = service
    if readiness is not None:
        readiness.start()

    add_probe_routes(app, readiness)

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.middleware("http")
    async def security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", csp)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if not request.url.path.startswith("/static"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def set_session_cookie(response: Response, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=settings.review_session_ttl_s,
            httponly=True,
            secure=settings.review_cookie_secure,
            samesite="strict",
            path="/",
        )

    def optional_session(request: Request) -> SessionInfo | None:
        return _optional_session(request)

    def check_csrf(who: SessionInfo, token: str | None) -> None:
        _check_csrf(who, token)

    @app.exception_handler(ReviewError)
    async def review_error(request: Request, exc: ReviewError) -> Response:
        headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)
        who = optional_session(request)
        return templates.TemplateResponse(
            request, "error.html", {"who": who, "message": str(exc)}, status_code=exc.status, headers=headers
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith("/api/") or request.url.path.startswith("/static/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if exc.status_code == 401:
            return RedirectResponse("/login", status_code=303)
        return templates.TemplateResponse(
            request, "error.html", {"who": None, "message": str(exc.detail)}, status_code=exc.status_code
        )

    # --- JSON API ---

    api = APIRouter(prefix="/api", tags=["review"])

    def summary(item: QueueItem) -> CaseSummaryOut:
        now = utcnow()
        case, lease = item.case, item.lease
        live = lease if lease is not None and lease.live(now) else None
        return CaseSummaryOut(
            job_id=item.job.job_id,
            campaign_id=item.job.campaign_id,
            recipient_id=item.job.recipient_id,
            recipient_name=item.job.request.recipient.name,
            waiting_since=item.waiting_since,
            age_s=(now - item.waiting_since).total_seconds(),
            overdue=service.overdue(item.waiting_since),
            escalated=case is not None and case.escalated_at is not None,
            four_eyes=service.four_eyes_required(item.result.findings, case),
            pending_approval_by=case.pending_approval_by if case else None,
            leased_by=live.reviewer if live else None,
            lease_expires_at=live.expires_at if live else None,
            findings=[f.model_dump(mode="json") for f in blocking_or_warning(item.result.findings)],
        )

    @api.post("/session", response_model=SessionOut, summary="Log in (sets the session cookie)")
    def api_login(body: LoginBody, request: Request, response: Response) -> SessionOut:
        token, who = service.login(body.name, body.password, ip=_client_ip(request))
        set_session_cookie(response, token)
        return SessionOut(
            reviewer=who.reviewer, role=who.role, csrf_token=who.csrf_token, expires_at=who.expires_at
        )

    @api.get("/session", response_model=SessionOut, summary="The current session and its CSRF token")
    def api_me(who: Api) -> SessionOut:
        return SessionOut(
            reviewer=who.reviewer, role=who.role, csrf_token=who.csrf_token, expires_at=who.expires_at
        )

    @api.delete("/session", status_code=204, summary="Log out")
    def api_logout(request: Request, who: ApiWrite) -> Response:
        service.logout(request.cookies.get(SESSION_COOKIE, ""))
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @api.get(
        "/cases", response_model=list[CaseSummaryOut], summary="Pending cases, the longest waiting first"
    )
    def api_cases(
        who: Api,
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        kind: Annotated[str | None, Query(max_length=64)] = None,
        min_age_h: Annotated[float | None, Query(ge=0)] = None,
        max_age_h: Annotated[float | None, Query(ge=0)] = None,
    ) -> list[CaseSummaryOut]:
        items = service.queue(QueueFilters(campaign, kind, min_age_h, max_age_h))
        return [summary(i) for i in items]

    @api.get("/cases/{job_id}", summary="One case: findings, evidence links, consent records, history")
    def api_case(job_id: uuid.UUID, who: Api) -> dict[str, Any]:
        v = service.case(job_id)
        return {
            "job_id": str(v.job.job_id),
            "state": v.job.state.value,
            "campaign_id": v.job.campaign_id,
            "recipient": v.job.request.recipient.model_dump(mode="json"),
            "clip_url": v.clip_url,
            "poster_url": v.poster_url,
            "four_eyes": v.four_eyes,
            "overdue": v.overdue,
            "waiting_since": v.waiting_since.isoformat() if v.waiting_since else None,
            "pending_approval_by": v.case.pending_approval_by if v.case else None,
            "escalated_at": v.case.escalated_at.isoformat() if v.case and v.case.escalated_at else None,
            "lease": {"reviewer": v.lease.reviewer, "expires_at": v.lease.expires_at.isoformat()}
            if v.lease
            else None,
            "findings": [{**m.finding.model_dump(mode="json"), "crop_url": m.crop_url} for m in v.findings],
            "consents": {
                sid: [
                    {
                        "record_id": str(c.record.record_id),
                        "action": c.record.action,
                        "scopes": sorted(s.value for s in c.record.scopes),
                        "purpose": c.record.purpose,
                        "granted_at": c.record.granted_at.isoformat(),
                        "expires_at": c.record.expires_at.isoformat() if c.record.expires_at else None,
                        "evidence_sha256": c.record.evidence_sha256,
                        "evidence_url": c.evidence_url,
                    }
                    for c in records
                ]
                for sid, records in v.consents.items()
            },
            "history": [
                {
                    "from": e.from_state.value if e.from_state else None,
                    "to": e.to_state.value,
                    "actor": e.actor,
                    "reason": e.reason,
                    "at": e.at.isoformat(),
                }
                for e in v.history
            ],
            "audit": [_audit_out(a).model_dump(mode="json") for a in v.audit],
            "can_reopen": v.can_reopen,
        }

    @api.post("/cases/{job_id}/lease", response_model=LeaseOut, summary="Claim the case")
    def api_claim(job_id: uuid.UUID, who: ApiWrite) -> LeaseOut:
        lease = service.claim(job_id, who)
        return LeaseOut(job_id=lease.job_id, reviewer=lease.reviewer, expires_at=lease.expires_at)

    @api.delete("/cases/{job_id}/lease", status_code=204, summary="Release the case")
    def api_release(job_id: uuid.UUID, who: ApiWrite) -> Response:
        service.release(job_id, who)
        return Response(status_code=204)

    @api.post(
        "/cases/{job_id}/decision", response_model=OutcomeOut, summary="Approve or reject (needs the lease)"
    )
    def api_decide(job_id: uuid.UUID, body: DecisionBody, who: ApiWrite) -> OutcomeOut:
        return _outcome_out(service.decide(job_id, who, body.decision == "approve", body.reason))

    @api.post(
        "/cases/{job_id}/reopen", response_model=OutcomeOut, summary="Appeal: reopen a likeness rejection"
    )
    def api_reopen(job_id: uuid.UUID, body: ReasonBody, who: ApiWrite) -> OutcomeOut:
        return _outcome_out(service.reopen(job_id, who, body.reason))

    @api.get("/audit", response_model=list[AuditOut], summary="The audit log (newest last)")
    def api_audit(
        who: Api, job_id: uuid.UUID | None = None, limit: Annotated[int, Query(ge=1, le=5000)] = 500
    ) -> list[AuditOut]:
        return [_audit_out(a) for a in service.repo.audit_log(job_id, limit=limit)]

    app.include_router(api)

    # --- pages ---

    def page_write(who: SessionInfo | None, csrf_token: str | None) -> SessionInfo:
        if who is None:
            raise HTTPException(status_code=401, detail="log in first")
        check_csrf(who, csrf_token)
        return who

    def login_form(
        request: Request, error: str | None, status_code: int = 200, headers: dict[str, str] | None = None
    ) -> Response:
        token = secrets.token_urlsafe(32)
        response = templates.TemplateResponse(
            request,
            "login.html",
            {"who": None, "login_csrf": token, "error": error},
            status_code=status_code,
            headers=headers,
        )
        response.set_cookie(
            LOGIN_CSRF_COOKIE, token, max_age=3600, httponly=True,
            secure=settings.review_cookie_secure, samesite="strict", path="/login",
        )  # fmt: skip
        return response

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_page(request: Request, error: str | None = None) -> Response:
        return login_form(request, "Unknown reviewer or wrong password." if error == "1" else None)

    @app.post("/login", include_in_schema=False)
    def login_submit(
        request: Request,
        name: Annotated[str, Form(max_length=64)],
        password: Annotated[str, Form(max_length=1024)],
        csrf_token: Annotated[str, Form(max_length=128)],
    ) -> Response:
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie.encode(), csrf_token.encode()):
            raise HTTPException(status_code=403, detail="the login form expired: reload the page")
        try:
            token, _who = service.login(name, password, ip=_client_ip(request))
        except (LoginThrottled, LoginBusy) as exc:
            retry = {"Retry-After": str(exc.retry_after_s)}
            return login_form(request, f"{str(exc).capitalize()}.", exc.status, retry)
        except ReviewError:
            return RedirectResponse("/login?error=1", status_code=303)
        response = RedirectResponse("/", status_code=303)
        set_session_cookie(response, token)
        response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout_submit(request: Request, csrf_token: Annotated[str, Form(max_length=128)] = "") -> Response:
        page_write(optional_session(request), csrf_token)
        service.logout(request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def queue_page(
        request: Request,
        campaign: Annotated[str | None, Query(max_length=64)] = None,
        kind: Annotated[str | None, Query(max_length=64)] = None,
        min_age_h: Annotated[str | None, Query(max_length=16)] = None,
        notice: Annotated[str | None, Query(max_length=64)] = None,
    ) -> Response:
        who = optional_session(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        try:
            min_age = float(min_age_h) if min_age_h else None
        except ValueError:
            min_age = None
        items = service.queue(QueueFilters(campaign or None, kind or None, min_age))
        rows = [summary(i) for i in items]
        kinds = sorted({f["kind"] for r in rows for f in r.findings} | set(settings.review_four_eyes_kinds))
        return templates.TemplateResponse(
            request,
            "queue.html",
            {
                "who": who,
                "rows": rows,
                "filters": {"campaign": campaign or "", "kind": kind or "", "min_age_h": min_age_h or ""},
                "kinds": kinds,
                "sla_hours": settings.review_sla_hours,
                "notice": NOTICES.get(notice or ""),
            },
        )

    @app.get("/cases/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def case_page(
        request: Request, job_id: uuid.UUID, notice: Annotated[str | None, Query(max_length=64)] = None
    ) -> Response:
        who = optional_session(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        view: CaseView = service.case(job_id)
        now = utcnow()
        mine = view.lease is not None and view.lease.reviewer == who.reviewer and view.lease.live(now)
        held_by = (
            view.lease.reviewer if view.lease is not None and view.lease.live(now) and not mine else None
        )
        return templates.TemplateResponse(
            request,
            "case.html",
            {
                "who": who,
                "v": view,
                "recipient": view.job.request.recipient,
                "mine": mine,
                "held_by": held_by,
                "age_s": (now - view.waiting_since).total_seconds() if view.waiting_since else None,
                "sla_hours": settings.review_sla_hours,
                "notice": NOTICES.get(notice or ""),
            },
        )

    @app.post("/cases/{job_id}/claim", include_in_schema=False)
    def claim_submit(
        request: Request, job_id: uuid.UUID, csrf_token: Annotated[str, Form(max_length=128)] = ""
    ) -> Response:
        who = page_write(optional_session(request), csrf_token)
        service.claim(job_id, who)
        return RedirectResponse(f"/cases/{job_id}", status_code=303)

    @app.post("/cases/{job_id}/release", include_in_schema=False)
    def release_submit(
        request: Request, job_id: uuid.UUID, csrf_token: Annotated[str, Form(max_length=128)] = ""
    ) -> Response:
        who = page_write(optional_session(request), csrf_token)
        service.release(job_id, who)
        return RedirectResponse("/?notice=released", status_code=303)

    @app.post("/cases/{job_id}/decision", include_in_schema=False)
    def decision_submit(
        request: Request,
        job_id: uuid.UUID,
        decision: Annotated[Literal["approve", "reject"], Form()],
        reason: Annotated[str, Form(max_length=2000)] = "",
        csrf_token: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        who = page_write(optional_session(request), csrf_token)
        outcome = service.decide(job_id, who, decision == "approve", reason)
        return RedirectResponse(f"/?notice={outcome.status}", status_code=303)

    @app.post("/cases/{job_id}/reopen", include_in_schema=False)
    def reopen_submit(
        request: Request,
        job_id: uuid.UUID,
        reason: Annotated[str, Form(max_length=2000)] = "",
        csrf_token: Annotated[str, Form(max_length=128)] = "",
    ) -> Response:
        who = page_write(optional_session(request), csrf_token)
        outcome = service.reopen(job_id, who, reason)
        return RedirectResponse(f"/cases/{job_id}?notice={outcome.status}", status_code=303)

    return app
