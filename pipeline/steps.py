"""One pipeline step on one job: claim it under a lease, do the work, then either move it
on with the claim token or give the claim back.

    step = claim_step(jobs, job_id, from_states=[JobState.REQUESTED], to_state=JobState.RENDERING,
                      owner=owner, lease_s=settings.step_lease_s)
    if step is None:
        return                      # the job moved on, or a live worker still holds it
    with step:
        ...                         # the work; an exception releases the claim
        won = step.finish(JobState.RENDERED, staging_key=key)
    if won:
        ...                         # announce

Leases are short and alive while the work is: a heartbeat thread renews the claim every
third of the lease from the claim until finish / release / the end of the `with`. A
worker that dies stops renewing, so its lease ends within one lease period.

Takeover: a redelivered message whose job is held under a live lease by another worker
is not given up at once: `claim_step` waits (re-reading the job) until that lease expires,
then takes the claim over and returns the step; when the job moves on instead, or the
holder keeps renewing past the wait (it is alive and will finish), it returns None.

Releasing on error matters because the consumer loop retries a failed handler on the
same message: the retry must be able to claim the job again at once instead of finding
it held (by the attempt that failed).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Unpack

from pipeline import metrics
from pipeline.repositories import JobFields, JobRecord, JobRepository, ModerationResult
from schemas.events import ClipPublished, ClipTakenDown, Decision, ModerationDecided
from schemas.jobs import JobState

log = logging.getLogger(__name__)

# Namespace of the deterministic envelope ids (see `event_id`).
EVENT_NAMESPACE = uuid.UUID("5b0e7f0c-3c1d-4f51-9a8e-6d1f2e7c4a90")


def event_id(job_id: uuid.UUID | str, event_type: str, *parts: object) -> uuid.UUID:
    """The envelope id of a job's announcement: the same job, event type and `parts` give
    the same id, so a re-announcement (after a crash, a takeover or a sweep) can be
    deduplicated by consumers. `parts` tell apart distinct events of one type (e.g. the
    moderation result a decision comes from)."""
    name = ":".join([str(uuid.UUID(str(job_id))), event_type, *(str(p) for p in parts)])
    return uuid.uuid5(EVENT_NAMESPACE, name)


def decision_event_id(job_id: uuid.UUID, decision: Decision, result: ModerationResult | None) -> uuid.UUID:
    """A moderation decision: per job, decision and the moderation result row it comes
    from, so re-announcing one decision repeats its id while a second decision of the same
    job (a human review, a re-moderation after a reopen) gets its own."""
    return event_id(
        job_id, ModerationDecided.event_type, Decision(decision).value, result.id if result else 0
    )


def published_event_id(job_id: uuid.UUID) -> uuid.UUID:
    """clips.published: once per job (a published job is never published again)."""
    return event_id(job_id, ClipPublished.event_type)


def taken_down_event_id(job_id: uuid.UUID) -> uuid.UUID:
    """clips.taken_down: once per job (taken_down is final)."""
    return event_id(job_id, ClipTakenDown.event_type)


class Step:
    """A claimed job. Use it as a context manager around the work."""

    def __init__(
        self, jobs: JobRepository, job: JobRecord, *, claim_token: str, owner: str, lease_s: float
    ) -> None:
        self._jobs = jobs
        self.job = job
        self.claim_token = claim_token
        self.owner = owner
        self.lease_s = lease_s
        self._finished = False
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def job_id(self) -> uuid.UUID:
        return self.job.job_id

    @property
    def working_state(self) -> JobState:
        return self.job.state

    @property
    def lost(self) -> bool:
        """True once a renewal found the claim gone (the lease expired and another worker
        took the job over): the work's result will not be recorded."""
        return self._lost.is_set()

    def renew(self) -> bool:
        """Push the lease end to `lease_s` from now. False when the claim is lost."""
        return self._jobs.renew(self.job_id, claim_token=self.claim_token, lease_s=self.lease_s)

    def start_heartbeat(self) -> None:
        """Renew the lease every third of it until finish / release / exit (idempotent)."""
        if self._heartbeat is not None:
            return
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id}", daemon=True)
        self._heartbeat.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        beat = self._heartbeat
        if beat is not None and beat is not threading.current_thread():
            beat.join(timeout=min(5.0, self.lease_s / 3))

    def _beat(self) -> None:
        interval = self.lease_s / 3
        while not self._stop.wait(interval):
            try:
                alive = self.renew()
            except Exception as exc:
                # The database may be away for a moment: the lease covers two more tries.
                log.warning("%s %s: could not renew the lease: %s", self.owner, self.job_id, exc)
                continue
            if not alive:
                if not self._stop.is_set():
                    self._lost.set()
                    log.warning(
                        "%s %s: lost the claim while %s (lease expired and taken over)",
                        self.owner, self.job_id, self.working_state.value,
                    )  # fmt: skip
                return

    def finish(self, to_state: JobState, *, reason: str | None = None, **fields: Unpack[JobFields]) -> bool:
        """Move the job from the working state to `to_state`, with the claim token; `fields`
        as in `JobRepository.transition`. False (logged) when the claim was lost meanwhile:
        its lease expired and another worker took the job over."""
        self._finished = True
        self.stop_heartbeat()
        if self.lost:
            log.warning(
                "%s %s: the claim was lost while %s; not moved to %s",
                self.owner, self.job_id, self.working_state.value, to_state.value,
            )  # fmt: skip
            return False
        won = self._jobs.transition(
            self.job_id,
            to_state=to_state,
            expected=self.working_state,
            claim_token=self.claim_token,
            reason=reason,
            actor=self.owner,
            **fields,
        )
        if not won:
            self._lost.set()
            log.warning(
                "%s %s: lost the claim while %s (lease expired?); not moved to %s",
                self.owner, self.job_id, self.working_state.value, to_state.value,
            )  # fmt: skip
        return won

    def release(self) -> bool:
        """Give the claim back, keeping the state, so that a retry can claim the job at once."""
        self._finished = True
        self.stop_heartbeat()
        return self._jobs.release(self.job_id, claim_token=self.claim_token)

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_heartbeat()
        if self._finished:
            return
        if exc is None:
            log.warning("%s %s: step ended without a transition; claim released", self.owner, self.job_id)
        try:
            self.release()
        except Exception:
            if exc is None:
                raise
            # Keep the work's error: the lease still ends the claim, later.
            log.exception("%s %s: could not release the claim", self.owner, self.job_id)


