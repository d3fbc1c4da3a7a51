"""The simple renderer makes a real, platform-ready MP4 with a visible name and music."""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.render.fonts import (
    FontNotFoundError,
    find_font_face,
    installed_faces,
    missing_glyphs_everywhere,
)
from pipeline.render.media import (
    RenderError,
    audio_stats,
    extract_frame,
    has_faststart,
    mp4_top_level_boxes,
    parse_ffmpeg_info,
    probe,
    run_ffmpeg,
)
from pipeline.render.simple import (
    GREETING_LINES,
    RenderOutput,
    fit_text,
    greeting_text,
    music_bed,
    render_greeting,
    safe_area,
    split_two,
    text_layer,
)
from schemas.brief import Recipient, TemplateRef
from schemas.common import Locale
from schemas.events import RenderRequested
from tests.fonts_util import name_without_font

DURATION = 6.0


def _request(name: str, locale: Locale, recipient_id: str = "r1") -> RenderRequested:
    return RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="lny-2026",
        recipient=Recipient(id=recipient_id, name=name, locale=locale),
        template=TemplateRef(name="lny-classic"),
        locale=locale,
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RenderOutput]:
    out = tmp_path_factory.mktemp("clips")
    return {
        "zh": render_greeting(_request("陳大文", Locale.ZH_HANT_HK), out, duration_s=DURATION),
        "en": render_greeting(_request("Alice", Locale.EN, "r2"), out, duration_s=DURATION),
    }


def _frame(path: Path, t: float, tmp_path: Path) -> np.ndarray:
    png = extract_frame(path, t, tmp_path / f"frame_{t:.2f}.png")
    with Image.open(png) as im:
        return np.asarray(im.convert("RGB")).astype(np.int32)


def _gold_fraction(region: np.ndarray) -> float:
    r, g, b = region[..., 0], region[..., 1], region[..., 2]
    return float(((r > 200) & (g > 140) & (b < 150) & (r - b > 80)).mean())


@pytest.mark.parametrize("key", ["zh", "en"])
def test_clip_is_platform_ready_mp4(clips: dict[str, RenderOutput], key: str) -> None:
    clip = clips[key]
    info = probe(clip.video_path)
    assert info.video_codec == "h264"
    assert info.profile == "High"
    assert info.pix_fmt == "yuv420p"
    assert (info.width, info.height) == (1080, 1920) == (clip.width, clip.height)
    assert info.fps == pytest.approx(30.0)
    assert info.audio_codec == "aac"
    assert info.audio_sample_rate == 48_000
    assert info.audio_channels == 2
    assert info.has_faststart is True
    assert abs(info.duration_s - DURATION) <= 0.2
    assert abs(clip.duration_s - DURATION) <= 0.2
    assert clip.sha256 == hashlib.sha256(clip.video_path.read_bytes()).hexdigest()
    assert clip.video_path.name == clip.video_path.stem + ".mp4"
    with Image.open(clip.poster_path) as poster:
        assert poster.format == "JPEG"
        assert poster.size == (1080, 1920)


@pytest.mark.parametrize("key", ["zh", "en"])
def test_frame_shows_gold_name_over_a_festive_background(
    clips: dict[str, RenderOutput], key: str, tmp_path: Path
) -> None:
    clip = clips[key]
    frame = _frame(clip.video_path, 3.0, tmp_path)
    assert frame.shape == (1920, 1080, 3)
    assert frame.std() > 25, "frame is (nearly) a flat colour"

    x0, y0, x1, y1 = clip.name_box
    area = safe_area(1080, 1920)
    assert area.x0 <= x0 < x1 <= area.x1 and area.y0 <= y0 < y1 <= area.y1
    name = frame[y0:y1, x0:x1]
    above = frame[y0 - (y1 - y0) - 30 : y0 - 30, x0:x1]  # plain background above the name
    assert _gold_fraction(name) > 0.15
    assert _gold_fraction(above) < 0.02
    assert np.abs(name.mean(axis=(0, 1)) - above.mean(axis=(0, 1))).max() > 30
    # the background is red, not grey
    r, g, b = above.mean(axis=(0, 1))
    assert r > 1.8 * g and r > 1.8 * b


