"""The consent rule as pure functions over ledger records (no database). The rule on
records read back from the ledger: tests/integration/test_db.py."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.consent.rules import (
    campaign_purpose,
    consent_findings,
    covers,
    effective_grants,
    face_grants,
    granted_scopes,
    unneeded_faces,
)
from pipeline.repositories import ConsentAction, ConsentRecord
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.events import Severity

T0 = datetime(2026, 2, 16, 12, 0, tzinfo=UTC)
FACE, VOICE, NAME = Scope.FACE, Scope.VOICE, Scope.NAME
LNY = campaign_purpose("lny")


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def record(
    action: ConsentAction = "grant",
    scopes: frozenset[Scope] = frozenset({FACE}),
    *,
    subject: str = "grandma",
    purpose: str = LNY,
    at: datetime = T0,
    expires: datetime | None = None,
    supersedes: uuid.UUID | None = None,
) -> ConsentRecord:
    return ConsentRecord(
        subject_id=subject,
        action=action,
        scopes=scopes,
        purpose=purpose,
        recorded_by="test",
        granted_at=at,
        expires_at=expires,
        supersedes=supersedes,
        created_at=at,
    )


def use(subject: str = "grandma", *scopes: Scope) -> SubjectUse:
    return SubjectUse(subject_id=subject, scopes=frozenset(scopes or {FACE}))


def test_purpose_must_match_or_be_any() -> None:
    records = [record(scopes=frozenset({FACE})), record(scopes=frozenset({NAME}), purpose="*")]
    assert granted_scopes(records, LNY, T0) == {FACE, NAME}
    assert granted_scopes(records, campaign_purpose("other"), T0) == {NAME}
    assert covers(records, [FACE, NAME], LNY, T0)
    assert not covers(records, [FACE], campaign_purpose("other"), T0)


def test_refusals() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        effective_grants([record()], datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="one subject"):
        effective_grants([record(), record(subject="aunt")], T0)
    with pytest.raises(ValueError, match="at least one scope"):
        covers([record()], [], LNY, T0)


def test_consent_findings_name_each_subject_and_the_missing_scopes() -> None:
    histories = {"grandma": [record(scopes=frozenset({FACE}))]}
    subjects = (use("grandma", FACE, VOICE), use("aunt", NAME), use("grandma", FACE))
    findings = consent_findings(histories, subjects, campaign_id="lny", at=T0)
    assert [(f.evidence["subject_id"], f.evidence["scopes"]) for f in findings] == [
        ("grandma", ["voice"]),
        ("aunt", ["name"]),
    ]
    assert {f.severity for f in findings} == {Severity.BLOCK}
    assert {f.kind for f in findings} == {"consent_missing"}
    assert consent_findings(histories, (use("grandma", FACE),), campaign_id="lny", at=T0) == []


def test_face_grants_and_the_faces_no_grant_needs() -> None:
    face = record(scopes=frozenset({FACE, NAME}))
    name_only = record(scopes=frozenset({NAME}))
    other = record(purpose=campaign_purpose("other"))
    future = record(at=T0 + hours(5))
    histories = {"grandma": [face, name_only, other, future]}
    assert face_grants(histories, (use("grandma", FACE),), campaign_id="lny", at=T0) == {
        face.record_id: "grandma"
    }
    assert face_grants(histories, (use("grandma", NAME),), campaign_id="lny", at=T0) == {}

    revoke = record("revoke", frozenset({FACE}), purpose="*", at=T0 + hours(1))
    history = [face, name_only, other, future, revoke]
    stored = {face.record_id, other.record_id, future.record_id}
    # The revoke ends the face of every earlier grant; the future grant keeps its face.
    assert unneeded_faces(history, stored, T0 + hours(2)) == {face.record_id, other.record_id}
    assert unneeded_faces(history, stored, T0) == set()
