"""`greetflow bench render`: the render-once engine against the naive way and the floor.

In ONE run, for N recipients of the lunar-new-year template:

- engine: `TemplateRenderer.render` per recipient, shared segments prewarmed (as the
  campaign DAG does); the cold build of the shared segments is reported separately;
- naive: moviepy 2.2.1 compositing the WHOLE clip per recipient from the same layer
  stills (the shared stills are drawn once, untimed, which flatters the naive way), with
  the same audio mix and the same x264 settings;
- floor: a bare ffmpeg encode of just the personalized frames (composited beforehand to
  raw yuv420p, untimed), with the same x264 settings and the same encode plan (the chunks
  the engine splits the personal segment into, encoded side by side);
- quality guard: the personal segment of a sample of the engine's clips against a
  `-preset slow` reference encode (same CRF) of the same raw frames, SSIM on luma.

Recipients get distinct names (no personal segment is reused) unless `dedup_s` is given:
then names are drawn from a Zipf distribution with exponent s over 5,000 names, and a
repeated name reuses its personal segment.

The last line printed is JSON.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.render import audio as audio_mod
from pipeline.render.compose import Still
from pipeline.render.engine import BT709_PARAMS, TemplateRenderer, encode_chunks
from pipeline.render.media import available_cpus, run_ffmpeg, x264_args
from pipeline.settings import get_settings
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


# Parts of the 5,000 names the Zipf draw picks from: family and given names per script.
_HANT_FAMILY = "陳李黃張王林吳劉何楊梁鄭謝郭曾羅馮蔡鄧許"
_HANT_GIVEN = ("大文", "小玲", "嘉欣", "志明", "美玲", "家豪", "詠詩", "俊傑", "慧敏", "子軒",
               "海晴", "家樂", "淑儀", "偉強", "雅婷", "浩然", "曉彤", "國榮", "麗華", "建華")  # fmt: skip
_HANS_FAMILY = "李王张刘陈杨赵黄周吴徐孙胡朱高林何郭马罗"
_HANS_GIVEN = ("小明", "伟", "洋", "芳", "娜", "敏", "静", "磊", "军", "杰",
               "秀英", "丽", "强", "艳", "勇", "晨", "浩", "欣怡", "子涵", "雨轩")  # fmt: skip
_EN_GIVEN = ("Alice", "Ben", "Chloe", "David", "Emma", "Frank", "Grace", "Henry", "Ivy", "Jack",
             "Karen", "Leo", "Mia", "Noah", "Olivia", "Peter", "Quinn", "Ruby", "Sam", "Tina")  # fmt: skip
_EN_FAMILY = ("Wong", "Carter", "Chan", "Smith", "Lee", "Brown", "Ng", "Taylor", "Cheung", "Davis",
              "Lam", "Wilson", "Ho", "Clark", "Tsang", "Lewis", "Yip", "Walker", "Leung", "Hall")  # fmt: skip
_JA_FAMILY = ("山田", "佐藤", "鈴木", "高橋", "田中", "伊藤", "渡辺", "中村", "小林", "加藤")
_JA_GIVEN = ("花子", "太郎", "陽菜", "蓮", "結衣", "大翔", "さくら", "悠真", "美咲", "健太")


def name_pool(size: int = 5000) -> list[tuple[str, Locale]]:
    """`size` distinct (name, locale) pairs, interleaved across four scripts: the sample
    names first, then composed family + given names, then numbered ones."""
    pools: list[list[tuple[str, Locale]]] = [
        [(f + g, Locale.ZH_HANT_HK) for g in _HANT_GIVEN for f in _HANT_FAMILY],
        [(f + g, Locale.ZH_HANS_CN) for g in _HANS_GIVEN for f in _HANS_FAMILY],
        [(f"{g} {f}", Locale.EN) for f in _EN_FAMILY for g in _EN_GIVEN],
        [(f"{f} {g}", Locale.JA) for g in _JA_GIVEN for f in _JA_FAMILY],
    ]
    out: list[tuple[str, Locale]] = list(NAMES)
    seen = {n for n, _ in out}
    i = 0
    while len(out) < size and any(i < len(p) for p in pools):
        for p in pools:
            if i < len(p) and p[i][0] not in seen and len(out) < size:
                out.append(p[i])
                seen.add(p[i][0])
        i += 1
    k = 2
    while len(out) < size:  # numbered: "Alice Wong 2"
        for name, loc in list(out[: len(NAMES) * 4]):
            if len(out) < size:
                out.append((f"{name} {k}", loc))
        k += 1
    return out


def zipf_names(n: int, s: float, *, pool: int = 5000, seed: int = 2027) -> list[tuple[str, Locale]]:
    """n names drawn with replacement from `pool` names, rank r with probability ∝ r^-s
    (a seeded generator: the same draw every run)."""
    if s <= 0:
        raise ValueError(f"the Zipf exponent must be positive, not {s}")
    names = name_pool(pool)
    ranks = np.arange(1, len(names) + 1, dtype=np.float64)
    p = ranks**-s
    picks = np.random.default_rng(seed).choice(len(names), size=n, p=p / p.sum())
    return [names[int(i)] for i in picks]


def _requests(n: int, template: str, dedup_s: float | None = None) -> list[RenderRequested]:
    """n requests; distinct names (every personal segment differs) unless dedup_s is set."""
    names = zipf_names(n, dedup_s) if dedup_s is not None else name_pool(max(n, len(NAMES)))[:n]
    out = []
    for i, (name, loc) in enumerate(names):
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


def _raw_personal(engine: TemplateRenderer, req: RenderRequested, photo: Path | None, raw: Path) -> Any:
    """The exact personal frames the engine composites, as raw yuv420p; the segments and stills."""
    lt = engine.template(req.template)
    var = engine._variant(lt.template, None, None)
    seg = engine.shared(lt, req.locale, var)
    _, cues = engine._voice(lt.template, req.locale, req.recipient.name, seg)
    stills, *_ = engine._personal_stills(lt, req.locale, var, req.recipient.name, photo, cues)
    engine._encode_personal(seg, stills, raw, None, 0.0, raw=True)
    return seg, stills


def _encode_raw(raw: Path, seg: Any, a: int, b: int, x264: Sequence[str], out: Path) -> list[str]:
    var = seg.variant
    return [
        "-y",
        *(["-skip_initial_bytes", str(a * var.width * var.height * 3 // 2)] if a else []),
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-s",
        var.size,
        "-framerate",
        str(var.fps),
        "-i",
        str(raw),
        "-vf",
        BT709_PARAMS,
        "-frames:v",
        str(b - a),
        "-r",
        str(var.fps),
        *x264,
        "-an",
        str(out),
    ]


def floor_encode(
    engine: TemplateRenderer,
    req: RenderRequested,
    photo: Path | None,
    work: Path,
    *,
    reference: Path | None = None,
) -> float:
    """Seconds to encode just this recipient's personalized frames: the exact frames the
    engine composites (written as raw yuv420p beforehand, untimed), the same x264 settings
    and the same chunks encoded side by side. With `reference`, also (untimed) a
    `-preset slow` encode of the same frames for the quality guard."""
    raw = work / "floor.yuv"
    seg, stills = _raw_personal(engine, req, photo, raw)
    var = seg.variant
    n = seg.n1 - seg.n0
    jobs = engine.encode_jobs or available_cpus()
    chunks = encode_chunks(n, jobs, var.fps, stills, seg.p0)
    threads = (
        engine.threads if engine.threads > 0 else (0 if len(chunks) == 1 else max(1, jobs // len(chunks)))
    )
    cmds = [
        _encode_raw(raw, seg, a, b, x264_args(var.fps, threads), work / f"floor-{i}.mp4")
        for i, (a, b) in enumerate(chunks)
    ]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        for f in [pool.submit(run_ffmpeg, c, timeout=300) for c in cmds]:
            f.result()
    dt = time.perf_counter() - t0
    if reference is not None:
        slow = x264_args(var.fps, engine.threads)
        slow[slow.index("-preset") + 1] = "slow"
        run_ffmpeg(_encode_raw(raw, seg, 0, n, slow, reference), timeout=600)
    raw.unlink(missing_ok=True)
    return dt


def ssim_personal(clip: Path, reference: Path, n0: int, n1: int) -> float:
    """SSIM (luma) of a clip's personal frames [n0, n1) against the reference encode."""
    proc = run_ffmpeg(
        [
            "-i",
            str(clip),
            "-i",
            str(reference),
            "-lavfi",
            f"[0:v]trim=start_frame={n0}:end_frame={n1},setpts=PTS-STARTPTS[a];"
            "[1:v]setpts=PTS-STARTPTS[b];[a][b]ssim",
            "-f",
            "null",
            "-",
        ],
        timeout=300,
    )
    m = re.findall(r"SSIM Y:([\d.]+)", proc.stderr.decode("utf-8", "replace"))
    if not m:
        raise RuntimeError(f"ffmpeg printed no SSIM for {clip} against {reference}")
    return float(m[-1])


