"""POST /v1/assets: upload a subject photo or a reference image (the raw bytes as the body)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from pipeline.api.auth import ApiPrincipal, require_scope
from pipeline.api.deps import ERRORS, api_service, read_capped
from pipeline.api.models import AssetOut

router = APIRouter(prefix="/v1", tags=["assets"], responses={**ERRORS, 413: ERRORS[422], 415: ERRORS[422]})

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            t: {"schema": {"type": "string", "format": "binary"}}
            for t in ("image/jpeg", "image/png", "image/webp")
        },
    }
}


@router.post(
    "/assets",
    status_code=201,
    response_model=AssetOut,
    summary="Upload a JPEG, PNG or WebP image",
    openapi_extra=_IMAGE_BODY,
)
async def upload_asset(
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("assets:write"))],
    kind: Annotated[Literal["photo", "reference"], Query()] = "photo",
) -> AssetOut:
    """The type is judged by content, not by Content-Type; the pixel count is read from the
    header before anything is decoded."""
    svc = api_service(request)
    data = await read_capped(request, svc.settings.api_upload_max_bytes)
    return await run_in_threadpool(svc.upload_asset, who, kind, data)
