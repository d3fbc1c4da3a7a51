"""Campaign briefs: what marketing teams hand to Greetflow (a YAML/JSON file or an API body)."""

from __future__ import annotations

from datetime import datetime
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.common import DisplayName, DisplayText, Locale, Scope, Slug


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemplateRef(_Model):
    name: Slug
    version: Slug = "1"


class SubjectUse(_Model):
    """A real person whose likeness (face, voice) or name a clip uses.

    Every subject use must be covered by a valid consent before the clip is published.
    """

    subject_id: Slug
    scopes: frozenset[Scope] = Field(min_length=1)


class Recipient(_Model):
    id: Slug
    name: DisplayName
    locale: Locale = Locale.EN
    # Object key of the subject photo in the assets bucket (validated, never a URL).
    photo_key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,255}$")
    subjects: tuple[SubjectUse, ...] = ()

    @model_validator(mode="after")
    def _photo_needs_face_subject(self) -> Self:
        if self.photo_key is not None:
            if ".." in self.photo_key:
                raise ValueError("photo_key must not contain '..'")
            if not any(Scope.FACE in s.scopes for s in self.subjects):
                raise ValueError(
                    "a recipient with photo_key must name the pictured person in subjects "
                    "with scope 'face' (consent is checked before publishing)"
                )
        return self


class Schedule(_Model):
    cron: str = Field(min_length=9, max_length=100)
    timezone: str = "UTC"
    start_date: datetime | None = None
    end_date: datetime | None = None


class CampaignBrief(_Model):
    campaign_id: Slug
    title: DisplayText
    template: TemplateRef
    default_locale: Locale = Locale.EN
    schedule: Schedule | None = None
    recipients: tuple[Recipient, ...] = Field(default=(), max_length=100_000)
    # Where the audience comes from when it is not inline (resolved by the campaign DAG).
    audience_key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,255}$")
    webhook_url: str | None = None

    @model_validator(mode="after")
    def _unique_recipients(self) -> Self:
        seen: set[str] = set()
        dupes = sorted({r.id for r in self.recipients if r.id in seen or seen.add(r.id)})  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate recipient ids: {', '.join(dupes[:10])}")
        if not self.recipients and self.audience_key is None:
            raise ValueError("a brief needs inline recipients or an audience_key")
        return self
