"""Kafka payloads and the event envelope that carries them."""

from __future__ import annotations

import json
import uuid
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, HttpUrl
from pydantic_core import to_jsonable_python

from schemas.brief import MAX_REFERENCES, Recipient, Reference, SubjectUse, TemplateRef, reference_subjects
from schemas.common import Locale, Scope, Slug, UtcDatetime, utcnow


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    event_type: ClassVar[str]
    schema_version: ClassVar[int] = 1


class RenderRequested(_Payload):
    event_type: ClassVar[str] = "render.requested"

    job_id: uuid.UUID
    campaign_id: Slug
    recipient: Recipient
    template: TemplateRef
    locale: Locale
    requested_at: UtcDatetime = Field(default_factory=utcnow)
    # The brief's reference assets (character photos, style images).
    references: tuple[Reference, ...] = Field(default=(), max_length=MAX_REFERENCES)

    @property
    def subjects(self) -> tuple[SubjectUse, ...]:
        """The recipient's subjects, and the real people the character references show."""
        if not self.references:
            return self.recipient.subjects
        scopes: dict[str, frozenset[Scope]] = {}
        for u in (*self.recipient.subjects, *reference_subjects(self.references)):
            scopes[u.subject_id] = scopes.get(u.subject_id, frozenset()) | u.scopes
        return tuple(SubjectUse(subject_id=k, scopes=v) for k, v in scopes.items())


class ClipRendered(_Payload):
    event_type: ClassVar[str] = "clip.rendered"

    job_id: uuid.UUID
    campaign_id: Slug
    recipient_id: Slug
    staging_key: str
    poster_key: str | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    duration_s: float = Field(gt=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    rendered_at: UtcDatetime = Field(default_factory=utcnow)


class DrawnText(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: str = Field(min_length=1, max_length=128)
    text: str = Field(max_length=2000)


class DrawnTexts(BaseModel):
    """What the renderer drew on one clip: every per-recipient text (by template layer id)
    and the merge values it substituted. Stored beside the clip in staging
    (`<campaign>/<recipient>/<job>.texts.json`); moderation checks these against the job row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: uuid.UUID
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]  # of the clip they were drawn on
    template: str = ""  # "name@version"
    merge_values: dict[str, str] = Field(default_factory=dict)
    texts: tuple[DrawnText, ...] = ()


class Decision(StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"
    NEEDS_REVIEW = "needs_review"


class Severity(StrEnum):
    INFO = "info"
    WARN = "warn"
    BLOCK = "block"


class Finding(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Slug
    severity: Severity
    message: str
    evidence: dict[str, Any] = Field(default_factory=dict)


class ModerationDecided(_Payload):
    event_type: ClassVar[str] = "moderation.decided"

    job_id: uuid.UUID
    campaign_id: Slug
    decision: Decision
    findings: tuple[Finding, ...] = ()
    decided_by: str = "auto"
    reason: str = ""
    decided_at: UtcDatetime = Field(default_factory=utcnow)


class ClipPublished(_Payload):
    event_type: ClassVar[str] = "clip.published"

    job_id: uuid.UUID
    campaign_id: Slug
    recipient_id: Slug
    object_key: str
    url: HttpUrl
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    captions_url: HttpUrl | None = None  # WebVTT sidecar of the voice line, when the template has captions
    published_at: UtcDatetime = Field(default_factory=utcnow)


class ClipTakenDown(_Payload):
    event_type: ClassVar[str] = "clip.taken_down"

    job_id: uuid.UUID
    campaign_id: Slug
    object_key: str
    reason: str
    taken_down_at: UtcDatetime = Field(default_factory=utcnow)


class ConsentChanged(_Payload):
    event_type: ClassVar[str] = "consent.changed"

    record_id: uuid.UUID
    subject_id: Slug
    action: Literal["grant", "revoke", "expire"]
    scopes: frozenset[Scope]
    purpose: str
    expires_at: UtcDatetime | None = None
    recorded_by: str
    changed_at: UtcDatetime = Field(default_factory=utcnow)


P = TypeVar("P", bound=_Payload)


class EnvelopeSignature(BaseModel):
    """HMAC-SHA256 of a trusted producer over the envelope's canonical content
    (`Envelope.signed_content`), under the producer key named `key_id`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: Slug
    hmac_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def canonical_json(value: Any) -> str:
    """JSON text of a canonical JSON-ready value as signatures cover it: keys sorted,
    compact, UTF-8 characters as they are."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(value: Any) -> Any:
    """JSON-ready value with one spelling per content: sets sorted, mappings by key."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [_canonical(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True, ensure_ascii=False))
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return to_jsonable_python(value)


class Envelope(BaseModel, Generic[P]):
    """Every Kafka message is one envelope. `type` and `schema_version` name the payload.

    `signature` is set by trusted producers (pipeline/trust.py); a render request for a job
    that has no row yet is accepted only with a valid one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    type: str
    schema_version: int = 1
    occurred_at: UtcDatetime = Field(default_factory=utcnow)
    trace_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    payload: P
    signature: EnvelopeSignature | None = None

    def signed_content(self) -> bytes:
        """The canonical bytes a signature covers: every field but `signature`, as sorted,
        compact UTF-8 JSON with sets in sorted order, so the producer's model and the
        consumer's parsed copy give the same bytes."""
        return canonical_json(_canonical(self.model_dump(mode="python", exclude={"signature"}))).encode()

    @classmethod
    def wrap(cls, payload: P, trace_id: str | None = None, id: uuid.UUID | None = None) -> Envelope[P]:
        kwargs: dict[str, Any] = {}
        if trace_id:
            kwargs["trace_id"] = trace_id
        if id is not None:
            kwargs["id"] = id
        model: Any = Envelope[type(payload)]  # type: ignore[misc]
        env: Envelope[P] = model(
            type=payload.event_type, schema_version=payload.schema_version, payload=payload, **kwargs
        )
        return env


PAYLOADS: dict[str, type[_Payload]] = {
    m.event_type: m
    for m in (RenderRequested, ClipRendered, ModerationDecided, ClipPublished, ClipTakenDown, ConsentChanged)
}


class UnknownEventType(ValueError):
    pass


def parse_envelope(raw: bytes | str, expect: type[P]) -> Envelope[P]:
    """Parse and validate one message. Raises pydantic.ValidationError or UnknownEventType.

    The header is checked first, so a message of the wrong type or of a newer schema says
    so instead of listing payload fields.
    """
    head = _Header.model_validate_json(raw)
    if head.type != expect.event_type:
        raise UnknownEventType(f"expected event type {expect.event_type!r}, got {head.type!r}")
    if head.schema_version > expect.schema_version:
        raise UnknownEventType(
            f"{head.type} schema_version {head.schema_version} is newer than this worker understands "
            f"({expect.schema_version})"
        )
    env: Envelope[P] = Envelope[expect].model_validate_json(raw)  # type: ignore[valid-type]
    return env


class _Header(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    schema_version: int = 1
