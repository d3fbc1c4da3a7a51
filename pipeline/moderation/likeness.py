"""Likeness rules: who the faces of a clip are, and what moderation makes of them.

Every face a clip shows must be a consented subject of the job. A face that matches the
protected-persons gallery rejects the clip (unless that person is the consented subject
of the job); any other face sends it to a human, because the detector is blind to
profiles and dlib is weaker on children and uneven across groups. When the recipient
supplied a photo, the subject's face must be seen in the clip itself: a clip showing none
goes to a human too (the photo's face may have been too small or hidden to be checked).
A character reference of a real person adds its face to that subject's reference faces
once it matches the face the subject consented with (`with_character_references`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.faces import MODEL_NAME, FaceSighting, distance, min_distance
from pipeline.repositories import ProtectedFace
from schemas.events import Finding, Severity


@dataclass(frozen=True)
class References:
    """What a clip's faces are compared with."""

    consented: Mapping[str, Sequence[Sequence[float]]]  # subject id -> its reference embeddings
    protected: Sequence[ProtectedFace] = ()


@dataclass
class _Group:
    kind: str  # consented | protected | unknown
    key: str
    sightings: list[FaceSighting] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    nearest: dict[str, Any] = field(default_factory=dict)

    def best(self) -> FaceSighting:
        """The clearest sighting, preferring the clip over the input photo."""
        return max(self.sightings, key=lambda s: (s.source == "clip", s.score))


def _times(sightings: Sequence[FaceSighting], limit: int = 30) -> list[float]:
    return sorted({round(s.t, 2) for s in sightings if s.source == "clip"})[:limit]


def classify_faces(sightings: Sequence[FaceSighting], refs: References, *, threshold: float) -> list[_Group]:
    """Group sightings by who they are: a consented subject, a protected person, or an
    unknown face (unknown faces are clustered so one stranger is one finding)."""
    linked: dict[str, str | None] = {}
    for pf in refs.protected:
        linked[pf.name] = linked.get(pf.name) or pf.subject_id
    # The whole gallery as one matrix: one vectorised distance computation per sighting.
    gallery = np.asarray([pf.embedding for pf in refs.protected], dtype=np.float64).reshape(-1, 128)
    gallery_names = [pf.name for pf in refs.protected]
    groups: dict[tuple[str, str], _Group] = {}
    unknown_reps: list[tuple[str, tuple[float, ...]]] = []
    for s in sightings:
        d_subject = {sid: min_distance(s.embedding, embs) for sid, embs in refs.consented.items()}
        d_person: dict[str, float] = {}
        if len(gallery_names):
            dists = np.linalg.norm(gallery - np.asarray(s.embedding, dtype=np.float64), axis=1)
            for name, d in zip(gallery_names, dists.tolist(), strict=True):
                d_person[name] = min(d, d_person.get(name, float("inf")))
        best_sid = min(d_subject, key=lambda k: d_subject[k]) if d_subject else None
        best_person = min(d_person, key=lambda k: d_person[k]) if d_person else None
        kind, key, dist = "unknown", "", float("inf")
        if best_person is not None and d_person[best_person] < threshold:
            # A protected person is allowed only as the job's own consented subject.
            own = linked.get(best_person)
            if own is not None and own in d_subject and d_subject[own] < threshold:
                kind, key, dist = "consented", own, d_subject[own]
            else:
                kind, key, dist = "protected", best_person, d_person[best_person]
        elif best_sid is not None and d_subject[best_sid] < threshold:
            kind, key, dist = "consented", best_sid, d_subject[best_sid]
        if kind == "unknown":
            for rep_key, rep in unknown_reps:
                if distance(rep, s.embedding) < threshold:
                    key = rep_key
                    break
            else:
                key = f"unknown-{len(unknown_reps) + 1}"
                unknown_reps.append((key, s.embedding))
            dist = d_subject[best_sid] if best_sid is not None else float("inf")
        g = groups.setdefault((kind, key), _Group(kind=kind, key=key))
        g.sightings.append(s)
        g.distances.append(dist)
        if kind == "unknown" and best_sid is not None:
            prev = g.nearest.get("distance", float("inf"))
            if d_subject[best_sid] < prev:
                g.nearest = {"subject_id": best_sid, "distance": round(d_subject[best_sid], 4)}
    return list(groups.values())


