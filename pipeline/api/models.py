"""Request and response bodies of the render API (they make its OpenAPI schema)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.brief import SubjectUse, TemplateRef
from schemas.common import Locale, Scope


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipientIn(_In):
    id: str = Field(description="the recipient's id (a slug), unique within the campaign")
    name: str = Field(description="the name drawn on the clip")
    locale: Locale | None = Field(default=None, description="defaults to the request's locale, else en")
    photo_key: str | None = Field(default=None, description="an asset key returned by POST /v1/assets")


class RenderIn(_In):
    recipient: RecipientIn
    template: TemplateRef
    locale: Locale | None = None
    subjects: list[SubjectUse] = Field(default_factory=list, description="real people the clip uses")
    campaign_id: str | None = Field(default=None, description="default: api-<tenant>")


class JobEventOut(BaseModel):
    from_state: str | None
    to_state: str
    reason: str | None
    actor: str
    at: datetime


class JobOut(BaseModel):
    job_id: uuid.UUID
    campaign_id: str
    recipient_id: str
    template: str
    locale: str
    state: str
    final: bool
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    url: str | None
    captions_url: str | None
    history: list[JobEventOut]


class RenderAccepted(BaseModel):
    job_id: uuid.UUID
    campaign_id: str
    state: str
    status_url: str


class CampaignAccepted(BaseModel):
    campaign_id: str
    jobs: int
    created: int
    requested: int
    already_final: int
    status_url: str
    webhook_secret: str | None = Field(
        default=None,
        description="the signing secret of the brief's webhook_url endpoint, shown only when created",
    )


class CampaignOut(BaseModel):
    campaign_id: str
    total: int
    counts: dict[str, int]
    unfinished: int
    report_key: str | None = Field(description="the newest report.json in the reports bucket, if any")
    report_url: str | None = Field(description="a presigned URL of that report")


class AssetOut(BaseModel):
    key: str
    kind: Literal["photo", "reference"]
    content_type: str
    sha256: str
    bytes: int
    width: int
    height: int


class ChallengeIn(_In):
    ttl_s: float | None = Field(default=None, gt=0, le=7 * 86_400)


class RevokeIn(_In):
    scopes: list[Scope] | None = None
    record_id: uuid.UUID | None = None


class Problem(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None
