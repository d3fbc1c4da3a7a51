"""The moderation step: decide approved / rejected / needs_review for a rendered clip.

Checks, in order: consent (every subject, every scope, for this purpose), text (merge
fields and prompts), likeness (every face in the input photo and in the sampled frames is
a consented subject; a protected person rejects; an unknown face goes to a human) and
the visible AI label. The policy turns the findings into a decision; the findings are
stored (append-only) for the review queue and sent with the decision.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from pipeline import metrics
from pipeline.adapters.storage import ObjectStore, sha256_file, validate_key
from pipeline.consent.check import ConsentCheck
from pipeline.errors import GreetflowError, PermanentError
from pipeline.faces import FaceEngine, FaceSighting, LikenessError, reference_embedding
from pipeline.keys import clip_key, drawn_texts_key, poster_key
from pipeline.moderation.clip import analyze_clip, clip_findings, photo_regions, photo_sightings
from pipeline.moderation.labels import expected_label_text
from pipeline.moderation.likeness import CharacterFace, References, with_character_references
from pipeline.moderation.policy import ModerationPolicy, summarize
from pipeline.moderation.text import (
    AbuseLists,
    ExpectedTexts,
    drawn_text_findings,
    expected_drawn_texts,
    text_fields,
    text_findings,
)
from pipeline.ports import EventPublisher
from pipeline.repositories import (
    ConsentRepository,
    JobRecord,
    JobRepository,
    LikenessGallery,
    ModerationResult,
    ModerationResultRepository,
)
from pipeline.settings import Settings
from pipeline.steps import claim_step, decision_event_id
from pipeline.topics import MODERATION_DECISIONS
from pipeline.trust import UntrustedMessage, check_matches_row
from schemas.common import Scope, utcnow
from schemas.events import (
    ClipRendered,
    Decision,
    DrawnTexts,
    Envelope,
    Finding,
    ModerationDecided,
    RenderRequested,
    Severity,
)
from schemas.jobs import JobState

log = logging.getLogger(__name__)

_DECIDED = {
    JobState.APPROVED: Decision.APPROVED,
    JobState.REJECTED: Decision.REJECTED,
    JobState.NEEDS_REVIEW: Decision.NEEDS_REVIEW,
}

_T = TypeVar("_T")

Check = Callable[[RenderRequested, ClipRendered, datetime], Sequence[Finding]]


class _Phases:
    """Wall seconds per phase of one moderation (logged, for profiling)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def _add(self, name: str, seconds: float) -> None:
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - t0)

    def timed(self, name: str, fn: Callable[[], _T]) -> _T:
        with self(name):
            return fn()

    def line(self) -> str:
        with self._lock:
            return " ".join(f"{k}={v:.3f}" for k, v in self.seconds.items())


def decide(findings: Sequence[Finding]) -> Decision:
    """The default policy (no overrides)."""
    return ModerationPolicy().decide(findings)