def test_ai_label_is_visible_from_the_first_frame(clips: dict[str, RenderOutput], tmp_path: Path) -> None:
    frame = _frame(clips["zh"].video_path, 0.0, tmp_path)
    area = safe_area(1080, 1920)
    label = frame[area.y0 : area.y0 + 90, area.x0 : area.x0 + 420]
    light = label.min(axis=2) > 200  # near-white label text on the dark pill
    assert light.mean() > 0.01
    above = frame[: area.y0, : area.x0 + 420]
    assert (above.min(axis=2) > 200).mean() < light.mean() / 4  # it sits inside the safe area


@pytest.mark.parametrize("key", ["zh", "en"])
def test_music_bed_is_audible_and_not_clipping(clips: dict[str, RenderOutput], key: str) -> None:
    stats = audio_stats(clips[key].video_path)
    assert stats.rms_dbfs > -40.0
    assert stats.peak_dbfs <= -0.9


def test_text_animates_in(clips: dict[str, RenderOutput], tmp_path: Path) -> None:
    clip = clips["en"]
    x0, y0, x1, y1 = clip.name_box
    start = _frame(clip.video_path, 0.0, tmp_path)[y0:y1, x0:x1]
    later = _frame(clip.video_path, 3.0, tmp_path)[y0:y1, x0:x1]
    assert _gold_fraction(start) < _gold_fraction(later) / 3


def test_render_is_deterministic_and_honours_size(tmp_path: Path) -> None:
    req = _request("陳大文", Locale.ZH_HANT_HK)
    a = render_greeting(req, tmp_path / "a", width=270, height=480, fps=24, duration_s=2.0)
    b = render_greeting(req, tmp_path / "b", width=270, height=480, fps=24, duration_s=2.0)
    assert a.sha256 == b.sha256
    info = probe(a.video_path)
    assert (info.width, info.height, info.fps) == (270, 480, 24.0)
    assert abs(info.duration_s - 2.0) <= 0.2
    assert a.video_path.name == f"{req.job_id}.mp4"
    assert a.poster_path.name == f"{req.job_id}.jpg"
    # no temporary files are left behind
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        [a.video_path.name, a.poster_path.name]
    )


