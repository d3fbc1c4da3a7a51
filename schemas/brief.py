"""Campaign briefs: what marketing teams hand to Greetflow (a YAML/JSON file or an API body)."""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from datetime import datetime
from functools import lru_cache
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

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


MAX_REFERENCES = 12


class Reference(_Model):
    """A reference asset in the assets bucket: a character photo (a person or character the
    generation should show) or a style image (the look it should take). Style images
    condition generation where the model takes an image (the image-to-video first frame,
    LTX condition frames); character photos of a real person join that subject's likeness
    references and need the subject's consent (scope face)."""

    key: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,255}$")
    kind: Literal["character", "style"]
    # The real person a character photo shows; None only for a fictional character.
    subject_id: Slug | None = None
    fictional: bool = False

    @model_validator(mode="after")
    def _consentable(self) -> Self:
        if ".." in self.key:
            raise ValueError("reference key must not contain '..'")
        if self.kind == "character" and self.subject_id is None and not self.fictional:
            raise ValueError(
                f"character reference {self.key} must name the pictured person in subject_id "
                "(consent is checked before publishing), or say fictional: true"
            )
        return self


def reference_subjects(refs: tuple[Reference, ...]) -> tuple[SubjectUse, ...]:
    """The subjects the character references picture (scope face), one per subject."""
    seen: dict[str, SubjectUse] = {}
    for r in refs:
        if r.kind == "character" and r.subject_id is not None and r.subject_id not in seen:
            seen[r.subject_id] = SubjectUse(subject_id=r.subject_id, scopes=frozenset({Scope.FACE}))
    return tuple(seen.values())


# Brief file versions this code reads.
SUPPORTED_BRIEF_VERSIONS: tuple[int, ...] = (1,)

# Validation context key: accept http webhooks on loopback (development setting).
ALLOW_LOOPBACK_WEBHOOKS = "allow_loopback_webhooks"

_TZ_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9][A-Za-z0-9_+-]*){0,2}$")


@lru_cache(maxsize=1)
def _known_time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(key: str) -> str:
    """An IANA time zone name known to zoneinfo; never a path."""
    if not _TZ_KEY_RE.match(key) or key not in _known_time_zones():
        raise ValueError(f"unknown time zone {key!r} (use an IANA name such as Asia/Hong_Kong)")
    try:
        zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {key!r}") from None
    return key


def check_cron(expr: str) -> str:
    """Five cron fields (minute hour day-of-month month day-of-week), as Airflow schedules them."""
    from croniter import croniter

    fields = expr.split()
    if len(fields) != 5 or not croniter.is_valid(" ".join(fields)):
        raise ValueError(f"invalid cron expression {expr!r} (expected 5 fields, e.g. '0 20 5 2 *')")
    return " ".join(fields)


def is_loopback_host(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_webhook_url(url: str, *, allow_loopback_http: bool = False) -> str:
    """An https URL with a host and no credentials; http only to loopback when allowed."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("webhook_url is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("webhook_url must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("webhook_url must not carry credentials")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise ValueError("webhook_url must not contain whitespace or control characters")
    if parts.scheme == "http":
        if not is_loopback_host(host):
            raise ValueError("webhook_url must use https (http is refused)")
        if not allow_loopback_http:
            raise ValueError(
                "webhook_url must use https (http to loopback needs GREETFLOW_INTAKE_ALLOW_LOOPBACK_WEBHOOKS)"
            )
    return url


class Schedule(_Model):
    cron: str = Field(min_length=9, max_length=100)
    timezone: str = Field(default="UTC", max_length=64)
    start_date: datetime | None = None
    end_date: datetime | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return check_cron(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return check_time_zone(v)

    @model_validator(mode="after")
    def _dates_in_order(self) -> Self:
        if self.start_date is not None and self.end_date is not None:
            tz = zoneinfo.ZoneInfo(self.timezone)
            start = self.start_date if self.start_date.tzinfo else self.start_date.replace(tzinfo=tz)
            end = self.end_date if self.end_date.tzinfo else self.end_date.replace(tzinfo=tz)
            if end <= start:
                raise ValueError(
                    f"end_date ({self.end_date.isoformat()}) must be after start_date "
                    f"({self.start_date.isoformat()})"
                )
        return self


class CampaignBrief(_Model):
    schema_version: int = 1
    campaign_id: Slug
    title: DisplayText
    template: TemplateRef
    default_locale: Locale = Locale.EN
    schedule: Schedule | None = None
    recipients: tuple[Recipient, ...] = Field(default=(), max_length=100_000)
    # Where the audience comes from when it is not inline (resolved by the campaign DAG).
    audience_key: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,255}$")
    webhook_url: str | None = Field(default=None, max_length=2000)
    # At most MAX_REFERENCES reference assets (character photos, style images).
    references: tuple[Reference, ...] = ()

    @field_validator("references", mode="before")
    @classmethod
    def _at_most_twelve(cls, v: object) -> object:
        if isinstance(v, list | tuple) and len(v) > MAX_REFERENCES:
            raise ValueError(f"a brief takes at most {MAX_REFERENCES} reference assets, got {len(v)}")
        return v

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v not in SUPPORTED_BRIEF_VERSIONS:
            known = ", ".join(str(x) for x in SUPPORTED_BRIEF_VERSIONS)
            raise ValueError(f"schema_version {v} is not supported (supported: {known})")
        return v

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        ctx = info.context if isinstance(info.context, dict) else {}
        return check_webhook_url(v, allow_loopback_http=bool(ctx.get(ALLOW_LOOPBACK_WEBHOOKS)))

    @model_validator(mode="after")
    def _unique_recipients(self) -> Self:
        seen: set[str] = set()
        dupes = sorted({r.id for r in self.recipients if r.id in seen or seen.add(r.id)})  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"duplicate recipient ids: {', '.join(dupes[:10])}")
        if not self.recipients and self.audience_key is None:
            raise ValueError("a brief needs inline recipients or an audience_key")
        if self.recipients and self.audience_key is not None:
            raise ValueError("a brief names either inline recipients or an audience_key, not both")
        return self
