"""The template engine end to end (real ffmpeg, eSpeak, fonts): every template and locale,
render-once segments joined by stream copy, one-pass audio, captions, poster, photo."""

from __future__ import annotations

import hashlib
import math
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import PermanentError
from pipeline.moderation.labels import LabelDetector, check_visible_label, expected_label_text
from pipeline.ports import RenderedClip
from pipeline.render import audio as audio_mod
from pipeline.render.compose import face_center, label_still
from pipeline.render.draw import safe_area
from pipeline.render.engine import RenderResult, TemplateRenderer, segment_parameter_sets
from pipeline.render.fonts import FontNotFoundError, installed_faces, missing_glyphs_everywhere
from pipeline.render.media import decode_audio, extract_frame, probe, run_ffmpeg
from pipeline.settings import Settings
from schemas.brief import Recipient, SubjectUse, TemplateRef
from schemas.common import Locale, Scope
from schemas.events import RenderRequested
from schemas.provenance import VISIBLE_AI_LABEL
from tests.clips import custom_label_template
from tests.fonts_util import name_without_font

W, H = 360, 640
NAMES = {
    Locale.ZH_HANT_HK: "陳大文",
    Locale.ZH_HANS_CN: "李小明",
    Locale.EN: "Alice Wong",
    Locale.JA: "山田 花子",
}
TEMPLATES = ("lunar-new-year", "mid-autumn", "season-greetings")


def grace_hopper() -> Path:
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def request(template: str, locale: Locale, name: str | None = None, rid: str = "r1") -> RenderRequested:
    return RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="test",
        recipient=Recipient(id=rid, name=name or NAMES[locale], locale=locale),
        template=TemplateRef(name=template),
        locale=locale,
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TemplateRenderer:
    return TemplateRenderer(tmp_path_factory.mktemp("cache"), size=(W, H))


@pytest.fixture(scope="module")
def clips(
    engine: TemplateRenderer, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, Locale], RenderResult]:
    out = tmp_path_factory.mktemp("clips")
    res = {}
    for t in TEMPLATES:
        for loc in Locale:
            photo = grace_hopper() if loc == Locale.ZH_HANT_HK else None
            res[(t, loc)] = engine.render(request(t, loc), out, photo=photo, stem=f"{t}-{loc.value}")
    return res


def frame(path: Path, t: float, tmp: Path) -> np.ndarray:
    png = extract_frame(path, t, tmp / f"{path.stem}-{t:.2f}.png")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def plate_luma(engine: TemplateRenderer, template: str, locale: Locale, t: float) -> np.ndarray:
    """The Y plane of the shared plate (the personal window without personal layers)."""
    lt = engine.template(template)
    seg = engine.shared(lt, locale, engine._variant(lt.template, None, None))
    k = round(t * seg.variant.fps) - seg.n0
    size = W * H * 3 // 2
    data = seg.plate.read_bytes()[k * size : k * size + W * H]
    return np.frombuffer(data, np.uint8).reshape(H, W).astype(np.int32)


def clip_luma(path: Path, t: float) -> np.ndarray:
    n = round(t * 30)
    proc = run_ffmpeg(
        [
            "-i",
            path,
            "-vf",
            f"trim=start_frame={n}:end_frame={n + 1}",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-",
        ]
    )
    return np.frombuffer(proc.stdout[: W * H], np.uint8).reshape(H, W).astype(np.int32)


