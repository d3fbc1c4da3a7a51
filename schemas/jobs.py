"""Job states and the allowed transitions; the database enforces them with compare-and-set."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    REQUESTED = "requested"
    RENDERING = "rendering"
    RENDERED = "rendered"
    MODERATING = "moderating"
    NEEDS_REVIEW = "needs_review"
    APPROVED = "approved"
    REJECTED = "rejected"
    PUBLISHING = "publishing"
    PUBLISHED = "published"
    TAKEN_DOWN = "taken_down"
    FAILED = "failed"


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.REQUESTED: frozenset({JobState.RENDERING}),
    JobState.RENDERING: frozenset({JobState.RENDERED}),
    JobState.RENDERED: frozenset({JobState.MODERATING}),
    JobState.MODERATING: frozenset({JobState.APPROVED, JobState.NEEDS_REVIEW, JobState.REJECTED}),
    JobState.NEEDS_REVIEW: frozenset({JobState.APPROVED, JobState.REJECTED}),
    JobState.APPROVED: frozenset({JobState.PUBLISHING}),
    JobState.PUBLISHING: frozenset({JobState.PUBLISHED, JobState.REJECTED}),
    JobState.PUBLISHED: frozenset({JobState.TAKEN_DOWN}),
    # An appeal: a lead reopens an automatic rejection for likeness alone (review queue, four eyes).
    JobState.REJECTED: frozenset({JobState.NEEDS_REVIEW}),
    JobState.TAKEN_DOWN: frozenset(),
    JobState.FAILED: frozenset(),
}
FINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.PUBLISHED, JobState.REJECTED, JobState.TAKEN_DOWN, JobState.FAILED}
)
"""States in which the pipeline does nothing more on its own (a campaign waits for these)."""

# "any state -> failed", except from a final state (a published clip is taken down, not failed).
for _state in TRANSITIONS:
    if _state not in FINAL_STATES:
        TRANSITIONS[_state] = TRANSITIONS[_state] | {JobState.FAILED}

WAITING_FOR_HUMAN: frozenset[JobState] = frozenset({JobState.NEEDS_REVIEW})


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in TRANSITIONS[src]


def sources_of(dst: JobState) -> frozenset[JobState]:
    return frozenset(s for s, targets in TRANSITIONS.items() if dst in targets)
