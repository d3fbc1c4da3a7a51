"""Public shapes of the consent ledger, the likeness gallery and stored moderation results.

These are what the CLI prints with --json and what the review-queue app reads; the rows
themselves live in pipeline.adapters.db.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict

from schemas.common import Scope, Slug, UtcDatetime
from schemas.events import Decision, Finding


class _View(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConsentChallengeView(_View):
    """A short-lived code the subject says or writes in the consent artifact."""

    challenge_id: uuid.UUID
    subject_id: Slug
    code: str
    issued_by: str
    issued_at: UtcDatetime
    expires_at: UtcDatetime


class ConsentRecordView(_View):
    record_id: uuid.UUID
    subject_id: Slug
    action: Literal["grant", "revoke", "expire"]
    scopes: frozenset[Scope]
    purpose: str
    granted_at: UtcDatetime
    expires_at: UtcDatetime | None = None
    evidence_sha256: str | None = None
    evidence_key: str | None = None
    challenge_code: str | None = None
    recorded_by: str
    created_at: UtcDatetime
    supersedes: uuid.UUID | None = None


class SubjectConsentView(_View):
    subject_id: Slug
    records: tuple[ConsentRecordView, ...]
    effective: tuple[ConsentRecordView, ...]  # grants in force now, narrowed to their live scopes
    reference_faces: int  # face embeddings kept for the effective face grants


class ProtectedPersonView(_View):
    name: str
    subject_id: Slug | None = None
    faces: int
    enrolled_by: str
    enrolled_at: UtcDatetime


class ModerationRecordView(_View):
    """One moderation result of a job (automatic or human), as the review queue shows it."""

    id: int
    job_id: uuid.UUID
    decision: Decision
    findings: tuple[Finding, ...]
    decided_by: str
    reason: str
    created_at: UtcDatetime
