"""The protected-persons gallery: public figures whose faces no clip may show.

`greetflow likeness protect NAME PHOTO...` enrols one reference face per photo. A clip
showing a face that matches the gallery is rejected, unless the person is linked to a
subject (`--subject`) with a valid face consent for that job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.errors import GreetflowError
from pipeline.faces import FaceEngine, LikenessError, reference_embedding
from pipeline.repositories import FaceEmbedding, LikenessGallery, ProtectedFace
from pipeline.settings import Settings
from schemas.consent import ProtectedPersonView


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
