"""Wiring: settings -> adapters -> services. The only place that knows every concrete class."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any, Protocol

from pipeline.adapters.airflow import airflow_settings
from pipeline.adapters.db import Database, MigrationOutcome
from pipeline.adapters.kafka import ConsumerWorker, EventBus
from pipeline.adapters.storage import ObjectStore
from pipeline.audience import check_source, iter_audience
from pipeline.campaign_runs import CampaignRunService
from pipeline.campaigns import CampaignService
from pipeline.consent.expiry import ExpiryReport, expire_consents
from pipeline.consent.service import ConsentService
from pipeline.faces import FaceEngine, face_engine
from pipeline.metrics import Readiness, Telemetry
from pipeline.moderation.gallery import GalleryService, PhotoScreen
from pipeline.moderation.service import ModerationService
from pipeline.observability import build_telemetry, readiness_for
from pipeline.ports import Renderer
from pipeline.progress import ProgressService
from pipeline.provenance import SigningMaterial, signing_material
from pipeline.publish import PublishService, TakedownService
from pipeline.render.service import RenderService
from pipeline.repositories import (
    ConsentRepository,
    JobRepository,
    JobSubjectRepository,
    LikenessGallery,
    LockRepository,
    ModerationResultRepository,
    PublishedClipRepository,
)
from pipeline.review.repository import ReviewRepository
from pipeline.review.service import ReviewService
from pipeline.settings import Settings, get_settings
from pipeline.stack import StackService
from pipeline.sweeper import JobSweeper, SweepReport
from pipeline.trust import JobIds, ProducerKeys, UntrustedMessage
from pipeline.webhooks.repository import WebhookRepository
from pipeline.webhooks.service import WebhookService
from pipeline.workers import WEBHOOK_TOPICS, worker_spec
from schemas.brief import CampaignBrief, Recipient, Reference, TemplateRef
from schemas.common import Locale
from schemas.events import Envelope, _Payload

log = logging.getLogger(__name__)


def worker_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


class WorkerService(Protocol):
    """A service that handles one worker's topic, one envelope at a time."""

    def handle(self, env: Envelope[Any]) -> None: ...


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
    # What opening the database did about the schema (workers log it); None until then.
    migration: MigrationOutcome | None = field(default=None, init=False)

    @cached_property
    def db(self) -> Database:
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(self.settings.resolved_database_url)
        if self.migrate:
            # Processes starting together either apply the migrations under the migration
            # lock or wait for the one that does (or, migrate_on_start off, for stack init).
            if self.settings.migrate_on_start:
                outcome = db.migrate(lock_timeout_s=self.settings.migration_wait_s)
            else:
                outcome = db.wait_for_head(timeout_s=self.settings.migration_wait_s)
            self.migration = outcome
            log.debug("database schema: %s", outcome.describe())
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
    def producer_keys(self) -> ProducerKeys:
        """Trusted producers' keys: this process signs what it publishes with one of them,
        and the render step verifies requests for jobs without a row against all."""
        return ProducerKeys.from_settings(self.settings)

    @cached_property
    def job_ids(self) -> JobIds:
        """The keyed job ids (a ConfigError in production when GREETFLOW_JOB_ID_KEY is unset)."""
        return JobIds.from_settings(self.settings)

    @cached_property
    def bus(self) -> EventBus:
        return EventBus(
            self.settings, sign=self.producer_keys.sign, sign_content=self.producer_keys.sign_content
        )

    @cached_property
    def renderer(self) -> Renderer:
        return default_renderer(self.settings)

    def campaigns(self) -> CampaignService:
        job_ids = self.job_ids  # first: production without the key stops here, before connecting
        return CampaignService(
            self.jobs,
            self.bus,
            job_ids=job_ids,
            audience=self.resolve_audience,
            screen_photos=self.photo_screen().check_recipients,
            brief_webhooks=self.webhook_service("intake"),
            screen_references=self.photo_screen().check_references,
        )

    def resolve_audience(self, brief: CampaignBrief) -> Iterator[list[Recipient]]:
        """An `audience_key` brief's recipients in chunks (pipeline/audience.py); a missing
        audience object is refused first."""
        check_source(brief, self.store, self.settings)
        return iter_audience(brief, store=self.store, settings=self.settings)

    def campaign_run_service(self) -> CampaignRunService:
        return CampaignRunService(self.settings, self.store, self.jobs, self.campaigns(), self.prewarm)

    def prewarm(self, template: TemplateRef, locale: Locale, references: tuple[Reference, ...] = ()) -> bool:
        """Render the shared segments of (template, locale) ahead of a campaign (generated
        video plates included), when the renderer offers a `prewarm` hook; False (and
        nothing done) when it does not."""
        hook = getattr(self.renderer, "prewarm", None)
        if hook is None:
            return False
        hook(template, locale, references=references)
        return True

    def render_service(self, owner: str) -> RenderService:
        return RenderService(
            self.settings,
            self.jobs,
            self.store,
            self.bus,
            self.renderer,
            producers=self.producer_keys,
            owner=owner,
            lease_s=self.settings.step_lease_s,
            screen_photo=self.photo_screen().check_request,
        )

    # --- consent, likeness, moderation, provenance, takedown ---

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

    def consent_expiry(self, *, now: datetime | None = None) -> ExpiryReport:
        """The daily consent sweep: expire due grants, take down the clips they no longer cover.
        `now` only to replay a sweep (tests, backfills)."""
        return expire_consents(
            self.consent_service(), self.takedown_service(worker_name("consent-expiry")), now=now
        )

    def gallery_service(self) -> GalleryService:
        return GalleryService(self.settings, self.gallery, faces=self.faces)

    def photo_screen(self) -> PhotoScreen:
        """Subject photos against the protected-persons gallery (intake and render)."""
        return PhotoScreen(self.settings, self.gallery, self.store, faces=self.faces)

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
            lease_s=self.settings.step_lease_s,
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
            lease_s=self.settings.step_lease_s,
        )

    def review_service(self) -> ReviewService:
        return ReviewService(
            self.settings,
            ReviewRepository(self.db),
            self.jobs,
            self.moderation_results,
            self.consents,
            self.store,
            self.events,
        )

    # --- the job sweeper (pipeline/sweeper.py) ---

    @cached_property
    def locks(self) -> LockRepository:
        return LockRepository(self.db)

    def job_sweeper(self, owner: str | None = None) -> JobSweeper:
        """The sweeper (`greetflow worker sweep` runs its `sweep` every sweep_interval_s)."""
        return JobSweeper(
            self.settings,
            self.jobs,
            self.locks,
            self.moderation_results,
            self.store,
            self.events,
            owner=owner or worker_name("sweep"),
        )

    def sweep_jobs(self) -> SweepReport:
        """One sweep pass under the lock, released afterwards (the `job_sweep` DAG)."""
        sweeper = self.job_sweeper()
        try:
            return sweeper.sweep()
        finally:
            sweeper.release()

    def progress_service(self) -> ProgressService:
        """Campaign progress snapshots (`greetflow campaign status`, `submit --wait`)."""
        return ProgressService(self.jobs, deadline_s=self.settings.campaign_deadline_s)

    # --- stack init / check (pipeline/stack.py) ---

    def stack_service(self) -> StackService:
        """`greetflow stack init|check`. Build the container with `migrate=False`: `check`
        must read the schema as it is, and `init` migrates it itself."""
        return StackService(self.settings, lambda: self.db)

    # --- workers ---

    def worker_service(self, role: str) -> Callable[[str], WorkerService]:
        """The factory (worker name -> service) of the service that handles `role`'s topic.
        Nothing is connected until the factory is called."""
        worker_spec(role)  # an unknown role is a ConfigError naming the known ones
        factories: dict[str, Callable[[str], WorkerService]] = {
            "render": self.render_service,
            "moderate": self.moderation_service,
            "publish": self.publish_service,
            "takedown": self.takedown_service,
            "webhook": self.webhook_service,
        }
        return factories[role]

    # --- webhooks (pipeline/webhooks) ---

    @cached_property
    def webhook_repository(self) -> WebhookRepository:
        """Opens the database on first use (intake without a webhook_url never needs it)."""
        return WebhookRepository(lambda: self.db)

    def webhook_service(self, owner: str) -> WebhookService:
        """Endpoints, events -> deliveries, and the sending loop (`greetflow worker webhook`)."""
        return WebhookService(self.settings, self.webhook_repository, owner=owner, store=_LazyStore(self))

    def webhook_workers(self, service: WebhookService) -> list[ConsumerWorker[Any]]:
        """The webhook role's consumers (clips.published, clips.taken_down), all handled by `service`."""
        workers: list[ConsumerWorker[Any]] = []
        for spec in WEBHOOK_TOPICS:
            name = worker_name(f"{spec.role}-{spec.topic}")
            workers.append(
                ConsumerWorker(
                    self.settings,
                    name=name,
                    topic=spec.topic,
                    group_id=spec.group_id,
                    payload_type=spec.payload_type,
                    handler=service.handle,
                    bus=self.bus,
                    max_poll_records=spec.max_poll_records,
                    spill=self.store,
                    step=spec.role,
                )
            )
        return workers

    def worker(self, role: str) -> ConsumerWorker[Any]:
        """The consumer-group worker of `role` (pipeline/workers.py), its service, the
        container's bus for results and DLQ, and a dead letter failing its job."""
        spec = worker_spec(role)
        name = worker_name(role)
        return ConsumerWorker(
            self.settings,
            name=name,
            topic=spec.topic,
            group_id=spec.group_id,
            payload_type=spec.payload_type,
            handler=self.worker_service(role)(name).handle,
            bus=self.bus,
            on_dead_letter=self.fail_job_on_dead_letter,
            max_poll_records=spec.max_poll_records,
            spill=self.store,
            step=role,
        )

    def telemetry(self, role: str, worker: ConsumerWorker[Any] | None = None) -> Telemetry:
        """The metrics endpoints, readiness probes and trace export of a `role` process
        (pipeline/observability.py); `worker`: its consumer, for lag and readiness."""
        spec = worker_spec(role) if worker is not None else None
        return build_telemetry(
            self.settings,
            role=role,
            db=lambda: self.db,
            jobs=lambda: self.jobs,
            consumer=(spec.group_id, spec.topic) if spec is not None else None,
            consumer_ready=(lambda: worker.is_ready) if worker is not None else None,
            consumer_live=(lambda: worker.is_live) if worker is not None else None,
        )

    def review_readiness(self) -> Readiness:
        """The review app's /readyz probes: database, object store, broker (not started)."""
        return readiness_for(self.settings, lambda: self.db)

    def fail_job_on_dead_letter(self, env: Envelope[Any] | None, exc: BaseException) -> None:
        """A dead-lettered message fails its job (with the reason), so nobody waits forever;
        except a message refused for disagreeing with its row or lacking a trusted
        producer's signature: that is a forged or stray message, and its job is not its."""
        if isinstance(exc, UntrustedMessage):
            return
        job_id = getattr(env.payload, "job_id", None) if env is not None else None
        if job_id is not None:
            self.jobs.fail(job_id, f"{type(exc).__name__}: {exc}"[:2000], actor="dlq")

    def close(self) -> None:
        if "bus" in self.__dict__:
            self.bus.close()
        if "db" in self.__dict__:
            self.db.dispose()


