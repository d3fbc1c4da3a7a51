"""kill -9 a worker mid-batch: every job is still published exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench_faults import SCENARIOS, first_takeover_s, sweeper_role
from tests.faults.harness import assert_exactly_once, fault_env, require_sweeper, start_pipeline, wait_holding

pytestmark = pytest.mark.integration

JOBS = 30


@pytest.mark.parametrize(
    ("scenario", "backend"),
    [("kill_render", "postgresql"), ("kill_publisher", "postgresql"), ("kill_moderator", "sqlite")],
)
def test_kill9_mid_batch_publishes_every_job_exactly_once(
    tmp_path: Path, scenario: str, backend: str
) -> None:
    from datetime import UTC, datetime

    role, working = SCENARIOS[scenario]
    with fault_env(tmp_path, backend=backend) as env:
        start_pipeline(env.procs, sweeper=sweeper_role() is not None)  # 2 renderers, moderator, publisher
        _campaign, ids = env.submit(JOBS)
        victim, held = wait_holding(
            env.container, env.procs, role, ids, working=working, after_done=JOBS // 5, timeout_s=400
        )
        wall = datetime.now(UTC)
        at = env.procs.kill9(victim)
        print(f"kill -9 {role} pid {victim.pid} holding {len(held)} job(s)")
        if role != "render":
            env.procs.start(role)  # a new one (the other renderer carries on alone)
        outcome = env.finish(ids, timeout_s=420, stall_s=90)
        print(f"takeover_s: {first_takeover_s(env.container, held, victim, wall, at)}")
        assert_exactly_once(outcome, ids)
    require_sweeper()
