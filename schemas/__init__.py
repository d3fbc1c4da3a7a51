"""Greetflow contracts: the only definition of everything that crosses a process boundary."""

from schemas.brief import CampaignBrief, Recipient, Schedule, SubjectUse, TemplateRef
from schemas.common import Locale, Scope, job_id_for
from schemas.events import (
    PAYLOADS,
    ClipPublished,
    ClipRendered,
    ClipTakenDown,
    ConsentChanged,
    Decision,
    Envelope,
    Finding,
    ModerationDecided,
    RenderRequested,
    Severity,
    parse_envelope,
)
from schemas.jobs import FINAL_STATES, JobState

__all__ = [
    "FINAL_STATES",
    "PAYLOADS",
    "CampaignBrief",
    "ClipPublished",
    "ClipRendered",
    "ClipTakenDown",
    "ConsentChanged",
    "Decision",
    "Envelope",
    "Finding",
    "JobState",
    "Locale",
    "ModerationDecided",
    "Recipient",
    "RenderRequested",
    "Schedule",
    "Scope",
    "Severity",
    "SubjectUse",
    "TemplateRef",
    "job_id_for",
    "parse_envelope",
]
