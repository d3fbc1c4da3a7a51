"""ffmpeg plumbing: stream info, faststart, errors, encoder settings and raw frame input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.render.media import (
    RenderError,
    aac_args,
    has_faststart,
    mp4_top_level_boxes,
    parse_ffmpeg_info,
    probe,
    raw_input_args,
    run_ffmpeg,
    write_raw_frame,
    x264_args,
)
from tests.clips import frame, still_clip


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


def test_faststart_box_order(tmp_path: Path) -> None:
    clip = still_clip(tmp_path / "fast.mp4", frame(180, 320), 1.0)
    boxes = mp4_top_level_boxes(clip)
    assert boxes.index("moov") < boxes.index("mdat")
    slow = tmp_path / "slow.mp4"
    run_ffmpeg(["-y", "-i", clip, "-c", "copy", slow])
    assert has_faststart(slow) is False
    assert probe(slow).has_faststart is False


def test_run_ffmpeg_error_has_stderr_tail(tmp_path: Path) -> None:
    with pytest.raises(RenderError) as exc:
        run_ffmpeg(["-i", tmp_path / "nope.mp4", tmp_path / "out.mp4"])
    assert "nope.mp4" in str(exc.value)
    assert "exited with" in str(exc.value)
    with pytest.raises(RenderError):
        probe(tmp_path / "nope.mp4")


def test_encoder_settings_make_joinable_h264_and_stereo_aac(tmp_path: Path) -> None:
    args = x264_args(30)
    assert args[args.index("-g") + 1] == "60" and args[args.index("-sc_threshold") + 1] == "0"
    assert "-threads" not in args and x264_args(30, 2)[-2:] == ["-threads", "2"]
    out = tmp_path / "enc.mp4"
    sources = [
        "-f",
        "lavfi",
        "-i",
        "color=c=red:s=64x64:r=30:d=0.5",
        "-f",
        "lavfi",
        "-i",
        "sine=r=44100:d=0.5",
    ]
    run_ffmpeg(["-y", *sources, *x264_args(30), *aac_args(48_000), "-shortest", out])
    info = probe(out)
    assert (info.video_codec, info.profile, info.pix_fmt) == ("h264", "High", "yuv420p")
    assert (info.audio_codec, info.audio_sample_rate, info.audio_channels) == ("aac", 48_000, 2)


def test_raw_frame_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    raw = write_raw_frame(tmp_path / "f.rgb", rgb)
    assert raw.stat().st_size == rgb.size
    png = tmp_path / "f.png"
    run_ffmpeg(["-y", *raw_input_args(raw, 32, 24, "rgb24", 30), "-frames:v", "1", png])
    with Image.open(png) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), rgb)
