"""The job sweeper: re-drives jobs that nothing else will move on.

A job can stall with no message left to move it: its worker died after the offset was
committed, a message was lost during an outage, an announcement failed after its state
was written. Every pass (under the database lock `job-sweeper`, so two sweepers never
double-drive a job) finds the jobs in a working or queue state whose lease expired, or
that made no progress (updated_at) for `sweep_stale_after_s`, and re-announces the message
that moves each one on, with the same job id, so the step that gets it is idempotent:

    requested, rendering  -> render.requests       (RenderRequested from the job's request)
    rendered, moderating  -> render.results        (ClipRendered from the staging object)
    approved, publishing  -> moderation.decisions  (the approval, from its moderation result)

A job waiting in a queue state (requested, rendered, approved) is not swept while its step
is busy (some job is in the step's working state under a live lease): it is then most
likely in a backlog being drained, not lost. A job swept `sweep_max_attempts` times without
a state change is failed with the reason "swept N times without progress: stuck in
<state>". Jobs waiting for a human (needs_review) are the review queue's, never swept.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import metrics
from pipeline.adapters.storage import ObjectStore
from pipeline.ports import EventPublisher
from pipeline.render.service import announce_rendered
from pipeline.repositories import JobRecord, JobRepository, LockRepository, ModerationResultRepository
from pipeline.settings import Settings
from pipeline.steps import decision_event_id
from pipeline.topics import MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS
from schemas.events import Decision, ModerationDecided
from schemas.jobs import JobState

log = logging.getLogger(__name__)

LOCK_NAME = "job-sweeper"

# The state a stuck job is in -> the topic whose message moves it on.
REDRIVE_TOPIC: dict[JobState, str] = {
    JobState.REQUESTED: RENDER_REQUESTS,
    JobState.RENDERING: RENDER_REQUESTS,
    JobState.RENDERED: RENDER_RESULTS,
    JobState.MODERATING: RENDER_RESULTS,
    JobState.APPROVED: MODERATION_DECISIONS,
    JobState.PUBLISHING: MODERATION_DECISIONS,
}
SWEPT_STATES: frozenset[JobState] = frozenset(REDRIVE_TOPIC)
# A job waiting in a queue state -> the working state its step claims it into.
QUEUE_NEXT: dict[JobState, JobState] = {
    JobState.REQUESTED: JobState.RENDERING,
    JobState.RENDERED: JobState.MODERATING,
    JobState.APPROVED: JobState.PUBLISHING,
}


def stuck_reason(sweeps: int, state: JobState) -> str:
    return f"swept {sweeps} times without progress: stuck in {state.value}"


@dataclass(frozen=True)
class Redriven:
    job_id: uuid.UUID
    state: JobState
    topic: str
    sweep: int  # this job's sweeps without progress, this one included


@dataclass(frozen=True)
class SweepReport:
    locked: bool  # False: another sweeper holds the lock, nothing was done
    redriven: tuple[Redriven, ...] = ()
    failed: tuple[uuid.UUID, ...] = ()
    errors: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        return {
            "locked": self.locked,
            "redriven": [
                {"job_id": str(r.job_id), "state": r.state.value, "topic": r.topic, "sweep": r.sweep}
                for r in self.redriven
            ],
            "failed": [str(j) for j in self.failed],
            "errors": list(self.errors),
        }


class JobSweeper:
    def __init__(
        self,
        settings: Settings,
        jobs: JobRepository,
        locks: LockRepository,
        results: ModerationResultRepository,
        store: ObjectStore,
        events: EventPublisher,
        *,
        owner: str,
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self.locks = locks
        self.results = results
        self.store = store
        self.events = events
        self.owner = owner

    def sweep(self) -> SweepReport:
        """One pass: take (or keep) the lock, then re-drive or fail each stuck job."""
        ttl = self.settings.sweep_lock_s
        if not self.locks.acquire(LOCK_NAME, self.owner, ttl_s=ttl):
            log.info("sweep: another sweeper holds the lock %s; skipped", LOCK_NAME)
            return SweepReport(locked=False)
        redriven: list[Redriven] = []
        failed: list[uuid.UUID] = []
        errors: list[str] = []
        draining = {q for q, w in QUEUE_NEXT.items() if self.jobs.has_live_claim(w)}
        stuck = self.jobs.stuck(
            SWEPT_STATES - draining,
            stale_after_s=self.settings.sweep_stale_after_s,
            limit=self.settings.sweep_batch_size,
        )
        for job in stuck:
            # Renewed per job: a long pass must not outlive the lock.
            if not self.locks.acquire(LOCK_NAME, self.owner, ttl_s=ttl):
                log.warning("sweep: lost the lock %s mid-pass; stopping", LOCK_NAME)
                break
            try:
                if job.sweeps >= self.settings.sweep_max_attempts:
                    if self._fail(job):
                        failed.append(job.job_id)
                        metrics.SWEEPS.labels(action="failed").inc()
                    continue
                done = self._redrive(job)
                if done is not None:
                    redriven.append(done)
                    metrics.SWEEPS.labels(action="redriven").inc()
            except Exception as exc:
                metrics.SWEEPS.labels(action="error").inc()
                log.exception("sweep %s: could not re-drive it from %s", job.job_id, job.state.value)
                errors.append(f"{job.job_id}: {type(exc).__name__}: {exc}"[:500])
        if redriven or failed or errors:
            log.warning(
                "sweep: %d stuck job(s): %d re-announced, %d failed, %d error(s)",
                len(stuck), len(redriven), len(failed), len(errors),
            )  # fmt: skip
        return SweepReport(locked=True, redriven=tuple(redriven), failed=tuple(failed), errors=tuple(errors))

    def release(self) -> None:
        """Give the lock back (a stopping sweeper; the DAG task after its pass)."""
        self.locks.release(LOCK_NAME, self.owner)

    def _fail(self, job: JobRecord) -> bool:
        now = self.jobs.get(job.job_id)
        if now is None or now.state != job.state or now.sweeps != job.sweeps:
            return False  # it moved on meanwhile
        reason = stuck_reason(job.sweeps, job.state)
        won = self.jobs.fail(job.job_id, reason, actor=self.owner)
        if won:
            log.error("sweep %s: failed: %s", job.job_id, reason)
        return won

    def _redrive(self, job: JobRecord) -> Redriven | None:
        if not self.jobs.mark_swept(job):
            return None  # it moved on meanwhile
        topic = REDRIVE_TOPIC[job.state]
        key = str(job.job_id)
        req = job.request
        if topic == RENDER_REQUESTS:
            self.events.publish(RENDER_REQUESTS, req, key=key)
        elif topic == RENDER_RESULTS:
            announce_rendered(self.events, self.store, self.settings.bucket_staging, req, trace_id=None)
        else:
            last = self.results.latest(job.job_id)
            if last is None or last.decision != Decision.APPROVED:
                raise RuntimeError(f"job {job.job_id} is {job.state.value} without an approval on record")
            self.events.publish(
                MODERATION_DECISIONS,
                ModerationDecided(
                    job_id=job.job_id,
                    campaign_id=job.campaign_id,
                    decision=Decision.APPROVED,
                    findings=last.findings,
                    decided_by=last.decided_by,
                    reason=last.reason,
                ),
                key=key,
                event_id=decision_event_id(job.job_id, Decision.APPROVED, last),
            )
        sweep = job.sweeps + 1
        lease = job.lease_expires_at.isoformat() if job.lease_expires_at else "none"
        log.warning(
            "sweep %s: stuck in %s (lease %s, claimed by %s, last change %s); re-announced to %s (%d/%d)",
            job.job_id, job.state.value, lease, job.claimed_by or "-", job.updated_at.isoformat(), topic,
            sweep, self.settings.sweep_max_attempts,
        )  # fmt: skip
        return Redriven(job.job_id, job.state, topic, sweep)
