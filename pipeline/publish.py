"""The publish step and takedown.

Publish: re-check consent, download the rendered clip from staging, write the AIGC
metadata label, sign the C2PA manifest LAST, upload to the distribution bucket, then its
captions (never captions without their clip: a publisher killed in between leaves the
clip alone, and the takeover adds the captions), record, announce. Then check consent
once more: a revocation that raced the upload is caught either here or by the takedown
worker (which only sees published jobs).

Takedown: a consent revocation or expiry removes every published clip whose consent no
longer covers it: the object leaves the distribution bucket, the job moves
published -> taken_down (compare-and-set) and clips.taken_down announces it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline import metrics
from pipeline.adapters.storage import ObjectStore, sha256_file
from pipeline.consent.check import ConsentCheck
from pipeline.consent.rules import relied_grants
from pipeline.keys import captions_key, clip_key, sidecar_of
from pipeline.ports import EventPublisher
from pipeline.provenance import GenerationInfo, SigningMaterial, label_and_sign, producer_code
from pipeline.repositories import (
    ConsentRepository,
    JobRecord,
    JobRepository,
    JobSubjectRepository,
    PublishedClipRepository,
)
from pipeline.settings import Settings
from pipeline.steps import Step, claim_step, published_event_id, taken_down_event_id
from pipeline.topics import CLIPS_PUBLISHED, CLIPS_TAKEN_DOWN
from pipeline.trust import UntrustedMessage, check_matches_row
from schemas.brief import Reference
from schemas.common import utcnow
from schemas.events import ClipPublished, ClipTakenDown, ConsentChanged, Decision, Envelope, ModerationDecided
from schemas.jobs import JobState
from schemas.provenance import AigcLabel

log = logging.getLogger(__name__)


class TakedownService:
    """Takes published clips down when their consent is gone. Idempotent."""

    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        consents: ConsentRepository,
        published: PublishedClipRepository,
        subjects: JobSubjectRepository,
        store: ObjectStore,
        events: EventPublisher,
        *,
        owner: str,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.consents = consents
        self._consent = ConsentCheck(consents)
        self.published = published
        self.subjects = subjects
        self.store = store
        self.events = events
        self.owner = owner

    def handle(self, env: Envelope[ConsentChanged]) -> None:
        """consent.events: a revoke or an expiry takes that subject's clips down."""
        change = env.payload
        if change.action == "grant":
            return
        reason = f"consent {change.action} {change.record_id} of subject {change.subject_id}"
        taken = self.take_down_subject(change.subject_id, reason=reason, trace_id=env.trace_id)
        log.info("takedown: %s -> %d clip(s) taken down", reason, len(taken))

    def take_down_subject(
        self, subject_id: str, *, reason: str, trace_id: str | None = None, at: datetime | None = None
    ) -> list[uuid.UUID]:
        """Take down every published clip of the subject whose consent no longer covers it."""
        out = []
        for job in self.subjects.jobs_using(subject_id, states=[JobState.PUBLISHED]):
            if self.take_down_if_unconsented(job, reason=reason, trace_id=trace_id, at=at):
                out.append(job.job_id)
        return out

    def take_down_if_unconsented(
        self, job: JobRecord, *, reason: str, trace_id: str | None = None, at: datetime | None = None
    ) -> bool:
        """Take the job's clip down when its consent, checked at `at` (now), is gone."""
        req = job.request
        missing = self._consent.findings(req.subjects, campaign_id=req.campaign_id, at=at or utcnow())
        if not missing:
            return False
        why = f"{reason}: " + "; ".join(f.message for f in missing)
        return self.take_down(job.job_id, reason=why, trace_id=trace_id)

    def take_down(self, job_id: uuid.UUID, *, reason: str, trace_id: str | None = None) -> bool:
        """Remove the clip from distribution; published -> taken_down; announce.

        The object goes first (that is what matters to the person), then the announcement,
        then the state: a crash in between repeats the work on redelivery (at least once).
        False when the job is not published (already taken down, or never published).
        """
        job = self.jobs.get(job_id)
        if job is None or job.state != JobState.PUBLISHED:
            return False
        clip = self.published.get(job_id)
        key = (clip.object_key if clip else None) or job.published_key
        if key is None:
            raise RuntimeError(f"takedown {job_id}: published job without an object key")
        self.store.remove(self.settings.bucket_distribution, key)
        self.store.remove(self.settings.bucket_distribution, sidecar_of(key, "vtt"))
        self.published.mark_taken_down(job_id, reason)
        self.events.publish(
            CLIPS_TAKEN_DOWN,
            ClipTakenDown(job_id=job_id, campaign_id=job.campaign_id, object_key=key, reason=reason[:2000]),
            key=str(job_id),
            trace_id=trace_id,
            event_id=taken_down_event_id(job_id),
        )
        won = self.jobs.transition(
            job_id,
            to_state=JobState.TAKEN_DOWN,
            expected=JobState.PUBLISHED,
            reason=reason[:2000],
            actor=self.owner,
        )
        if won:
            metrics.TAKEN_DOWN.inc()
        log.warning("takedown %s: %s removed (%s)", job_id, key, reason)
        return won

    def sweep(self, *, trace_id: str | None = None, at: datetime | None = None) -> list[uuid.UUID]:
        """Every published clip that uses a subject is re-checked (a safety net for lost
        consent events); the unconsented ones are taken down."""
        out = []
        for job in self.subjects.jobs_with_subjects([JobState.PUBLISHED]):
            if self.take_down_if_unconsented(job, reason="consent sweep", trace_id=trace_id, at=at):
                out.append(job.job_id)
        return out


