"""Generated motion on the real stack (Tansu + moto S3, SQLite, real ffmpeg, tiny LTX
pipelines built from configs on the CPU): a generated_video background through intake,
render, moderation and publish; the shared plate cache across nodes; two nodes racing on
one plate; a living photo; the animate scope at intake; references as C2PA ingredients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.bootstrap import Container
from pipeline.briefs import BriefError
from pipeline.dev.stack import DevStack
from pipeline.keys import generation_key
from pipeline.render.engine import TemplateRenderer
from pipeline.render.media import extract_frame
from pipeline.render.video import (
    DiffusersVideoGenerator,
    GenerationQueue,
    PlateCache,
    VideoClip,
    VideoDefaults,
    VideoPlates,
    VideoRequest,
    plate_key,
)
from pipeline.settings import Settings, get_settings
from schemas.brief import CampaignBrief, Recipient, Reference, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.events import RenderRequested
from schemas.jobs import JobState
from tests.integration.pipeline_fixtures import run_workers, stack_settings
from tests.unit.tiny_video import build_tiny_video_pipeline

pytestmark = pytest.mark.integration

W, H = 360, 640
GEN_W, GEN_H = 32, 64  # the tiny LTX model's generation size (portrait, VAE x32)

TEMPLATE = """
name: {name}
version: "1"
title: Generated motion
duration_s: 3.0
personal: {{start: 1.2, end: 2.6}}
strings:
  en:
    title: "Hello"
    name: "To {{recipient.name}}"
layers:
  - id: background
    type: background
    source:
      kind: generated_video
      prompt: "lanterns drifting over a night river"
      negative_prompt: "text"
      seed: 7
      frames: 9
      fps: 8
      steps: 2
      fill: pingpong
  - id: title
    type: text
    text: title
    end: 1.2
    box: {{x: 0.0, y: 0.55, w: 1.0, h: 0.2}}
  - id: name
    type: text
    text: name
    start: 1.2
    end: 2.6
    box: {{x: 0.0, y: 0.1, w: 1.0, h: 0.15}}
{photo}  - id: ai-label
    type: label
"""

LIVING = """  - id: photo
    type: living_photo
    start: 1.2
    end: 2.6
    box: {{x: 0.15, y: 0.35, w: 0.7, h: 0.45}}
    fade_s: 0.0
    frames: 9
    fps: 8
    steps: 2
    fill: {fill}
    fallback: {fallback}
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny-ltx")
    return {
        "t2v": build_tiny_video_pipeline(d, "ltx", "t2v"),
        "i2v": build_tiny_video_pipeline(d, "ltx", "i2v"),
    }


def write_templates(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "motion.yaml").write_text(TEMPLATE.format(name="motion", photo=""), encoding="utf-8")
    for name, fallback in (("living", "none"), ("living-or-still", "still")):
        photo = LIVING.format(fill="loop", fallback=fallback)
        (d / f"{name}.yaml").write_text(TEMPLATE.format(name=name, photo=photo), encoding="utf-8")
    return d


@pytest.fixture
def motion(tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Container]:
    """The stack, with the tiny text- and image-to-video models configured."""
    templates = write_templates(tmp_path / "templates")
    monkeypatch.setenv("GREETFLOW_TEMPLATES_DIR", str(templates))  # intake reads the process settings
    get_settings.cache_clear()
    base = stack_settings(tmp_path / "data")
    settings = base.model_copy(
        update={
            "templates_dir": templates,
            "render_width": W,
            "render_height": H,
            "video_model_dir": models["t2v"],
            "video_i2v_model_dir": models["i2v"],
            "video_device": "cpu",
            "video_width": GEN_W,
            "video_height": GEN_H,
        }
    )
    with DevStack(settings, log=lambda _m: None):
        c = Container(settings)
        try:
            yield c
        finally:
            c.close()
            get_settings.cache_clear()


def luma(path: Path, t: float, tmp: Path) -> np.ndarray:
    png = extract_frame(path, t, tmp / f"{path.stem}-{t:.2f}.png")
    with Image.open(png) as im:
        return np.asarray(im.convert("L")).astype(np.int32)


def put_image(c: Container, key: str, color: tuple[int, int, int], path: Path) -> None:
    img = Image.new("RGB", (96, 96), color)
    for i in range(0, 96, 12):
        img.paste((255 - color[0], 200, 40), (i, 0, i + 5, 96))
    img.save(path)
    c.store.put_file(c.settings.bucket_assets, key, path, content_type="image/png")


