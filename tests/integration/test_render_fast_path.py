"""The fast render path on real ffmpeg: a personal segment encoded in chunks side by side
is the same clip, frame for frame, as one encode; an identical recipient reuses the
encoded personal segment; the personal-segment cache stays within its size."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import pytest

from pipeline.render.engine import BT709_PARAMS, RenderResult, TemplateRenderer, segment_parameter_sets
from pipeline.render.media import probe, run_ffmpeg
from schemas.brief import Recipient, TemplateRef
from schemas.common import Locale
from schemas.events import RenderRequested

W, H = 360, 640


def grace_hopper() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def request(name: str, locale: Locale = Locale.ZH_HANT_HK) -> RenderRequested:
    return RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="test",
        recipient=Recipient(id=f"r-{uuid.uuid4().hex[:6]}", name=name, locale=locale),
        template=TemplateRef(name="lunar-new-year"),
        locale=locale,
    )


def decoded(path: Path, start: int, count: int) -> bytes:
    proc = run_ffmpeg(
        ["-i", path, "-vf", f"trim=start_frame={start}:end_frame={start + count}", "-f", "rawvideo",
         "-pix_fmt", "yuv420p", "-"]
    )  # fmt: skip
    return proc.stdout


def per_frame_psnr(clip: Path, raw: Path, n0: int, n: int, tmp: Path) -> list[float]:
    stats = tmp / f"{clip.stem}-psnr.txt"
    run_ffmpeg(
        ["-i", clip, "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{W}x{H}", "-framerate", "30", "-i", raw,
         "-lavfi", f"[0:v]trim=start_frame={n0}:end_frame={n0 + n},setpts=PTS-STARTPTS[a];"
         f"[1:v]{BT709_PARAMS},setpts=PTS-STARTPTS[b];[a][b]psnr=stats_file={stats}", "-f", "null", "-"]
    )  # fmt: skip
    return [float(m) for m in re.findall(r"psnr_y:([\d.]+)", stats.read_text())]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_chunked_personal_segment_is_the_same_clip_as_one_encode(cache: Path, tmp_path: Path) -> None:
    one = TemplateRenderer(cache, size=(W, H), encode_jobs=1, dedup=False)
    two = TemplateRenderer(cache, size=(W, H), encode_jobs=2, dedup=False)
    req = request("陳大文")
    a = one.render(req, tmp_path, photo=grace_hopper(), stem="one")
    b = two.render(req, tmp_path, photo=grace_hopper(), stem="two")
    lt = one.template("lunar-new-year")
    seg = one.shared(lt, req.locale, one._variant(lt.template, None, None))
    n = seg.n1 - seg.n0
    for r in (a, b):
        info = probe(r.video_path)
        assert info.has_faststart and info.audio_codec == "aac" and abs(info.duration_s - 9.0) < 0.05
        proc = run_ffmpeg(["-i", r.video_path, "-map", "0:v", "-f", "null", "-"])
        assert int(re.findall(r"frame=\s*(\d+)", proc.stderr.decode())[-1]) == seg.n_frames
    assert segment_parameter_sets(b.video_path) == segment_parameter_sets(seg.intro)  # type: ignore[arg-type]
    # the frames the engine composites, raw: every decoded personal frame of both clips
    # matches its own raw frame (a dropped or doubled frame at the cut would not)
    _, cues = two._voice(lt.template, req.locale, req.recipient.name, seg)
    stills, *_ = two._personal_stills(lt, req.locale, seg.variant, req.recipient.name, grace_hopper(), cues)
    raw = tmp_path / "raw.yuv"
    two._encode_personal(seg, stills, raw, None, 0.0, raw=True)
    for r in (a, b):
        psnr = per_frame_psnr(r.video_path, raw, seg.n0, n, tmp_path)
        assert len(psnr) == n
        assert min(psnr) > 38.0, (r.video_path.name, min(psnr), psnr.index(min(psnr)))
    # intro and outro are the shared segments, byte for byte the same frames
    assert decoded(a.video_path, 0, seg.n0) == decoded(b.video_path, 0, seg.n0)
    assert decoded(a.video_path, seg.n1, 20) == decoded(b.video_path, seg.n1, 20)


def test_an_identical_recipient_reuses_the_personal_segment(cache: Path, tmp_path: Path) -> None:
    eng = TemplateRenderer(cache, size=(W, H), encode_jobs=2)
    first = eng.render(request("李小明", Locale.ZH_HANS_CN), tmp_path, stem="first")
    again = eng.render(request("李小明", Locale.ZH_HANS_CN), tmp_path, stem="again")
    other = eng.render(request("张伟", Locale.ZH_HANS_CN), tmp_path, stem="other")
    assert "dedup_hit" not in first.timings
    assert again.timings.get("dedup_hit") == 1.0 and "encode_personal" not in again.timings
    assert "dedup_hit" not in other.timings

    def same(x: RenderResult, y: RenderResult) -> None:
        assert decoded(x.video_path, 0, 270) == decoded(y.video_path, 0, 270)
        assert x.poster_path.read_bytes() == y.poster_path.read_bytes()
        assert x.captions_path and y.captions_path
        assert x.captions_path.read_text() == y.captions_path.read_text()
        assert (x.cues, x.drawn_texts, x.name_box, x.photo_box) == (
            y.cues,
            y.drawn_texts,
            y.name_box,
            y.photo_box,
        )
        assert (x.lufs, x.true_peak_db, x.merge_values) == (y.lufs, y.true_peak_db, y.merge_values)

    same(first, again)
    assert first.drawn_texts[0] == ("name", "给 李小明")
    assert decoded(first.video_path, 100, 5) != decoded(other.video_path, 100, 5)
    # a later render still hits after its entry was linked away (the cache keeps its own copy)
    third = eng.render(request("李小明", Locale.ZH_HANS_CN), tmp_path, stem="third")
    assert third.timings.get("dedup_hit") == 1.0
    assert hashlib.sha256(third.video_path.read_bytes()).hexdigest() == again.sha256


def test_a_personal_segment_with_a_photo_is_never_cached(cache: Path, tmp_path: Path) -> None:
    eng = TemplateRenderer(cache, size=(W, H), encode_jobs=2)
    entries = set((cache / "personal").glob("*/*/meta.json"))
    first = eng.render(request("李小明", Locale.ZH_HANS_CN), tmp_path, photo=grace_hopper(), stem="p1")
    again = eng.render(request("李小明", Locale.ZH_HANS_CN), tmp_path, photo=grace_hopper(), stem="p2")
    assert first.photo_box is not None
    assert "dedup_hit" not in again.timings and "encode_personal" in again.timings
    # nothing derived from the photo stays behind on the render node
    assert set((cache / "personal").glob("*/*/meta.json")) == entries


def test_the_personal_segment_cache_is_bounded(cache: Path, tmp_path: Path) -> None:
    eng = TemplateRenderer(cache, size=(W, H), encode_jobs=2)
    eng.render(request("Alice Wong", Locale.EN), tmp_path, stem="a")
    assert list((cache / "personal").glob("*/*/meta.json"))
    eng.dedup_max_bytes = 1
    eng._prune_personal()
    assert list((cache / "personal").glob("*/*/meta.json")) == []
    # a pruned entry is a miss, not an error
    again = eng.render(request("Alice Wong", Locale.EN), tmp_path, stem="b")
    assert "dedup_hit" not in again.timings
