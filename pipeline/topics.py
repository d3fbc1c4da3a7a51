"""Kafka topic names. Every topic has a `<topic>.dlq` twin."""

from __future__ import annotations

RENDER_REQUESTS = "render.requests"
RENDER_RESULTS = "render.results"
MODERATION_DECISIONS = "moderation.decisions"
CLIPS_PUBLISHED = "clips.published"
CLIPS_TAKEN_DOWN = "clips.taken_down"
CONSENT_EVENTS = "consent.events"

TOPICS: tuple[str, ...] = (
    RENDER_REQUESTS,
    RENDER_RESULTS,
    MODERATION_DECISIONS,
    CLIPS_PUBLISHED,
    CLIPS_TAKEN_DOWN,
    CONSENT_EVENTS,
)


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


ALL_TOPICS: tuple[str, ...] = TOPICS + tuple(dlq(t) for t in TOPICS)
