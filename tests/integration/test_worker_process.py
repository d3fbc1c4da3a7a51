"""A worker is a real process: SIGTERM lets it finish, commit and exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from pipeline.settings import Settings
from pipeline.topics import RENDER_REQUESTS
from schemas.jobs import JobState

pytestmark = pytest.mark.integration


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "GREETFLOW_DATA_DIR": str(settings.data_dir),
            "GREETFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "GREETFLOW_S3_ENDPOINT": settings.s3_endpoint,
            "GREETFLOW_RENDER_WIDTH": str(settings.render_width),
            "GREETFLOW_RENDER_HEIGHT": str(settings.render_height),
        }
    )
    return env


@pytest.mark.parametrize(
    "argv",
    [["-m", "pipeline.cli", "worker", "render"], ["-m", "consumers.render"]],
    ids=["greetflow-worker", "python-m-consumers"],
)
def test_render_worker_process_stops_cleanly_on_sigterm(container: Container, argv: list[str]) -> None:
    brief = sample_brief(2)
    reqs = [render_request_for(brief, r) for r in brief.recipients]
    for req in reqs:
        container.bus.publish(RENDER_REQUESTS, req, key=str(req.job_id))
    proc = subprocess.Popen(
        [sys.executable, *argv],
        env=_env(container.settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = [j.state for j in container.jobs.list_jobs(campaign_id=brief.campaign_id)]
            if JobState.RENDERING in states or JobState.RENDERED in states:
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    # Whatever it started it finished: nothing is left half-done in `rendering`.
    states = [j.state for j in container.jobs.list_jobs(campaign_id=brief.campaign_id)]
    assert JobState.RENDERING not in states, states
