"""POST /v1/renders: one render through the trusted intake path."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request

from pipeline.api.auth import ApiPrincipal, require_scope
from pipeline.api.deps import ERRORS, api_service, base_url
from pipeline.api.models import RenderAccepted, RenderIn

router = APIRouter(prefix="/v1", tags=["renders"], responses={**ERRORS, 409: ERRORS[422]})


@router.post("/renders", status_code=202, response_model=RenderAccepted, summary="Request one render")
def create_render(
    body: RenderIn,
    request: Request,
    who: Annotated[ApiPrincipal, Depends(require_scope("renders:write"))],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> RenderAccepted:
    """Validated as a brief's recipient is (template fit, consent scopes, protected photos);
    the same Idempotency-Key and body give the same job for 24 h, another body 409."""
    return api_service(request).request_render(
        who, body, idempotency_key=idempotency_key, base_url=base_url(request)
    )