class ModerationService:
    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        consents: ConsentRepository,
        results: ModerationResultRepository,
        gallery: LikenessGallery,
        store: ObjectStore,
        events: EventPublisher,
        *,
        owner: str,
        faces: Callable[[], FaceEngine],
        policy: ModerationPolicy | None = None,
        abuse: AbuseLists | None = None,
        extra_checks: Sequence[Check] = (),
        lease_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.consents = consents
        self._consent = ConsentCheck(consents)
        self.results = results
        self.gallery = gallery
        self.store = store
        self.events = events
        self.owner = owner
        self._faces = faces
        self.policy = policy or ModerationPolicy.parse(settings.moderation_rules)
        self.abuse = abuse or AbuseLists.load(settings.text_abuse_lists_dir)
        self.extra_checks = tuple(extra_checks)
        self.lease_s = lease_s
        # Character reference faces by (key, ETag): every job of a campaign has the same ones.
        self._reference_faces: dict[tuple[str, str], tuple[float, ...] | str] = {}

    def handle(self, env: Envelope[ClipRendered]) -> None:
        clip = env.payload
        job = self.jobs.get(clip.job_id)
        if job is None:
            raise UntrustedMessage(f"rendered clip for job {clip.job_id}: no such job")
        self._check_against_row(job, clip)
        if job.state in _DECIDED or job.state in (JobState.PUBLISHING, JobState.PUBLISHED):
            if job.state == JobState.APPROVED:
                # Re-announce: we may have crashed between recording and announcing.
                last = self.results.latest(job.job_id)
                found = last.findings if last else ()
                self._announce(job, Decision.APPROVED, found, job.reason or "", env.trace_id, last)
            return
        step = claim_step(
            self.jobs,
            clip.job_id,
            from_states=[JobState.RENDERED],
            to_state=JobState.MODERATING,
            owner=self.owner,
            lease_s=self.lease_s,
        )
        if step is None:
            log.info("moderate %s: state %s, not claimable", clip.job_id, job.state)
            return
        with step:
            findings = self.policy.apply(self._moderate(step.job, clip))
            decision = self.policy.decide(findings)
            reason = summarize(findings)
            result = self.results.record(
                clip.job_id, decision, findings, decided_by=self.owner, reason=reason
            )
            won = step.finish(JobState(decision.value), reason=reason or None)
        if won:
            metrics.MODERATION_DECISIONS.labels(outcome=decision.value).inc()
            log.info(
                "moderate %s: %s (%s)",
                clip.job_id,
                decision.value,
                reason or f"{len(findings)} findings, all info",
            )
            self._announce(step.job, decision, findings, reason, env.trace_id, result)

    def _check_against_row(self, job: JobRecord, clip: ClipRendered) -> None:
        """The announcement must name the row's clip: its ids, its staging keys and, while
        the clip awaits moderation, the sha256 the render step recorded on the object."""
        what = f"rendered clip for job {job.job_id}"
        pairs: dict[str, tuple[object, object]] = {
            "campaign_id": (clip.campaign_id, job.campaign_id),
            "recipient_id": (clip.recipient_id, job.recipient_id),
            "staging_key": (
                clip.staging_key,
                job.staging_key or clip_key(job.campaign_id, job.recipient_id, job.job_id),
            ),
        }
        if clip.poster_key is not None:
            pairs["poster_key"] = (
                clip.poster_key,
                job.poster_key or poster_key(job.campaign_id, job.recipient_id, job.job_id),
            )
        check_matches_row(what, pairs)
        if job.state in (JobState.RENDERED, JobState.MODERATING) and job.staging_key:
            info = self.store.stat(self.settings.bucket_staging, job.staging_key)
            recorded = info.metadata.get("sha256") if info is not None else None
            if recorded is not None and recorded != clip.sha256:
                raise UntrustedMessage(f"{what}: sha256 differs from the staging object")

    def _drawn_text_findings(self, req: RenderRequested, clip: ClipRendered) -> list[Finding]:
        """What the renderer drew (its record beside the clip) against the row."""
        key = drawn_texts_key(req.campaign_id, req.recipient.id, req.job_id)
        bucket = self.settings.bucket_staging
        record: DrawnTexts | None = None
        if self.store.exists(bucket, key):
            try:
                record = DrawnTexts.model_validate_json(self.store.get_bytes(bucket, key))
            except ValueError:
                return [
                    Finding(
                        kind="drawn_texts_missing",
                        severity=Severity.BLOCK,
                        message=f"the drawn-text record {key} is not readable",
                    )
                ]
        expected: ExpectedTexts | None
        try:
            expected = expected_drawn_texts(req, self.settings.templates_dir)
        except GreetflowError as exc:
            log.warning("moderate %s: drawn texts compared by merge values only: %s", req.job_id, exc)
            expected = None
        return drawn_text_findings(
            record,
            req,
            clip_sha256=clip.sha256,
            expected=expected,
            lists=self.abuse,
            max_chars=self.settings.text_max_chars,
        )

    def _moderate(self, job: JobRecord, clip: ClipRendered) -> list[Finding]:
        req = job.request
        now = utcnow()
        phase = _Phases()
        work = Path(tempfile.mkdtemp(prefix=f"moderate-{req.job_id}-", dir=self._work_root()))
        try:
            with phase("fetch"):
                video = self._fetch_clip(job, clip, work)
                photo = self._fetch_photo(req, work)
            engine = self._faces()
            # The subject photo's faces and the row's checks (consent, texts, the drawn-text
            # record, reference faces) do not need the clip's frames: they run beside its
            # analysis, which is what takes the time. Every check runs to completion.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="moderate-row") as side:
                extra_f = side.submit(
                    phase.timed, "photo", lambda: photo_sightings(engine, photo) if photo is not None else []
                )
                row_f = side.submit(phase.timed, "row_checks", lambda: self._row_checks(req, clip, now))
                refs_f = side.submit(
                    phase.timed, "references", lambda: self._references(req, engine, work, now)
                )
                with phase("analysis"):
                    analysis = analyze_clip(
                        video,
                        self.settings,
                        engine,
                        label_text=expected_label_text(req.template, self.settings.templates_dir),
                        small_face_regions=photo_regions(req.template, self.settings.templates_dir),
                    )
                extra: list[FaceSighting] = extra_f.result()
                findings = row_f.result()
                refs, ref_findings = refs_f.result()
            findings.extend(ref_findings)
            face_subjects = [u.subject_id for u in req.subjects if Scope.FACE in u.scopes]
            more, to_show = clip_findings(
                analysis,
                refs,
                self.settings,
                face_subjects=face_subjects,
                extra_sightings=extra,
                photo_supplied=photo is not None,
            )
            log.info(
                "moderate %s: %d frames, %d faces analysed in %.2fs",
                req.job_id, analysis.frames_sampled, len(analysis.sightings), analysis.seconds,
            )  # fmt: skip
        finally:
            shutil.rmtree(work, ignore_errors=True)
        with phase("crops"):
            findings.extend(self._with_crops(job, more, to_show))
        with phase("extra_checks"):
            for check in self.extra_checks:
                findings.extend(check(req, clip, now))
        log.info("moderate %s: phases %s", req.job_id, phase.line())
        return findings

    def _row_checks(self, req: RenderRequested, clip: ClipRendered, now: datetime) -> list[Finding]:
        """Consent of every subject, the row's texts and the renderer's drawn-text record."""
        findings: list[Finding] = self._consent.findings(req.subjects, campaign_id=req.campaign_id, at=now)
        findings.extend(
            text_findings(
                text_fields(req),
                self.abuse,
                max_chars=self.settings.text_max_chars,
                name_max_chars=self.settings.text_name_max_chars,
            )
        )
        findings.extend(self._drawn_text_findings(req, clip))
        return findings

    def _references(
        self, req: RenderRequested, engine: FaceEngine, work: Path, now: datetime
    ) -> tuple[References, list[Finding]]:
        """The faces the clip's faces are compared with, and the character-reference findings."""
        consented, ref_findings = with_character_references(
            self._consent.face_references(req.subjects, campaign_id=req.campaign_id, at=now),
            self._character_faces(req, engine, work),
            threshold=self.settings.likeness_threshold,
        )
        return References(consented=consented, protected=self.gallery.faces()), ref_findings

    def _fetch_clip(self, job: JobRecord, clip: ClipRendered, work: Path) -> Path:
        key = job.staging_key or clip.staging_key
        bucket = self.settings.bucket_staging
        if not self.store.exists(bucket, key):
            raise PermanentError(f"moderate {job.job_id}: staging object {key} is missing")
        video = self.store.get_file(bucket, key, work / "clip.mp4")
        digest = sha256_file(video)
        if digest != clip.sha256:
            raise PermanentError(
                f"moderate {job.job_id}: staging object {key} is not the rendered clip "
                f"(sha256 {digest[:12]}..., expected {clip.sha256[:12]}...)"
            )
        return video

    def _character_faces(self, req: RenderRequested, engine: FaceEngine, work: Path) -> list[CharacterFace]:
        """The face of each character reference of a real person, from the assets bucket."""
        out: list[CharacterFace] = []
        bucket = self.settings.bucket_assets
        for n, ref in enumerate(req.references):
            if ref.kind != "character" or ref.subject_id is None:
                continue
            info = self.store.stat(bucket, ref.key)
            if info is None:
                out.append(CharacterFace(ref.key, ref.subject_id, None, f"it is not in bucket {bucket}"))
                continue
            got = self._reference_faces.get((ref.key, info.etag))
            if got is None:
                local = work / f"reference-{n}{Path(ref.key).suffix.lower()}"
                path = self.store.get_file(bucket, ref.key, local)
                try:
                    got = reference_embedding(engine, path).values
                except LikenessError as exc:
                    got = str(exc).replace(str(path), "it")
                if len(self._reference_faces) >= 256:
                    self._reference_faces.clear()
                self._reference_faces[(ref.key, info.etag)] = got
            if isinstance(got, str):
                out.append(CharacterFace(ref.key, ref.subject_id, None, got))
            else:
                out.append(CharacterFace(ref.key, ref.subject_id, got))
        return out

    def _fetch_photo(self, req: RenderRequested, work: Path) -> Path | None:
        key = req.recipient.photo_key
        if key is None:
            return None
        bucket = self.settings.bucket_assets
        if not self.store.exists(bucket, key):
            raise PermanentError(f"moderate {req.job_id}: photo {key!r} is not in bucket {bucket}")
        return self.store.get_file(bucket, key, work / ("photo" + Path(key).suffix.lower()))

    def _with_crops(
        self, job: JobRecord, findings: list[Finding], to_show: Sequence[tuple[Finding, FaceSighting]]
    ) -> list[Finding]:
        """Upload the face crop a reviewer needs next to each unknown / protected finding."""
        crops: dict[int, str] = {}
        for n, (finding, sighting) in enumerate(to_show, start=1):
            if sighting.crop_jpeg is None:
                continue
            key = validate_key(f"{job.campaign_id}/{job.recipient_id}/{job.job_id}-face{n}.jpg")
            self.store.put_bytes(
                self.settings.bucket_staging, key, sighting.crop_jpeg, content_type="image/jpeg"
            )
            crops[id(finding)] = key
        out = []
        for f in findings:
            if id(f) in crops:
                f = f.model_copy(update={"evidence": {**f.evidence, "crop_key": crops[id(f)]}})
            out.append(f)
        return out

    def _announce(
        self,
        job: JobRecord,
        decision: Decision,
        findings: Sequence[Finding],
        reason: str,
        trace_id: str,
        result: ModerationResult | None,
    ) -> None:
        self.events.publish(
            MODERATION_DECISIONS,
            ModerationDecided(
                job_id=job.job_id,
                campaign_id=job.campaign_id,
                decision=decision,
                findings=tuple(findings),
                decided_by=self.owner,
                reason=reason,
            ),
            key=str(job.job_id),
            trace_id=trace_id,
            event_id=decision_event_id(job.job_id, decision, result),
        )

    def _work_root(self) -> Path:
        root = self.settings.resolved_render_dir / "moderate"
        root.mkdir(parents=True, exist_ok=True)
        return root