def state_of(c: Container, job_id: Any) -> JobState | None:
    job = c.jobs.get(job_id)
    return None if job is None else job.state


def test_generated_background_published_verified_and_shared(motion: Container, tmp_path: Path) -> None:
    c = motion
    put_image(c, "refs/style.png", (30, 60, 200), tmp_path / "style.png")
    brief = CampaignBrief(
        campaign_id="motion",
        title="Motion",
        template=TemplateRef(name="motion"),
        recipients=(Recipient(id="r1", name="Alice Wong"),),
        references=(Reference(key="refs/style.png", kind="style"),),
    )
    job_id = c.campaigns().submit(brief).job_ids[0]
    started = time.perf_counter()
    run_workers(
        c,
        [consumers.render.build, consumers.moderate.build, consumers.publish.build],
        lambda: state_of(c, job_id) in (JobState.PUBLISHED, JobState.REJECTED, JobState.NEEDS_REVIEW),
        timeout_s=150,
    )
    job = c.jobs.get(job_id)
    assert job is not None and job.state == JobState.PUBLISHED, (
        job.state if job else None,
        job and job.reason,
    )
    clip = c.store.get_file(c.settings.bucket_distribution, job.published_key or "", tmp_path / "pub.mp4")
    print(f"published in {time.perf_counter() - started:.1f} s")

    # the background moves (intro frames: nothing personal drawn; the label band left out)
    a, b = luma(clip, 0.3, tmp_path), luma(clip, 0.8, tmp_path)
    region = (slice(int(H * 0.3), int(H * 0.5)), slice(0, W))
    assert np.abs(a[region] - b[region]).mean() > 1.0
    extract_frame(clip, 0.5, tmp_path / "generated-frame.png")

    # the plate was generated once and stored in the assets bucket
    plates = [
        k for k in c.store.list_keys(c.settings.bucket_assets, "generated/plates/") if k.endswith(".json")
    ]
    assert len(plates) == 1
    renderer = c.renderer
    assert isinstance(renderer, TemplateRenderer) and renderer.videos is not None
    # the style reference is the first frame, so the image-to-video model made the plate
    gen, t2v = renderer.videos.i2v, renderer.videos.t2v
    assert gen is not None and t2v is not None
    assert (gen.calls, t2v.calls) == (1, 0)

    # provenance: the generation record, the model fingerprint, the style reference as ingredient
    record = json.loads(c.store.get_bytes(c.settings.bucket_staging, generation_key("motion", "r1", job_id)))
    assert record["plates"][0]["model"] == gen.model_id
    assert record["plates"][0]["params"]["image_sha256"]  # the style image conditioned it
    env = {
        **os.environ,
        "GREETFLOW_DATA_DIR": str(c.settings.data_dir),
        "GREETFLOW_TEMPLATES_DIR": str(c.settings.templates_dir),
    }
    exe = Path(sys.executable).with_name("greetflow")
    out = subprocess.run(
        [str(exe), "verify", str(clip), "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert report["c2pa"]["ingredients"] == ["style:refs/style.png"]
    assert gen.model_id in report["c2pa"]["parameters"]["models"]
    assert report["c2pa"]["parameters"]["generation"]["plates"][0]["key"] == record["plates"][0]["key"]
    assert f"model:{gen.fingerprint}" in report["aigc"]["ReservedCode1"]

    # a second render node: the plate comes from the bucket, nothing is generated again
    node2_gen = DiffusersVideoGenerator(c.settings.video_i2v_model_dir or "", device="cpu")
    cache2 = PlateCache(c.store, c.settings.bucket_assets, tmp_path / "node2-plates")
    node2 = TemplateRenderer(
        tmp_path / "node2-cache",
        templates_dir=c.settings.templates_dir,
        size=(W, H),
        videos=VideoPlates(GenerationQueue(cache2), i2v=node2_gen, defaults=renderer.videos.defaults),
    )
    req = RenderRequested(
        job_id=job_id,
        campaign_id="motion",
        recipient=brief.recipients[0],
        template=brief.template,
        locale=Locale.EN,
        references=brief.references,
    )
    r2 = node2.render(req, tmp_path / "node2-out", stem="again")
    assert (node2_gen.calls, cache2.hits, cache2.misses) == (0, 1, 0)
    assert gen.calls == 1
    assert np.abs(luma(r2.video_path, 0.3, tmp_path) - a).mean() < 3.0  # the same plate


class SlowGenerator:
    """A real tiny generator that takes a while, so two nodes overlap."""

    def __init__(self, inner: DiffusersVideoGenerator, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.model_id = inner.model_id
        self.backend = inner.backend
        self.modes = inner.modes
        self.calls = 0

    def generate(self, req: VideoRequest) -> VideoClip:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.generate(req)


def test_two_nodes_racing_on_one_plate_generate_it_once(
    stack: Settings, models: dict[str, Path], tmp_path: Path
) -> None:
    c = Container(stack)
    try:
        req = VideoRequest(prompt="race", frames=9, fps=8, steps=2, width=GEN_W, height=GEN_H)
        gens = [SlowGenerator(DiffusersVideoGenerator(models["t2v"], device="cpu"), 1.0) for _ in range(2)]
        caches = [
            PlateCache(c.store, stack.bucket_assets, tmp_path / f"node{i}", poll_s=0.1) for i in range(2)
        ]
        barrier = threading.Barrier(2)
        results: list[Any] = [None, None]

        def node(i: int) -> None:
            barrier.wait()
            try:
                results[i] = GenerationQueue(caches[i]).plate(gens[i], req)
            except BaseException as exc:  # reported below
                results[i] = exc

        threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(not isinstance(r, BaseException) and r is not None for r in results), results
        assert sum(g.calls for g in gens) == 1
        assert sorted(p.generated_here for p in results) == [False, True]
        key = plate_key(gens[0].model_id, req)
        assert {p.key for p in results} == {key}
        assert results[0].video.read_bytes() == results[1].video.read_bytes()
        assert not c.store.exists(stack.bucket_assets, f"generated/plates/{key[:2]}/{key}.claim")
    finally:
        c.close()


def photo_recipient(scopes: set[Scope]) -> Recipient:
    return Recipient(
        id="r2",
        name="Grace",
        photo_key="photos/grace.png",
        subjects=(SubjectUse(subject_id="grace-h", scopes=frozenset(scopes)),),
    )


def test_living_photo_renders_through_the_render_worker(motion: Container, tmp_path: Path) -> None:
    c = motion
    put_image(c, "photos/grace.png", (220, 120, 90), tmp_path / "grace.png")
    brief = CampaignBrief(
        campaign_id="living",
        title="Living",
        template=TemplateRef(name="living"),
        recipients=(photo_recipient({Scope.FACE, Scope.ANIMATE}),),
    )
    job_id = c.campaigns().submit(brief).job_ids[0]
    run_workers(c, [consumers.render.build], lambda: state_of(c, job_id) == JobState.RENDERED, timeout_s=120)
    job = c.jobs.get(job_id)
    assert job is not None and job.staging_key
    clip = c.store.get_file(c.settings.bucket_staging, job.staging_key, tmp_path / "living.mp4")
    # the photo box moves during the personal window
    box = (slice(int(H * 0.45), int(H * 0.7)), slice(int(W * 0.3), int(W * 0.7)))
    a, b = luma(clip, 1.5, tmp_path), luma(clip, 2.2, tmp_path)
    assert np.abs(a[box] - b[box]).mean() > 1.0
    extract_frame(clip, 1.8, tmp_path / "living-frame.png")
    record = json.loads(c.store.get_bytes(c.settings.bucket_staging, generation_key("living", "r2", job_id)))
    roles = [p["role"] for p in record["plates"]]
    assert roles == ["background", "living_photo"]
    renderer = c.renderer
    assert isinstance(renderer, TemplateRenderer) and renderer.videos is not None
    assert renderer.videos.i2v is not None and renderer.videos.i2v.calls == 1


def test_animate_scope_is_required_at_intake_unless_the_template_falls_back(motion: Container) -> None:
    c = motion
    without = photo_recipient({Scope.FACE})
    refused = CampaignBrief(
        campaign_id="no-animate", title="x", template=TemplateRef(name="living"), recipients=(without,)
    )
    with pytest.raises(BriefError) as err:
        c.campaigns().submit(refused)
    assert "subject grace-h lacks scope animate" in str(err.value)
    fallback = refused.model_copy(update={"template": TemplateRef(name="living-or-still")})
    assert c.campaigns().submit(fallback).created == 1


class _BarrierStore:
    """One node's view of the real store, except that its first read of a claim waits until
    the other node has read it too: both hold the same stale claim (and ETag) before either
    replaces it."""

    def __init__(self, inner: Any, barrier: threading.Barrier) -> None:
        self._inner = inner
        self._barrier = barrier
        self._waited = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_versioned(self, bucket: str, key: str) -> tuple[bytes, str] | None:
        got = self._inner.get_versioned(bucket, key)
        if key.endswith(".claim") and not self._waited:
            self._waited = True
            self._barrier.wait(timeout=30)
        return got  # type: ignore[no-any-return]


def test_two_nodes_taking_over_one_stale_claim_generate_once(stack: Settings, tmp_path: Path) -> None:
    c = Container(stack)
    try:
        key = "ab" + "0" * 62
        claim = f"generated/plates/{key[:2]}/{key}.claim"
        stale = json.dumps({"owner": "dead-node", "at": time.time() - 3600}).encode()
        assert c.store.put_if_absent(stack.bucket_assets, claim, stale)
        barrier = threading.Barrier(2)
        calls: list[int] = []

        def make() -> VideoClip:
            calls.append(1)
            time.sleep(0.5)
            return VideoClip(np.stack([np.full((16, 16, 3), 20 * i, np.uint8) for i in range(9)]), fps=8)

        caches = [
            PlateCache(
                _BarrierStore(c.store, barrier),  # type: ignore[arg-type]
                stack.bucket_assets,
                tmp_path / f"node{i}",
                claim_ttl_s=60,
                poll_s=0.1,
                wait_timeout_s=60,
            )
            for i in range(2)
        ]
        results: list[Any] = [None, None]

        def node(i: int) -> None:
            try:
                results[i] = caches[i].get(key, make, {"model": "fake"})
            except BaseException as exc:  # reported below
                results[i] = exc

        threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(not isinstance(r, BaseException) and r is not None for r in results), results
        assert len(calls) == 1
        assert sorted(p.generated_here for p in results) == [False, True]
        assert sum(cache.misses for cache in caches) == 1
        assert not c.store.exists(stack.bucket_assets, claim)
    finally:
        c.close()


# --------------------------------------------------------------------------- faces in generated motion

FACE_SIDE = 192  # living-photo generation size of these tests: faces large enough for dlib

DRIFT = """  - id: photo
    type: living_photo
    prompt: "{prompt}"
    start: 1.2
    end: 2.6
    box: {{x: 0.1, y: 0.3, w: 0.8, h: 0.5}}
    fade_s: 0.0
    frames: 9
    fps: 8
    steps: 2
    fill: loop
"""


class FaceFramesGenerator:
    """The tiny image-to-video pipeline behind the product's generator interface, with its
    output frames replaced by a face (a deterministic fake: the tiny model's noise shows no
    face, and these tests are about what moderation makes of the faces it is given). The
    frames keep the conditioning photo's face, drifting a few pixels, unless the prompt asks
    for "someone else": then they show the astronaut instead, as a model whose face drifted
    to another person would."""

    def __init__(self, inner: Any, other_face: np.ndarray) -> None:
        self.inner = inner
        self.other_face = other_face
        self.model_id = f"{inner.model_id}:face-frames"
        self.backend = inner.backend
        self.modes = inner.modes
        self.calls = 0

    def generate(self, req: VideoRequest) -> VideoClip:
        import io

        self.calls += 1
        out = self.inner.generate(req)
        assert req.image is not None
        if "someone else" in req.prompt:
            base = self.other_face
        else:
            with Image.open(io.BytesIO(req.image)) as im:
                base = np.asarray(im.convert("RGB").resize((req.width, req.height)))
        frames = np.stack([np.roll(base, (k % 3, k % 2), axis=(0, 1)) for k in range(len(out.frames))])
        return VideoClip(frames=frames, fps=out.fps)


@pytest.fixture
def faces_motion(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Container]:
    """The stack with the tiny models, living photos generated at FACE_SIDE, and the i2v
    generator wrapped in FaceFramesGenerator."""
    from tests import faces

    templates = write_templates(tmp_path / "templates")
    for name, prompt in (("keeps", "the person smiles"), ("drifts", "the person becomes someone else")):
        (templates / f"{name}.yaml").write_text(
            TEMPLATE.format(name=name, photo=DRIFT.format(prompt=prompt)), encoding="utf-8"
        )
    monkeypatch.setenv("GREETFLOW_TEMPLATES_DIR", str(templates))  # intake reads the process settings
    get_settings.cache_clear()
    settings = stack_settings(tmp_path / "data").model_copy(
        update={
            "templates_dir": templates,
            "render_width": W,
            "render_height": H,
            "video_model_dir": models["t2v"],
            "video_i2v_model_dir": models["i2v"],
            "video_device": "cpu",
            "video_width": FACE_SIDE,
            "video_height": FACE_SIDE,
        }
    )
    other = np.asarray(faces.astronaut_image().crop((100, 0, 350, 250)).resize((FACE_SIDE, FACE_SIDE)))
    with DevStack(settings, log=lambda _m: None):
        c = Container(settings)
        try:
            renderer = c.renderer
            assert isinstance(renderer, TemplateRenderer) and renderer.videos is not None
            renderer.videos.i2v = FaceFramesGenerator(renderer.videos.i2v, other)
            yield c
        finally:
            c.close()
            get_settings.cache_clear()


def grant_face(c: Container, subject: str, photo: Path, evidence: Path) -> None:
    svc = c.consent_service()
    code = svc.challenge(subject, issued_by="test").code
    svc.grant(
        subject,
        scopes=["face", "animate", "name"],
        purpose="*",
        evidence=evidence,
        challenge_code=code,
        recorded_by="test",
        photo=photo,
    )


def findings_of(c: Container, job_id: Any) -> list[Any]:
    result = c.moderation_results.latest(job_id)
    assert result is not None
    return list(result.findings)


def test_living_photo_faces_and_character_references_in_moderation(
    faces_motion: Container, tmp_path: Path
) -> None:
    """Three living-photo jobs of subject grace-h (consented with another picture of her):
    frames that keep her face, with her character reference, are approved and the reference
    counts as hers; frames whose face drifted to another person go to review naming the
    mismatch; a character reference of someone else named as grace-h is not used as her
    face and goes to review."""
    from tests import faces

    c = faces_motion
    grant_face(c, "grace-h", faces.grace_selfie(tmp_path / "consent"), faces.grace(tmp_path / "evidence"))
    assets = c.settings.bucket_assets
    for key, path in (
        ("photos/grace.jpg", faces.grace(tmp_path / "photo")),
        ("refs/grace-2019.jpg", faces.grace(tmp_path / "ref")),
        ("refs/not-grace.jpg", faces.astronaut_portrait(tmp_path / "other")),
    ):
        c.store.put_file(assets, key, path, content_type="image/jpeg")
    recipient = Recipient(
        id="r1",
        name="Grace",
        photo_key="photos/grace.jpg",
        subjects=(SubjectUse(subject_id="grace-h", scopes=frozenset({Scope.FACE, Scope.ANIMATE})),),
    )
    briefs = {
        "keeps": ("keeps", Reference(key="refs/grace-2019.jpg", kind="character", subject_id="grace-h")),
        "drifts": ("drifts", None),
        "wrong-ref": ("keeps", Reference(key="refs/not-grace.jpg", kind="character", subject_id="grace-h")),
    }
    jobs = {}
    for campaign, (template, ref) in briefs.items():
        brief = CampaignBrief(
            campaign_id=campaign,
            title=campaign,
            template=TemplateRef(name=template),
            recipients=(recipient,),
            references=(ref,) if ref is not None else (),
        )
        jobs[campaign] = c.campaigns().submit(brief).job_ids[0]
    settled = (
        JobState.APPROVED,
        JobState.PUBLISHED,
        JobState.NEEDS_REVIEW,
        JobState.REJECTED,
        JobState.FAILED,
    )
    started = time.perf_counter()
    run_workers(
        c,
        [consumers.render.build, consumers.moderate.build],
        lambda: all(state_of(c, j) in settled for j in jobs.values()),
        timeout_s=240,
    )
    print(f"three living-photo jobs rendered and moderated in {time.perf_counter() - started:.1f} s")
    states = {k: state_of(c, j) for k, j in jobs.items()}

    def kinds(campaign: str) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for f in findings_of(c, jobs[campaign]):
            out.setdefault(f.kind, []).append(f)
        return out

    for campaign, job_id in jobs.items():  # a frame of the personal window of each clip, to look at
        job = c.jobs.get(job_id)
        assert job is not None and job.staging_key
        clip = c.store.get_file(c.settings.bucket_staging, job.staging_key, tmp_path / f"{campaign}.mp4")
        print(extract_frame(clip, 1.8, tmp_path / f"{campaign}-frame.png"))
    keeps, drifts, wrong = kinds("keeps"), kinds("drifts"), kinds("wrong-ref")
    print(drifts["unknown_face"][0].message)
    messages = {k: [f.message for fs in v.values() for f in fs if f.severity != "info"] for k, v in
                (("keeps", keeps), ("drifts", drifts), ("wrong-ref", wrong))}  # fmt: skip
    assert states["keeps"] == JobState.APPROVED, messages["keeps"]
    (ref,) = keeps["character_reference_used"]
    assert ref.evidence["used"] is True and ref.evidence["distance"] < 0.6
    (seen,) = keeps["face_consented"]
    assert seen.evidence["subject_id"] == "grace-h" and "clip" in seen.evidence["sources"]

    assert states["drifts"] == JobState.NEEDS_REVIEW, messages["drifts"]
    (drift,) = drifts["unknown_face"]
    assert (
        "matches no consented subject" in drift.message
        and "nearest consented subject grace-h" in drift.message
    )
    assert drift.evidence["nearest"]["distance"] >= 0.6 and drift.evidence["frames"] > 0
    assert "face_consented" not in drifts or all(
        f.evidence["sources"] == ["photo"] for f in drifts["face_consented"]
    )

    assert states["wrong-ref"] == JobState.NEEDS_REVIEW, messages["wrong-ref"]
    (bad,) = wrong["character_reference_not_used"]
    assert (
        bad.evidence["used"] is False
        and "does not match the consented face of subject grace-h" in bad.message
    )


def test_character_references_are_screened_at_intake(motion: Container, tmp_path: Path) -> None:
    """A real person's character reference must show one face, no protected person's, and
    be in the assets bucket; a fictional one may show no face. Each refusal is one line."""
    from tests import faces

    c = motion
    c.gallery_service().protect("Eileen Collins", [faces.astronaut(tmp_path / "gallery")], enrolled_by="test")
    put_image(c, "refs/no-face.png", (200, 30, 30), tmp_path / "no-face.png")
    for key, path in (
        ("refs/celeb.jpg", faces.astronaut_portrait(tmp_path / "celeb")),
        ("refs/pair.jpg", faces.pair(tmp_path / "pair")),
        ("refs/grace.jpg", faces.grace(tmp_path / "grace")),
    ):
        c.store.put_file(c.settings.bucket_assets, key, path, content_type="image/jpeg")

    def submit(*refs: Reference) -> str:
        brief = CampaignBrief(
            campaign_id="refs",
            title="Refs",
            template=TemplateRef(name="motion"),
            recipients=(Recipient(id="r1", name="Alice"),),
            references=refs,
        )
        try:
            c.campaigns().submit(brief)
        except BriefError as exc:
            assert "\n" not in str(exc)
            return str(exc)
        return "accepted"

    char = lambda key, **kw: Reference(key=key, kind="character", **kw)  # noqa: E731
    assert "refs/no-face.png (subject gran) shows no face" in submit(
        char("refs/no-face.png", subject_id="gran")
    )
    assert "shows 2 faces" in submit(char("refs/pair.jpg", subject_id="gran"))
    assert "shows protected person 'Eileen Collins'" in submit(char("refs/celeb.jpg", subject_id="gran"))
    assert "shows protected person 'Eileen Collins'" in submit(char("refs/celeb.jpg", fictional=True))
    assert "refs/missing.jpg is not in bucket" in submit(char("refs/missing.jpg", subject_id="gran"))
    assert c.jobs.get(render_request_job(c)) is None  # nothing was created by a refused brief
    assert (
        submit(char("refs/grace.jpg", subject_id="gran"), char("refs/no-face.png", fictional=True))
        == "accepted"
    )


def render_request_job(c: Container) -> Any:
    from pipeline.campaigns import render_request_for

    brief = CampaignBrief(
        campaign_id="refs",
        title="Refs",
        template=TemplateRef(name="motion"),
        recipients=(Recipient(id="r1", name="Alice"),),
    )
    return render_request_for(brief, brief.recipients[0], c.job_ids).job_id