def takeover_wait_s(lease_s: float) -> float:
    """How long a step waits for another worker's lease: one lease plus one renewal
    interval (a live holder renews within it; a dead one's lease has ended by then)."""
    return lease_s + lease_s / 3 + 1.0


def claim_step(
    jobs: JobRepository,
    job_id: uuid.UUID | str,
    *,
    from_states: Iterable[JobState],
    to_state: JobState,
    owner: str,
    lease_s: float,
    wait_s: float | None = None,
    heartbeat: bool = True,
) -> Step | None:
    """Claim the job into the working state `to_state` (see `JobRepository.claim`) and start
    its heartbeat. When another worker holds the job in `to_state`, wait up to `wait_s`
    (default `takeover_wait_s(lease_s)`) for its lease to expire and take the job over.
    None when the job is in none of `from_states` / `to_state` (it moved on), or its holder
    is still renewing when the wait ends."""
    sources = frozenset(JobState(s) for s in from_states)
    deadline = time.monotonic() + (takeover_wait_s(lease_s) if wait_s is None else wait_s)
    poll_s = min(0.5, max(0.02, lease_s / 20))
    holder: str | None = None
    while True:
        claimed = jobs.claim(job_id, to_state=to_state, from_states=sources, owner=owner, lease_s=lease_s)
        if claimed is not None:
            break
        job = jobs.get(job_id)
        if job is None:
            return None
        if job.state in sources and time.monotonic() < deadline:
            continue  # lost a race on the claim: look again
        if job.state != to_state:
            if holder is not None:
                log.info("%s %s: moved on to %s while held by %s", owner, job_id, job.state.value, holder)
            return None
        if time.monotonic() >= deadline:
            log.info(
                "%s %s: %s still holds it (lease renewed); leaving the job to it",
                owner, job_id, job.claimed_by,
            )  # fmt: skip
            return None
        if holder is None:
            holder = job.claimed_by or "?"
            log.info(
                "%s %s: held by %s in %s until %s; waiting to take it over",
                owner, job_id, holder, to_state.value, job.lease_expires_at,
            )  # fmt: skip
        time.sleep(poll_s)
    if claimed.claim_token is None:
        raise RuntimeError(f"claim of job {job_id} returned no claim token")
    if holder is not None:
        log.warning("%s %s: took over from %s (its lease expired)", owner, job_id, holder)
        step_name = metrics.STEP_OF_WORKING_STATE.get(to_state.value, to_state.value)
        metrics.STEP_TAKEOVERS.labels(step=step_name).inc()
    step = Step(jobs, claimed, claim_token=claimed.claim_token, owner=owner, lease_s=lease_s)
    if heartbeat:
        step.start_heartbeat()
    return step