def run_bench(
    recipients: int,
    *,
    template: str = "lunar-new-year",
    naive_count: int | None = None,
    photo: bool = True,
    threads: int = 0,
    size: tuple[int, int] | None = None,
    dedup_s: float | None = None,
    ssim_samples: int = 3,
    work_dir: Path | None = None,
    say: Any = print,
) -> dict[str, Any]:
    if recipients < 1:
        raise ValueError(f"--recipients must be at least 1, not {recipients}")
    root = Path(tempfile.mkdtemp(prefix="greetflow-bench-", dir=work_dir))
    try:
        settings = get_settings()
        engine = TemplateRenderer(
            root / "cache",
            threads=threads,
            size=size,
            encode_jobs=settings.render_encode_jobs,
            dedup=settings.render_dedup,
            dedup_max_bytes=int(settings.render_dedup_max_gb * 2**30),
        )
        reqs = _requests(recipients, template, dedup_s)
        pic = sample_photo() if photo else None
        lt = engine.template(template)
        var = engine._variant(lt.template, None, None)
        locales = sorted({r.locale for r in reqs}, key=lambda x: x.value)
        t0 = time.perf_counter()
        for loc in locales:
            engine.prewarm(TemplateRef(name=template), loc)
        shared_s = time.perf_counter() - t0
        say(f"shared segments for {len(locales)} locales built in {shared_s:.2f} s ({var.size}@{var.fps})")

        # one untimed render loads what a worker loads once (fonts, eSpeak data, face
        # detector); its name is none of the recipients', so it seeds no reuse
        warm = _requests(1, template)[0].model_copy(
            update={
                "recipient": Recipient(id="warmup", name="Warm Up", locale=Locale.EN),
                "locale": Locale.EN,
            }
        )
        engine.render(warm, root / "warmup", photo=pic, stem="warmup")
        engine_times: list[float] = []
        floors: list[float] = []
        clips: list[Path] = []
        hits = 0
        ssims: list[float] = []
        sample_every = max(1, recipients // max(1, ssim_samples))
        # engine and floor interleaved per recipient, so that other load on the machine
        # weighs on both alike
        for i, req in enumerate(reqs):
            t1 = time.perf_counter()
            res = engine.render(req, root / "engine", photo=pic, stem=f"clip{i}")
            engine_times.append(time.perf_counter() - t1)
            hits += int(res.timings.get("dedup_hit", 0.0) > 0)
            clips.append(res.video_path)
            ref = root / "reference.mp4" if i % sample_every == 0 and len(ssims) < ssim_samples else None
            floors.append(floor_encode(engine, req, pic, root, reference=ref))
            if ref is not None:
                seg = engine.shared(lt, req.locale, var)
                ssims.append(ssim_personal(res.video_path, ref, seg.n0, seg.n1))
        say(
            f"engine: {statistics.mean(engine_times):.3f} s/clip over {recipients} "
            f"({hits} reused personal segments); floor: {statistics.mean(floors):.3f} s/clip; "
            f"SSIM of the personal segment vs a slow-preset encode: min {min(ssims):.4f}"
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
        n = lt.template
        jobs = engine.encode_jobs or available_cpus()
        return {
            "template": template,
            "recipients": recipients,
            "size": var.size,
            "fps": var.fps,
            "clip_seconds": n.duration_s,
            "personal_seconds": round((n.personal.end - n.personal.start), 3),
            "photo": pic is not None,
            "cpus": available_cpus(),
            "machine": platform.machine(),
            "encode_jobs": jobs,
            "x264": " ".join(x264_args(var.fps)),
            "clips_per_min": round(60.0 * recipients / sum(engine_times), 2),
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
            "ssim_personal": round(min(ssims), 4),
            "ssim_personal_mean": round(statistics.mean(ssims), 4),
            "ssim_samples": len(ssims),
            "dedup_zipf_s": dedup_s,
            "dedup_hits": hits,
            "distinct_personal_segments": len({(r.recipient.name, r.locale) for r in reqs}),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--recipients", type=int, default=20)
    p.add_argument("--naive", type=int, default=None)
    p.add_argument("--dedup-rate", type=float, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    result = run_bench(a.recipients, naive_count=a.naive, dedup_s=a.dedup_rate)
    print(json.dumps(result, ensure_ascii=False))
    return 0
