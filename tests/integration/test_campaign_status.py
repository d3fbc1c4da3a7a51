"""`greetflow campaign status` on a real (SQLite) database: plain lines when stdout is not a
terminal, the counts, throughput, ETA and dead letters; the rich view on a terminal; and
the report's chart of jobs by state over time, drawn from the same job history."""

from __future__ import annotations

import io
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from PIL import Image

from pipeline.bootstrap import Container
from pipeline.cli import main
from pipeline.progress import ProgressService, ProgressView
from pipeline.reports import render_state_chart, state_timeline
from pipeline.repositories import JobRepository
from pipeline.settings import Settings, get_settings
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

CAMPAIGN = "status-demo"


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _publish(jobs: JobRepository, job_id: object, clock: Clock, step: timedelta) -> None:
    path = [
        (JobState.RENDERING, [JobState.REQUESTED], JobState.RENDERED),
        (JobState.MODERATING, [JobState.RENDERED], JobState.APPROVED),
        (JobState.PUBLISHING, [JobState.APPROVED], JobState.PUBLISHED),
    ]
    for working, sources, done in path:
        clock.at += step
        rec = jobs.claim(job_id, to_state=working, from_states=sources, owner="test", lease_s=60)  # type: ignore[arg-type]
        assert rec is not None and rec.claim_token
        clock.at += step
        assert jobs.transition(job_id, to_state=done, expected=working, claim_token=rec.claim_token)  # type: ignore[arg-type]


@pytest.fixture
def campaign(tmp_path: Path) -> tuple[Settings, JobRepository, datetime]:
    """10 jobs created 20 min ago: 4 published and 1 dead-lettered in the last 5 min,
    1 waiting for review, 4 still requested."""
    settings = Settings(data_dir=tmp_path / "data")
    container = Container(settings)
    now = datetime.now(UTC).replace(microsecond=0)
    clock = Clock(now - timedelta(minutes=20))
    jobs = JobRepository(container.db, clock=clock)
    reqs = [render_request(CAMPAIGN, f"r-{i:04d}") for i in range(10)]
    for req in reqs:
        assert jobs.create_if_absent(req)
    clock.at = now - timedelta(minutes=4, seconds=30)
    for req in reqs[:4]:
        _publish(jobs, req.job_id, clock, timedelta(seconds=10))
    assert jobs.fail(reqs[4].job_id, "ValidationError: bad photo", actor="dlq")
    rec = jobs.claim(
        reqs[5].job_id, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED], owner="t", lease_s=60
    )
    assert rec is not None
    assert jobs.transition(
        reqs[5].job_id, to_state=JobState.RENDERED, expected=JobState.RENDERING, claim_token=rec.claim_token
    )
    rec = jobs.claim(
        reqs[5].job_id, to_state=JobState.MODERATING, from_states=[JobState.RENDERED], owner="t", lease_s=60
    )
    assert rec is not None
    assert jobs.transition(
        reqs[5].job_id,
        to_state=JobState.NEEDS_REVIEW,
        expected=JobState.MODERATING,
        claim_token=rec.claim_token,
    )
    assert clock.at < now
    container.close()
    return settings, JobRepository(Container(settings).db), now


def test_campaign_status_prints_plain_lines_off_a_terminal(
    campaign: tuple[Settings, JobRepository, datetime],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, _, _ = campaign
    monkeypatch.setenv("GREETFLOW_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    try:
        rc = main(["campaign", "status", CAMPAIGN])
        out = capsys.readouterr().out
        unknown = main(["campaign", "status", "no-such-campaign"])
        err = capsys.readouterr().err
    finally:
        get_settings.cache_clear()
    assert rc == 0, out
    lines = out.splitlines()
    assert lines[0] == f"campaign {CAMPAIGN}: 5/10 final (50%), 1 waiting for review, 1 dead-lettered"
    assert lines[1] == "  states: requested=4, needs_review=1, published=4, failed=1"
    # 5 jobs final in the last 5 minutes: 1.0 per minute, so the 5 left take about 5 min.
    assert lines[2].startswith("  throughput: 1.0 jobs/min over the last 5.0 min; ETA "), lines[2]
    assert "(in 5 min 00 s)" in lines[2] or "(in 4 min 59 s)" in lines[2], lines[2]
    assert lines[2].endswith(": on time"), lines[2]
    assert "\x1b[" not in out, "no terminal codes in plain output"
    assert unknown == 2 and "no jobs" in err


def test_rich_view_on_a_terminal_and_the_state_chart(
    campaign: tuple[Settings, JobRepository, datetime], tmp_path: Path
) -> None:
    settings, jobs, now = campaign
    service = ProgressService(jobs, deadline_s=settings.campaign_deadline_s)
    snapshot = service.snapshot(CAMPAIGN)
    assert snapshot.deadline == snapshot.started_at + timedelta(seconds=settings.campaign_deadline_s)  # type: ignore[operator]
    tty = io.StringIO()
    tty.isatty = lambda: True  # type: ignore[method-assign]
    with ProgressView(tty) as view:
        assert view.live_mode
        view.show(snapshot)
    drawn = tty.getvalue()
    assert "━" in drawn and "published" in drawn and "dead-lettered 1" in drawn, drawn

    ids = [j.job_id for j in jobs.list_jobs(campaign_id=CAMPAIGN)]
    history = jobs.history_many(ids)
    times, series = state_timeline(history)
    assert [series[st][-1] for st in (JobState.REQUESTED, JobState.PUBLISHED, JobState.FAILED)] == [4, 4, 1]
    assert all(sum(series[st][i] for st in series) <= 10 for i in range(len(times)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        png = render_state_chart(
            history, title=f"新春祝福 {CAMPAIGN}: jobs by state", deadline=now + timedelta(minutes=5)
        )
    assert not [w for w in caught if "missing from font" in str(w.message)], "the CJK title lacks glyphs"
    out = tmp_path / "jobs-by-state.png"
    out.write_bytes(png)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1000, 500)
        # Published (dark green) is drawn: the top band at the right edge is not blank.
        rgb = img.convert("RGB")
        greens = sum(
            1 for x in range(300, 800) for y in range(50, 450, 10) if rgb.getpixel((x, y)) == (35, 139, 69)
        )
        assert greens > 0
    print(f"chart: {out}")
