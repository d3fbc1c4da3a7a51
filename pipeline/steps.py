"""One pipeline step on one job: claim it under a lease, do the work, then either move it
on with the claim token or give the claim back.

    step = claim_step(jobs, job_id, from_states=[JobState.REQUESTED], to_state=JobState.RENDERING,
                      owner=owner, lease_s=300)
    if step is None:
        return                      # another worker holds the job, or it is past this step
    with step:
        ...                         # the work; an exception releases the claim
        won = step.finish(JobState.RENDERED, staging_key=key)
    if won:
        ...                         # announce

Releasing on error matters because the consumer loop retries a failed handler on the
same message: the retry must be able to claim the job again at once instead of finding
it held (by the attempt that failed) and committing the message as done.

The step owns the claim token and the lease, so a heartbeat can call `renew()` from
another thread while the work runs.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Unpack

from pipeline.repositories import JobFields, JobRecord, JobRepository
from schemas.jobs import JobState

log = logging.getLogger(__name__)


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

    @property
    def job_id(self) -> uuid.UUID:
        return self.job.job_id

    @property
    def working_state(self) -> JobState:
        return self.job.state

    def renew(self) -> bool:
        """Push the lease end to `lease_s` from now. False when the claim is lost."""
        return self._jobs.renew(self.job_id, claim_token=self.claim_token, lease_s=self.lease_s)

    def finish(self, to_state: JobState, *, reason: str | None = None, **fields: Unpack[JobFields]) -> bool:
        """Move the job from the working state to `to_state`, with the claim token; `fields`
        as in `JobRepository.transition`. False (logged) when the claim was lost meanwhile:
        its lease expired and another worker took the job over."""
        self._finished = True
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
            log.warning(
                "%s %s: lost the claim while %s (lease expired?); not moved to %s",
                self.owner, self.job_id, self.working_state.value, to_state.value,
            )  # fmt: skip
        return won

    def release(self) -> bool:
        """Give the claim back, keeping the state, so that a retry can claim the job at once."""
        self._finished = True
        return self._jobs.release(self.job_id, claim_token=self.claim_token)

    def __enter__(self) -> Step:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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


def claim_step(
    jobs: JobRepository,
    job_id: uuid.UUID | str,
    *,
    from_states: Iterable[JobState],
    to_state: JobState,
    owner: str,
    lease_s: float,
) -> Step | None:
    """Claim the job into the working state `to_state` (see `JobRepository.claim`); None
    when it is not claimable (another worker holds it, or it is in none of `from_states`)."""
    claimed = jobs.claim(job_id, to_state=to_state, from_states=from_states, owner=owner, lease_s=lease_s)
    if claimed is None:
        return None
    if claimed.claim_token is None:
        raise RuntimeError(f"claim of job {job_id} returned no claim token")
    return Step(jobs, claimed, claim_token=claimed.claim_token, owner=owner, lease_s=lease_s)