@dataclass(frozen=True)
class _Prepared:
    path: Path
    sha256: str


class PublishService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        consents: ConsentRepository,
        published: PublishedClipRepository,
        subjects: JobSubjectRepository,
        store: ObjectStore,
        events: EventPublisher,
        takedown: TakedownService,
        *,
        owner: str,
        signing: Callable[[], SigningMaterial],
        lease_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.consents = consents
        self._consent = ConsentCheck(consents)
        self.published = published
        self.subjects = subjects
        self.store = store
        self.events = events
        self.takedown = takedown
        self.owner = owner
        self._signing = signing
        self.lease_s = lease_s

    def handle(self, env: Envelope[ModerationDecided]) -> None:
        decided = env.payload
        if decided.decision != Decision.APPROVED:
            return
        job = self.jobs.get(decided.job_id)
        what = f"moderation decision for job {decided.job_id}"
        if job is None:
            raise UntrustedMessage(f"{what}: no such job")
        # Only the row's state (approved, by the moderator or a reviewer) lets a clip out;
        # the message merely says "look at this job", and must name it consistently.
        check_matches_row(what, {"campaign_id": (decided.campaign_id, job.campaign_id)})
        if job.state == JobState.PUBLISHED:
            self._announce(job, env.trace_id)  # idempotent re-announce after a crash
            return
        step = claim_step(
            self.jobs,
            decided.job_id,
            from_states=[JobState.APPROVED],
            to_state=JobState.PUBLISHING,
            owner=self.owner,
            lease_s=self.lease_s,
        )
        if step is None:
            log.info("publish %s: moved on, or a live worker still holds it", decided.job_id)
            return
        with step:
            published = self._publish(step)
        if not published:
            return
        job_now = self.jobs.get(decided.job_id)
        if job_now is None:
            raise RuntimeError(f"publish {decided.job_id}: the job is gone right after it was published")
        # A revocation between the consent check and the transition was not seen by the
        # takedown worker (the job was not published yet): catch it here.
        if self.takedown.take_down_if_unconsented(job_now, reason="consent changed while publishing"):
            return
        self._announce(job_now, env.trace_id)

    def _publish(self, step: Step) -> bool:
        """Check consent, upload the labelled and signed clip, record it and move the job to
        published (True), or to rejected when consent is gone (False)."""
        claimed = step.job
        req = claimed.request
        job_id = claimed.job_id
        # Consent may have been revoked since moderation: check again right before writing.
        blocking = self._consent.findings(req.subjects, campaign_id=req.campaign_id, at=utcnow())
        if blocking:
            reason = "not published: " + "; ".join(f.message for f in blocking)
            step.finish(JobState.REJECTED, reason=reason)
            log.warning("publish %s: %s", job_id, reason)
            return False
        staging_key = claimed.staging_key
        if staging_key is None:
            raise RuntimeError(f"publish {job_id}: job has no staging object")
        key = clip_key(req.campaign_id, req.recipient.id, req.job_id)
        # Index the subjects BEFORE the object is public: a revocation must find it.
        self.subjects.index(job_id, req.subjects)
        bucket = self.settings.bucket_distribution
        record = self.published.get(job_id)
        live = self.store.stat(bucket, key)
        if record is not None and live is not None and live.metadata.get("sha256") == record.sha256:
            sha = record.sha256  # uploaded and recorded before a crash: keep those bytes
        else:
            work = Path(tempfile.mkdtemp(prefix=f"publish-{job_id}-", dir=self._work_root()))
            try:
                prepared = self._prepare(claimed, staging_key, key, work)
                self.store.put_file(
                    bucket,
                    key,
                    prepared.path,
                    content_type="video/mp4",
                    metadata={"sha256": prepared.sha256, "job-id": str(job_id), "aigc-label": "1"},
                )
                sha = prepared.sha256
            finally:
                shutil.rmtree(work, ignore_errors=True)
        # The captions sidecar follows its clip, before the job is published: a published
        # clip always has its captions, and captions never appear without their clip.
        vtt = captions_key(req.campaign_id, req.recipient.id, req.job_id)
        if self.store.exists(self.settings.bucket_staging, vtt):
            self.store.copy(self.settings.bucket_staging, vtt, bucket, vtt)
        url = self.store.distribution_url(key)
        self.published.record(job_id, key, url, sha)
        won = step.finish(JobState.PUBLISHED, published_key=key, url=url)
        if won:
            metrics.PUBLISHED.inc()
        return won

    def _prepare(self, job: JobRecord, staging_key: str, key: str, work: Path) -> _Prepared:
        """Download the rendered clip, write the AIGC label, sign C2PA (last)."""
        staging = self.store.get_file(self.settings.bucket_staging, staging_key, work / "rendered.mp4")
        rendered_sha = sha256_file(staging)
        meta = self.store.stat(self.settings.bucket_staging, staging_key)
        model = (meta.metadata.get("generator") if meta else None) or self.settings.generator_model
        req = job.request
        generation = self._generation_record(staging_key)
        relied = relied_grants(
            self._consent.histories(req.subjects), req.subjects, campaign_id=req.campaign_id, at=utcnow()
        )
        info = GenerationInfo(
            title=Path(key).name,
            template=f"{job.template_name}@{job.template_version}",
            model=model,
            job_id=str(job.job_id),
            campaign_id=job.campaign_id,
            producer=self.settings.content_producer,
            generation=generation,
            consent_ids=tuple(str(g) for g in relied),
            ingredients=self._reference_ingredients(req.references, work),
        )
        label = AigcLabel(
            content_producer=self.settings.content_producer,
            produce_id=str(job.job_id),
            reserved_code1=producer_code(rendered_sha, info),
            content_propagator=self.settings.content_propagator,
            propagate_id=key,
        )
        out = work / "published.mp4"
        label_and_sign(staging, out, label=label, info=info, material=self._signing())
        return _Prepared(path=out, sha256=sha256_file(out))

    def _generation_record(self, staging_key: str) -> dict[str, Any]:
        """The render step's record of how the clip was generated ({} when it wrote none)."""
        gkey = sidecar_of(staging_key, "generation.json")
        if not self.store.exists(self.settings.bucket_staging, gkey):
            return {}
        data = json.loads(self.store.get_bytes(self.settings.bucket_staging, gkey))
        return data if isinstance(data, dict) else {}

    def _reference_ingredients(
        self, refs: tuple[Reference, ...], work: Path
    ) -> tuple[tuple[str, str, Path], ...]:
        """The brief's reference assets, fetched from the assets bucket, as C2PA ingredients."""
        out: list[tuple[str, str, Path]] = []
        for i, r in enumerate(refs):
            ext = r.key.rsplit(".", 1)[-1].lower() if "." in r.key else ""
            fmt = {"png": "image/png", "webp": "image/webp"}.get(ext, "image/jpeg")
            path = self.store.get_file(self.settings.bucket_assets, r.key, work / f"ref-{i}.{ext or 'jpg'}")
            out.append((f"{r.kind}:{r.key}", fmt, path))
        return tuple(out)

    def _announce(self, job: JobRecord, trace_id: str) -> None:
        clip = self.published.get(job.job_id)
        if clip is None or job.url is None:
            raise RuntimeError(f"publish {job.job_id}: published state without a clip record")
        vtt = sidecar_of(clip.object_key, "vtt")
        captions_url = (
            self.store.distribution_url(vtt)
            if self.store.exists(self.settings.bucket_distribution, vtt)
            else None
        )
        self.events.publish(
            CLIPS_PUBLISHED,
            ClipPublished(
                job_id=job.job_id,
                campaign_id=job.campaign_id,
                recipient_id=job.recipient_id,
                object_key=clip.object_key,
                url=clip.url,  # type: ignore[arg-type,unused-ignore]
                sha256=clip.sha256,
                captions_url=captions_url,  # type: ignore[arg-type,unused-ignore]
            ),
            key=str(job.job_id),
            trace_id=trace_id,
            event_id=published_event_id(job.job_id),
        )

    def _work_root(self) -> Path:
        root = self.settings.resolved_render_dir / "publish"
        root.mkdir(parents=True, exist_ok=True)
        return root