def likeness_findings(
    sightings: Sequence[FaceSighting],
    refs: References,
    *,
    threshold: float,
    frames_sampled: int,
    face_subjects: Sequence[str] = (),
    photo_supplied: bool = False,
) -> tuple[list[Finding], list[tuple[Finding, FaceSighting]]]:
    """Findings for the faces of a clip, and the (finding, best sighting) pairs whose face
    crop a reviewer should see. `photo_supplied`: the recipient gave a photo, so a face
    subject not seen in the clip's frames needs a human (not only information)."""
    findings: list[Finding] = []
    to_show: list[tuple[Finding, FaceSighting]] = []
    groups = classify_faces(sightings, refs, threshold=threshold)
    for g in sorted(groups, key=lambda g: (g.kind, g.key)):
        best = g.best()
        d_min = min(g.distances)
        evidence: dict[str, Any] = {
            "times_s": _times(g.sightings),
            "frames": sum(1 for s in g.sightings if s.source == "clip"),
            "sources": sorted({s.source for s in g.sightings}),
            "box": list(best.box),
            "best_frame_s": round(best.t, 2) if best.source == "clip" else None,
            "detection_score": round(best.score, 3),
            "threshold": threshold,
        }
        if g.kind == "protected":
            f = Finding(
                kind="protected_person",
                severity=Severity.BLOCK,
                message=(
                    f"a face {best.where} matches protected person {g.key!r} "
                    f"(distance {d_min:.3f} < {threshold})"
                ),
                evidence={**evidence, "person": g.key, "distance": round(d_min, 4)},
            )
            to_show.append((f, best))
        elif g.kind == "consented":
            f = Finding(
                kind="face_consented",
                severity=Severity.INFO,
                message=f"face of consented subject {g.key} (distance {d_min:.3f})",
                evidence={**evidence, "subject_id": g.key, "distance": round(d_min, 4)},
            )
        else:
            near = (
                f"; nearest consented subject {g.nearest['subject_id']} at {g.nearest['distance']:.3f}"
                if g.nearest
                else ""
            )
            f = Finding(
                kind="unknown_face",
                severity=Severity.WARN,
                message=f"a face {best.where} matches no consented subject of this job{near}",
                evidence={**evidence, "nearest": g.nearest or None},
            )
            to_show.append((f, best))
        findings.append(f)
    # Seen means in the clip's frames: the input photo alone proves nothing about the clip.
    seen = {g.key for g in groups if g.kind == "consented" and any(s.source == "clip" for s in g.sightings)}
    clip_faces = sum(1 for s in sightings if s.source == "clip")
    for sid in face_subjects:
        if sid in seen:
            continue
        if photo_supplied:
            f = Finding(
                kind="subject_face_not_seen",
                severity=Severity.WARN,
                message=(
                    f"a photo of subject {sid} was supplied but their face was not found in the clip "
                    f"({clip_faces} face sightings in {frames_sampled} sampled frames): a reviewer must "
                    "check who the clip shows"
                ),
                evidence={"subject_id": sid, "photo_supplied": True, "clip_sightings": clip_faces},
            )
        else:
            f = Finding(
                kind="subject_face_not_seen",
                severity=Severity.INFO,
                message=f"subject {sid} has face scope but their face was not found in the clip",
                evidence={"subject_id": sid, "photo_supplied": False},
            )
        findings.append(f)
    findings.append(
        Finding(
            kind="likeness_checked",
            severity=Severity.INFO,
            message=f"{len(sightings)} face sightings in {frames_sampled} sampled frames",
            evidence={
                "frames_sampled": frames_sampled,
                "sightings": len(sightings),
                "model": MODEL_NAME,
                "threshold": threshold,
            },
        )
    )
    return findings, to_show


@dataclass(frozen=True)
class CharacterFace:
    """The face found in a character reference of a real person (or why none was)."""

    key: str
    subject_id: str
    embedding: tuple[float, ...] | None
    problem: str = ""  # why there is no embedding


def with_character_references(
    consented: Mapping[str, Sequence[Sequence[float]]],
    faces: Sequence[CharacterFace],
    *,
    threshold: float,
) -> tuple[dict[str, list[Sequence[float]]], list[Finding]]:
    """The consented reference faces plus each character reference's face, and a finding
    per reference (`character_reference_used`, info; `character_reference_not_used`, warn). A
    reference face joins its subject's references only when it matches
    the face the subject consented with (in the ledger): the brief's author supplied the
    reference, the subject did not, so an unverified reference must not turn a stranger
    into the consented subject. One that does not match goes to a human."""
    out: dict[str, list[Sequence[float]]] = {sid: list(embs) for sid, embs in consented.items()}
    findings: list[Finding] = []
    for cf in faces:
        evidence: dict[str, Any] = {"key": cf.key, "subject_id": cf.subject_id, "used": False}
        own = consented.get(cf.subject_id, ())
        if cf.embedding is None:
            severity = Severity.WARN
            message = f"character reference {cf.key} of subject {cf.subject_id} cannot be used: {cf.problem}"
        elif not own:
            severity = Severity.WARN
            message = (
                f"character reference {cf.key}: subject {cf.subject_id} has no consented face for this "
                "use, so it is not used as a reference face"
            )
        else:
            d = min_distance(cf.embedding, own)
            evidence.update(distance=round(d, 4), threshold=threshold)
            if d < threshold:
                out[cf.subject_id].append(cf.embedding)
                evidence["used"] = True
                severity = Severity.INFO
                message = (
                    f"character reference {cf.key} is a reference face of subject {cf.subject_id} "
                    f"(distance {d:.3f} to their consented face)"
                )
            else:
                severity = Severity.WARN
                message = (
                    f"character reference {cf.key} does not match the consented face of subject "
                    f"{cf.subject_id} (distance {d:.3f} >= {threshold}): not used as their reference "
                    "face; a reviewer must check who it shows"
                )
        kind = "character_reference_used" if evidence["used"] else "character_reference_not_used"
        findings.append(Finding(kind=kind, severity=severity, message=message, evidence=evidence))
    return out, findings
