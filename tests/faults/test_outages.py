"""Outages are waited out: the broker and the S3 server frozen (SIGSTOP) for 20 s each, the
database stalled or refusing for 20 s behind a proxy. Every job is published exactly once,
nothing is dead-lettered and no worker process exits."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

from pipeline.bench_faults import sweeper_role
from schemas.jobs import FINAL_STATES, JobState
from tests.faults.harness import (
    FaultEnv,
    assert_exactly_once,
    dlq_records,
    fault_env,
    signal_component,
    start_pipeline,
)

pytestmark = pytest.mark.integration

JOBS = 10
OUTAGE_S = 20.0


def _wait_some_published(env: FaultEnv, ids: list[uuid.UUID], n: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        env.procs.check_alive()
        states = env.container.jobs.states_of(ids)
        if sum(1 for s in states.values() if s == JobState.PUBLISHED) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} jobs published within {timeout_s} s")


def _outage(env: FaultEnv, seconds: float) -> None:
    """Sleep through an outage, checking meanwhile that no worker exits."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        env.procs.check_alive()
        time.sleep(0.5)


def test_broker_and_s3_frozen_20s_each(tmp_path: Path) -> None:
    with fault_env(tmp_path) as env:
        start_pipeline(env.procs, sweeper=sweeper_role() is not None)
        _campaign, ids = env.submit(JOBS)
        _wait_some_published(env, ids, 2)
        for component in ("broker", "s3"):
            print(f"SIGSTOP {component} for {OUTAGE_S:.0f} s")
            signal_component(env.stack, component, signal.SIGSTOP)
            try:
                _outage(env, OUTAGE_S)
            finally:
                signal_component(env.stack, component, signal.SIGCONT)
            _outage(env, 3.0)
        outcome = env.finish(ids, timeout_s=420)
        assert_exactly_once(outcome, ids)
        assert dlq_records(env.settings) == {}, "an outage was dead-lettered"
        env.procs.check_alive()


@pytest.mark.parametrize("mode", ["stalled", "refusing"])
def test_database_outage_20s_behind_a_proxy(tmp_path: Path, mode: str) -> None:
    with fault_env(tmp_path, backend="postgresql", proxy=True) as env:
        assert env.proxy is not None
        start_pipeline(env.procs, sweeper=sweeper_role() is not None)
        _campaign, ids = env.submit(JOBS)
        _wait_some_published(env, ids, 2)
        states = env.container.jobs.states_of(ids)
        assert any(s not in FINAL_STATES for s in states.values()), "the batch ended before the outage"
        print(f"database {mode} for {OUTAGE_S:.0f} s ({env.proxy.accepted} connections so far)")
        if mode == "stalled":
            env.proxy.stall()
        else:
            env.proxy.refuse()
        try:
            _outage(env, OUTAGE_S)
        finally:
            env.proxy.resume()
        outcome = env.finish(ids, timeout_s=420)
        assert_exactly_once(outcome, ids)
        assert dlq_records(env.settings) == {}, "the database outage was dead-lettered"
        env.procs.check_alive()
