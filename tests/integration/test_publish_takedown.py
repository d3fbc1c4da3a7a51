"""Publish-time consent recheck, the revoke-while-publishing race, the daily expiry sweep
and the takedown worker, on the real broker, S3 server and database."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import consumers.takedown
from pipeline.adapters.storage import sha256_file
from pipeline.bootstrap import Container
from pipeline.keys import captions_key, clip_key
from pipeline.provenance import read_aigc_label, read_c2pa, trust_anchors
from pipeline.publish import PublishService
from pipeline.repositories import ConsentRecord
from pipeline.topics import CLIPS_PUBLISHED, CLIPS_TAKEN_DOWN, CONSENT_EVENTS, dlq
from schemas.brief import SubjectUse
from schemas.common import Scope, job_id_for
from schemas.events import ConsentChanged, Decision, Envelope, ModerationDecided, RenderRequested
from schemas.jobs import JobState
from tests.clips import frame, still_clip
from tests.integration.db_fixtures import TEST_JOB_ID_KEY, render_request
from tests.integration.pipeline_fixtures import consume_all, run_workers

pytestmark = pytest.mark.integration
CAMPAIGN = "lny-2026"


def consent(c: Container, subject: str, *, expires_in: timedelta = timedelta(days=30)) -> ConsentRecord:
    now = datetime.now(UTC)
    rec = ConsentRecord(
        subject_id=subject,
        action="grant",
        scopes=frozenset({Scope.FACE}),
        purpose=f"campaign:{CAMPAIGN}",
        recorded_by="test",
        granted_at=now - timedelta(days=1),
        expires_at=now + expires_in,
        evidence_sha256="e" * 64,
        challenge_code="ABC234",
    )
    c.consents.append(rec)
    return rec


def approved_job(c: Container, tmp_path: Path, recipient: str, subject: str) -> RenderRequested:
    """A job moderated and approved, its clip in the staging bucket."""
    req = render_request(
        CAMPAIGN, recipient, subjects=(SubjectUse(subject_id=subject, scopes=frozenset({Scope.FACE})),)
    )
    assert req.job_id == job_id_for(TEST_JOB_ID_KEY, CAMPAIGN, recipient, "lunar-new-year", "1")
    c.jobs.create_if_absent(req)
    video = still_clip(tmp_path / f"{recipient}.mp4", frame(), 2.5)
    key = clip_key(CAMPAIGN, recipient, req.job_id)
    c.store.put_file(
        c.settings.bucket_staging,
        key,
        video,
        content_type="video/mp4",
        metadata={"sha256": sha256_file(video)},
    )
    c.store.put_bytes(
        c.settings.bucket_staging,
        captions_key(CAMPAIGN, recipient, req.job_id),
        f"WEBVTT\n\n1\n00:00:00.000 --> 00:00:02.000\n{recipient}\n".encode(),
        content_type="text/vtt; charset=utf-8",
    )
    steps = [JobState.RENDERING, JobState.RENDERED, JobState.MODERATING, JobState.APPROVED]
    prev = JobState.REQUESTED
    for st in steps:
        extra = {"staging_key": key} if st == JobState.RENDERED else {}
        assert c.jobs.transition(req.job_id, to_state=st, expected=prev, **extra)
        prev = st
    return req


def approve(c: Container, job_id: uuid.UUID, publisher: PublishService | None = None) -> None:
    (publisher or c.publish_service("publish-test")).handle(
        Envelope.wrap(ModerationDecided(job_id=job_id, campaign_id=CAMPAIGN, decision=Decision.APPROVED))
    )


def state(c: Container, job_id: uuid.UUID) -> JobState:
    job = c.jobs.get(job_id)
    assert job is not None
    return job.state


def test_published_clip_carries_both_labels_and_its_subjects_are_indexed(
    container: Container, tmp_path: Path
) -> None:
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    approve(container, req.job_id)
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == JobState.PUBLISHED and job.published_key
    out = container.store.get_file(
        container.settings.bucket_distribution, job.published_key, tmp_path / "p.mp4"
    )
    label, _ = read_aigc_label(out)
    assert label is not None and label.produce_id == str(req.job_id)
    assert label.reserved_code1.startswith("sha256:")
    assert read_c2pa(out, anchors_pem=trust_anchors(container.settings)).trusted
    record = container.published.get(req.job_id)
    assert record is not None and record.sha256 == sha256_file(out)
    assert [j.job_id for j in container.job_subjects.jobs_using("grandma")] == [req.job_id]
    vtt = captions_key(CAMPAIGN, "r-1", req.job_id)
    assert sorted(container.store.list_keys(container.settings.bucket_distribution)) == sorted(
        [job.published_key, vtt]
    )
    (announced,) = consume_all(container.settings, CLIPS_PUBLISHED, expect=1)
    payload = json.loads(announced.value)["payload"]
    assert payload["captions_url"] == container.store.public_url(vtt)


def test_consent_revoked_after_moderation_is_not_published(container: Container, tmp_path: Path) -> None:
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    container.consent_service().revoke("grandma", recorded_by="test")
    approve(container, req.job_id)
    job = container.jobs.get(req.job_id)
    assert job is not None and job.state == JobState.REJECTED
    assert (job.reason or "").startswith("not published: subject grandma has no valid consent")
    assert container.store.list_keys(container.settings.bucket_distribution) == []


def test_revocation_racing_the_upload_is_taken_down_by_the_publisher(
    container: Container, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revoked after the pre-upload check, before the job is published: the takedown worker
    cannot see the job yet, so the publisher's post-publish check must catch it."""
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    publisher = container.publish_service("publish-test")
    real_prepare = publisher._prepare

    def prepare_then_revoke(*args: object, **kwargs: object) -> object:
        out = real_prepare(*args, **kwargs)  # type: ignore[arg-type]
        container.consent_service().revoke("grandma", recorded_by="test")
        return out

    monkeypatch.setattr(publisher, "_prepare", prepare_then_revoke)
    approve(container, req.job_id, publisher)
    assert state(container, req.job_id) == JobState.TAKEN_DOWN
    assert container.store.list_keys(container.settings.bucket_distribution) == []
    (event,) = consume_all(container.settings, CLIPS_TAKEN_DOWN, expect=1)
    assert json.loads(event.value)["payload"]["job_id"] == str(req.job_id)


