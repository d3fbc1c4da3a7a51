"""POST /v1/campaigns (a brief as JSON) and GET /v1/campaigns/{id}."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from pipeline.api.auth import ApiPrincipal, require_scope
from pipeline.api.deps import ERRORS, api_service, base_url, read_capped
from pipeline.api.models import CampaignAccepted, CampaignOut

router = APIRouter(prefix="/v1", tags=["campaigns"], responses={**ERRORS, 409: ERRORS[422]})

_BRIEF_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CampaignBrief"}}},
    }
}


@router.post(
    "/campaigns",
    status_code=202,
    response_model=CampaignAccepted,
    summary="Submit a campaign brief (JSON)",
    openapi_extra=_BRIEF_BODY,
)
async def create_campaign(
    request: Request, who: Annotated[ApiPrincipal, Depends(require_scope("campaigns:write"))]
) -> CampaignAccepted:
    svc = api_service(request)
    raw = await read_capped(request, svc.settings.intake_max_brief_bytes)
    return await run_in_threadpool(svc.submit_campaign, who, raw, base_url(request))


@router.get("/campaigns/{campaign_id}", response_model=CampaignOut, summary="Counts by state, report")
def get_campaign(
    campaign_id: str,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("campaigns:read"))],
) -> CampaignOut:
    return api_service(request).campaign(who, campaign_id)
