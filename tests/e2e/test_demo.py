"""`greetflow demo` as a new user runs it: a real process, a private stack, real clips."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.render.media import probe

pytestmark = pytest.mark.e2e


def test_demo_publishes_and_downloads_three_clips(tmp_path: Path) -> None:
    out = tmp_path / "clips"
    env = dict(os.environ, GREETFLOW_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--recipients", "3", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "published" in proc.stdout
    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == 3, proc.stdout
    for clip in clips:
        info = probe(clip)
        assert (info.video_codec, info.width, info.height) == ("h264", 1080, 1920)
        assert info.audio_codec == "aac"
        assert info.has_faststart
        captions = clip.with_suffix(".vtt").read_text(encoding="utf-8")
        assert captions.startswith("WEBVTT") and "-->" in captions
    # The clips verify with the default settings of the same data dir (its dev CA).
    verify = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "verify", str(clips[0]), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert verify.returncode == 0, verify.stdout[-4000:] + verify.stderr[-4000:]
    report = json.loads(verify.stdout)
    assert report["ok"] and report["c2pa"]["validation_state"] == "Trusted"
    # The stack is gone: nothing listens any more on the ports this run's servers used.
    ports = [int(p) for p in re.findall(r"on 127\.0\.0\.1:(\d+) \.\.\.", proc.stdout)]
    assert len(ports) == 2, proc.stdout
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open after the demo"
