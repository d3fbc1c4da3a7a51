"""The latency bench's arithmetic: step durations from a job's events, percentiles, summary."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.bench_latency import LatencyBenchError, percentile, step_durations, summarize
from pipeline.repositories import JobEvent
from schemas.jobs import JobState

T0 = datetime(2026, 2, 1, 12, 0, 0, tzinfo=UTC)
JOB = uuid.uuid4()


def events(*marks: tuple[JobState, float], naive: bool = False) -> list[JobEvent]:
    out = []
    prev: JobState | None = None
    for n, (state, at) in enumerate(marks, start=1):
        when = T0 + timedelta(seconds=at)
        out.append(
            JobEvent(
                id=n,
                job_id=JOB,
                from_state=prev,
                to_state=state,
                reason=None,
                actor="test",
                at=when.replace(tzinfo=None) if naive else when,
            )
        )
        prev = state
    return out


HAPPY = (
    (JobState.REQUESTED, 0.0),
    (JobState.RENDERING, 0.05),
    (JobState.RENDERED, 2.55),
    (JobState.MODERATING, 2.6),
    (JobState.APPROVED, 3.8),
    (JobState.PUBLISHING, 3.85),
    (JobState.PUBLISHED, 4.1),
)


def test_step_durations_of_a_published_job() -> None:
    d = step_durations(events(*HAPPY))
    assert d == {
        "to_render": 0.05,
        "render": 2.5,
        "to_moderate": 0.05,
        "moderate": 1.2,
        "to_publish": 0.05,
        "publish": 0.25,
        "total": 4.1,
    }


def test_naive_timestamps_are_utc() -> None:
    """SQLite returns naive datetimes: they are read as UTC, like the aware ones."""
    assert step_durations(events(*HAPPY, naive=True)) == step_durations(events(*HAPPY))


def test_a_retried_step_counts_from_its_last_claim() -> None:
    """A render released after a failure and claimed again: the render step is the last
    attempt; the total still runs from the first request."""
    d = step_durations(
        events(
            (JobState.REQUESTED, 0.0),
            (JobState.RENDERING, 0.1),
            (JobState.REQUESTED, 1.0),
            (JobState.RENDERING, 1.5),
            (JobState.RENDERED, 3.5),
            (JobState.MODERATING, 3.6),
            (JobState.APPROVED, 4.6),
            (JobState.PUBLISHING, 4.7),
            (JobState.PUBLISHED, 5.0),
        )
    )
    assert d["render"] == 2.0
    assert d["to_render"] == 0.1
    assert d["total"] == 5.0


def test_a_job_that_was_not_published_is_an_error() -> None:
    with pytest.raises(LatencyBenchError, match="not requested and published"):
        step_durations(events(*HAPPY[:5]))


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert percentile(values, 50) == pytest.approx(10.5)
    assert percentile(values, 95) == pytest.approx(19.05)
    assert percentile([3.0], 95) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summary_has_the_reported_keys() -> None:
    rows = [step_durations(events(*HAPPY)) for _ in range(3)]
    out = summarize(rows, photo=True, cpus=2)
    assert out["requests"] == 3 and out["photo"] is True and out["cpus"] == 2
    assert out["p50_s"] == out["p95_s"] == 4.1
    assert out["render_median_s"] == 2.5
    assert out["moderate_median_s"] == 1.2
    assert out["publish_median_s"] == 0.25
    assert out["to_moderate_median_s"] == 0.05
    assert len(out["per_request"]) == 3