def test_daily_expiry_takes_down_expired_and_orphaned_clips(container: Container, tmp_path: Path) -> None:
    consent(container, "short-lived", expires_in=timedelta(seconds=4))
    consent(container, "lost-event")
    consent(container, "still-fine")
    reqs = {
        s: approved_job(container, tmp_path, f"r-{s}", s) for s in ("short-lived", "lost-event", "still-fine")
    }
    for r in reqs.values():
        approve(container, r.job_id)
    assert {state(container, r.job_id) for r in reqs.values()} == {JobState.PUBLISHED}
    # A revocation whose event never reached the takedown worker (appended behind its back).
    container.consents.append(
        ConsentRecord(
            subject_id="lost-event", action="revoke", scopes=frozenset(Scope), purpose="*", recorded_by="test"
        )
    )
    import time

    time.sleep(4.5)
    report = container.consent_expiry()
    assert report.expired_subjects == ("short-lived",)
    assert set(report.taken_down) == {reqs["short-lived"].job_id, reqs["lost-event"].job_id}
    assert state(container, reqs["still-fine"].job_id) == JobState.PUBLISHED
    assert sorted(container.store.list_keys(container.settings.bucket_distribution)) == [
        clip_key(CAMPAIGN, "r-still-fine", reqs["still-fine"].job_id),
        captions_key(CAMPAIGN, "r-still-fine", reqs["still-fine"].job_id),
    ]
    again = container.consent_expiry()
    assert again.expired_records == () and again.taken_down == ()
    expire_events = [
        json.loads(r.value)["payload"] for r in consume_all(container.settings, CONSENT_EVENTS, expect=1)
    ]
    assert [(e["subject_id"], e["action"]) for e in expire_events] == [("short-lived", "expire")]


def test_takedown_worker_dead_letters_bad_input_and_carries_on(container: Container, tmp_path: Path) -> None:
    consent(container, "grandma")
    req = approved_job(container, tmp_path, "r-1", "grandma")
    approve(container, req.job_id)
    # Same key as the revocation: one partition, so both bad records are behind us once the takedown is.
    bad_envelope = b'{"type": "consent.changed", "payload": {"nope": 1}}'
    container.bus.send_raw(CONSENT_EVENTS, bad_envelope, key="grandma")
    container.bus.send_raw(CONSENT_EVENTS, b"\x00 not json", key="grandma")
    rec = container.consent_service().revoke("grandma", recorded_by="test")
    grant_only = ConsentChanged(
        record_id=uuid.uuid4(),
        subject_id="someone",
        action="grant",
        scopes=frozenset({Scope.FACE}),
        purpose="*",
        recorded_by="t",
    )
    container.bus.publish(CONSENT_EVENTS, grant_only, key="someone")

    workers = run_workers(
        container,
        [consumers.takedown.build],
        lambda: state(container, req.job_id) == JobState.TAKEN_DOWN,
    )
    assert workers[0].stats.dead_lettered == 2
    dead = consume_all(container.settings, dlq(CONSENT_EVENTS), expect=2)
    assert sorted(r.value for r in dead) == sorted(
        [b'{"type": "consent.changed", "payload": {"nope": 1}}', b"\x00 not json"]
    )
    job = container.jobs.get(req.job_id)
    assert job is not None and str(rec.record_id) in (job.reason or "")
