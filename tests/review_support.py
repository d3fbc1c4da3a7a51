"""Review-queue test helpers: cases in needs_review with a real clip, poster and face crop
in the staging bucket, findings as the automatic moderator stores them, and reviewers."""

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.adapters.storage import ensure_buckets, sha256_file
from pipeline.bootstrap import Container
from pipeline.keys import clip_key
from pipeline.repositories import ConsentRecord
from pipeline.review.service import ReviewService
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.events import Decision, Finding, RenderRequested, Severity
from schemas.jobs import JobState
from tests.clips import frame, still_clip
from tests.integration.db_fixtures import render_request

CAMPAIGN = "lny-2026"
PASSWORD = "correct horse battery staple"
XSS_NAME = "<script>alert(1)</script>"


def grant(c: Container, subject: str) -> None:
    now = datetime.now(UTC)
    c.consents.append(
        ConsentRecord(
            subject_id=subject,
            action="grant",
            scopes=frozenset({Scope.FACE}),
            purpose=f"campaign:{CAMPAIGN}",
            recorded_by="test",
            granted_at=now - timedelta(days=1),
            expires_at=now + timedelta(days=30),
            evidence_sha256="e" * 64,
            challenge_code="ABC234",
        )
    )


def _jpeg(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def unknown_face(crop_key: str | None) -> Finding:
    ev: dict[str, Any] = {
        "times_s": [0.0, 1.0],
        "frames": 2,
        "sources": ["clip"],
        "box": [10, 10, 90, 90],
        "best_frame_s": 0.0,
        "detection_score": 0.93,
        "threshold": 0.6,
        "nearest": {"subject_id": "grandma", "distance": 0.6812},
    }
    if crop_key:
        ev["crop_key"] = crop_key
    return Finding(
        kind="unknown_face",
        severity=Severity.WARN,
        message="a face at 0.0 s matches no consented subject of this job; nearest consented subject "
        "grandma at 0.681",
        evidence=ev,
    )


def text_abuse() -> Finding:
    return Finding(
        kind="text_abuse",
        severity=Severity.WARN,
        message="recipient.name contains terms from the abuse list(s) en",
        evidence={"field": "recipient.name", "terms": ["<b>rude</b>"], "lists": ["en"]},
    )


def needs_review_case(
    c: Container,
    tmp_path: Path,
    recipient: str,
    *,
    name: str = "陳大文",
    findings: tuple[Finding, ...] | None = None,
    face: bool = False,
    final: JobState = JobState.NEEDS_REVIEW,
) -> RenderRequested:
    """A job moderated into `final` (needs_review, or rejected), its clip and poster in the
    staging bucket, its subject consented (so the publisher's re-check passes)."""
    grant(c, "grandma")
    req = render_request(
        CAMPAIGN,
        recipient,
        name=name,
        subjects=(SubjectUse(subject_id="grandma", scopes=frozenset({Scope.FACE})),),
    )
    c.jobs.create_if_absent(req)
    ensure_buckets(c.settings)
    video = still_clip(tmp_path / f"{recipient}.mp4", frame(), 2.0)
    key = clip_key(CAMPAIGN, recipient, req.job_id)
    c.store.put_file(
        c.settings.bucket_staging,
        key,
        video,
        content_type="video/mp4",
        metadata={"sha256": sha256_file(video)},
    )
    poster = key.removesuffix(".mp4") + ".jpg"
    c.store.put_bytes(
        c.settings.bucket_staging, poster, _jpeg((150, 18, 30), (90, 160)), content_type="image/jpeg"
    )
    if findings is None:
        if face:
            crop = f"{CAMPAIGN}/{recipient}/{req.job_id}-face1.jpg"
            c.store.put_bytes(
                c.settings.bucket_staging, crop, _jpeg((200, 170, 140), (96, 96)), content_type="image/jpeg"
            )
            findings = (unknown_face(crop),)
        else:
            findings = (text_abuse(),)
    prev = JobState.REQUESTED
    for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING):
        extra = {"staging_key": key, "poster_key": poster} if st == JobState.RENDERED else {}
        assert c.jobs.transition(req.job_id, to_state=st, expected=prev, actor="test", **extra)
        prev = st
    decision = Decision(final.value)
    c.moderation_results.record(req.job_id, decision, findings, decided_by="moderate@test", reason="test")
    assert c.jobs.transition(req.job_id, to_state=final, expected=JobState.MODERATING, actor="moderate@test")
    return req


def add_reviewers(c: Container, **roles: str) -> ReviewService:
    svc = c.review_service()
    for name, role in roles.items():
        svc.add_user(name, "lead" if role == "lead" else "reviewer", PASSWORD)
    return svc


def state(c: Container, job_id: uuid.UUID) -> JobState:
    job = c.jobs.get(job_id)
    assert job is not None
    return job.state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run the app with uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the review app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
