"""Shared field types and identity rules."""

from __future__ import annotations

import unicodedata
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, StringConstraints

# Namespace of every deterministic Greetflow id (uuid5). Never change it: job ids are
# persisted and used in object keys.
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


def job_id_for(campaign_id: str, recipient_id: str, template_name: str, template_version: str) -> uuid.UUID:
    """The deterministic job id: UUIDv5 of (campaign, recipient, template version).

    Redelivery and re-runs of the same brief map to the same job, so they are idempotent.
    """
    return uuid.uuid5(
        GREETFLOW_NAMESPACE, f"job:{campaign_id}/{recipient_id}/{template_name}@{template_version}"
    )
