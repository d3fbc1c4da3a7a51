"""The render step: claim the job, render, upload to staging, record, announce."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline import metrics
from pipeline.adapters.storage import ObjectStore
from pipeline.errors import PermanentError
from pipeline.keys import captions_key, clip_key, drawn_texts_key, generation_key, poster_key
from pipeline.ports import EventPublisher, RenderedClip, Renderer
from pipeline.repositories import JobRecord, JobRepository
from pipeline.settings import Settings
from pipeline.steps import claim_step, event_id
from pipeline.topics import RENDER_RESULTS
from pipeline.trust import ProducerKeys, check_request_matches_row
from schemas.events import ClipRendered, DrawnText, DrawnTexts, Envelope, RenderRequested
from schemas.jobs import JobState

log = logging.getLogger(__name__)

# Past these states the render step has nothing left to do for a job.
_AFTER_RENDER = frozenset(JobState) - {JobState.REQUESTED, JobState.RENDERING, JobState.RENDERED}


class RenderService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        store: ObjectStore,
        events: EventPublisher,
        renderer: Renderer,
        *,
        producers: ProducerKeys,
        owner: str,
        lease_s: float = 30.0,
        screen_photo: Callable[[RenderRequested, Path], None] | None = None,
    ) -> None:
        self.settings = settings
        self.producers = producers
        # Fails the job before drawing when its photo shows a protected person (PhotoScreen).
        self.screen_photo = screen_photo
        self.jobs = jobs
        self.store = store
        self.events = events
        self.renderer = renderer
        self.owner = owner
        self.lease_s = lease_s

    def handle(self, env: Envelope[RenderRequested]) -> None:
        job = self._job_of(env)
        req = job.request  # the row is the truth: render what intake recorded, not the message
        if job.state in _AFTER_RENDER:
            log.info("render %s: already %s, nothing to do", req.job_id, job.state)
            return
        if job.state == JobState.RENDERED:
            # We crashed after recording the render but before announcing it: announce again.
            self._announce(req, env.trace_id)
            return
        step = claim_step(
            self.jobs,
            req.job_id,
            from_states=[JobState.REQUESTED],
            to_state=JobState.RENDERING,
            owner=self.owner,
            lease_s=self.lease_s,
        )
        if step is None:
            log.info("render %s: moved on, or a live worker still holds it", req.job_id)
            return
        with step:
            vkey, pkey = self._render(req)
            won = step.finish(JobState.RENDERED, staging_key=vkey, poster_key=pkey)
        if won:
            self._announce(req, env.trace_id)

    def _job_of(self, env: Envelope[RenderRequested]) -> JobRecord:
        """The request's job row. A request for a job without a row creates it only when a
        trusted producer signed it; a request that disagrees with its row is refused
        (UntrustedMessage: dead-lettered, the job left alone)."""
        msg = env.payload
        what = f"render request for job {msg.job_id}"
        job = self.jobs.get(msg.job_id)
        if job is None:
            producer = self.producers.verify(env, what=f"{what} (no such job)")
            self.jobs.create_if_absent(msg, actor=f"producer:{producer}")
            job = self.jobs.get(msg.job_id)
            if job is None:
                raise RuntimeError(f"render {msg.job_id}: the job is gone right after it was created")
        check_request_matches_row(msg, job.request)
        return job

    def _render(self, req: RenderRequested) -> tuple[str, str]:
        """Render and upload to staging; the clip's and the poster's keys."""
        work = Path(tempfile.mkdtemp(prefix=f"render-{req.job_id}-", dir=self._work_root()))
        try:
            photo = self._fetch_photo(req, work)
            if photo is not None and self.screen_photo is not None:
                self.screen_photo(req, photo)
            clip = self.renderer(req, work, photo)
            meta = {
                "sha256": clip.sha256,
                "duration": f"{clip.duration_s:.3f}",
                "width": str(clip.width),
                "height": str(clip.height),
                "job-id": str(req.job_id),
            }
            vkey = clip_key(req.campaign_id, req.recipient.id, req.job_id)
            pkey = poster_key(req.campaign_id, req.recipient.id, req.job_id)
            bucket = self.settings.bucket_staging
            uploading = time.perf_counter()
            self.store.put_file(bucket, vkey, clip.video_path, content_type="video/mp4", metadata=meta)
            self.store.put_file(bucket, pkey, clip.poster_path, content_type="image/jpeg")
            captions = getattr(clip, "captions_path", None)
            if captions is not None:
                ckey = captions_key(req.campaign_id, req.recipient.id, req.job_id)
                self.store.put_file(bucket, ckey, captions, content_type="text/vtt; charset=utf-8")
            generation = getattr(clip, "generation", None)
            if generation:
                self.store.put_bytes(
                    bucket,
                    generation_key(req.campaign_id, req.recipient.id, req.job_id),
                    json.dumps(generation, sort_keys=True).encode(),
                    content_type="application/json",
                )
            texts = drawn_texts_of(req, clip)
            if texts is not None:
                self.store.put_bytes(
                    bucket,
                    drawn_texts_key(req.campaign_id, req.recipient.id, req.job_id),
                    texts.model_dump_json().encode(),
                    content_type="application/json",
                )
            metrics.RENDER_PHASE_SECONDS.labels(phase="upload").observe(time.perf_counter() - uploading)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return vkey, pkey

    def _fetch_photo(self, req: RenderRequested, work: Path) -> Path | None:
        key = req.recipient.photo_key
        if key is None:
            return None
        bucket = self.settings.bucket_assets
        if not self.store.exists(bucket, key):
            raise PermanentError(f"render {req.job_id}: photo {key!r} is not in bucket {bucket}")
        return self.store.get_file(bucket, key, work / ("photo" + Path(key).suffix.lower()))

    def _announce(self, req: RenderRequested, trace_id: str) -> None:
        announce_rendered(self.events, self.store, self.settings.bucket_staging, req, trace_id=trace_id)

    def _work_root(self) -> Path:
        root = self.settings.resolved_render_dir
        root.mkdir(parents=True, exist_ok=True)
        return root


def drawn_texts_of(req: RenderRequested, clip: RenderedClip) -> DrawnTexts | None:
    """The record of what the renderer drew (None when the renderer does not report it)."""
    if clip.drawn_texts is None:
        return None
    return DrawnTexts(
        job_id=req.job_id,
        sha256=clip.sha256,
        template=clip.template or f"{req.template.name}@{req.template.version}",
        merge_values=dict(clip.merge_values or {}),
        texts=tuple(DrawnText(layer=layer, text=text) for layer, text in clip.drawn_texts),
    )


def rendered_event(store: ObjectStore, bucket: str, req: RenderRequested) -> ClipRendered:
    """The ClipRendered of a recorded render, rebuilt from its staging object's metadata."""
    vkey = clip_key(req.campaign_id, req.recipient.id, req.job_id)
    info = store.stat(bucket, vkey)
    if info is None:
        raise RuntimeError(f"render {req.job_id}: staging object {vkey} is missing")
    return ClipRendered(
        job_id=req.job_id,
        campaign_id=req.campaign_id,
        recipient_id=req.recipient.id,
        staging_key=vkey,
        poster_key=poster_key(req.campaign_id, req.recipient.id, req.job_id),
        sha256=info.metadata["sha256"],
        duration_s=float(info.metadata["duration"]),
        width=int(info.metadata["width"]),
        height=int(info.metadata["height"]),
    )


def announce_rendered(
    events: EventPublisher, store: ObjectStore, bucket: str, req: RenderRequested, *, trace_id: str | None
) -> None:
    """render.results for a recorded render; the envelope id is the same at every
    re-announcement (job id, event type, clip sha256)."""
    clip = rendered_event(store, bucket, req)
    events.publish(
        RENDER_RESULTS,
        clip,
        key=str(req.job_id),
        trace_id=trace_id,
        event_id=event_id(req.job_id, ClipRendered.event_type, clip.sha256),
    )