def frame_count(path: Path) -> int:
    proc = run_ffmpeg(["-i", path, "-map", "0:v", "-f", "null", "-"])
    return int(re.findall(r"frame=\s*(\d+)", proc.stderr.decode())[-1])


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("locale", list(Locale))
def test_every_template_and_locale_renders_a_platform_ready_clip(
    clips: dict[tuple[str, Locale], RenderResult], template: str, locale: Locale
) -> None:
    res = clips[(template, locale)]
    info = probe(res.video_path)
    assert (info.video_codec, info.profile, info.pix_fmt) == ("h264", "High", "yuv420p")
    assert (info.width, info.height, info.fps) == (W, H, 30.0)
    assert (info.audio_codec, info.audio_sample_rate, info.audio_channels) == ("aac", 48_000, 2)
    assert info.has_faststart
    assert abs(info.duration_s - 9.0) < 0.1
    assert frame_count(res.video_path) == 270  # intro + personal + outro, nothing lost at the joins
    assert res.sha256 == hashlib.sha256(res.video_path.read_bytes()).hexdigest()
    with Image.open(res.poster_path) as poster:
        assert poster.format == "JPEG" and poster.size == (W, H)
    # captions: WebVTT sidecar following the voice, with the recipient's name
    assert res.captions_path is not None
    vtt = res.captions_path.read_text(encoding="utf-8")
    assert vtt.startswith("WEBVTT\n")
    assert NAMES[locale] in vtt
    for cue in res.cues:
        assert 2.5 <= cue.start < cue.end <= 6.0
    assert res.lufs == pytest.approx(-14.0, abs=0.5)
    assert res.true_peak_db <= -1.0


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("locale", list(Locale))
def test_name_is_drawn_inside_the_safe_area(
    engine: TemplateRenderer,
    clips: dict[tuple[str, Locale], RenderResult],
    template: str,
    locale: Locale,
    tmp_path: Path,
) -> None:
    res = clips[(template, locale)]
    assert res.name_box is not None
    x0, y0, x1, y1 = res.name_box
    area = safe_area(W, H)
    assert area.x0 <= x0 < x1 <= area.x1 and area.y0 <= y0 < y1 <= area.y1
    t = 4.5  # personal window, everything faded in
    diff = np.abs(clip_luma(res.video_path, t) - plate_luma(engine, template, locale, t))
    inside = diff[y0:y1, x0:x1]
    assert (inside > 40).mean() > 0.08, "the name is not drawn over the shared frames"
    # outside every personal layer the frame is the shared plate (up to compression)
    mask = np.ones_like(diff, dtype=bool)
    mask[max(0, y0 - 30) : y1 + 30, :] = False
    if res.photo_box:
        px0, py0, px1, py1 = res.photo_box
        mask[max(0, py0 - 10) : py1 + 10, max(0, px0 - 10) : px1 + 10] = False
    area_caps = (round(area.y0 + 0.8 * area.height), area.y1 + 20)
    mask[area_caps[0] : area_caps[1], :] = False
    assert np.median(diff[mask]) <= 2


@pytest.mark.parametrize("template", TEMPLATES)
def test_ai_label_is_visible_at_start_and_end(
    clips: dict[tuple[str, Locale], RenderResult], template: str, tmp_path: Path
) -> None:
    area = safe_area(W, H)
    for t in (0.0, 4.0, 8.9):
        f = frame(clips[(template, Locale.EN)].video_path, t, tmp_path)
        label = f[area.y0 : area.y0 + 30, area.x0 : area.x0 + 130]
        above = f[: area.y0 - 2, area.x0 : area.x0 + 130]
        light = (label.min(axis=2) > 170).mean()
        assert light > 0.01, f"no light label text at t={t}"
        assert (above.min(axis=2) > 170).mean() < light / 4


def _label_still(engine: TemplateRenderer, template: str, locale: Locale) -> tuple[np.ndarray, int, int]:
    lt = engine.template(template)
    _, stills = engine._shared_stills(lt, locale, engine._variant(lt.template, None, None))
    label = stills[-1]
    return label.image, label.x, label.y


@pytest.mark.parametrize("template", TEMPLATES)
def test_templates_without_label_text_draw_the_default_label(engine: TemplateRenderer, template: str) -> None:
    image, x, y = _label_still(engine, template, Locale.EN)
    want, wx, wy = label_still(VISIBLE_AI_LABEL, Locale.EN, W, H)
    assert (x, y) == (wx, wy) and np.array_equal(image, np.asarray(want))


def test_a_templates_label_text_is_drawn_and_passes_the_label_check(tmp_path: Path) -> None:
    text = "本片由AI生成 / Made with AI"
    templates = tmp_path / "templates"
    custom_label_template(templates, text)
    eng = TemplateRenderer(tmp_path / "cache", size=(W, H), templates_dir=templates)
    image, x, y = _label_still(eng, "custom-label", Locale.EN)
    want, wx, wy = label_still(text, Locale.EN, W, H)
    assert (x, y) == (wx, wy) and np.array_equal(image, np.asarray(want))
    default, *_ = label_still(VISIBLE_AI_LABEL, Locale.EN, W, H)
    assert image.shape != np.asarray(default).shape
    res = eng.render(request("custom-label", Locale.EN), tmp_path / "out", stem="custom")
    first = frame(res.video_path, 0.0, tmp_path).astype(np.uint8)
    hit = LabelDetector(label_text=text).find(first)
    assert hit is not None and hit.box is not None
    assert abs(hit.box[0] - x) <= 6 and abs(hit.box[1] - y) <= 6
    expected = expected_label_text(TemplateRef(name="custom-label"), templates)
    assert expected == text
    report = check_visible_label(res.video_path, Settings(data_dir=tmp_path), label_text=expected)
    assert report.ok, report.message


def test_subject_photo_is_shown_face_centred(
    clips: dict[tuple[str, Locale], RenderResult], tmp_path: Path
) -> None:
    res = clips[("lunar-new-year", Locale.ZH_HANT_HK)]
    assert res.photo_box is not None
    x0, y0, x1, y1 = res.photo_box
    area = safe_area(W, H)
    assert area.y0 <= y0 and y1 <= area.y1 + 20
    f = frame(res.video_path, 5.0, tmp_path)
    crop = Image.fromarray(f[y0:y1, x0:x1].astype(np.uint8))
    assert face_center(crop.resize((crop.width * 2, crop.height * 2))) is not None, (
        "no face in the photo slot"
    )
    no_photo = clips[("lunar-new-year", Locale.EN)]
    assert no_photo.photo_box is None


