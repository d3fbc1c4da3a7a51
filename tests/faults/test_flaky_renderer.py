"""A renderer that raises a transient error once per job: every job is still published."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.bench_faults import sweeper_role
from tests.faults.harness import assert_exactly_once, fault_env, start_pipeline

pytestmark = pytest.mark.integration

JOBS = 8


def test_renderer_failing_once_per_job_still_publishes_every_job(tmp_path: Path) -> None:
    marks = tmp_path / "flaky-marks"
    marks.mkdir()
    with fault_env(tmp_path, extra_env={"GREETFLOW_TEST_FLAKY_DIR": str(marks)}) as env:
        env.procs.main_code["render"] = FLAKY_MAIN
        start_pipeline(env.procs, sweeper=sweeper_role() is not None)
        _campaign, ids = env.submit(JOBS)
        outcome = env.finish(ids, timeout_s=300)
        assert_exactly_once(outcome, ids)
        # The fault really fired: once for every job.
        assert sorted(p.name for p in marks.iterdir()) == sorted(str(j) for j in ids)


# The render worker process, with `pipeline.bootstrap.default_renderer` wrapped so that the
# first call for each job (across all processes: a marker file per job) raises.
FLAKY_MAIN = "import tests.faults.flaky as f; f.main()"
