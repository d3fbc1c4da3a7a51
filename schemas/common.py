"""Shared field types and identity rules."""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, StringConstraints

# Namespace of Greetflow's deterministic non-secret ids (uuid5: trace ids of campaign runs).
# Job ids are keyed instead (`job_id_for`).
GREETFLOW_NAMESPACE = uuid.UUID("6f1d7c3e-2b7a-5c1e-9a4e-6b1f0c9d2e11")

Slug = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"),
]
"""An identifier that is safe inside an object key and a URL path segment."""


class Locale(StrEnum):
    ZH_HANT_HK = "zh-Hant-HK"
    ZH_HANS_CN = "zh-Hans-CN"
    EN = "en"
    JA = "ja"


class Scope(StrEnum):
    FACE = "face"
    VOICE = "voice"
    NAME = "name"
    # Moving pictures made from the person's photo (a living photo); separate from face,
    # and never granted by it.
    ANIMATE = "animate"


_FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def _clean_display_text(value: str) -> str:
    value = unicodedata.normalize("NFC", value).strip()
    if not value:
        raise ValueError("must not be empty")
    bad = sorted({f"U+{ord(c):04X}" for c in value if unicodedata.category(c) in _FORBIDDEN_CATEGORIES})
    if bad:
        raise ValueError(
            f"contains control, format (bidi / zero-width) or unassigned characters: {', '.join(bad)}"
        )
    return value


DisplayName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=40),
    AfterValidator(_clean_display_text),
]
"""A human name drawn on a clip: NFC, no control / bidi / zero-width characters."""

DisplayText = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200),
    AfterValidator(_clean_display_text),
]

UtcDatetime = Annotated[AwareDatetime, AfterValidator(lambda d: d.astimezone(UTC))]


def utcnow() -> datetime:
    return datetime.now(UTC)


def job_id_for(
    key: bytes, campaign_id: str, recipient_id: str, template_name: str, template_version: str
) -> uuid.UUID:
    """The job id: HMAC-SHA256 under a server secret over (campaign, recipient, template
    version), formatted as a UUID (version 8, RFC 9562 variant).

    The same key and brief give the same ids, so re-runs and redelivery are idempotent;
    without the key nobody can compute a job's id ahead of its campaign.
    """
    if not key:
        raise ValueError("the job id key must not be empty")
    message = "\x1f".join(("job", campaign_id, recipient_id, template_name, template_version))
    digest = bytearray(hmac.new(key, message.encode(), hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80
    digest[8] = (digest[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(digest))
