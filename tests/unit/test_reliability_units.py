"""Deterministic envelope ids, the jobs summary, and `greetflow submit --wait`'s exit status."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline.campaigns import SubmitResult, summarize_jobs
from pipeline.cli import UNFINISHED_EXIT, main
from pipeline.repositories import JobRecord, ModerationResult
from pipeline.steps import decision_event_id, event_id, published_event_id, taken_down_event_id
from schemas.common import Locale
from schemas.events import ClipRendered, Decision, Envelope, ModerationDecided
from schemas.jobs import FINAL_STATES, JobState

JOB = uuid.UUID("00000000-0000-4000-8000-000000000001")
T = datetime(2026, 12, 1, tzinfo=UTC)


def record(n: int, state: JobState, sweeps_total: int = 0) -> JobRecord:
    return JobRecord(
        job_id=uuid.UUID(int=n),
        campaign_id="c",
        recipient_id=f"r-{n}",
        template_name="t",
        template_version="1",
        locale=Locale.EN,
        state=state,
        reason=None,
        request_json={},
        staging_key=None,
        poster_key=None,
        published_key=None,
        url=None,
        claim_token=None,
        claimed_by=None,
        lease_expires_at=None,
        attempts=1,
        created_at=T,
        updated_at=T,
        sweeps_total=sweeps_total,
    )


def result(rid: int, decision: Decision) -> ModerationResult:
    return ModerationResult(rid, JOB, decision, (), "moderate@x", "", T)


def test_event_ids_are_deterministic_per_job_type_and_parts() -> None:
    assert event_id(JOB, "clip.rendered", "abc") == event_id(str(JOB), "clip.rendered", "abc")
    assert event_id(JOB, "clip.rendered", "abc") != event_id(JOB, "clip.rendered", "abd")
    assert event_id(JOB, "clip.rendered") != event_id(uuid.UUID(int=2), "clip.rendered")
    assert published_event_id(JOB) == published_event_id(JOB) != taken_down_event_id(JOB)


def test_a_second_decision_of_a_job_gets_its_own_id() -> None:
    approved = result(7, Decision.APPROVED)
    assert decision_event_id(JOB, Decision.APPROVED, approved) == decision_event_id(
        JOB, Decision.APPROVED, approved
    )
    # A human decision (or a re-moderation after a reopen) is recorded as a new result.
    assert decision_event_id(JOB, Decision.APPROVED, result(9, Decision.APPROVED)) != decision_event_id(
        JOB, Decision.APPROVED, approved
    )
    assert decision_event_id(JOB, Decision.REJECTED, approved) != decision_event_id(
        JOB, Decision.APPROVED, approved
    )


def test_envelope_wrap_takes_the_id() -> None:
    payload = ModerationDecided(job_id=JOB, campaign_id="c", decision=Decision.APPROVED)
    eid = decision_event_id(JOB, Decision.APPROVED, None)
    assert Envelope.wrap(payload, id=eid).id == eid == Envelope.wrap(payload, id=eid).id
    assert Envelope.wrap(payload).id != Envelope.wrap(payload).id
    assert ClipRendered.event_type == "clip.rendered"


def test_summary_counts_unfinished_swept_and_failed() -> None:
    ids = [uuid.UUID(int=n) for n in range(1, 6)]
    recs = [
        record(1, JobState.PUBLISHED),
        record(2, JobState.FAILED, sweeps_total=3),
        record(3, JobState.RENDERING, sweeps_total=1),
        record(4, JobState.REQUESTED),
    ]
    s = summarize_jobs(ids, recs)
    assert (s.total, s.unfinished, s.swept, s.failed) == (5, 3, 2, 1)
    assert s.counts == {"published": 1, "failed": 1, "rendering": 1, "requested": 1, "missing": 1}
    assert "3 of 5 jobs unfinished" in s.describe()


@dataclass
class FakeCampaigns:
    records: list[JobRecord]

    def submit(self, brief: Any, **_: Any) -> SubmitResult:
        return SubmitResult(
            "c", tuple(r.job_id for r in self.records), len(self.records), len(self.records), 0
        )

    submit_brief = submit

    def wait(self, job_ids: Any, *, timeout_s: float, on_progress: Any = None) -> list[JobRecord]:
        if on_progress is not None:
            on_progress({})
        return self.records

    def wait_campaign(
        self, campaign_id: str, *, expected: int, timeout_s: float, on_progress: Any = None
    ) -> dict[JobState, int]:
        if on_progress is not None:
            on_progress({})
        counts = dict.fromkeys(JobState, 0)
        for r in self.records:
            counts[r.state] += 1
        return counts


@dataclass
class FakeJobs:
    records: list[JobRecord]

    def list_jobs(self, campaign_id: str | None = None, limit: int = 1000, **_: Any) -> list[JobRecord]:
        return self.records[:limit]


class FakeProgress:
    """`Container.progress_service()` for the fake: a snapshot of the fake's records."""

    def __init__(self, records: list[JobRecord]) -> None:
        self.records = records

    def snapshot(self, campaign_id: str) -> Any:
        from pipeline.progress import CampaignProgress

        counts = dict.fromkeys(JobState, 0)
        for r in self.records:
            counts[r.state] += 1
        now = datetime.now(UTC)
        return CampaignProgress(campaign_id, counts, 0, 0, 300.0, now, None, now)


@pytest.mark.parametrize(
    ("states", "status"),
    [
        ([JobState.PUBLISHED, JobState.REJECTED], 0),
        ([JobState.PUBLISHED, JobState.RENDERING, JobState.REQUESTED], UNFINISHED_EXIT),
    ],
)
def test_submit_wait_exits_non_zero_with_unfinished_jobs(
    states: list[JobState],
    status: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import pipeline.bootstrap
    import pipeline.campaigns

    campaigns = FakeCampaigns([record(n, st) for n, st in enumerate(states, start=1)])

    class FakeContainer:
        def __init__(self, settings: Any) -> None:
            self.jobs = FakeJobs(campaigns.records)

        def campaigns(self) -> FakeCampaigns:
            return campaigns

        def progress_service(self) -> FakeProgress:
            return FakeProgress(campaigns.records)

        def close(self) -> None:
            pass

    monkeypatch.setattr(pipeline.bootstrap, "Container", FakeContainer)
    monkeypatch.setattr(pipeline.campaigns, "load_brief", lambda _p: object())
    assert main(["submit", str(tmp_path / "brief.yaml"), "--wait", "5"]) == status
    out, err = capsys.readouterr()
    assert f"campaign c: {sum(st in FINAL_STATES for st in states)}/{len(states)} final" in out, out
    if status:
        assert "2 of 3 jobs unfinished (published=1, rendering=1, requested=1)" in err
    else:
        assert "unfinished" not in err
