"""`greetflow bench render`: the render-once engine against the naive way and the floor.

In ONE run, for N recipients of the lunar-new-year template:

- engine: `TemplateRenderer.render` per recipient, shared segments prewarmed (as the
  campaign DAG does); the cold build of the shared segments is reported separately;
- naive: moviepy 2.2.1 compositing the WHOLE clip per recipient from the same layer
  stills (the shared stills are drawn once, untimed, which flatters the naive way), with
  the same audio mix and the same x264 settings;
- floor: a bare ffmpeg encode of just the personalized frames (decoded beforehand to raw
  yuv420p, untimed), with the same x264 settings.

The last line printed is JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.render import audio as audio_mod
from pipeline.render.compose import Still
from pipeline.render.engine import BT709_PARAMS, TemplateRenderer
from pipeline.render.media import run_ffmpeg, x264_args
from schemas.brief import Recipient, TemplateRef
from schemas.common import Locale
from schemas.events import RenderRequested

NAMES: tuple[tuple[str, Locale], ...] = (
    ("陳大文", Locale.ZH_HANT_HK),
    ("李小明", Locale.ZH_HANS_CN),
    ("Alice Wong", Locale.EN),
    ("黃小玲", Locale.ZH_HANT_HK),
    ("张伟", Locale.ZH_HANS_CN),
    ("Ben Carter", Locale.EN),
    ("何嘉欣", Locale.ZH_HANT_HK),
    ("刘洋", Locale.ZH_HANS_CN),
)


def sample_photo() -> Path | None:
    try:
        from matplotlib import cbook

        return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (ImportError, OSError):
        return None


def _requests(n: int, template: str) -> list[RenderRequested]:
    out = []
    for i in range(n):
        name, loc = NAMES[i % len(NAMES)]
        out.append(
            RenderRequested(
                job_id=uuid.uuid5(uuid.NAMESPACE_URL, f"bench/{i}"),
                campaign_id="bench",
                recipient=Recipient(id=f"r{i}", name=name, locale=loc),
                template=TemplateRef(name=template),
                locale=loc,
            )
        )
    return out


def naive_render(
    engine: TemplateRenderer,
    req: RenderRequested,
    photo: Path | None,
    out: Path,
    shared_cache: dict[Locale, tuple[Still, list[Still]]],
) -> Path:
    """The whole clip composited frame by frame by moviepy, then encoded."""
    from moviepy import CompositeVideoClip, ImageClip, vfx
    from moviepy.audio.AudioClip import AudioArrayClip

    lt = engine.template(req.template)
    t = lt.template
    var = engine._variant(t, None, None)
    base, shared = shared_cache[req.locale]
    seg = engine.shared(lt, req.locale, var)
    speech, cues = engine._voice(t, req.locale, req.recipient.name, seg)
    personal, *_ = engine._personal_stills(lt, req.locale, var, req.recipient.name, photo, cues)
    d = t.duration_s
    label = shared[-1]
    layers = shared[:-1] + personal + [label]

    def clip_of(s: Still) -> Any:
        c = ImageClip(s.image, transparent=s.alpha).with_start(s.start)
        c = c.with_duration((s.end if s.end is not None else d) - s.start)
        if s.x_at is not None or s.y_at is not None:
            c = c.with_position(lambda tt, s=s: s.position_at(tt + s.start))
        else:
            c = c.with_position((s.x, s.y))
        fx = []
        if s.fade_in > 0:
            fx.append(vfx.CrossFadeIn(s.fade_in))
        if s.fade_out > 0:
            fx.append(vfx.CrossFadeOut(s.fade_out))
        return c.with_effects(fx) if fx else c

    bg = ImageClip(base.image).with_duration(d)
    y_at = base.y_at
    if y_at is not None:
        bg = bg.with_position(lambda tt: (0, -round(y_at(tt))))
    video = CompositeVideoClip([bg, *(clip_of(s) for s in layers)], size=(var.width, var.height))
    video = video.with_duration(d)
    bed = np.load(seg.bed)
    voice_start = t.audio.voice.start if t.audio.voice is not None else 0.0
    mixed = audio_mod.mix(
        bed, speech.samples if speech else None, voice_start, list(speech.spans) if speech else [], t.audio
    )
    video = video.with_audio(AudioArrayClip(mixed.samples.astype(np.float32), fps=audio_mod.SAMPLE_RATE))
    x264 = x264_args(var.fps, engine.threads)
    params = x264[x264.index("-profile:v") :]
    params = [p for p in params if p not in ("-pix_fmt", "yuv420p")]
    video.write_videofile(
        str(out),
        fps=var.fps,
        codec="libx264",
        preset="veryfast",
        audio_codec="aac",
        audio_fps=audio_mod.SAMPLE_RATE,
        audio_bitrate="160k",
        ffmpeg_params=[*params, "-movflags", "+faststart"],
        pixel_format="yuv420p",
        threads=engine.threads or None,
        # moviepy writes its temporary audio track into the current directory by default.
        temp_audiofile_path=str(out.parent),
        logger=None,
    )
    video.close()
    return out


def floor_encode(engine: TemplateRenderer, req: RenderRequested, photo: Path | None, work: Path) -> float:
    """Seconds to encode just this recipient's personalized frames: the exact frames the
    engine composites (written as raw yuv420p beforehand, untimed), same x264 settings."""
    lt = engine.template(req.template)
    var = engine._variant(lt.template, None, None)
    seg = engine.shared(lt, req.locale, var)
    _, cues = engine._voice(lt.template, req.locale, req.recipient.name, seg)
    stills, *_ = engine._personal_stills(lt, req.locale, var, req.recipient.name, photo, cues)
    raw = work / "floor.yuv"
    engine._encode_personal(seg, stills, raw, None, 0.0, raw=True)
    n = seg.n1 - seg.n0
    t0 = time.perf_counter()
    run_ffmpeg(
        [
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-s",
            var.size,
            "-framerate",
            str(var.fps),
            "-i",
            raw,
            "-vf",
            BT709_PARAMS,
            "-frames:v",
            str(n),
            "-r",
            str(var.fps),
            *x264_args(var.fps, engine.threads),
            "-an",
            work / "floor.mp4",
        ],
        timeout=300,
    )
    dt = time.perf_counter() - t0
    raw.unlink(missing_ok=True)
    return dt


def run_bench(
    recipients: int,
    *,
    template: str = "lunar-new-year",
    naive_count: int | None = None,
    photo: bool = True,
    threads: int = 0,
    size: tuple[int, int] | None = None,
    work_dir: Path | None = None,
    say: Any = print,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="greetflow-bench-", dir=work_dir))
    try:
        engine = TemplateRenderer(root / "cache", threads=threads, size=size)
        reqs = _requests(recipients, template)
        pic = sample_photo() if photo else None
        lt = engine.template(template)
        var = engine._variant(lt.template, None, None)
        locales = sorted({r.locale for r in reqs}, key=lambda x: x.value)
        t0 = time.perf_counter()
        for loc in locales:
            engine.prewarm(TemplateRef(name=template), loc)
        shared_s = time.perf_counter() - t0
        say(f"shared segments for {len(locales)} locales built in {shared_s:.2f} s ({var.size}@{var.fps})")

        # one untimed render loads what a worker loads once (fonts, eSpeak data, face detector)
        engine.render(_requests(1, template)[0], root / "warmup", photo=pic, stem="warmup")
        engine_times: list[float] = []
        floors: list[float] = []
        clips: list[Path] = []
        # engine and floor interleaved per recipient, so that other load on the machine
        # weighs on both alike
        for i, req in enumerate(reqs):
            t1 = time.perf_counter()
            res = engine.render(req, root / "engine", photo=pic, stem=f"clip{i}")
            engine_times.append(time.perf_counter() - t1)
            clips.append(res.video_path)
            floors.append(floor_encode(engine, req, pic, root))
        say(
            f"engine: {statistics.mean(engine_times):.3f} s/clip over {recipients}; "
            f"floor: {statistics.mean(floors):.3f} s/clip"
        )

        k = recipients if naive_count is None else max(1, min(recipients, naive_count))
        naive_times: list[float] = []
        shared_cache = {loc: engine._shared_stills(lt, loc, var) for loc in locales}
        (root / "naive").mkdir()
        for i, req in enumerate(reqs[:k]):
            t1 = time.perf_counter()
            naive_render(engine, req, pic, root / "naive" / f"clip{i}.mp4", shared_cache)
            naive_times.append(time.perf_counter() - t1)
            say(f"naive clip {i + 1}/{k}: {naive_times[-1]:.2f} s")
        eng = statistics.mean(engine_times)
        flo = statistics.mean(floors)
        nai = statistics.mean(naive_times)
        return {
            "template": template,
            "recipients": recipients,
            "size": var.size,
            "fps": var.fps,
            "clip_seconds": lt.template.duration_s,
            "personal_seconds": round((lt.template.personal.end - lt.template.personal.start), 3),
            "photo": pic is not None,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "engine_s_per_clip": round(eng, 4),
            "engine_s_per_clip_median": round(statistics.median(engine_times), 4),
            "encode_floor_s_per_clip_median": round(statistics.median(floors), 4),
            "engine_s_per_clip_incl_shared_build": round(eng + shared_s / recipients, 4),
            "shared_build_s": round(shared_s, 3),
            "naive_s_per_clip": round(nai, 4),
            "naive_clips": k,
            "encode_floor_s_per_clip": round(flo, 4),
            "speedup_vs_naive": round(nai / eng, 2),
            "cost_vs_encode_floor": round(eng / flo, 3),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipients", type=int, default=20)
    p.add_argument("--naive", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = run_bench(a.recipients, naive_count=a.naive)
    print(json.dumps(result, ensure_ascii=False))
    return 0
