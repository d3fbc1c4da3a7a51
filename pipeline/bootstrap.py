"""Wiring: settings -> adapters -> services. The only place that knows every concrete class."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pipeline.adapters.db import Database
from pipeline.adapters.kafka import EventBus
from pipeline.adapters.storage import ObjectStore
from pipeline.campaigns import CampaignService
from pipeline.moderation.consent import ConsentService
from pipeline.moderation.gallery import GalleryService
from pipeline.moderation.likeness import FaceEngine, face_engine
from pipeline.moderation.service import ModerationService
from pipeline.ports import Renderer
from pipeline.provenance import SigningMaterial, signing_material
from pipeline.publish import PublishService, TakedownService
from pipeline.render.service import RenderService
from pipeline.repositories import (
    ConsentRepository,
    JobRepository,
    JobSubjectRepository,
    LikenessGallery,
    ModerationResultRepository,
    PublishedClipRepository,
)
from pipeline.settings import Settings, get_settings
from schemas.brief import TemplateRef
from schemas.common import Locale
from schemas.events import Envelope, _Payload

log = logging.getLogger(__name__)


def worker_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def default_renderer(settings: Settings) -> Renderer:
    """The template engine (pipeline/render/engine.py): shared segments rendered once per
    (template, locale, variant), only the personal seconds per recipient. It also has
    `prewarm(template, locale)`."""
    from pipeline.render.engine import renderer_from_settings

    return renderer_from_settings(settings)


@dataclass
class Container:
    settings: Settings = field(default_factory=get_settings)
    migrate: bool = True

    @cached_property
    def db(self) -> Database:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(self.settings.resolved_database_url)
        if self.migrate:
            db.migrate()
        return db

    @cached_property
    def jobs(self) -> JobRepository:
        return JobRepository(self.db)

    @cached_property
    def consents(self) -> ConsentRepository:
        return ConsentRepository(self.db)

    @cached_property
    def published(self) -> PublishedClipRepository:
        return PublishedClipRepository(self.db)

    @cached_property
    def store(self) -> ObjectStore:
        return ObjectStore(self.settings)

    @cached_property
    def bus(self) -> EventBus:
        return EventBus(self.settings)

    @cached_property
    def renderer(self) -> Renderer:
        return default_renderer(self.settings)

    def campaigns(self) -> CampaignService:
        return CampaignService(self.jobs, self.bus)

    def prewarm(self, template: TemplateRef, locale: Locale) -> bool:
        """Render the shared segments of (template, locale) ahead of a campaign, when the
        renderer offers a `prewarm` hook; False (and nothing done) when it does not."""
        hook = getattr(self.renderer, "prewarm", None)
        if hook is None:
            return False
        hook(template, locale)
        return True

    def render_service(self, owner: str) -> RenderService:
        return RenderService(self.settings, self.jobs, self.store, self.bus, self.renderer, owner=owner)

    # --- consent, likeness, moderation, provenance, takedown (issue 4) ---

    @cached_property
    def gallery(self) -> LikenessGallery:
        return LikenessGallery(self.db)

    @cached_property
    def moderation_results(self) -> ModerationResultRepository:
        return ModerationResultRepository(self.db)

    @cached_property
    def job_subjects(self) -> JobSubjectRepository:
        return JobSubjectRepository(self.db)

    def faces(self) -> FaceEngine:
        """The process-wide dlib engine (models load on first use)."""
        return face_engine(self.settings.likeness_models_dir, self.settings.likeness_min_detection_score)

    @cached_property
    def signing(self) -> SigningMaterial:
        """C2PA signing credentials: from settings, else the dev CA (created when missing)."""
        return signing_material(self.settings)

    @cached_property
    def events(self) -> _LazyEvents:
        """The bus, connected on the first event (commands that emit nothing need no broker)."""
        return _LazyEvents(self)

    def consent_service(self) -> ConsentService:
        return ConsentService(
            self.settings, self.consents, self.gallery, self.store, self.events, faces=self.faces
        )

    def gallery_service(self) -> GalleryService:
        return GalleryService(self.settings, self.gallery, faces=self.faces)

    def moderation_service(self, owner: str) -> ModerationService:
        return ModerationService(
            self.settings,
            self.jobs,
            self.consents,
            self.moderation_results,
            self.gallery,
            self.store,
            self.bus,
            owner=owner,
            faces=self.faces,
        )

    def takedown_service(self, owner: str) -> TakedownService:
        return TakedownService(
            self.settings,
            self.jobs,
            self.consents,
            self.published,
            self.job_subjects,
            self.store,
            self.events,
            owner=owner,
        )

    def publish_service(self, owner: str) -> PublishService:
        return PublishService(
            self.settings,
            self.jobs,
            self.consents,
            self.published,
            self.job_subjects,
            self.store,
            self.bus,
            self.takedown_service(owner),
            owner=owner,
            signing=lambda: self.signing,
        )

    def fail_job_on_dead_letter(self, env: Envelope[Any] | None, exc: BaseException) -> None:
        """A dead-lettered message fails its job (with the reason), so nobody waits forever."""
        job_id = getattr(env.payload, "job_id", None) if env is not None else None
        if job_id is not None:
            self.jobs.fail(job_id, f"{type(exc).__name__}: {exc}"[:2000], actor="dlq")

    def close(self) -> None:
        if "bus" in self.__dict__:
            self.bus.close()
        if "db" in self.__dict__:
            self.db.dispose()


class _LazyEvents:
    """An EventPublisher that opens the container's bus on first use."""

    def __init__(self, container: Container) -> None:
        self._container = container

    def publish(self, topic: str, payload: _Payload, *, key: str, trace_id: str | None = None) -> Any:
        return self._container.bus.publish(topic, payload, key=key, trace_id=trace_id)
