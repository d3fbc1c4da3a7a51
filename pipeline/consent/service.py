"""The consent ledger service.

`challenge` issues a short-lived code; `grant` records a consent only with an evidence
artifact (an image, audio or video file, judged by its content: consent/evidence.py) and
the code, computes the subject's reference face from the consented photo, and stores both
with the grant in one transaction. A face consent's artifact must show a face matching
that reference; `revoke` and `expire_due` append records that end grants and delete the
reference faces that no grant in force needs any more. Every change is emitted on
consent.events, where the takedown worker picks it up.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from collections.abc import Callable, Generator, Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from pipeline.adapters.storage import ObjectStore, sha256_file
from pipeline.consent.evidence import EvidenceError, EvidenceType, inspect_evidence
from pipeline.consent.rules import ANY_PURPOSE, campaign_purpose, effective_grants, unneeded_faces
from pipeline.errors import GreetflowError
from pipeline.faces import (
    FaceEngine,
    LikenessError,
    analysis_size,
    distance,
    faces_in_photo,
    faces_in_rgb,
    min_distance,
    reference_embedding,
    sample_frames,
)
from pipeline.ports import EventPublisher
from pipeline.repositories import (
    ConsentChallenge,
    ConsentRecord,
    ConsentRepository,
    FaceEmbedding,
    InvalidChallenge,
    LikenessGallery,
)
from pipeline.settings import Settings
from pipeline.topics import CONSENT_EVENTS
from schemas.common import Scope, Slug, utcnow
from schemas.consent import ConsentChallengeView, ConsentRecordView, SubjectConsentView
from schemas.events import ConsentChanged

log = logging.getLogger(__name__)

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud and typed
CODE_LENGTH = 6
_ID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_PURPOSE = re.compile(rf"^(\*|campaign:{_ID}|personal:{_ID})$")
_SLUG = TypeAdapter(Slug)


class ConsentError(GreetflowError):
    """A consent operation was refused; the message says why and what to do."""


def new_code(length: int = CODE_LENGTH) -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(length))


def normalise_purpose(purpose: str) -> str:
    """'*', 'campaign:<id>' or 'personal:<id>'; a bare id means its campaign."""
    p = purpose.strip()
    if p and ":" not in p and p != ANY_PURPOSE:
        p = campaign_purpose(p)
    if not _PURPOSE.match(p):
        raise ConsentError(f"purpose {purpose!r} must be '*', 'campaign:<campaign id>' or 'personal:<id>'")
    return p


def record_view(r: ConsentRecord) -> ConsentRecordView:
    return ConsentRecordView(
        record_id=r.record_id,
        subject_id=r.subject_id,
        action=r.action,
        scopes=r.scopes,
        purpose=r.purpose,
        granted_at=r.granted_at,
        expires_at=r.expires_at,
        evidence_sha256=r.evidence_sha256,
        evidence_key=r.evidence_key,
        challenge_code=r.challenge_code,
        recorded_by=r.recorded_by,
        created_at=r.created_at,
        supersedes=r.supersedes,
    )


@dataclass(frozen=True)
class SubjectSummary:
    subject_id: str
    records: int
    effective_scopes: frozenset[Scope]
    purposes: tuple[str, ...]
    last_change: datetime


class ConsentService:
    def __init__(
        self,
        settings: Settings,
        consents: ConsentRepository,
        gallery: LikenessGallery,
        store: ObjectStore,
        events: EventPublisher,
        *,
        faces: Callable[[], FaceEngine],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.consents = consents
        self.gallery = gallery
        self.store = store
        self.events = events
        self._faces = faces
        self._clock = clock

    # ----------------------------------------------------------------- challenge

    def challenge(
        self, subject_id: str, *, issued_by: str, ttl_s: float | None = None
    ) -> ConsentChallengeView:
        """Issue a code the subject must say (consent video) or write (signed form)."""
        subject_id = _subject(subject_id)
        ch = self.consents.issue_challenge(
            subject_id,
            new_code(),
            issued_by=issued_by,
            ttl_s=ttl_s or self.settings.consent_challenge_ttl_s,
            at=self._clock(),
        )
        return _challenge_view(ch)

    # ----------------------------------------------------------------- grant

    def grant(
        self,
        subject_id: str,
        *,
        scopes: Iterable[Scope | str],
        purpose: str,
        evidence: Path,
        challenge_code: str,
        recorded_by: str,
        photo: Path | None = None,
        expires_at: datetime | None = None,
        trace_id: str | None = None,
    ) -> ConsentRecord:
        """Record a consent. Needs the evidence artifact and the challenge code issued to
        the subject; a grant with scope face needs the consented photo of the subject."""
        subject_id = _subject(subject_id)
        try:
            wanted = frozenset(Scope(s) for s in scopes)
        except ValueError as exc:
            raise ConsentError(f"unknown scope: {exc} (use face, voice, name)") from exc
        if not wanted:
            raise ConsentError("a grant needs at least one scope (face, voice, name)")
        purpose = normalise_purpose(purpose)
        if not recorded_by.strip():
            raise ConsentError("recorded_by must name who records the consent")
        now = self._clock()
        code = (challenge_code or "").strip().upper()
        if not code:
            raise ConsentError(
                f"a grant needs the challenge code: issue one with `greetflow consent challenge {subject_id}`"
            )
        self._valid_challenge(subject_id, code, now)
        if expires_at is None and self.settings.consent_default_ttl_days:
            expires_at = now + timedelta(days=self.settings.consent_default_ttl_days)
        if expires_at is not None and expires_at <= now:
            raise ConsentError(f"expires_at {expires_at.isoformat()} is not in the future")
        evidence = Path(evidence)
        if not evidence.is_file() or evidence.stat().st_size == 0:
            raise ConsentError(f"evidence {evidence} is not a readable, non-empty file")
        try:
            kind = inspect_evidence(evidence)
        except EvidenceError as exc:
            raise ConsentError(str(exc)) from None

        faces: list[FaceEmbedding] = []
        if Scope.FACE in wanted:
            if photo is None:
                raise ConsentError(
                    "scope face needs the consented photo (--photo): the subject's reference face "
                    "is computed from it"
                )
            faces = [self._reference_face(subject_id, Path(photo))]
            if sha256_file(evidence) == faces[0].source_sha256:
                raise ConsentError(
                    f"evidence {evidence.name} is the consented photo itself: record the subject's own "
                    "consent artifact (a video or photo of them with the code or the signed form)"
                )
            self._check_evidence_face(evidence, kind, faces)

        sha = sha256_file(evidence)
        key = f"{self.settings.consent_evidence_prefix}/{subject_id}/{sha}{kind.suffix}"
        self.store.put_file(
            self.settings.bucket_assets,
            key,
            evidence,
            content_type=kind.content_type,
            metadata={"sha256": sha, "subject-id": subject_id},
        )
        record = ConsentRecord(
            subject_id=subject_id,
            action="grant",
            scopes=wanted,
            purpose=purpose,
            recorded_by=recorded_by,
            granted_at=now,
            expires_at=expires_at,
            evidence_sha256=sha,
            evidence_key=key,
            challenge_code=code,
            created_at=now,
        )
        try:
            self.consents.append_grant(record, challenge_code=code, faces=faces, at=now)
        except InvalidChallenge as exc:
            raise ConsentError(str(exc)) from exc
        self._emit(record, trace_id)
        log.info("consent grant %s: %s %s for %s", record.record_id, subject_id, sorted(wanted), purpose)
        return record

    def _valid_challenge(self, subject_id: str, code: str, now: datetime) -> ConsentChallenge:
        for ch in reversed(self.consents.challenges(subject_id)):
            if ch.code != code:
                continue
            if ch.used_at is not None:
                raise ConsentError(f"challenge code {code} was already used (by record {ch.used_by_record})")
            if ch.expires_at <= now:
                raise ConsentError(
                    f"challenge code {code} expired at {ch.expires_at.isoformat()}: issue a new one"
                )
            return ch
        raise ConsentError(f"challenge code {code} was not issued to subject {subject_id}")

    def _reference_face(self, subject_id: str, photo: Path) -> FaceEmbedding:
        if not photo.is_file():
            raise ConsentError(f"photo {photo} is not a readable file")
        try:
            ref = reference_embedding(self._faces(), photo)
        except LikenessError as exc:
            raise ConsentError(str(exc)) from exc
        # Nobody consents on behalf of a protected person under another subject id.
        for pf in self.gallery.faces():
            d = distance(ref.values, pf.embedding)
            if d < self.settings.likeness_threshold and pf.subject_id != subject_id:
                raise ConsentError(
                    f"the photo matches protected person {pf.name!r} (distance {d:.3f}); a consent "
                    f"for subject {subject_id!r} cannot cover that face"
                )
        return ref

    def _check_evidence_face(
        self, evidence: Path, kind: EvidenceType, faces: Sequence[FaceEmbedding]
    ) -> None:
        """A face consent's artifact must show the subject: a face in it matches the
        reference face (below the likeness threshold)."""
        if kind.kind == "audio":
            raise ConsentError(
                f"evidence {evidence.name} is audio ({kind.format}): a consent with scope face needs an "
                "image or video that shows the subject"
            )
        refs = [f.values for f in faces]
        threshold = self.settings.likeness_threshold
        best = float("inf")
        with closing(self._faces_in_artifact(evidence, kind)) as found:  # stops ffmpeg early
            for embedding in found:
                best = min(best, min_distance(embedding, refs))
                if best < threshold:
                    return
        if best == float("inf"):
            where = " in its first 10 seconds" if kind.kind == "video" else ""
            raise ConsentError(
                f"no face found in the consent artifact {evidence.name}{where}: for scope face it must "
                "show the subject"
            )
        raise ConsentError(
            f"the person in the consent artifact {evidence.name} does not match the consented photo "
            f"(closest distance {best:.3f}, must be below {threshold})"
        )

    def _faces_in_artifact(self, evidence: Path, kind: EvidenceType) -> Generator[tuple[float, ...]]:
        """Face embeddings in an image, or in a video's frames (one a second, at most 10)."""
        engine = self._faces()
        if kind.kind == "video":
            from pipeline.render.media import RenderError, probe

            try:
                info = probe(evidence)
                if not info.width or not info.height:
                    raise ConsentError(f"the consent video {evidence.name} has no picture")
                width = min(info.width, self.settings.likeness_analysis_width)
                w, h = analysis_size(info.width, info.height, width)
                for fr in sample_frames(evidence, width=w, height=h, interval_s=1.0, max_frames=10):
                    for f in faces_in_rgb(engine, fr.image):
                        yield f.embedding
                return
            except (RenderError, LikenessError) as exc:
                raise ConsentError(f"cannot read the consent video {evidence.name}: {exc}") from exc
        try:
            found = faces_in_photo(engine, evidence)
        except LikenessError as exc:
            raise ConsentError(str(exc)) from exc
        for f in found:
            yield f.embedding

    # ----------------------------------------------------------------- revoke / expire

    def revoke(
        self,
        subject_id: str,
        *,
        recorded_by: str,
        scopes: Iterable[Scope | str] | None = None,
        record_id: uuid.UUID | str | None = None,
        trace_id: str | None = None,
    ) -> ConsentRecord:
        """Withdraw consent: one grant (record_id), or the given scopes (default: all) of
        every grant of the subject, whatever the purpose."""
        subject_id = _subject(subject_id)
        history = self.consents.records(subject_id)
        if not history:
            raise ConsentError(f"no consent is recorded for subject {subject_id}")
        now = self._clock()
        if record_id is not None:
            rid = uuid.UUID(str(record_id))
            prior = next((r for r in history if r.record_id == rid), None)
            if prior is None or prior.action != "grant":
                raise ConsentError(f"{rid} is not a grant of subject {subject_id}")
            record = ConsentRecord(
                subject_id=subject_id,
                action="revoke",
                scopes=prior.scopes,
                purpose=prior.purpose,
                recorded_by=recorded_by,
                granted_at=now,
                created_at=now,
                supersedes=rid,
            )
        else:
            try:
                wanted = frozenset(Scope(s) for s in scopes) if scopes else frozenset(Scope)
            except ValueError as exc:
                raise ConsentError(f"unknown scope: {exc} (use face, voice, name)") from exc
            record = ConsentRecord(
                subject_id=subject_id,
                action="revoke",
                scopes=wanted,
                purpose=ANY_PURPOSE,
                recorded_by=recorded_by,
                granted_at=now,
                created_at=now,
            )
        self.consents.append(record)
        purged = self.purge_faces(subject_id, at=now)
        self._emit(record, trace_id)
        log.info(
            "consent revoke %s: %s %s (%d reference faces deleted)",
            record.record_id, subject_id, sorted(record.scopes), purged,
        )  # fmt: skip
        return record

    def expire_due(self, *, at: datetime | None = None) -> list[ConsentRecord]:
        """Append an `expire` record for every grant past its expires_at (and not ended
        yet), delete the reference faces no grant needs, and emit each change."""
        now = at or self._clock()
        out: list[ConsentRecord] = []
        for g in self.consents.due_expiries(now):
            record = ConsentRecord(
                subject_id=g.subject_id,
                action="expire",
                scopes=g.scopes,
                purpose=g.purpose,
                recorded_by="consent-expiry",
                granted_at=now,
                created_at=now,
                supersedes=g.record_id,
            )
            self.consents.append(record)
            self.purge_faces(g.subject_id, at=now)
            self._emit(record, None)
            out.append(record)
        return out

    def purge_faces(self, subject_id: str, *, at: datetime) -> int:
        """Delete reference faces of grants that no longer cover the face (PDPO: delete
        biometric data when it is no longer needed)."""
        with_faces = self.consents.face_record_ids(subject_id)
        if not with_faces:
            return 0
        return self.consents.delete_subject_faces(
            unneeded_faces(self.consents.records(subject_id), with_faces, at)
        )

    # ----------------------------------------------------------------- read

    def show(self, subject_id: str, *, at: datetime | None = None) -> SubjectConsentView:
        subject_id = _subject(subject_id)
        now = at or self._clock()
        records = self.consents.records(subject_id)
        effective = effective_grants(records, now)
        face_ids = [g.record_id for g in effective if Scope.FACE in g.scopes]
        faces = sum(len(v) for v in self.consents.subject_faces(face_ids).values())
        return SubjectConsentView(
            subject_id=subject_id,
            records=tuple(record_view(r) for r in records),
            effective=tuple(record_view(g) for g in effective),
            reference_faces=faces,
        )

    def list_subjects(self, *, at: datetime | None = None) -> list[SubjectSummary]:
        now = at or self._clock()
        out = []
        for sid in self.consents.list_subjects():
            records = self.consents.records(sid)
            effective = effective_grants(records, now)
            scopes: set[Scope] = set()
            for g in effective:
                scopes |= g.scopes
            out.append(
                SubjectSummary(
                    subject_id=sid,
                    records=len(records),
                    effective_scopes=frozenset(scopes),
                    purposes=tuple(sorted({g.purpose for g in effective})),
                    last_change=max(r.created_at for r in records),
                )
            )
        return out

    # ----------------------------------------------------------------- events

    def _emit(self, record: ConsentRecord, trace_id: str | None) -> None:
        self.events.publish(
            CONSENT_EVENTS,
            ConsentChanged(
                record_id=record.record_id,
                subject_id=record.subject_id,
                action=record.action,
                scopes=record.scopes,
                purpose=record.purpose,
                expires_at=record.expires_at,
                recorded_by=record.recorded_by,
                changed_at=record.granted_at,
            ),
            key=record.subject_id,
            trace_id=trace_id,
        )


def _subject(subject_id: str) -> str:
    try:
        return str(_SLUG.validate_python(subject_id))
    except ValidationError as exc:
        raise ConsentError(
            f"subject id {subject_id!r} must be 1-64 letters, digits, '-' or '_' (not starting with - or _)"
        ) from exc


def _challenge_view(ch: ConsentChallenge) -> ConsentChallengeView:
    return ConsentChallengeView(
        challenge_id=ch.challenge_id,
        subject_id=ch.subject_id,
        code=ch.code,
        issued_by=ch.issued_by,
        issued_at=ch.issued_at,
        expires_at=ch.expires_at,
    )
