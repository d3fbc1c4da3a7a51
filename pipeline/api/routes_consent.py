"""Consent over HTTP: challenge, grant (with the evidence upload), revoke, show; the same
ConsentService as `greetflow consent`."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from pipeline.api.auth import ApiPrincipal, ApiProblem, require_scope
from pipeline.api.deps import ERRORS, api_service
from pipeline.api.models import ChallengeIn, RevokeIn
from schemas.consent import ConsentChallengeView, SubjectConsentView

router = APIRouter(prefix="/v1/consent", tags=["consent"], responses={**ERRORS, 413: ERRORS[422]})


async def _read_upload(upload: UploadFile, max_bytes: int, what: str) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiProblem(413, "Content Too Large", f"{what} is over the limit of {max_bytes} bytes")
    return data


@router.post("/{subject_id}/challenge", response_model=ConsentChallengeView, summary="Issue a code")
def challenge(
    subject_id: str,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("consent:write"))],
    body: ChallengeIn | None = None,
) -> ConsentChallengeView:
    return api_service(request).consent_challenge(who, subject_id, body.ttl_s if body else None)


@router.post("/{subject_id}/grant", response_model=SubjectConsentView, summary="Record a consent")
async def grant(
    subject_id: str,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("consent:write"))],
    evidence: Annotated[UploadFile, File(description="the consent artifact (video, audio, image, PDF)")],
    scopes: Annotated[str, Form(description="comma-separated: face, voice, name")],
    purpose: Annotated[str, Form()],
    code: Annotated[str, Form(description="the challenge code")],
    photo: Annotated[UploadFile | None, File(description="the consented photo (scope face)")] = None,
    expires_at: Annotated[datetime | None, Form()] = None,
) -> SubjectConsentView:
    svc = api_service(request)
    cap = svc.settings.api_upload_max_bytes
    evidence_bytes = await _read_upload(evidence, cap, "the evidence")
    photo_bytes = await _read_upload(photo, cap, "the photo") if photo is not None else None
    return await run_in_threadpool(
        lambda: svc.consent_grant(
            who,
            subject_id,
            scopes=[s.strip() for s in scopes.split(",") if s.strip()],
            purpose=purpose,
            code=code,
            evidence=evidence_bytes,
            evidence_name=evidence.filename or "evidence",
            photo=photo_bytes,
            expires_at=expires_at,
        )
    )


@router.post("/{subject_id}/revoke", response_model=SubjectConsentView, summary="Withdraw consent")
def revoke(
    subject_id: str,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("consent:write"))],
    body: RevokeIn | None = None,
) -> SubjectConsentView:
    scopes = [s.value for s in body.scopes] if body and body.scopes else None
    return api_service(request).consent_revoke(who, subject_id, scopes, body.record_id if body else None)


@router.get("/{subject_id}", response_model=SubjectConsentView, summary="A subject's consent ledger")
def show(
    subject_id: str,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("consent:read"))],
) -> SubjectConsentView:
    return api_service(request).consent_show(subject_id)
