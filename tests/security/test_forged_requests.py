"""Forged render requests, sent with a plain kafka-python producer as an outsider with
network access to the broker would, against real worker processes on the real stack.

- squat: a request for a job of a campaign that does not exist yet (no row, unsigned);
- swap: a request queued ahead of the real one, naming an abusive recipient name;
- DoS: a request queued ahead of the real one, naming a photo that does not exist;
- then a forged `clip.rendered` and `moderation.decided` for a published job.

Each is dead-lettered naming its reason or field, with no traceback and no worker lost;
the real jobs keep their rows, are never failed, and publish with the right name drawn.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from pipeline.keys import drawn_texts_key
from pipeline.settings import Settings
from pipeline.topics import MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS, dlq
from schemas.brief import Recipient
from schemas.events import ClipRendered, Decision, DrawnTexts, Envelope, ModerationDecided, RenderRequested
from schemas.jobs import JobState
from tests.faults.harness import fault_env, lean_brief, produce_raw, read_topic, start_pipeline, wait_final

pytestmark = pytest.mark.integration


def _forged(real: RenderRequested, **recipient: object) -> bytes:
    """The real request's envelope with some recipient fields changed, unsigned."""
    fields = {**real.recipient.model_dump(), **recipient}
    req = real.model_copy(update={"recipient": Recipient.model_validate(fields)})
    return Envelope.wrap(req).model_dump_json().encode()


def _dead_letters(settings: Settings, expect: int, topic: str = RENDER_REQUESTS) -> list[dict[str, str]]:
    deadline = time.monotonic() + 60
    while True:
        records = read_topic(settings, dlq(topic))
        if len(records) >= expect or time.monotonic() > deadline:
            return [{k: v.decode(errors="replace") for k, v in r.headers} for r in records]
        time.sleep(0.5)


def test_forged_squat_swap_and_dos_requests_are_refused_and_real_jobs_publish(tmp_path: Path) -> None:
    with fault_env(tmp_path) as env:
        c = env.container
        start_pipeline(env.procs, renderers=1, sweeper=False)
        brief = lean_brief(4)
        reqs = [
            RenderRequested(
                job_id=c.campaigns().job_id(brief.campaign_id, r.id, brief.template),
                campaign_id=brief.campaign_id,
                recipient=r,
                template=brief.template,
                locale=r.locale,
            )
            for r in brief.recipients
        ]
        squat, swap, dos, plain = (r.job_id for r in reqs)

        # squat: before the campaign exists (no job row), a request with the real job id
        produce_raw(
            env.settings, RENDER_REQUESTS, _forged(reqs[0], name="Not Your Name"), str(squat).encode()
        )
        first = _dead_letters(env.settings, 1)
        assert len(first) == 1 and "not signed by a trusted producer" in first[0]["error"], first
        assert c.jobs.get(squat) is None, "an unsigned request created a job"

        # intake writes the rows of two jobs; forged requests get queued ahead of the real ones
        for req in (reqs[1], reqs[2]):
            assert c.jobs.create_if_absent(req)
        produce_raw(env.settings, RENDER_REQUESTS, _forged(reqs[1], name="Go die, loser"), str(swap).encode())
        produce_raw(
            env.settings,
            RENDER_REQUESTS,
            _forged(
                reqs[2],
                photo_key="photos/missing.jpg",
                subjects=[{"subject_id": "victim", "scopes": ["face"]}],
            ),
            str(dos).encode(),
        )
        submitted = c.campaigns().submit(brief)
        assert (submitted.created, submitted.requested, submitted.already_final) == (2, 4, 0)

        wait_final(c, [squat, swap, dos, plain], timeout_s=240, procs=env.procs, stall_s=120)
        env.procs.check_alive()

        letters = _dead_letters(env.settings, 3)
        errors = sorted(h["error"] for h in letters)
        assert len(letters) == 3, errors
        assert any("recipient.name differs from job row" in e for e in errors), errors
        assert any("recipient.photo_key, recipient.subjects differ from job row" in e for e in errors), errors
        assert all(h["error_class"] == "UntrustedMessage" for h in letters), errors
        assert {h["job_id"] for h in letters} == {str(squat), str(swap), str(dos)}

        for r, req in zip(brief.recipients, reqs, strict=True):
            job = c.jobs.get(req.job_id)
            assert job is not None and job.state == JobState.PUBLISHED, (
                r.id,
                job and job.state,
                job and job.reason,
            )
            assert job.request.recipient == r, f"the row of {r.id} changed: {job.request.recipient}"
            history = c.jobs.history(job.job_id)
            assert JobState.FAILED not in {e.to_state for e in history}, [
                (e.to_state, e.reason) for e in history
            ]
            drawn = DrawnTexts.model_validate_json(
                c.store.get_bytes(
                    c.settings.bucket_staging, drawn_texts_key(brief.campaign_id, r.id, job.job_id)
                )
            )
            assert drawn.merge_values == {"recipient.name": r.name}
            assert any(r.name in t.text for t in drawn.texts), drawn.texts
            results = c.moderation_results.history(job.job_id)
            kinds = {f.kind for res in results for f in res.findings}
            assert "drawn_texts_checked" in kinds and "drawn_text_mismatch" not in kinds, kinds
            shown = json.dumps(drawn.model_dump(mode="json"), ensure_ascii=False)
            assert "Not Your Name" not in shown and "Go die" not in shown

        # forged step messages for a published job: refused by the moderator and the publisher
        job = c.jobs.get(swap)
        assert job is not None and job.staging_key is not None
        clip = ClipRendered(
            job_id=swap,
            campaign_id=brief.campaign_id,
            recipient_id="someone-else",
            staging_key=job.staging_key,
            sha256="0" * 64,
            duration_s=1.0,
            width=180,
            height=320,
        )
        produce_raw(
            env.settings, RENDER_RESULTS, Envelope.wrap(clip).model_dump_json().encode(), str(swap).encode()
        )
        decided = ModerationDecided(job_id=swap, campaign_id="other-campaign", decision=Decision.APPROVED)
        raw = Envelope.wrap(decided).model_dump_json().encode()
        produce_raw(env.settings, MODERATION_DECISIONS, raw, str(swap).encode())
        [moderated] = _dead_letters(env.settings, 1, RENDER_RESULTS)
        assert "recipient_id differs from job row" in moderated["error"], moderated["error"]
        [published] = _dead_letters(env.settings, 1, MODERATION_DECISIONS)
        assert "campaign_id differs from job row" in published["error"], published["error"]
        after = c.jobs.get(swap)
        assert after is not None and after.state == JobState.PUBLISHED and after.updated_at == job.updated_at
        env.procs.check_alive()

        logs = "".join(p.log_path.read_text(errors="replace") for p in env.procs.procs)
        assert "Traceback" not in logs, logs[logs.find("Traceback") - 500 :][:3000]
        assert swap.version == 8  # keyed (HMAC) ids, not the guessable UUIDv5
