"""The consent rule, as pure functions of consent records and a time.

Every real person a clip uses has a valid, unexpired, unrevoked consent for this use (its
purpose) covering each scope the clip uses (a photo needs face, a cloned voice needs voice).

A grant is in force from its `granted_at` until its `expires_at`. A record that took effect
by the time asked about and names a grant in `supersedes` ends that grant entirely. A
revoke or expire record with no `supersedes` removes the scopes it lists from every grant
of the subject that took effect before (or at) it, whatever the purpose: withdrawing
consent is never narrower than the person meant. A grant for purpose "*" covers any use.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime

from pipeline.repositories import ConsentRecord
from schemas.brief import Recipient, SubjectUse
from schemas.common import Scope
from schemas.events import Finding, Severity
from schemas.template import LivingPhotoLayer, Template

ANY_PURPOSE = "*"

History = Sequence[ConsentRecord]
"""The ledger records of one subject, in any order."""


def campaign_purpose(campaign_id: str) -> str:
    return f"campaign:{campaign_id}"


def effective_grants(records: Iterable[ConsentRecord], at: datetime) -> list[ConsentRecord]:
    """The grants among one subject's `records` in force at `at`, each narrowed to the
    scopes still granted (in the order of `records`)."""
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware")
    history = list(records)
    subjects = {r.subject_id for r in history}
    if len(subjects) > 1:
        raise ValueError(f"effective_grants() takes the records of one subject, got {sorted(subjects)}")
    history = [r for r in history if r.granted_at <= at]
    ended = {r.supersedes for r in history if r.supersedes is not None}
    blanket = [r for r in history if r.action != "grant" and r.supersedes is None]
    out: list[ConsentRecord] = []
    for g in history:
        if g.action != "grant" or g.record_id in ended or not g.active_at(at):
            continue
        scopes = set(g.scopes)
        for rv in blanket:
            if g.granted_at <= rv.granted_at:
                scopes -= rv.scopes
        if scopes:
            out.append(g if scopes == g.scopes else replace(g, scopes=frozenset(scopes)))
    return out


def granted_scopes(records: Iterable[ConsentRecord], purpose: str, at: datetime) -> frozenset[Scope]:
    """The scopes one subject's grants in force at `at` give for `purpose`."""
    granted: set[Scope] = set()
    for g in effective_grants(records, at):
        if g.purpose in (purpose, ANY_PURPOSE):
            granted |= g.scopes
    return frozenset(granted)


def covers(records: Iterable[ConsentRecord], scopes: Iterable[Scope], purpose: str, at: datetime) -> bool:
    """Every scope is granted, at `at`, by some grant for `purpose` or for any purpose ("*")."""
    wanted = {Scope(sc) for sc in scopes}
    if not wanted:
        raise ValueError("covers() needs at least one scope")
    return wanted <= granted_scopes(records, purpose, at)


# Using one scope needs another as well: an animated photo still shows the face.
IMPLIED_SCOPES: dict[Scope, frozenset[Scope]] = {Scope.ANIMATE: frozenset({Scope.FACE})}


def needed_scopes(scopes: Iterable[Scope]) -> frozenset[Scope]:
    """`scopes` plus the scopes they imply."""
    out = {Scope(s) for s in scopes}
    for s in list(out):
        out |= IMPLIED_SCOPES.get(s, frozenset())
    return frozenset(out)


def may_animate(subjects: Iterable[SubjectUse]) -> bool:
    """Whether a clip may animate the photo: every pictured subject (scope face) is used
    with scope animate too (and consent_findings then requires a grant for it)."""
    pictured = [u for u in subjects if Scope.FACE in u.scopes]
    return bool(pictured) and all(Scope.ANIMATE in u.scopes for u in pictured)


def living_photo_problems(template: Template, recipients: Iterable[Recipient]) -> list[str]:
    """Intake: a template that animates the photo needs scope animate on every pictured
    subject of a recipient with a photo, unless it falls back to the still photo."""
    layers = [la for la in template.layers if isinstance(la, LivingPhotoLayer)]
    if not layers or all(la.fallback == "still" for la in layers):
        return []
    problems: list[str] = []
    for r in recipients:
        if r.photo_key is None:
            continue
        for use in r.subjects:
            if Scope.FACE in use.scopes and Scope.ANIMATE not in use.scopes:
                problems.append(
                    f"recipient {r.id}: subject {use.subject_id} lacks scope animate (template "
                    f"{template.name} animates the photo in layer {layers[0].id}; add animate to the "
                    "subject's scopes with a consent that grants it, or give the layer fallback: still)"
                )
    return problems


def consent_findings(
    histories: Mapping[str, History],
    subjects: Iterable[SubjectUse],
    *,
    campaign_id: str,
    at: datetime,
) -> list[Finding]:
    """A blocking finding for each subject whose consent (its history in `histories`; none
    when absent) does not cover every scope the clip uses for this campaign."""
    findings: list[Finding] = []
    purpose = campaign_purpose(campaign_id)
    for use in subjects:
        granted = granted_scopes(histories.get(use.subject_id, ()), purpose, at)
        missing = sorted(s.value for s in needed_scopes(use.scopes) if s not in granted)
        if missing:
            findings.append(
                Finding(
                    kind="consent_missing",
                    severity=Severity.BLOCK,
                    message=(
                        f"subject {use.subject_id} has no valid consent for {', '.join(missing)} ({purpose})"
                    ),
                    evidence={"subject_id": use.subject_id, "scopes": missing, "purpose": purpose},
                )
            )
    return findings


def relied_grants(
    histories: Mapping[str, History],
    subjects: Iterable[SubjectUse],
    *,
    campaign_id: str,
    at: datetime,
) -> list[uuid.UUID]:
    """The grants in force at `at` that give a scope the clip uses (what it relies on)."""
    purpose = campaign_purpose(campaign_id)
    out: list[uuid.UUID] = []
    for use in subjects:
        wanted = needed_scopes(use.scopes)
        for g in effective_grants(histories.get(use.subject_id, ()), at):
            if g.purpose in (purpose, ANY_PURPOSE) and g.scopes & wanted and g.record_id not in out:
                out.append(g.record_id)
    return out


def face_grants(
    histories: Mapping[str, History],
    subjects: Iterable[SubjectUse],
    *,
    campaign_id: str,
    at: datetime,
) -> dict[uuid.UUID, str]:
    """The grants in force at `at` that let the clip show a subject's face: grant id -> subject."""
    purpose = campaign_purpose(campaign_id)
    out: dict[uuid.UUID, str] = {}
    for use in subjects:
        if Scope.FACE not in use.scopes:
            continue
        for g in effective_grants(histories.get(use.subject_id, ()), at):
            if Scope.FACE in g.scopes and g.purpose in (purpose, ANY_PURPOSE):
                out[g.record_id] = use.subject_id
    return out


def unneeded_faces(records: History, with_faces: Iterable[uuid.UUID], at: datetime) -> set[uuid.UUID]:
    """Among the grants `with_faces` (reference faces stored), those whose faces no grant
    needs any more: not in force for the face at `at`, and not taking effect later."""
    live = {g.record_id for g in effective_grants(records, at) if Scope.FACE in g.scopes}
    future = {r.record_id for r in records if r.granted_at > at}
    return set(with_faces) - live - future
