"""Video backends through the product loader (tiny pipelines built from configs, CPU, no
hub), the plate key, the duration fill, and the loader's refusals."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PermanentError
from pipeline.render.media import RenderError
from pipeline.render.video import (
    DiffusersVideoGenerator,
    GenerationQueue,
    PlateCache,
    VideoClip,
    VideoRequest,
    cycle_frames,
    load_video_pipeline,
    pipeline_class_name,
    plate_encoder_args,
    plate_key,
)
from tests.unit.tiny_video import build_tiny_video_pipeline


def _png(color: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", (48, 48), color)
    for i in range(0, 48, 6):
        img.paste((255 - color[0], 40, 200), (i, 0, i + 3, 48))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# the smallest size each tiny model takes (LTX: VAE x32; CogVideoX: its fixed sample size)
SIZES = {"ltx": (32, 32), "wan": (16, 32), "cogvideox": (16, 16)}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-video")


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
@pytest.mark.parametrize("backend", ["ltx", "wan", "cogvideox"])
def test_tiny_backend_loads_and_generates_moving_frames(tiny_dir: Path, backend: str, mode: str) -> None:
    model = build_tiny_video_pipeline(tiny_dir, backend, mode)
    index = json.loads((model / "model_index.json").read_text())
    gen = DiffusersVideoGenerator(model, device="cpu")
    assert gen.class_name == index["_class_name"]
    assert gen.backend == backend and mode in gen.modes
    width, height = SIZES[backend]
    req = VideoRequest(
        prompt="lanterns over a river",
        seed=3,
        frames=9,
        fps=8,
        steps=2,
        guidance=1.0,
        width=width,
        height=height,
        image=_png((200, 40, 30)) if mode == "i2v" else None,
    )
    clip = gen.generate(req)
    assert gen.calls == 1
    n, h, w, c = clip.frames.shape
    assert clip.frames.dtype == np.uint8 and c == 3 and n == 9
    assert h >= 16 and w >= 16
    diffs = np.abs(np.diff(clip.frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (diffs > 0).all(), f"frames do not change: {diffs}"
    if backend == "ltx":  # the seed decides the output
        again = gen.generate(req)
        assert np.array_equal(again.frames, clip.frames)


def test_ltx2_makes_video_and_its_audio(tiny_dir: Path) -> None:
    model = build_tiny_video_pipeline(tiny_dir, "ltx2", "t2v")
    gen = DiffusersVideoGenerator(model, device="cpu")
    clip = gen.generate(
        VideoRequest(prompt="a robot dancing", frames=9, fps=25, steps=2, guidance=1.0, width=32, height=32)
    )
    assert clip.frames.shape[0] == 9
    assert clip.audio is not None and clip.audio.ndim == 2 and clip.audio.shape[1] == 2
    assert clip.audio_rate == 16000


def test_plate_key_covers_every_parameter() -> None:
    base = VideoRequest(prompt="p")
    keys = {plate_key("m", base), plate_key("other-model", base)}
    for change in (
        {"prompt": "q"},
        {"negative_prompt": "n"},
        {"seed": 1},
        {"frames": 57},
        {"fps": 25},
        {"steps": 31},
        {"guidance": 5.5},
        {"width": 512},
        {"height": 768},
        {"image": b"x"},
    ):
        keys.add(plate_key("m", VideoRequest(**{**base.__dict__, **change})))
    assert len(keys) == 12


def test_fill_cycles() -> None:
    f = np.arange(5)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    assert [int(x[0, 0, 0]) for x in cycle_frames(f, "pingpong")] == [0, 1, 2, 3, 4, 3, 2, 1]
    assert len(cycle_frames(f, "loop")) == 5 and len(cycle_frames(f, "hold")) == 5


def test_loader_refuses_what_it_cannot_load(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"no model_index\.json"):
        load_video_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(RenderError, match="not a supported video pipeline"):
        pipeline_class_name(tmp_path)


def test_t2v_only_model_refuses_an_image(tiny_dir: Path) -> None:
    gen = DiffusersVideoGenerator(build_tiny_video_pipeline(tiny_dir, "ltx", "t2v"), device="cpu")
    with pytest.raises(PermanentError, match="cannot do i2v"):
        gen.generate(VideoRequest(prompt="p", frames=9, steps=1, width=32, height=32, image=_png((1, 2, 3))))


def test_a_thirteenth_reference_is_refused() -> None:
    from pydantic import ValidationError

    from schemas.brief import CampaignBrief, Recipient, Reference, TemplateRef

    refs = [Reference(key=f"refs/s{i}.png", kind="style") for i in range(13)]
    base = {
        "campaign_id": "c",
        "title": "t",
        "template": TemplateRef(name="motion"),
        "recipients": [Recipient(id="r", name="A")],
    }
    assert len(CampaignBrief(**base, references=refs[:12]).references) == 12
    with pytest.raises(ValidationError, match="at most 12 reference assets, got 13"):
        CampaignBrief(**base, references=refs)
    with pytest.raises(ValidationError, match="must name the pictured person"):
        Reference(key="refs/c.png", kind="character")
    with pytest.raises(ValidationError, match="must not contain"):
        Reference(key="refs/../x.png", kind="style")


def test_character_references_need_consent_and_animate_is_its_own_scope() -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    from pipeline.consent.rules import consent_findings, may_animate, relied_grants
    from pipeline.repositories import ConsentRecord
    from schemas.brief import Recipient, Reference, SubjectUse, TemplateRef
    from schemas.common import Scope
    from schemas.events import RenderRequested

    now = datetime.now(UTC)
    face = SubjectUse(subject_id="gran", scopes=frozenset({Scope.FACE, Scope.ANIMATE}))
    req = RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="c",
        recipient=Recipient(id="r", name="A", photo_key="p/g.png", subjects=(face,)),
        template=TemplateRef(name="living"),
        locale="en",
        references=(Reference(key="refs/star.png", kind="character", subject_id="star"),),
    )
    assert {u.subject_id: u.scopes for u in req.subjects} == {
        "gran": frozenset({Scope.FACE, Scope.ANIMATE}),
        "star": frozenset({Scope.FACE}),
    }
    assert may_animate(req.recipient.subjects)  # the photo pictures the recipient's subjects
    grant = ConsentRecord(
        record_id=uuid.uuid4(), subject_id="gran", action="grant", scopes=frozenset({Scope.FACE}),
        purpose="*", granted_at=now - timedelta(days=1), expires_at=None, recorded_by="t",
    )  # fmt: skip
    found = consent_findings({"gran": [grant]}, req.subjects, campaign_id="c", at=now)
    messages = sorted(f.message for f in found)
    assert messages == [
        "subject gran has no valid consent for animate (campaign:c)",
        "subject star has no valid consent for face (campaign:c)",
    ]
    assert relied_grants({"gran": [grant]}, req.subjects, campaign_id="c", at=now) == [grant.record_id]
    # animate alone still needs face
    only_animate = SubjectUse(subject_id="gran", scopes=frozenset({Scope.ANIMATE}))
    found = consent_findings({"gran": []}, [only_animate], campaign_id="c", at=now)
    assert "animate, face" in found[0].message


class _FakeGen:
    """Stands in for a model: slow, counts its calls, makes moving frames."""

    model_id = "fake:1"
    backend = "ltx"
    modes = ("t2v",)

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, req: VideoRequest) -> VideoClip:
        import time

        self.calls += 1
        time.sleep(0.3)
        frames = np.stack([np.full((16, 16, 3), 10 * i, np.uint8) for i in range(req.frames)])
        return VideoClip(frames=frames, fps=req.fps)


def test_one_process_coalesces_requests_for_the_same_plate(tmp_path: Path) -> None:
    import threading

    queue = GenerationQueue(PlateCache(None, "assets", tmp_path / "plates"), max_pending=2)
    gen = _FakeGen()
    req = VideoRequest(prompt="p", frames=9, fps=8, width=16, height=16)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(queue.plate(gen, req))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert gen.calls == 1 and queue.coalesced == 3 and len(got) == 4
    assert len({p.key for p in got}) == 1  # type: ignore[attr-defined]
    again = queue.plate(gen, req)  # a later request: the local copy
    assert gen.calls == 1 and again.frames == 9


def test_nvenc_falls_back_to_libx264_with_a_message(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.render import video

    monkeypatch.setattr(video, "_NVENC_OK", False)  # as on a GPU without NVENC (H100, H200)
    with caplog.at_level("WARNING"):
        args = plate_encoder_args("h264_nvenc")
    assert args[:2] == ["-c:v", "libx264"]
    assert "no NVENC" in caplog.text and "libx264" in caplog.text


def test_a_verified_character_reference_is_a_reference_face_of_its_subject() -> None:
    from pipeline.faces import FaceSighting
    from pipeline.moderation.likeness import (
        CharacterFace,
        References,
        likeness_findings,
        with_character_references,
    )

    def at(*xs: float) -> tuple[float, ...]:
        return (*xs, *([0.0] * (128 - len(xs))))

    consented = {"gran": [at(0.0)]}
    faces = [
        CharacterFace("refs/gran-2019.jpg", "gran", at(0.4)),  # 0.4 from her consented face
        CharacterFace("refs/someone.jpg", "gran", at(0.0, 0.9)),  # 0.9 away: not her
        CharacterFace("refs/gone.jpg", "gran", None, "it is not in bucket assets"),
        CharacterFace("refs/star.jpg", "star", at(5.0)),  # no consented face for star
    ]
    merged, found = with_character_references(consented, faces, threshold=0.6)
    assert merged == {"gran": [at(0.0), at(0.4)]} and consented == {"gran": [at(0.0)]}
    assert [(f.evidence["key"], f.kind, f.severity.value) for f in found] == [
        ("refs/gran-2019.jpg", "character_reference_used", "info"),
        ("refs/someone.jpg", "character_reference_not_used", "warn"),
        ("refs/gone.jpg", "character_reference_not_used", "warn"),
        ("refs/star.jpg", "character_reference_not_used", "warn"),
    ]
    assert "does not match the consented face of subject gran (distance 0.900 >= 0.6)" in found[1].message

    # a generated face 0.7 from her consented photo but 0.3 from the verified reference is hers;
    # one near the unverified reference alone matches nobody
    def sighting(emb: tuple[float, ...]) -> FaceSighting:
        return FaceSighting(
            t=1.0, box=(0, 0, 90, 90), score=1.0, embedding=emb, crop_jpeg=None, source="clip"
        )

    ok, _ = likeness_findings(
        [sighting(at(0.7))], References(consented=merged), threshold=0.6, frames_sampled=1
    )
    assert "face_consented" in {f.kind for f in ok} and "unknown_face" not in {f.kind for f in ok}
    before, _ = likeness_findings(
        [sighting(at(0.7))], References(consented=consented), threshold=0.6, frames_sampled=1
    )
    assert "unknown_face" in {f.kind for f in before}
    stranger, _ = likeness_findings(
        [sighting(at(0.0, 0.95))], References(consented=merged), threshold=0.6, frames_sampled=1
    )
    assert {f.kind for f in stranger} == {"unknown_face", "likeness_checked"}
