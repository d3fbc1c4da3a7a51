"""Likeness on small faces, on the real stack (Tansu broker, moto S3, SQLite) with the real
renderer and moderator workers: the protected person's photo is refused at intake however
small it is (270 px, 600 px, a 274x171 thumbnail), a photo that became protected after
intake fails at render before anything is drawn, a small protected face in the clip's
photo box is found in the clip's frames, and a supplied photo whose face the clip does not
show goes to a human. After each refusal the next valid job goes through."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

import consumers.moderate
import consumers.render
from pipeline.bootstrap import Container
from pipeline.campaigns import BriefError
from pipeline.dev.stack import DevStack
from pipeline.repositories import ConsentRecord
from schemas.brief import CampaignBrief, Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.jobs import JobState
from tests import faces
from tests.integration.pipeline_fixtures import run_workers, stack_settings
from tests.security import photos

pytestmark = pytest.mark.integration

TEMPLATE = TemplateRef(name="lunar-new-year", version="1")
PROTECTED = "Eileen Collins"


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pics")
    return {
        "astronaut": faces.astronaut(d),
        "a270": photos.protected_at_width(d, 270),
        "a600": photos.protected_at_width(d, 600),
        "thumb": photos.landscape_thumbnail(d),
        "grace": faces.grace(d),
        "grace270": photos.grace_at_width(d, 270),
        "small": photos.face_in_scene(d, 70),
        "tiny": photos.face_in_scene(d, 40, (1200, 1200)),
    }


def _world(root: Path, files: dict[str, Path]) -> Iterator[Container]:
    """A private stack with every photo in the assets bucket as photos/<name>.jpg."""
    settings = stack_settings(root / "data").model_copy(update={"render_fps": 10})
    with DevStack(settings, log=lambda _m: None):
        c = Container(settings)
        _ = c.db
        for name, path in files.items():
            c.store.put_file(settings.bucket_assets, f"photos/{name}.jpg", path, content_type="image/jpeg")
        try:
            yield c
        finally:
            c.close()


@pytest.fixture(scope="module")
def intake(tmp_path_factory: pytest.TempPathFactory, photo_files: dict[str, Path]) -> Iterator[Container]:
    """A stack for the intake cases (their accepted jobs are never rendered)."""
    yield from _world(tmp_path_factory.mktemp("intake"), photo_files)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, photo_files: dict[str, Path]) -> Iterator[Container]:
    """A stack for the cases that run the render and moderation workers."""
    yield from _world(tmp_path_factory.mktemp("workers"), photo_files)


def key(name: str) -> str:
    return f"photos/{name}.jpg"


@contextmanager
def protecting(c: Container, name: str, photo: Path) -> Iterator[None]:
    c.gallery_service().protect(name, [photo], enrolled_by="test")
    try:
        yield
    finally:
        c.gallery_service().unprotect(name)


@pytest.fixture
def protected(intake: Container, photo_files: dict[str, Path]) -> Iterator[None]:
    with protecting(intake, PROTECTED, photo_files["astronaut"]):
        yield


def recipient(rid: str, photo_key: str | None = None, subject: str | None = None) -> Recipient:
    subjects = (SubjectUse(subject_id=subject, scopes=frozenset({Scope.FACE})),) if subject else ()
    return Recipient(id=rid, name="Grace", locale=Locale.EN, photo_key=photo_key, subjects=subjects)


def brief(campaign: str, *recipients: Recipient) -> CampaignBrief:
    return CampaignBrief(
        campaign_id=campaign, title="Likeness probe", template=TEMPLATE, recipients=recipients
    )


def grant_face(c: Container, subject: str, campaign: str) -> None:
    now = datetime.now(UTC)
    c.consents.append(
        ConsentRecord(
            subject_id=subject,
            action="grant",
            scopes=frozenset({Scope.FACE}),
            purpose=f"campaign:{campaign}",
            recorded_by="test",
            granted_at=now - timedelta(days=1),
            expires_at=now + timedelta(days=30),
            evidence_sha256="e" * 64,
            challenge_code="ABC234",
        )
    )


def states(c: Container, ids: list[uuid.UUID]) -> dict[uuid.UUID, JobState | None]:
    return {j: (r.state if (r := c.jobs.get(j)) is not None else None) for j in ids}


def until_states(c: Container, ids: list[uuid.UUID], wanted: frozenset[JobState]) -> Callable[[], bool]:
    return lambda: all(s in wanted for s in states(c, ids).values())


@pytest.mark.parametrize("photo", ["a270", "a600", "thumb"])
def test_protected_photo_is_refused_at_intake_whatever_its_size(
    intake: Container, protected: None, photo: str
) -> None:
    campaign = f"probe-intake-{photo}"
    bad = brief(campaign, recipient("r-celeb", key(photo), "grandma"))
    t0 = time.monotonic()
    with pytest.raises(BriefError) as refused:
        intake.campaigns().submit(bad)
    message = str(refused.value)
    print(f"{photo}: refused in {time.monotonic() - t0:.2f}s: {message}")
    assert PROTECTED in message and "grandma" in message and "r-celeb" in message
    assert "\n" not in message
    assert intake.jobs.list_jobs(campaign_id=campaign) == []  # nothing was accepted
    # The next valid brief of the same campaign goes through.
    ok = intake.campaigns().submit(brief(campaign, recipient("r-grace", key("grace"), "grace")))
    assert ok.created == 1 and ok.requested == 1


def test_cli_refusal_is_one_line(intake: Container, protected: None, tmp_path: Path) -> None:
    s = intake.settings
    env = dict(os.environ)
    env.update(
        {
            "GREETFLOW_DATA_DIR": str(s.data_dir),
            "GREETFLOW_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "GREETFLOW_S3_ENDPOINT": s.s3_endpoint,
            "GREETFLOW_DATABASE_URL": "",
            "GREETFLOW_RENDER_WIDTH": "540",
            "GREETFLOW_RENDER_HEIGHT": "960",
        }
    )

    def submit(rec: Recipient) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{rec.id}.yaml"
        path.write_text(yaml.safe_dump(brief("probe-cli", rec).model_dump(mode="json"), allow_unicode=True))
        return subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "submit", str(path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad = submit(recipient("r-thumb", key("thumb"), "grandma"))
    assert bad.returncode == 2, bad.stderr
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: campaign probe-cli refused:"), bad.stderr
    assert PROTECTED in lines[0] and "Traceback" not in bad.stderr
    assert intake.jobs.list_jobs(campaign_id="probe-cli") == []
    ok = intake.campaigns().submit(brief("probe-cli", recipient("r-plain")))
    assert ok.created == 1


def test_gallery_growing_while_jobs_are_in_flight(world: Container, photo_files: dict[str, Path]) -> None:
    """Photos accepted at intake before their person was protected: a 270 px photo whose
    person is protected before the render fails at render before anything is drawn; a
    protected face drawn at ~22 px (540x960), protected after the render, is rejected from
    the clip's own frames; a supplied photo whose face the clip does not show at all goes to
    a human; a plain job is rendered and approved."""
    campaign = "probe-flight"
    for subject in ("s-small", "s-tiny"):
        grant_face(world, subject, campaign)
    submitted = world.campaigns().submit(
        brief(
            campaign,
            recipient("r-grace", key("grace270"), "grace"),
            recipient("r-small", key("small"), "s-small"),
            recipient("r-tiny", key("tiny"), "s-tiny"),
            recipient("r-plain"),
        )
    )
    ids = list(submitted.job_ids)
    t0 = time.monotonic()
    with protecting(world, "Grace Hopper", photo_files["grace"]):
        settled = frozenset({JobState.RENDERED, JobState.FAILED})
        run_workers(world, [consumers.render.build], until_states(world, ids, settled), timeout_s=240)
    print(f"renders: {time.monotonic() - t0:.1f}s")
    celeb = world.jobs.get(ids[0])
    assert celeb is not None and celeb.state == JobState.FAILED, celeb
    assert "Grace Hopper" in (celeb.reason or "") and "ProtectedPhotoError" in (celeb.reason or "")
    assert "Traceback" not in (celeb.reason or "")
    assert celeb.staging_key is None  # nothing was drawn or uploaded
    assert all(s == JobState.RENDERED for s in states(world, ids[1:]).values())

    t0 = time.monotonic()
    decided = frozenset({JobState.APPROVED, JobState.REJECTED, JobState.NEEDS_REVIEW, JobState.FAILED})
    with protecting(world, PROTECTED, photo_files["astronaut"]):
        run_workers(world, [consumers.moderate.build], until_states(world, ids[1:], decided), timeout_s=240)
    print(f"moderation: {time.monotonic() - t0:.1f}s")
    small, tiny, plain = (world.jobs.get(j) for j in ids[1:])

    assert small is not None and small.state == JobState.REJECTED, small
    hit = _finding(world, ids[1], "protected_person")
    print(f"small face: {hit['message']} (evidence {hit['evidence']})")
    assert hit["evidence"]["person"] == PROTECTED
    assert "clip" in hit["evidence"]["sources"] and hit["evidence"]["frames"] >= 1
    assert hit["evidence"]["best_frame_s"] is not None  # seen in a frame, not only in the photo

    assert tiny is not None and tiny.state == JobState.NEEDS_REVIEW, tiny
    unseen = _finding(world, ids[2], "subject_face_not_seen")
    assert unseen["severity"] == "warn" and unseen["evidence"]["photo_supplied"] is True
    assert "s-tiny" in (tiny.reason or "")

    assert plain is not None and plain.state == JobState.APPROVED, plain


def _finding(c: Container, job_id: uuid.UUID, kind: str) -> dict[str, Any]:
    result = c.moderation_results.latest(job_id)
    assert result is not None, f"no moderation result for {job_id}"
    found = [f for f in result.findings if f.kind == kind]
    assert found, f"no {kind} finding in {[f.kind for f in result.findings]}"
    return found[0].model_dump(mode="json")
