"""The protected-persons gallery: public figures whose faces no clip may show.

`greetflow likeness protect NAME PHOTO...` enrols one reference face per photo. A clip
showing a face that matches the gallery is rejected, unless the person is linked to a
subject (`--subject`) with a valid face consent for that job.

The subject photo a recipient supplies is screened against the gallery before any clip
is made of it (`PhotoScreen`): at intake, a brief or request whose photo shows a
protected person is refused; at render, such a photo fails its job before anything is
drawn. Moderation checks the photo and the clip again.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.adapters.storage import ObjectStore
from pipeline.briefs import BriefError
from pipeline.errors import GreetflowError, PermanentError
from pipeline.faces import DetectedFace, FaceEngine, LikenessError, faces_in_photo, reference_embedding
from pipeline.repositories import FaceEmbedding, LikenessGallery, ProtectedFace
from pipeline.settings import Settings
from schemas.brief import Recipient, Reference
from schemas.common import Scope
from schemas.consent import ProtectedPersonView
from schemas.events import RenderRequested

log = logging.getLogger(__name__)


class GalleryError(GreetflowError):
    pass


class GalleryService:
    def __init__(
        self, settings: Settings, gallery: LikenessGallery, *, faces: Callable[[], FaceEngine]
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self._faces = faces

    def protect(
        self, name: str, photos: Sequence[Path], *, enrolled_by: str, subject_id: str | None = None
    ) -> int:
        """Enrol NAME with one face per photo (each photo must show only that person).
        Returns how many new faces were stored (a photo already enrolled is skipped)."""
        name = " ".join(name.split())
        if not name or len(name) > 128:
            raise GalleryError("a protected person needs a name of 1-128 characters")
        if not photos:
            raise GalleryError("give at least one photo of the person")
        embeddings: list[FaceEmbedding] = []
        engine = self._faces()
        for photo in photos:
            p = Path(photo)
            if not p.is_file():
                raise GalleryError(f"photo {p} is not a readable file")
            try:
                embeddings.append(reference_embedding(engine, p))
            except LikenessError as exc:
                raise GalleryError(str(exc)) from exc
        return self.gallery.protect(name, embeddings, enrolled_by=enrolled_by, subject_id=subject_id)

    def unprotect(self, name: str) -> int:
        return self.gallery.unprotect(" ".join(name.split()))

    def people(self) -> list[ProtectedPersonView]:
        by_name: dict[str, list[ProtectedFace]] = {}
        for f in self.gallery.faces():
            by_name.setdefault(f.name, []).append(f)
        out = []
        for name, group in sorted(by_name.items()):
            out.append(
                ProtectedPersonView(
                    name=name,
                    subject_id=next((f.subject_id for f in group if f.subject_id), None),
                    faces=len(group),
                    enrolled_by=group[0].enrolled_by,
                    enrolled_at=min(f.created_at for f in group),
                )
            )
        return out


# --------------------------------------------------------------------------- photo screen


class ProtectedPhotoError(PermanentError):
    """A subject photo shows a protected person (or cannot be read to find out)."""


@dataclass(frozen=True)
class PhotoMatch:
    """A face of a photo that matches a protected person."""

    person: str
    subject_id: str | None  # the subject id the person is linked to, if any
    distance: float


def face_subjects(recipient: Recipient) -> list[str]:
    return [u.subject_id for u in recipient.subjects if Scope.FACE in u.scopes]


class PhotoScreen:
    """The subject photo against the protected-persons gallery, before a job is accepted
    (intake) and before anything is drawn (render). A protected person's face is refused
    unless the person is linked to a face subject of the recipient (moderation then
    requires that subject's consent). Faces are found however small the photo is."""

    def __init__(
        self,
        settings: Settings,
        gallery: LikenessGallery,
        store: ObjectStore,
        *,
        faces: Callable[[], FaceEngine],
    ) -> None:
        self.settings = settings
        self.gallery = gallery
        self.store = store
        self._faces = faces

    def matches(self, photo: Path, protected: Sequence[ProtectedFace] | None = None) -> list[PhotoMatch]:
        """Every protected person a face of `photo` matches, nearest first (LikenessError
        when the photo cannot be read)."""
        people = list(self.gallery.faces() if protected is None else protected)
        if not people:
            return []
        return self._match(faces_in_photo(self._faces(), photo), people)

    def _match(self, found: Sequence[DetectedFace], people: Sequence[ProtectedFace]) -> list[PhotoMatch]:
        if not found or not people:
            return []
        gallery = np.asarray([pf.embedding for pf in people], dtype=np.float64).reshape(-1, 128)
        linked: dict[str, str | None] = {}
        for pf in people:
            linked[pf.name] = linked.get(pf.name) or pf.subject_id
        best: dict[str, float] = {}
        for face in found:
            dists = np.linalg.norm(gallery - np.asarray(face.embedding, dtype=np.float64), axis=1)
            for pf, d in zip(people, dists.tolist(), strict=True):
                if d < self.settings.likeness_threshold and d < best.get(pf.name, float("inf")):
                    best[pf.name] = d
        return sorted(
            (PhotoMatch(person=n, subject_id=linked[n], distance=d) for n, d in best.items()),
            key=lambda m: m.distance,
        )

    def refusal(self, recipient: Recipient, found: Sequence[PhotoMatch]) -> str | None:
        """Why the recipient's photo is refused (one clause), or None when it may be used."""
        allowed = set(face_subjects(recipient))
        hits = [m for m in found if m.subject_id is None or m.subject_id not in allowed]
        if not hits:
            return None
        subjects = ", ".join(sorted(allowed)) or "none"
        people = ", ".join(f"{m.person!r} (distance {m.distance:.3f})" for m in hits)
        return (
            f"the photo {recipient.photo_key} of recipient {recipient.id} shows protected person "
            f"{people}; the face subject(s) {subjects} cannot consent for that face"
        )

    def check_recipients(self, campaign_id: str, recipients: Collection[Recipient]) -> None:
        """Intake: refuse the brief or request (BriefError, one line) when a recipient's photo
        shows a protected person. A photo not uploaded yet is screened when it is rendered."""
        with_photo = [r for r in recipients if r.photo_key is not None]
        if not with_photo:
            return
        protected = self.gallery.faces()
        if not protected:
            return
        problems: list[str] = []
        by_key: dict[str, list[PhotoMatch]] = {}
        with tempfile.TemporaryDirectory(prefix="photo-screen-") as tmp:
            for n, r in enumerate(with_photo):
                key = r.photo_key
                if key is None:
                    continue
                if key not in by_key:
                    if not self.store.exists(self.settings.bucket_assets, key):
                        log.info("intake %s: photo %s is not uploaded yet", campaign_id, key)
                        continue
                    path = self.store.get_file(
                        self.settings.bucket_assets, key, Path(tmp) / f"{n}{Path(key).suffix.lower()}"
                    )
                    try:
                        by_key[key] = self.matches(path, protected)
                    except LikenessError:
                        problems.append(f"the photo {key} of recipient {r.id} is not a readable image")
                        continue
                    finally:
                        path.unlink(missing_ok=True)
                why = self.refusal(r, by_key.get(key, []))
                if why is not None:
                    problems.append(why)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise BriefError(f"campaign {campaign_id} refused: {'; '.join(problems[:5])}{more}")

    def reference_problem(
        self, ref: Reference, photo: Path, protected: Sequence[ProtectedFace]
    ) -> str | None:
        """Why a character reference is refused (one clause), or None. A real person's
        reference must show exactly one face (it becomes a reference face of that subject in
        moderation); no reference may show a protected person, except the reference subject's
        own linked face."""
        what = f"character reference {ref.key}" + (f" (subject {ref.subject_id})" if ref.subject_id else "")
        try:
            found = faces_in_photo(self._faces(), photo)
        except LikenessError:
            return f"{what} is not a readable image"
        if ref.subject_id is not None:
            if not found:
                return f"{what} shows no face: use a clear, frontal photo of the person"
            if len(found) > 1:
                return f"{what} shows {len(found)} faces: it must show only the person (crop it)"
        hits = [
            m for m in self._match(found, protected) if m.subject_id is None or m.subject_id != ref.subject_id
        ]
        if hits:
            people = ", ".join(f"{m.person!r} (distance {m.distance:.3f})" for m in hits)
            return f"{what} shows protected person {people}"
        return None

    def check_references(self, campaign_id: str, references: Sequence[Reference]) -> None:
        """Intake: refuse the brief (BriefError, one line) when a character reference is
        missing from the assets bucket, shows no face or several (a real person's), or shows
        a protected person."""
        chars = [r for r in references if r.kind == "character"]
        if not chars:
            return
        protected = self.gallery.faces()
        problems: list[str] = []
        bucket = self.settings.bucket_assets
        with tempfile.TemporaryDirectory(prefix="reference-screen-") as tmp:
            for n, ref in enumerate(chars):
                if not self.store.exists(bucket, ref.key):
                    problems.append(f"character reference {ref.key} is not in bucket {bucket}")
                    continue
                path = self.store.get_file(bucket, ref.key, Path(tmp) / f"{n}{Path(ref.key).suffix.lower()}")
                try:
                    why = self.reference_problem(ref, path, protected)
                finally:
                    path.unlink(missing_ok=True)
                if why is not None:
                    problems.append(why)
        if problems:
            raise BriefError(f"campaign {campaign_id} refused: {'; '.join(problems)}")

    def check_request(self, req: RenderRequested, photo: Path) -> None:
        """Render: a ProtectedPhotoError (the job fails with it) before anything is drawn
        when the job's photo shows a protected person."""
        try:
            found = self.matches(photo)
        except LikenessError as exc:
            raise ProtectedPhotoError(f"render {req.job_id}: {exc}") from exc
        why = self.refusal(req.recipient, found)
        if why is not None:
            raise ProtectedPhotoError(f"render {req.job_id} refused: {why}")