def test_audio_carries_voice_and_music_and_is_normalized(
    engine: TemplateRenderer, clips: dict[tuple[str, Locale], RenderResult]
) -> None:
    res = clips[("lunar-new-year", Locale.ZH_HANT_HK)]
    # loudness measured independently by ffmpeg's EBU R128 meter on the final AAC
    proc = run_ffmpeg(
        ["-nostats", "-i", res.video_path, "-map", "0:a", "-af", "ebur128=peak=true", "-f", "null", "-"]
    )
    err = proc.stderr.decode()
    lufs = float(re.findall(r"I:\s*(-?[\d.]+) LUFS", err)[-1])
    peak = float(re.findall(r"Peak:\s*(-?[\d.]+) dBFS", err)[-1])
    assert lufs == pytest.approx(-14.0, abs=1.0)
    assert peak <= -1.0
    pcm = decode_audio(res.video_path).mean(axis=1)
    sr = 48_000

    def rms_db(a: float, b: float) -> float:
        seg = pcm[int(a * sr) : int(b * sr)]
        return 20 * math.log10(float(np.sqrt(np.mean(seg**2))) + 1e-12)

    assert rms_db(0.5, 2.4) > -30 and rms_db(6.5, 8.0) > -30  # music, not silence
    # the voice line is in the final audio: correlate with the spoken samples
    t = engine.template("lunar-new-year").template
    seg = engine.shared(engine.template("lunar-new-year"), Locale.ZH_HANT_HK, engine._variant(t, None, None))
    speech, _ = engine._voice(t, Locale.ZH_HANT_HK, NAMES[Locale.ZH_HANT_HK], seg)
    assert speech is not None
    v = speech.samples.astype(np.float64)
    start = int(t.audio.voice.start * sr)  # type: ignore[union-attr]
    window = pcm[start - 4096 : start + v.size + 4096]
    corr = np.correlate(window, v, mode="valid")
    norm = np.sqrt(np.sum(v**2)) * np.sqrt(np.convolve(window**2, np.ones(v.size), mode="valid"))
    assert float(np.max(corr / np.maximum(norm, 1e-9))) > 0.3  # music alone: ~0.02
    assert rms_db(2.8, 5.5) > rms_db(6.5, 8.0) - 3  # voice over ducked music is not quieter


def test_no_glitch_at_segment_joins(
    engine: TemplateRenderer, clips: dict[tuple[str, Locale], RenderResult]
) -> None:
    """The soundtrack is one continuous pass: around each video join the decoded audio
    matches the mix exactly as well as it does elsewhere (no gap, no click)."""
    res = clips[("mid-autumn", Locale.EN)]
    lt = engine.template("mid-autumn")
    t = lt.template
    seg = engine.shared(lt, Locale.EN, engine._variant(t, None, None))
    speech, _ = engine._voice(t, Locale.EN, NAMES[Locale.EN], seg)
    mixed = audio_mod.mix(
        np.load(seg.bed),
        speech.samples if speech else None,
        t.audio.voice.start,  # type: ignore[union-attr]
        list(speech.spans) if speech else [],
        t.audio,
    ).samples.mean(axis=1)
    pcm = decode_audio(res.video_path).mean(axis=1)
    sr = 48_000
    n = min(pcm.size, mixed.size)
    lag = int(np.argmax([np.dot(pcm[sr : 2 * sr], mixed[sr - k : 2 * sr - k]) for k in range(-64, 65)])) - 64
    assert abs(lag) <= 64

    def match(at: float) -> float:
        a = int(at * sr)
        x, y = pcm[a - 1200 : a + 1200], mixed[a - 1200 - lag : a + 1200 - lag]
        return float(np.dot(x, y) / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))

    for join in (seg.p0, seg.p1):
        assert join * sr < n
        assert match(join) > 0.97
    d = np.abs(np.diff(pcm))
    for join in (seg.p0, seg.p1):
        a = int(join * sr)
        assert d[a - 480 : a + 480].max() <= d.max()  # trivially bounded; and
        assert d[a - 480 : a + 480].max() < 8 * np.percentile(d, 99.9)


