"""Object keys, derived only from validated ids (never from free user text)."""

from __future__ import annotations

import uuid

from pipeline.adapters.storage import validate_key


def clip_key(campaign_id: str, recipient_id: str, job_id: uuid.UUID, ext: str = "mp4") -> str:
    return validate_key(f"{campaign_id}/{recipient_id}/{job_id}.{ext}")


def poster_key(campaign_id: str, recipient_id: str, job_id: uuid.UUID) -> str:
    return clip_key(campaign_id, recipient_id, job_id, "jpg")


def captions_key(campaign_id: str, recipient_id: str, job_id: uuid.UUID) -> str:
    return clip_key(campaign_id, recipient_id, job_id, "vtt")


def sidecar_of(clip_object_key: str, ext: str) -> str:
    """The key of a clip's sidecar (`.vtt`) next to the clip's own key."""
    stem, dot, _ = clip_object_key.rpartition(".")
    if not dot:
        raise ValueError(f"not a clip key: {clip_object_key!r}")
    return validate_key(f"{stem}.{ext}")


def generation_key(campaign_id: str, recipient_id: str, job_id: uuid.UUID) -> str:
    """The staging record of how the clip was generated: models, parameters, plates,
    reference assets (the publish step writes it into the C2PA manifest)."""
    return clip_key(campaign_id, recipient_id, job_id, "generation.json")


def drawn_texts_key(campaign_id: str, recipient_id: str, job_id: uuid.UUID) -> str:
    """The staging record of the texts the renderer drew on the clip (schemas.events.DrawnTexts)."""
    return clip_key(campaign_id, recipient_id, job_id, "texts.json")
