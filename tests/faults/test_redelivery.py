"""Every message delivered twice: one object per job, and every duplicate event carries the
id of the first."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench_faults import read_topic, sweeper_role
from pipeline.topics import MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS
from pipeline.workers import MODERATE, PUBLISH, RENDER
from tests.faults.harness import (
    assert_exactly_once,
    count_outcome,
    fault_env,
    lean_brief,
    produce_raw,
    start_pipeline,
    wait_group_caught_up,
)

pytestmark = pytest.mark.integration

JOBS = 8


def test_every_message_redelivered(tmp_path: Path) -> None:
    with fault_env(tmp_path) as env:
        start_pipeline(env.procs, renderers=1, sweeper=sweeper_role() is not None)
        campaign, ids = env.submit(JOBS)
        # A second submit while nothing is final yet: every render request twice, mid-flight.
        again = env.container.campaigns().submit(lean_brief(JOBS, campaign_id=campaign))
        assert again.job_ids == tuple(ids)
        first = env.finish(ids, timeout_s=300)
        assert_exactly_once(first, ids)

        # Now every record of the three step topics once more, as it was (key, value, headers).
        copied = 0
        for topic in (RENDER_REQUESTS, RENDER_RESULTS, MODERATION_DECISIONS):
            for rec in read_topic(env.settings, topic):
                produce_raw(env.settings, topic, rec.value, rec.key, list(rec.headers or []))
                copied += 1
        print(f"re-produced {copied} records")
        for spec in (RENDER, MODERATE, PUBLISH):
            wait_group_caught_up(env.settings, spec.group_id, spec.topic, timeout_s=240)
        env.procs.check_alive()

        outcome = count_outcome(env.container, campaign, ids)
        print(f"after redelivery: {outcome.summary()}")
        assert_exactly_once(outcome, ids)