def test_segments_are_rendered_once_and_joined_by_stream_copy(
    engine: TemplateRenderer, tmp_path: Path
) -> None:
    lt = engine.template("lunar-new-year")
    var = engine._variant(lt.template, None, None)
    seg = engine.shared(lt, Locale.ZH_HANS_CN, var)
    meta = (seg.dir / "meta.json").read_text()
    assert seg.intro and seg.outro and seg.plate.stat().st_size == (seg.n1 - seg.n0) * W * H * 3 // 2
    # identical SPS/PPS: the concat demuxer may join them with stream copy
    a = engine.render(request("lunar-new-year", Locale.ZH_HANS_CN, "张伟", "a"), tmp_path, stem="a")
    b = engine.render(request("lunar-new-year", Locale.ZH_HANS_CN, "刘洋", "b"), tmp_path, stem="b")
    assert a.segments_key == b.segments_key == seg.key
    assert (seg.dir / "meta.json").read_text() == meta  # not rebuilt
    assert a.timings["shared"] < 0.5
    sps = segment_parameter_sets(seg.intro)
    assert sps and segment_parameter_sets(seg.outro) == sps
    assert segment_parameter_sets(a.video_path) == sps

    def decoded(path: Path, start: int, count: int) -> str:
        proc = run_ffmpeg(
            [
                "-i",
                path,
                "-vf",
                f"trim=start_frame={start}:end_frame={start + count}",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "yuv420p",
                "-",
            ]
        )
        return hashlib.sha256(proc.stdout).hexdigest()

    # the shared parts of two recipients' clips are the very same frames...
    assert decoded(a.video_path, 0, seg.n0) == decoded(b.video_path, 0, seg.n0)
    assert decoded(a.video_path, seg.n1, 30) == decoded(b.video_path, seg.n1, 30)
    # ... and the personal window differs
    assert decoded(a.video_path, seg.n0 + 40, 5) != decoded(b.video_path, seg.n0 + 40, 5)


def test_variants_and_the_renderer_port(engine: TemplateRenderer, tmp_path: Path) -> None:
    for size in ((360, 360), (640, 360)):
        res = engine.render(request("season-greetings", Locale.EN), tmp_path, size=size, stem=f"v{size[0]}")
        info = probe(res.video_path)
        assert (info.width, info.height) == size
        assert res.name_box is not None
        x0, y0, x1, y1 = res.name_box
        area = safe_area(*size)
        assert area.x0 <= x0 < x1 <= area.x1 and area.y0 <= y0 < y1 <= area.y1
    clip = engine(request("mid-autumn", Locale.JA), tmp_path, None)
    assert isinstance(clip, RenderedClip)
    assert clip.captions_path is not None and clip.captions_path.suffix == ".vtt"
    assert clip.template == "mid-autumn@1" and clip.generator == "procedural-v1"
    assert (clip.width, clip.height) == (W, H)


def test_prewarm_builds_the_shared_segments(tmp_path: Path) -> None:
    r = TemplateRenderer(tmp_path / "cache", size=(W, H))
    r.prewarm(TemplateRef(name="mid-autumn"), Locale.ZH_HANS_CN)
    entries = [p for p in (tmp_path / "cache" / "segments").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "meta.json").is_file()
    r.prewarm(TemplateRef(name="mid-autumn"), Locale.ZH_HANS_CN)
    assert len([p for p in (tmp_path / "cache" / "segments").iterdir() if p.is_dir()]) == 1


def test_unknown_glyph_fails_before_encoding(engine: TemplateRenderer, tmp_path: Path) -> None:
    thai, code = name_without_font()
    with pytest.raises(FontNotFoundError, match=re.escape(code)):
        engine.render(request("lunar-new-year", Locale.EN, thai), tmp_path / "x")
    assert not list((tmp_path / "x").glob("*.mp4"))
    with pytest.raises(PermanentError, match="no template nope@1"):
        engine.render(request("nope", Locale.EN), tmp_path)


def test_full_size_clip_with_photo(tmp_path: Path) -> None:
    r = TemplateRenderer(tmp_path / "cache")
    req = request("lunar-new-year", Locale.ZH_HANT_HK)
    req = req.model_copy(
        update={
            "recipient": Recipient(
                id="r1",
                name="陳大文",
                locale=Locale.ZH_HANT_HK,
                photo_key="p/grace.jpg",
                subjects=(SubjectUse(subject_id="grace", scopes=frozenset({Scope.FACE})),),
            )
        }
    )
    res = r.render(req, tmp_path, photo=grace_hopper())
    info = probe(res.video_path)
    assert (info.width, info.height, info.profile, info.pix_fmt) == (1080, 1920, "High", "yuv420p")
    assert res.name_box is not None and res.photo_box is not None
    area = safe_area(1080, 1920)
    x0, y0, x1, y1 = res.name_box
    assert area.x0 <= x0 < x1 <= area.x1 and area.y0 <= y0 < y1 <= area.y1
    f = frame(res.video_path, 4.5, tmp_path)
    px0, py0, px1, py1 = res.photo_box
    assert face_center(Image.fromarray(f[py0:py1, px0:px1].astype(np.uint8))) is not None
