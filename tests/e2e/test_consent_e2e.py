"""Consent and likeness end to end, on the local stack, with real photos and the real renderer.

One broker + S3 server + SQLite database for the module, with the four workers (render,
moderate, publish, takedown) running as consumer-group members in threads. Operators act
through the `greetflow` command in subprocesses, as they would:

- the consented subject's photo -> approved and published, and `greetflow verify` on the
  published clip shows the AIGC label and a trusted C2PA manifest (trainedAlgorithmicMedia);
- no consent -> not published;
- a protected person's face -> refused at intake;
- an unconsented second face -> needs_review (with the face crop for the reviewer);
- revoked after publishing -> the object is gone within 60 s.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import consumers.moderate
import consumers.publish
import consumers.render
import consumers.takedown
from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import BriefError
from pipeline.dev.stack import DevStack
from pipeline.render.media import extract_frame
from pipeline.settings import Settings
from pipeline.topics import CLIPS_TAKEN_DOWN
from schemas.brief import CampaignBrief, Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.jobs import FINAL_STATES, JobState
from tests import faces
from tests.integration.pipeline_fixtures import consume_all, stack_settings

pytestmark = pytest.mark.e2e

CAMPAIGN = "e2e-consent"
TEMPLATE = TemplateRef(name="lunar-new-year", version="1")
SETTLED = FINAL_STATES | {JobState.NEEDS_REVIEW}


@dataclass
class World:
    settings: Settings
    container: Container
    env: dict[str, str]
    photos: dict[str, Path]
    out: Path
    workers: list[ConsumerWorker[Any]]
    threads: list[threading.Thread]

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if ok:
            assert proc.returncode == 0, f"greetflow {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def consent(self, subject: str, photo: str = "grace") -> None:
        """The operator flow: challenge, the subject's artifact carries the code, grant."""
        out = self.cli("consent", "challenge", subject).stdout
        code = re.search(r"code ([A-Z0-9]{6})", out)
        assert code, out
        # The subject's artifact: another picture of them (it must match the consented photo).
        evidence = faces.grace_selfie(self.out / f"{subject}-evidence")
        granted = self.cli(
            "consent",
            "grant",
            subject,
            "--scopes",
            "face,name",
            "--purpose",
            f"campaign:{CAMPAIGN}",
            "--evidence",
            str(evidence),
            "--code",
            code[1],
            "--photo",
            str(self.photos[photo]),
        ).stdout
        assert "1 reference face(s)" in granted, granted

    def submit(self, recipient: str, photo_key: str, subject: str) -> uuid.UUID:
        brief = CampaignBrief(
            campaign_id=CAMPAIGN,
            title="Consent e2e",
            template=TEMPLATE,
            recipients=(
                Recipient(
                    id=recipient,
                    name="Grace",
                    locale=Locale.EN,
                    photo_key=photo_key,
                    subjects=(SubjectUse(subject_id=subject, scopes=frozenset({Scope.FACE, Scope.NAME})),),
                ),
            ),
        )
        (job_id,) = self.container.campaigns().submit(brief).job_ids
        return job_id

    def settle(self, job_id: uuid.UUID, timeout_s: float = 150.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.container.jobs.get(job_id)
            if job is not None and job.state in SETTLED:
                return job
            dead = [w.name for w, t in zip(self.workers, self.threads, strict=True) if not t.is_alive()]
            assert not dead, f"worker thread(s) died: {dead}"
            assert time.monotonic() < deadline, f"job {job_id} not settled: {job}"
            time.sleep(0.2)

    def live_keys(self) -> list[str]:
        return self.container.store.list_keys(self.settings.bucket_distribution)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("consent-e2e")
    settings = stack_settings(root / "data")
    env = dict(os.environ)
    env.update(
        {
            "GREETFLOW_DATA_DIR": str(settings.data_dir),
            "GREETFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "GREETFLOW_S3_ENDPOINT": settings.s3_endpoint,
            "GREETFLOW_DATABASE_URL": "",
        }
    )
    photos_dir = root / "photos"
    photos = {
        "grace": faces.grace(photos_dir),
        "astronaut": faces.astronaut(photos_dir),
        "portrait": faces.astronaut_portrait(photos_dir),
        "pair": faces.pair(photos_dir),
    }
    with DevStack(settings, log=lambda _m: None):
        container = Container(settings)
        _ = container.db  # migrate before the workers race to it
        for name, path in photos.items():
            container.store.put_file(
                settings.bucket_assets, f"photos/{name}.jpg", path, content_type="image/jpeg"
            )
        factories = [
            consumers.render.build,
            consumers.moderate.build,
            consumers.publish.build,
            consumers.takedown.build,
        ]
        workers = [f(container) for f in factories]
        threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
        for t in threads:
            t.start()
        w = World(settings, container, env, photos, root, workers, threads)
        try:
            w.consent("grandma-grace")
            yield w
        finally:
            for wk in workers:
                wk.stop()
            for t in threads:
                t.join(timeout=60)
            container.close()


def findings_of(world: World, job_id: uuid.UUID) -> dict[str, list[dict[str, Any]]]:
    out = json.loads(world.cli("moderation", "findings", str(job_id), "--json").stdout)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for f in out[-1]["findings"]:
        kinds.setdefault(f["kind"], []).append(f)
    return kinds


def test_consented_subject_is_approved_published_and_verifiable(world: World) -> None:
    job_id = world.submit("r-consented", "photos/grace.jpg", "grandma-grace")
    job = world.settle(job_id)
    assert job.state == JobState.PUBLISHED, job.reason
    kinds = findings_of(world, job_id)
    assert kinds["face_consented"][0]["evidence"]["subject_id"] == "grandma-grace"
    assert kinds["face_consented"][0]["evidence"]["sources"] == ["clip", "photo"]  # drawn in the clip
    assert "label_visible" in kinds and "unknown_face" not in kinds

    clip = world.out / "published.mp4"
    world.container.store.get_file(world.settings.bucket_distribution, job.published_key, clip)
    png = extract_frame(clip, 1.5, world.out / "published-frame.png")
    assert png.stat().st_size > 10_000
    verify = world.cli("verify", str(clip))
    print(verify.stdout)
    lines = verify.stdout.splitlines()
    assert any(ln.startswith("visible label: OK") for ln in lines)
    assert any(ln.startswith("AIGC metadata: OK - Label=1 ContentProducer=Greetflow") for ln in lines)
    c2pa = next(ln for ln in lines if ln.startswith("C2PA: "))
    assert "OK - Trusted" in c2pa and "trainedAlgorithmicMedia" in c2pa and "lunar-new-year@1" in c2pa
    report = json.loads(world.cli("verify", str(clip), "--json", "--no-visible-label").stdout)
    assert report["ok"] and report["c2pa"]["validation_state"] == "Trusted"
    assert report["aigc"]["ProduceID"] == str(job_id)
    assert report["aigc"]["PropagateID"] == job.published_key


def test_no_consent_is_not_published(world: World) -> None:
    job_id = world.submit("r-no-consent", "photos/grace.jpg", "nobody-asked")
    job = world.settle(job_id)
    assert job.state == JobState.REJECTED
    assert "nobody-asked has no valid consent" in (job.reason or "")
    assert not any(k.endswith(f"{job_id}.mp4") for k in world.live_keys())


def test_protected_persons_face_is_rejected(world: World) -> None:
    out = world.cli("likeness", "protect", "Eileen Collins", str(world.photos["astronaut"])).stdout
    assert "1 new face(s)" in out
    try:
        # The requester claims the astronaut's portrait shows their consented grandma: the
        # photo is screened against the gallery at intake and nothing is accepted.
        with pytest.raises(BriefError, match=r"protected person 'Eileen Collins'.*grandma-grace"):
            world.submit("r-protected", "photos/portrait.jpg", "grandma-grace")
        assert not [
            j for j in world.container.jobs.list_jobs(campaign_id=CAMPAIGN) if j.recipient_id == "r-protected"
        ]
    finally:
        world.cli("likeness", "unprotect", "Eileen Collins")


def test_unconsented_second_face_needs_review(world: World) -> None:
    job_id = world.submit("r-second-face", "photos/pair.jpg", "grandma-grace")
    job = world.settle(job_id)
    assert job.state == JobState.NEEDS_REVIEW, job.reason
    kinds = findings_of(world, job_id)
    assert kinds["face_consented"][0]["evidence"]["subject_id"] == "grandma-grace"
    (unknown,) = kinds["unknown_face"]
    assert unknown["severity"] == "warn" and unknown["evidence"]["nearest"]["distance"] > 0.6
    crop = world.container.store.get_bytes(world.settings.bucket_staging, unknown["evidence"]["crop_key"])
    assert crop[:3] == b"\xff\xd8\xff"  # the reviewer sees the stranger's face
    queue = world.container.moderation_results.review_queue()
    assert job_id in [j.job_id for j, _ in queue]
    assert not any(k.endswith(f"{job_id}.mp4") for k in world.live_keys())


def test_revocation_takes_the_published_clip_down_within_60_s(world: World) -> None:
    world.consent("revoke-me")
    job_id = world.submit("r-revoke", "photos/grace.jpg", "revoke-me")
    job = world.settle(job_id)
    assert job.state == JobState.PUBLISHED, job.reason
    key = job.published_key
    assert key is not None and key in world.live_keys()
    vtt = key.removesuffix(".mp4") + ".vtt"
    assert vtt in world.live_keys(), "the captions sidecar is published beside the clip"
    others_before = [k for k in world.live_keys() if k not in (key, vtt)]

    t0 = time.monotonic()
    out = world.cli("consent", "revoke", "revoke-me").stdout
    assert out.startswith("revoked:")
    while key in world.live_keys():
        assert time.monotonic() - t0 < 60, "the clip is still public 60 s after the revocation"
        time.sleep(0.2)
    latency = time.monotonic() - t0
    print(f"takedown latency: {latency:.2f}s from `greetflow consent revoke` to the object being gone")
    assert latency < 60

    deadline = time.monotonic() + 30
    while (j := world.container.jobs.get(job_id)) is not None and j.state != JobState.TAKEN_DOWN:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "consent revoke" in (j.reason or "")
    clip = world.container.published.get(job_id)
    assert clip is not None and clip.taken_down_at is not None
    events = [json.loads(r.value)["payload"] for r in consume_all(world.settings, CLIPS_TAKEN_DOWN, expect=1)]
    assert [(e["job_id"], e["object_key"]) for e in events] == [(str(job_id), key)]
    # The sidecar goes with the clip; other subjects' clips stay up.
    assert world.live_keys() == others_before


def test_operator_commands(world: World) -> None:
    shown = json.loads(world.cli("consent", "show", "grandma-grace", "--json").stdout)
    assert shown["reference_faces"] == 1
    assert [r["action"] for r in shown["records"]] == ["grant"]
    assert shown["records"][0]["evidence_key"].startswith("consent-evidence/grandma-grace/")
    listed = {s["subject_id"]: s for s in json.loads(world.cli("consent", "list", "--json").stdout)}
    assert listed["grandma-grace"]["effective_scopes"] == ["face", "name"]
    assert "grandma-grace" in world.cli("consent", "show", "grandma-grace").stdout
    assert world.cli("consent", "expire").stdout.startswith("consent expiry: 0 grant(s) expired")
    assert "kept existing" in world.cli("provenance", "init-ca").stdout
    assert json.loads(world.cli("likeness", "list", "--json").stdout) == []
    world.cli("moderation", "queue")
    refused = world.cli(
        "consent",
        "grant",
        "x",
        "--scopes",
        "face",
        "--purpose",
        "*",
        "--evidence",
        str(world.photos["grace"]),
        "--code",
        "NOPE12",
        ok=False,
    )
    assert refused.returncode == 2 and "error: challenge code NOPE12 was not issued" in refused.stderr
