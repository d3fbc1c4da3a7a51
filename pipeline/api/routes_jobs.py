"""GET /v1/jobs/{id}: where one of the tenant's jobs stands."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from pipeline.api.auth import ApiPrincipal, require_scope
from pipeline.api.deps import ERRORS, api_service
from pipeline.api.models import JobOut

router = APIRouter(prefix="/v1", tags=["jobs"], responses=ERRORS)


@router.get("/jobs/{job_id}", response_model=JobOut, summary="A job's state, history and URLs")
def get_job(
    job_id: str, request: Request, who: Annotated[ApiPrincipal, Depends(require_scope("jobs:read"))]
) -> JobOut:
    return api_service(request).job(who, job_id)