@contextmanager
def airflow_container(settings: Settings | None = None, *, migrate: bool = True) -> Iterator[Container]:
    """A Container for one Airflow task (settings from its connections and variables, see
    pipeline/adapters/airflow.py); its producer and engine are closed when the task ends.
    Call it only inside a running task.

    `migrate=False` skips the Alembic upgrade on first database use: for tasks that run
    often (a sensor's checks) after a first task of the same run has migrated.
    """
    c = Container(settings or airflow_settings(), migrate=migrate)
    try:
        yield c
    finally:
        c.close()


class _LazyEvents:
    """An EventPublisher that opens the container's bus on first use."""

    def __init__(self, container: Container) -> None:
        self._container = container

    def publish(
        self,
        topic: str,
        payload: _Payload,
        *,
        key: str,
        trace_id: str | None = None,
        event_id: uuid.UUID | None = None,
    ) -> Any:
        return self._container.bus.publish(topic, payload, key=key, trace_id=trace_id, event_id=event_id)


class _LazyStore:
    """The container's object store, connected on the first dead letter."""

    def __init__(self, container: Container) -> None:
        self._container = container

    def put_bytes(self, bucket: str, key: str, data: bytes, *, content_type: str) -> None:
        self._container.store.put_bytes(bucket, key, data, content_type=content_type)
