"""The designer commands and the worker wiring use the same engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.bootstrap import default_renderer
from pipeline.cli import main
from pipeline.render.engine import TemplateRenderer
from pipeline.render.generate import make_generator
from pipeline.render.media import probe
from pipeline.settings import Settings, get_settings
from schemas.brief import TemplateRef
from schemas.common import Locale
from tests.integration.test_render_engine import grace_hopper, request


@pytest.fixture
def settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GREETFLOW_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_render_command(settings_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = settings_env / "clip.mp4"
    rc = main(
        [
            "render",
            "--template",
            "lunar-new-year",
            "--locale",
            "zh-Hant-HK",
            "--name",
            "陳大文",
            "--photo",
            str(grace_hopper()),
            "--size",
            "360x640",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "LUFS" in text and "captions" in text
    info = probe(out)
    assert (info.width, info.height, info.video_codec) == (360, 640, "h264")
    assert out.with_suffix(".jpg").is_file() and out.with_suffix(".vtt").is_file()
    assert (settings_env / "data" / "render-cache" / "segments").is_dir()


def test_preview_command(settings_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = settings_env / "preview"
    assert (
        main(["template", "preview", "mid-autumn", "--locale", "ja", "--out", str(out), "--size", "360x640"])
        == 0
    )
    printed = capsys.readouterr().out.split()
    pngs = sorted(out.glob("mid-autumn-ja-*s.png"))
    assert len(pngs) == 4
    sheet = out / "mid-autumn-ja-contact-sheet.png"
    assert str(sheet) in printed
    with Image.open(sheet) as im:
        assert im.width > 4 * 360 and np.asarray(im).std() > 10


def test_worker_renderer_is_the_template_engine(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, render_width=360, render_height=640)
    r = default_renderer(s)
    assert isinstance(r, TemplateRenderer)
    assert callable(getattr(r, "prewarm", None))
    r.prewarm(TemplateRef(name="lunar-new-year", version="1"), Locale.EN)
    clip = r(request("lunar-new-year", Locale.EN), tmp_path / "out", None)
    assert (clip.width, clip.height) == (360, 640) and clip.captions_path is not None
    assert r.cache_dir == tmp_path / "render-cache"


def test_engine_with_a_diffusers_background(tmp_path: Path) -> None:
    from tests.unit.tiny_diffusers import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "model")
    gen = make_generator("diffusers", model_dir=model, device="cpu", cache_dir=tmp_path / "gen")
    r = TemplateRenderer(tmp_path / "cache", generator=gen, size=(360, 640))
    res = r.render(request("season-greetings", Locale.EN), tmp_path / "out")
    assert probe(res.video_path).video_codec == "h264"
    assert len(list((tmp_path / "gen").rglob("*.png"))) == 1  # one background, cached by content hash
    r2 = TemplateRenderer(tmp_path / "cache2", generator=gen, size=(360, 640))
    r2.render(request("season-greetings", Locale.EN), tmp_path / "out2")
    assert len(list((tmp_path / "gen").rglob("*.png"))) == 1
