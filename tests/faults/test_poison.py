"""Poison input: 1.5 MB messages are dead-lettered as pointers (the next job is published, a
later revocation still takes its clip down), and an image bomb fails its job, nothing stuck."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.bench_faults import sweeper_role
from pipeline.topics import CONSENT_EVENTS, RENDER_REQUESTS, dlq
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.jobs import FINAL_STATES, JobState
from tests.faults.harness import (
    approved_job,
    fault_env,
    grant_consent,
    lean_brief,
    png_bomb,
    produce_raw,
    read_topic,
    start_pipeline,
)
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

BIG = 1_500_000


def _assert_spilled(env, topic: str, expect: int) -> list[dict[str, bytes]]:  # type: ignore[no-untyped-def]
    records = read_topic(env.settings, dlq(topic))
    assert len(records) == expect, f"{dlq(topic)}: {len(records)} records, expected {expect}"
    out = []
    for rec in records:
        headers = dict(rec.headers)
        assert "spilled_to" in headers, f"a {len(rec.value)}-byte dead letter without spilled_to: {headers}"
        assert len(rec.value) < 100_000
        bucket, key = headers["spilled_to"].decode().removeprefix("s3://").split("/", 1)
        assert len(env.container.store.get_bytes(bucket, key)) > BIG
        out.append(headers)
    return out


def test_oversized_request_and_consent_event_are_spilled_and_work_goes_on(tmp_path: Path) -> None:
    with fault_env(tmp_path) as env:
        c = env.container
        start_pipeline(env.procs, renderers=1, sweeper=sweeper_role() is not None)
        env.procs.start("takedown")

        # 1. A 1.5 MB render request (a name no display name may be), then a valid job on the
        #    same partition, behind it.
        good = render_request("faults-big", "r-good", name="Guest Good")
        big = json.loads(
            json.dumps(
                {"id": "6f1c7d52-3f7e-4c55-9a55-8b8f0d1b6a10", "type": "render.requested", "payload": {}}
            )
        )
        big["payload"] = json.loads(good.model_dump_json())
        big["payload"]["job_id"] = "0b8a6a9e-5a1f-4b7e-8d7c-2b2b6c1f3e11"
        big["payload"]["recipient"]["name"] = "x" * BIG
        produce_raw(env.settings, RENDER_REQUESTS, json.dumps(big).encode(), str(good.job_id).encode())
        c.bus.publish(RENDER_REQUESTS, good, key=str(good.job_id))

        # 2. A published clip of a consented subject, then a 1.5 MB consent event for that
        #    subject, then the revocation (same key: same partition, behind the big one).
        grant_consent(c, "grandma", "faults-big")
        taken = approved_job(c, tmp_path, "faults-big", "r-grandma", "grandma")
        _wait_state(env, taken.job_id, {JobState.PUBLISHED}, 240)
        blob = {"type": "consent.changed", "payload": {"subject_id": "grandma", "purpose": "y" * BIG}}
        produce_raw(env.settings, CONSENT_EVENTS, json.dumps(blob).encode(), b"grandma")
        c.consent_service().revoke("grandma", recorded_by="faults-test")
        revoked_at = time.monotonic()
        _wait_state(env, taken.job_id, {JobState.TAKEN_DOWN}, 60)  # the 60 s bound
        print(f"taken down {time.monotonic() - revoked_at:.1f} s after the revocation")
        job = c.jobs.get(taken.job_id)
        assert job is not None and job.published_key
        assert c.store.stat(c.settings.bucket_distribution, job.published_key) is None

        _wait_state(env, good.job_id, {JobState.PUBLISHED}, 240)
        _assert_spilled(env, RENDER_REQUESTS, 1)
        _assert_spilled(env, CONSENT_EVENTS, 1)
        env.procs.check_alive()


def test_image_bomb_photo_fails_its_job_and_nothing_is_stuck(tmp_path: Path) -> None:
    with fault_env(tmp_path) as env:
        c = env.container
        bomb = png_bomb()
        assert len(bomb) < 20_000
        c.store.put_bytes(c.settings.bucket_assets, "photos/bomb.png", bomb, content_type="image/png")
        start_pipeline(env.procs, renderers=1, sweeper=sweeper_role() is not None)
        brief = lean_brief(3)
        victim = brief.recipients[1].model_copy(
            update={
                "photo_key": "photos/bomb.png",
                "subjects": (SubjectUse(subject_id="bomb-subject", scopes=frozenset({Scope.FACE})),),
            }
        )
        brief = brief.model_copy(update={"recipients": (brief.recipients[0], victim, brief.recipients[2])})
        ids = list(c.campaigns().submit(brief).job_ids)
        outcome = env.finish(ids, timeout_s=300)
        bomb_job = c.jobs.get(ids[1])
        assert bomb_job is not None and bomb_job.state == JobState.FAILED, bomb_job
        reason = bomb_job.reason or ""
        print(f"reason: {reason}")
        assert "pixels" in reason.lower() or "bomb" in reason.lower(), reason
        assert outcome.states == {JobState.PUBLISHED.value: 2, JobState.FAILED.value: 1}
        assert outcome.stuck == 0


def _wait_state(env, job_id, states: set[JobState], timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while True:
        env.procs.check_alive()
        job = env.container.jobs.get(job_id)
        if job is not None and job.state in states:
            return
        if job is not None and job.state in FINAL_STATES - {JobState.PUBLISHED}:
            raise AssertionError(f"job {job_id} ended {job.state.value}: {job.reason}")
        if time.monotonic() > deadline:
            raise AssertionError(
                f"job {job_id} is {job.state.value if job else None} after {timeout_s:.0f} s"
            )
        time.sleep(0.3)