def test_name_without_any_font_fails_before_encoding(tmp_path: Path) -> None:
    thai, code = name_without_font()
    with pytest.raises(FontNotFoundError) as exc:
        render_greeting(_request(thai, Locale.EN), tmp_path)
    assert code in str(exc.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- layout, no encode


@pytest.mark.parametrize(
    ("name", "locale"),
    [
        ("陳大文", Locale.ZH_HANT_HK),
        ("歐陽諸葛司馬上官慕容夏侯長孫端木皇甫東方令狐西門公孫尉遲", Locale.ZH_HANT_HK),
        ("Maximilian Alexander von Hohenstein-Berg", Locale.EN),
        ("W" * 40, Locale.EN),
        ("山田 花子", Locale.JA),
        ("陈大文", Locale.ZH_HANS_CN),
    ],
)
def test_text_stays_in_the_safe_area(name: str, locale: Locale) -> None:
    layer = text_layer(name, locale, 1080, 1920)
    area = safe_area(1080, 1920)
    assert area.y0 >= 192 and area.y1 <= 1536  # clear of the top 10 % and bottom 20 %
    for box in (layer.name_box, layer.greeting_box):
        assert area.x0 <= box.x0 < box.x1 <= area.x1, box
        assert area.y0 <= box.y0 < box.y1 <= area.y1, box
    assert layer.name_box.y1 < layer.greeting_box.y0


def test_long_names_shrink_then_wrap() -> None:
    short = text_layer("陳大文", Locale.ZH_HANT_HK, 1080, 1920)
    longer = text_layer("歐陽諸葛司", Locale.ZH_HANT_HK, 1080, 1920)
    longest = text_layer("歐陽諸葛司馬上官慕容夏侯長孫端木皇甫", Locale.ZH_HANT_HK, 1080, 1920)
    assert short.name_lines == ("給 陳大文",)
    assert longer.name_lines == ("給 歐陽諸葛司",)
    assert longer.name_size < short.name_size
    assert longer.name_box.height < short.name_box.height
    assert len(longest.name_lines) == 2
    assert longest.name_size < longer.name_size
    for layer in (short, longer, longest):
        assert layer.name_box.width <= safe_area(1080, 1920).width


def test_fit_text_wraps_and_refuses_what_cannot_fit() -> None:
    face = find_font_face("To Alexandra Papadopoulou", Locale.EN)
    one = fit_text("To Bob", face, max_width=900, max_height=400, max_size=150, min_size=70)
    assert one.lines == ("To Bob",) and one.size == 150
    two = fit_text(
        "To Alexandra Papadopoulou", face, max_width=900, max_height=400, max_size=150, min_size=70
    )
    assert two.lines == ("To Alexandra", "Papadopoulou")
    with pytest.raises(RenderError):
        fit_text("W" * 40, face, max_width=100, max_height=50, max_size=150, min_size=70)


def test_split_two_balances_lines() -> None:
    assert split_two("給 歐陽諸葛司馬") == ("給 歐陽", "諸葛司馬")
    assert split_two("To Maximilian Alexander von Hohenstein") == (
        "To Maximilian Alexander",
        "von Hohenstein",
    )


def test_greetings_per_locale() -> None:
    assert greeting_text(Locale.ZH_HANT_HK) == "新年快樂 恭喜發財"
    assert greeting_text(Locale.ZH_HANS_CN) == "新年快乐 恭喜发财"
    assert greeting_text(Locale.EN) == "Happy Lunar New Year"
    assert greeting_text(Locale.JA) == "あけましておめでとう"
    for locale in Locale:
        on_screen = "".join(GREETING_LINES[locale]).replace(" ", "")
        assert on_screen == greeting_text(locale).replace(" ", "")


def test_music_bed_levels() -> None:
    bed = music_bed(6.0, peak_dbfs=-3.0)
    assert bed.shape == (288_000, 2)
    assert np.abs(bed).max() == pytest.approx(10 ** (-3 / 20), rel=1e-6)
    rms = float(np.sqrt(np.mean(bed**2)))
    assert 20 * np.log10(rms) > -30
    assert np.abs(bed[:10]).max() < 0.05 and np.abs(bed[-10:]).max() < 0.01  # no clicks


# --------------------------------------------------------------------------- media helpers


def test_parse_ffmpeg_info() -> None:
    stderr = """Input #0, mov,mp4,m4a,3gp,3g2,mj2, from 'x.mp4':
  Duration: 00:00:06.02, start: 0.000000, bitrate: 1290 kb/s
  Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709, progressive), 1080x1920 [SAR 1:1 DAR 9:16], 1151 kb/s, 30 fps, 30 tbr, 15360 tbn (default)
  Stream #0:1[0x2](und): Audio: aac (LC) (mp4a / 0x6134706D), 48000 Hz, stereo, fltp, 130 kb/s (default)
"""  # noqa: E501
    info = parse_ffmpeg_info(stderr, has_faststart=True)
    assert info.duration_s == pytest.approx(6.02)
    assert (info.video_codec, info.profile, info.pix_fmt) == ("h264", "High", "yuv420p")
    assert (info.width, info.height, info.fps) == (1080, 1920, 30.0)
    assert (info.audio_codec, info.audio_sample_rate, info.audio_channels) == ("aac", 48000, 2)


def test_faststart_box_order(clips: dict[str, RenderOutput], tmp_path: Path) -> None:
    boxes = mp4_top_level_boxes(clips["en"].video_path)
    assert boxes.index("moov") < boxes.index("mdat")
    slow = tmp_path / "slow.mp4"
    run_ffmpeg(["-y", "-i", clips["en"].video_path, "-c", "copy", slow])
    assert has_faststart(slow) is False
    assert probe(slow).has_faststart is False


def test_run_ffmpeg_error_has_stderr_tail(tmp_path: Path) -> None:
    with pytest.raises(RenderError) as exc:
        run_ffmpeg(["-i", tmp_path / "nope.mp4", tmp_path / "out.mp4"])
    assert "nope.mp4" in str(exc.value)
    assert "exited with" in str(exc.value)
    with pytest.raises(RenderError):
        probe(tmp_path / "nope.mp4")
