"""The template engine: render once, personalize a segment.

A clip is three segments: intro [0, p0), personal [p0, p1), outro [p1, D).

- Shared work, once per (template content, locale, variant, generator, encoder settings),
  keyed by a content hash and cached on disk (`<cache>/segments/<key>/`): the generated
  background, every shared layer, the intro and outro ENCODED (H.264, identical settings),
  the personal window's shared frames as a raw yuv420p "plate", and the music bed with
  its effects.
- Per recipient: draw the personal stills (name, photo, captions), speak the voice line,
  overlay the stills on the plate and encode ONLY the personal frames, in chunks encoded
  side by side (at most one per keyframe interval); join intro + chunks + outro with the
  concat demuxer and stream copy (every segment starts with an IDR frame and has closed
  GOPs); mix the whole soundtrack in one continuous pass (voice over the ducked bed,
  loudness normalized, true peak limited) and mux it with the joined video, encoding the
  audio once.
- An identical recipient (same name, locale, photo content, template and settings) reuses
  the encoded personal segment, its soundtrack and poster (`<cache>/personal/`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import metrics
from pipeline.adapters.storage import sha256_file
from pipeline.consent.rules import may_animate
from pipeline.errors import PermanentError
from pipeline.ports import RenderedClip
from pipeline.render import audio as audio_mod
from pipeline.render.audio import SAMPLE_RATE
from pipeline.render.compose import (
    Still,
    box_px,
    composite_at,
    draw_text,
    face_crop,
    framed_photo,
    hanging_cluster,
    label_still,
    load_photo,
    overlay_chain,
    particles_image,
    photo_still,
    size_scale,
    yuv420_frame_to_rgb,
)
from pipeline.render.draw import LANTERN_CHAR, safe_area
from pipeline.render.draw import Box as PixelBox
from pipeline.render.fonts import find_font_face
from pipeline.render.generate import Generator, GenRequest, ProceduralGenerator, cover
from pipeline.render.layout import VoiceDoesNotFit, fit_voice
from pipeline.render.media import (
    RenderError,
    aac_args,
    available_cpus,
    ffmpeg_exe,
    has_faststart,
    raw_input_args,
    run_ffmpeg,
    write_raw_frame,
    x264_args,
)
from pipeline.render.templates import (
    LoadedTemplate,
    TemplateError,
    drawn_texts,
    get_template,
    label_text,
    localized,
    merge_values,
    substitute,
)
from pipeline.render.tts import TTS, EspeakTTS, Speech, SpeechPart, voice_locale_for
from pipeline.render.video import Plate, VideoPlates, cycle_frames, decode_plate, fill_filter, plate_key
from pipeline.settings import Settings
from schemas.brief import Reference, TemplateRef
from schemas.common import Locale
from schemas.events import RenderRequested
from schemas.template import (
    BackgroundLayer,
    CaptionsLayer,
    GeneratedSource,
    GeneratedVideoSource,
    ImageSource,
    LabelLayer,
    LivingPhotoLayer,
    MusicFile,
    ParticlesLayer,
    PhotoLayer,
    StickerLayer,
    Template,
    TextLayer,
    VideoSource,
    merge_fields_in,
)

log = logging.getLogger(__name__)

ENGINE_VERSION = "1"
# The layout of a cached personal segment (`<cache>/personal/<xx>/<key>/`).
PERSONAL_VERSION = "1"
PERSONAL_PRUNE_EVERY = 64  # stores between two size checks of the personal-segment cache
SLIDE_S = 0.9  # text slides in over this long
BT709_PARAMS = "setparams=range=tv:colorspace=bt709:color_primaries=bt709:color_trc=bt709"


@dataclass(frozen=True)
class Variant:
    name: str
    width: int
    height: int
    fps: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def resolve_variant(
    t: Template, variant: str | None = None, size: tuple[int, int] | None = None, fps: int | None = None
) -> Variant:
    """A named variant of the template, or a custom size (scaled from the reference)."""
    rate = fps or t.canvas.fps
    if size is not None:
        w, h = size
        if w % 2 or h % 2 or w < 64 or h < 64:
            raise TemplateError(f"size {w}x{h} must be even and at least 64x64")
        for name, s in t.canvas.variants.items():
            if (s.width, s.height) == (w, h):
                return Variant(name, w, h, rate)
        return Variant(f"custom-{w}x{h}", w, h, rate)
    name = variant or t.canvas.default_variant
    if name not in t.canvas.variants:
        raise TemplateError(
            f"template {t.name} has no variant {name!r} (it has {', '.join(t.canvas.variants)})"
        )
    s = t.canvas.variants[name]
    return Variant(name, s.width, s.height, rate)


@dataclass(frozen=True)
class SharedSegments:
    """A cache entry: what every recipient of one (template, locale, variant) shares."""

    key: str
    dir: Path
    variant: Variant
    n_frames: int
    n0: int  # first personal frame
    n1: int  # first outro frame

    @property
    def intro(self) -> Path | None:
        p = self.dir / "intro.mp4"
        return p if self.n0 > 0 else None

    @property
    def outro(self) -> Path | None:
        p = self.dir / "outro.mp4"
        return p if self.n1 < self.n_frames else None

    @property
    def plate(self) -> Path:
        return self.dir / "plate.yuv"

    @property
    def bed(self) -> Path:
        return self.dir / "bed.npy"

    @property
    def p0(self) -> float:
        return self.n0 / self.variant.fps

    @property
    def p1(self) -> float:
        return self.n1 / self.variant.fps


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class RenderResult:
    video_path: Path
    poster_path: Path
    captions_path: Path | None
    sha256: str
    duration_s: float
    width: int
    height: int
    template: str
    locale: Locale
    variant: str
    cues: tuple[Cue, ...]
    name_box: tuple[int, int, int, int] | None
    photo_box: tuple[int, int, int, int] | None
    lufs: float
    true_peak_db: float
    timings: dict[str, float] = field(default_factory=dict)
    segments_key: str = ""
    # (layer id, text) of every personal text drawn, and the merge values substituted
    drawn_texts: tuple[tuple[str, str], ...] = ()
    merge_values: dict[str, str] = field(default_factory=dict)
    # models, parameters and plate keys of the generated visuals; reference assets
    generation: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _frames(t: float, fps: int) -> int:
    return round(t * fps)


def vtt_time(t: float) -> str:
    ms = round(t * 1000)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def write_vtt(path: Path, cues: Sequence[Cue]) -> Path:
    lines = ["WEBVTT", ""]
    for i, c in enumerate(cues, start=1):
        # a cue's text may not contain "-->" or a blank line
        text = "\n".join(ln for ln in c.text.replace("-->", "→").splitlines() if ln.strip())
        lines += [str(i), f"{vtt_time(c.start)} --> {vtt_time(c.end)}", text, ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


_SENTENCE_END = re.compile(r"(?<=[。！？!?])\s*|(?<=[.])\s+")
_LEADING_PUNCT = re.compile(r"^[\s、。，,.!！?？:：;；]+")


def speech_parts(voice_text: str, locale: Locale, name: str) -> list[tuple[SpeechPart, str]]:
    """(what to speak, what to show) pieces of a voice line: the merge fields are spoken by
    the voice that can read them, literal text is cut at sentence ends."""
    from schemas.template import ruby_text, split_merge

    out: list[tuple[SpeechPart, str]] = []
    values = merge_values(name)
    for piece, is_field in split_merge(voice_text):
        if is_field:
            val = values[piece]
            out.append((SpeechPart(val, voice_locale_for(val, locale)), val))
            continue
        lead = _LEADING_PUNCT.match(piece)
        if lead and out:
            sp, shown = out[-1]
            out[-1] = (sp, shown + lead.group(0).rstrip() + (" " if lead.group(0).endswith(" ") else ""))
            piece = piece[lead.end() :]
        for sentence in _SENTENCE_END.split(piece):
            if sentence.strip():
                spoken = ruby_text(sentence, locale, spoken=True).strip()
                out.append((SpeechPart(spoken, locale), ruby_text(sentence, locale, spoken=False)))
    return out


def _cells(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)


def make_cues(
    shown: Sequence[str],
    spans: Sequence[tuple[float, float]],
    start: float,
    end_limit: float,
    max_cells: int = 48,
) -> list[Cue]:
    """Group the spoken pieces into caption cues that follow the voice."""
    groups: list[tuple[str, float, float]] = []
    for text, (s, e) in zip(shown, spans, strict=True):
        if groups and _cells(groups[-1][0] + text) <= max_cells:
            g = groups[-1]
            groups[-1] = (g[0] + text, g[1], e)
        else:
            groups.append((text, s, e))
    cues: list[Cue] = []
    for i, (text, s, e) in enumerate(groups):
        nxt = groups[i + 1][1] + start if i + 1 < len(groups) else min(end_limit, e + start + 0.5)
        cues.append(Cue(round(s + start, 3), round(max(nxt, e + start), 3), text.strip()))
    return cues


# --------------------------------------------------------------------------- the engine


class TemplateRenderer:
    """Renders greeting clips from templates, sharing everything that can be shared.

    One instance per worker: it keeps the loaded generator (a diffusers model is loaded
    once) and the on-disk caches. It is the `Renderer` the render step calls, and it has
    `prewarm(template, locale)` so a campaign DAG can build the shared segments before
    the first recipient arrives.
    """

    def __init__(
        self,
        cache_dir: Path,
        *,
        generator: Generator | None = None,
        tts: TTS | None = None,
        templates_dir: Path | None = None,
        font_dirs: Sequence[Path | str] = (),
        threads: int = 0,
        size: tuple[int, int] | None = None,
        fps: int | None = None,
        variant: str | None = None,
        cache_max_bytes: int = 20 * 2**30,
        timeout_s: float = 600.0,
        videos: VideoPlates | None = None,
        encode_jobs: int = 0,
        dedup: bool = True,
        dedup_max_bytes: int = 2 * 2**30,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.videos = videos
        self.generator: Generator = generator or ProceduralGenerator()
        self.tts: TTS = tts or EspeakTTS(sample_rate=SAMPLE_RATE)
        self.templates_dir = templates_dir
        self.font_dirs = tuple(font_dirs)
        self.threads = threads
        self.size = size
        self.fps = fps
        self.variant = variant
        self.cache_max_bytes = cache_max_bytes
        self.timeout_s = timeout_s
        # x264 processes one personal segment is split over; 0: one per CPU
        self.encode_jobs = encode_jobs
        # reuse the personal segment of an identical recipient (name, locale, photo, template)
        self.dedup = dedup
        self.dedup_max_bytes = dedup_max_bytes
        self._personal_stores = 0

    # ------------------------------------------------------------------ public API

    def template(self, ref: TemplateRef | str) -> LoadedTemplate:
        return get_template(ref, self.templates_dir)

    def prewarm(
        self,
        template: TemplateRef | str,
        locale: Locale,
        *,
        variant: str | None = None,
        size: tuple[int, int] | None = None,
        references: Sequence[Reference] = (),
    ) -> None:
        """Build (or find) the shared segments of a template for a locale (generating its
        video plates, conditioned on the brief's style reference)."""
        lt = self.template(template)
        style = self.videos.style_image(references) if self.videos is not None else None
        self.shared(lt, locale, self._variant(lt.template, variant, size), style=style)

    def __call__(self, req: RenderRequested, out_dir: Path, photo: Path | None) -> RenderedClip:
        """The `Renderer` port: render one clip for the render step."""
        r = self.render(req, out_dir, photo=photo)
        return RenderedClip(
            video_path=r.video_path,
            poster_path=r.poster_path,
            sha256=r.sha256,
            duration_s=r.duration_s,
            width=r.width,
            height=r.height,
            captions_path=r.captions_path,
            template=r.template,
            generator=self.generator.model_id,
            generation=r.generation or None,
            drawn_texts=r.drawn_texts,
            merge_values=dict(r.merge_values),
        )

    def render(
        self,
        req: RenderRequested,
        out_dir: Path,
        *,
        photo: Path | None = None,
        variant: str | None = None,
        size: tuple[int, int] | None = None,
        stem: str | None = None,
    ) -> RenderResult:
        """One personalized clip: `<out_dir>/<job_id>.mp4`, `.jpg` (poster), `.vtt`."""
        timings: dict[str, float] = {}
        t_all = time.perf_counter()
        lt = self.template(req.template)
        t = lt.template
        locale = req.locale
        if locale not in t.strings:
            raise TemplateError(
                f"template {t.name} has no {locale.value} strings (it supports "
                f"{', '.join(x.value for x in t.locales)})"
            )
        var = self._variant(t, variant, size)
        if photo is None and any(isinstance(la, PhotoLayer) and la.required for la in t.layers):
            raise TemplateError(f"template {t.name} needs a subject photo")
        # fonts first: a name no font can draw fails the job before any work
        values = merge_values(req.recipient.name)
        for text in drawn_texts(t, locale):
            if merge_fields_in(text):
                find_font_face(substitute(text, values).replace("\n", ""), locale, extra_dirs=self.font_dirs)
        t0 = time.perf_counter()
        style = self.videos.style_image(req.references) if self.videos is not None else None
        seg = self.shared(lt, locale, var, style=style)
        timings["shared"] = time.perf_counter() - t0
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or str(req.job_id)
        name = req.recipient.name
        drawn: list[tuple[str, str]] = []

        animate = may_animate(req.recipient.subjects)
        dedup_key = self._personal_key(lt, seg, name, photo, animate) if self.dedup else None

        with tempfile.TemporaryDirectory(prefix=".render-", dir=out_dir) as tmp_s:
            tmp = Path(tmp_s)
            poster_tmp = tmp / "poster.jpg"
            hit = self._personal_cache_get(dedup_key, tmp) if dedup_key is not None else None
            if hit is not None:
                parts, m4a, personal_meta = hit
                os.replace(tmp / "cached-poster.jpg", poster_tmp)
                cues = [Cue(float(c[0]), float(c[1]), str(c[2])) for c in personal_meta["cues"]]
                drawn = [(str(a), str(b)) for a, b in personal_meta["drawn"]]
                name_box = _box_or_none(personal_meta["name_box"])
                photo_box = _box_or_none(personal_meta["photo_box"])
                mix_lufs = float(personal_meta["lufs"])
                mix_tp = float(personal_meta["true_peak_db"])
                stills: list[Still] = []
                timings["dedup_hit"] = 1.0
            else:
                parts, m4a, cues, stills, name_box, photo_box, mixed = self._render_personal(
                    lt, seg, req, photo, tmp, poster_tmp, drawn, animate, timings
                )
                mix_lufs, mix_tp = mixed.lufs, mixed.true_peak_db
                if dedup_key is not None:
                    t0 = time.perf_counter()
                    self._personal_cache_put(
                        dedup_key,
                        parts,
                        m4a,
                        poster_tmp,
                        {
                            "cues": [[c.start, c.end, c.text] for c in cues],
                            "drawn": [list(d) for d in drawn],
                            "name_box": list(name_box) if name_box else None,
                            "photo_box": list(photo_box) if photo_box else None,
                            "lufs": mix_lufs,
                            "true_peak_db": mix_tp,
                        },
                    )
                    timings["dedup_store"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            video = out_dir / f"{stem}.mp4"
            tmp_video = tmp / "out.mp4"
            self._join(seg, parts, m4a, tmp_video)
            if not has_faststart(tmp_video):
                raise RenderError(f"joined clip {tmp_video} is not faststart")
            os.replace(tmp_video, video)
            poster = out_dir / f"{stem}.jpg"
            os.replace(poster_tmp, poster)
            timings["join"] = time.perf_counter() - t0
        generation = self._generation_record(lt, req, style, stills)
        captions = write_vtt(out_dir / f"{stem}.vtt", cues) if cues else None
        timings["total"] = time.perf_counter() - t_all
        observe_phases(timings)
        return RenderResult(
            video_path=video,
            poster_path=poster,
            captions_path=captions,
            sha256=sha256_file(video),
            duration_s=seg.n_frames / var.fps,
            width=var.width,
            height=var.height,
            template=f"{t.name}@{t.version}",
            locale=locale,
            variant=var.name,
            cues=tuple(cues),
            name_box=name_box,
            photo_box=photo_box,
            lufs=mix_lufs,
            true_peak_db=mix_tp,
            timings=timings,
            segments_key=seg.key,
            generation=generation,
            drawn_texts=tuple(drawn),
            merge_values=merge_values(name),
        )

    def _render_personal(
        self,
        lt: LoadedTemplate,
        seg: SharedSegments,
        req: RenderRequested,
        photo: Path | None,
        tmp: Path,
        poster_tmp: Path,
        drawn: list[tuple[str, str]],
        animate: bool,
        timings: dict[str, float],
    ) -> tuple[
        list[Path],
        Path,
        list[Cue],
        list[Still],
        tuple[int, int, int, int] | None,
        tuple[int, int, int, int] | None,
        audio_mod.MixResult,
    ]:
        """Speak, draw and encode one recipient's personal segment (the chunks of its
        video, its soundtrack as AAC, its poster)."""
        t = lt.template
        locale = req.locale
        var = seg.variant
        name = req.recipient.name
        # voice first: its timing places the captions
        t0 = time.perf_counter()
        speech, cues = self._voice(t, locale, name, seg)
        timings["tts"] = time.perf_counter() - t0
        personal = tmp / "personal.mp4"
        # the soundtrack (mix + AAC encode) and the poster run beside the drawing and
        # the video encode
        bed_path = seg.bed
        voice_start = t.audio.voice.start if t.audio.voice is not None else 0.0

        def soundtrack() -> tuple[audio_mod.MixResult, Path]:
            t1 = time.perf_counter()
            bed = np.load(bed_path)
            mixed = audio_mod.mix(
                bed,
                speech.samples if speech else None,
                voice_start,
                list(speech.spans) if speech else [],
                t.audio,
            )
            wav = audio_mod.write_wav(tmp / "mix.wav", mixed.samples)
            m4a = tmp / "mix.m4a"
            run_ffmpeg(
                ["-y", "-i", str(wav), *aac_args(SAMPLE_RATE), "-vn", str(m4a)], timeout=self.timeout_s
            )
            timings["audio"] = time.perf_counter() - t1
            return mixed, m4a

        with ThreadPoolExecutor(max_workers=2) as pool:
            audio_job = pool.submit(soundtrack)
            t0 = time.perf_counter()
            stills, name_box, photo_box, poster_t = self._personal_stills(
                lt, locale, var, name, photo, cues, drawn=drawn, animate=animate
            )
            timings["draw"] = time.perf_counter() - t0
            poster_job = pool.submit(write_poster, seg, stills, poster_t, poster_tmp)
            t0 = time.perf_counter()
            parts = self._encode_personal(seg, stills, personal, None, poster_t)
            timings["encode_personal"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            mixed, m4a = audio_job.result()
            poster_job.result()
            timings["wait_audio"] = time.perf_counter() - t0
        return parts, m4a, cues, stills, name_box, photo_box, mixed

    # ------------------------------------------------------------------ personal segment cache

    def _personal_key(
        self, lt: LoadedTemplate, seg: SharedSegments, name: str, photo: Path | None, animate: bool
    ) -> str | None:
        """Content hash of everything one recipient's personal segment depends on (the
        shared segments' key covers template, locale, variant, generator, encoder and
        fonts); None when the segment is not to be reused (it shows a photo)."""
        if photo is not None:
            # A photo is one person's: its frames would rarely be reused, and a cached copy
            # would outlive a revoked consent on every render node that drew it.
            return None
        tts = self.tts
        payload = {
            "engine": ENGINE_VERSION,
            "personal": PERSONAL_VERSION,
            "segments": seg.key,
            "name": name,
            "animate": animate,
            # the TTS's settings (its public attributes), not its caches
            "tts": [
                type(tts).__module__,
                type(tts).__qualname__,
                getattr(tts, "name", ""),
                repr({k: v for k, v in sorted(vars(tts).items()) if not k.startswith("_")}),
            ],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]

    def _personal_cache_get(self, key: str, tmp: Path) -> tuple[list[Path], Path, dict[str, Any]] | None:
        """Hard links (in tmp) to a cached personal segment's files, or None. Linking first
        means a concurrent prune cannot pull a file from under the join."""
        entry = self.cache_dir / "personal" / key[:2] / key
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
            names = [str(x) for x in meta["parts"]]
            parts = []
            for i, part in enumerate(names):
                dst = tmp / f"cached-{i}.mp4"
                os.link(entry / part, dst)
                parts.append(dst)
            m4a = tmp / "cached-mix.m4a"
            os.link(entry / "mix.m4a", m4a)
            os.link(entry / "poster.jpg", tmp / "cached-poster.jpg")
            os.utime(entry / "meta.json")
        except (OSError, ValueError, KeyError, TypeError):
            for p in tmp.glob("cached-*"):
                p.unlink(missing_ok=True)
            return None
        return parts, m4a, meta

    def _personal_cache_put(
        self, key: str, parts: Sequence[Path], m4a: Path, poster: Path, meta: dict[str, object]
    ) -> None:
        """Store a personal segment: built in a temporary folder, renamed into place (the
        first of two concurrent writers wins, the other's copy is dropped)."""
        root = self.cache_dir / "personal" / key[:2]
        final = root / key
        if (final / "meta.json").is_file():
            return
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".put-{key}-", dir=root))
        try:
            names = []
            for i, p in enumerate(parts):
                names.append(f"part{i}.mp4")
                shutil.copyfile(p, work / names[-1])
            shutil.copyfile(m4a, work / "mix.m4a")
            shutil.copyfile(poster, work / "poster.jpg")
            (work / "meta.json").write_text(json.dumps({**meta, "parts": names}), encoding="utf-8")
            try:
                os.replace(work, final)
            except OSError:
                return  # another worker stored the same segment first
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self._personal_stores += 1
        if self._personal_stores % PERSONAL_PRUNE_EVERY == 1:
            self._prune_personal()

    def _prune_personal(self) -> None:
        """Drop the least recently used personal segments beyond dedup_max_bytes."""
        root = self.cache_dir / "personal"
        entries = []
        total = 0
        for meta in root.glob("*/*/meta.json"):
            try:
                d = meta.parent
                size = sum(f.stat().st_size for f in d.iterdir())
                entries.append((meta.stat().st_mtime, size, d))
            except OSError:
                continue
            total += size
        for _, size, d in sorted(entries):
            if total <= self.dedup_max_bytes:
                break
            shutil.rmtree(d, ignore_errors=True)
            total -= size

    # ------------------------------------------------------------------ shared segments

    def _variant(self, t: Template, variant: str | None, size: tuple[int, int] | None) -> Variant:
        return resolve_variant(t, variant or self.variant, size or self.size, self.fps)

    def segments_key(
        self, lt: LoadedTemplate, locale: Locale, var: Variant, *, style: bytes | None = None
    ) -> str:
        """Content hash of everything the shared segments depend on."""
        payload = {
            "engine": ENGINE_VERSION,
            "template": lt.content_hash,
            "locale": locale.value,
            "variant": [var.width, var.height, var.fps],
            "generator": self.generator.model_id,
            "x264": x264_args(var.fps),
            "fonts": [str(d) for d in self.font_dirs],
            "video_plates": [
                self.videos.key(self.videos.request(src, image=style)) for src in _video_sources(lt.template)
            ]
            if self.videos is not None
            else [],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def shared(
        self, lt: LoadedTemplate, locale: Locale, var: Variant, *, style: bytes | None = None
    ) -> SharedSegments:
        """The shared segments; `style`: the style reference image that conditions a
        generated_video background (its first frame)."""
        t = lt.template
        if locale not in t.strings:
            raise TemplateError(f"template {t.name} has no {locale.value} strings")
        key = self.segments_key(lt, locale, var, style=style)
        root = self.cache_dir / "segments"
        final = root / key
        n = _frames(t.duration_s, var.fps)
        seg = SharedSegments(
            key, final, var, n, _frames(t.personal.start, var.fps), _frames(t.personal.end, var.fps)
        )
        if (final / "meta.json").is_file():
            os.utime(final / "meta.json")
            metrics.SEGMENT_CACHE.labels(result="hit").inc()
            return seg
        with _file_lock(root / f"{key}.lock"):
            if (final / "meta.json").is_file():
                metrics.SEGMENT_CACHE.labels(result="hit").inc()
                return seg
            metrics.SEGMENT_CACHE.labels(result="miss").inc()
            started = time.perf_counter()
            work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
            try:
                self._build_shared(lt, locale, var, seg, work, style=style)
                (work / "meta.json").write_text(
                    json.dumps(
                        {
                            "template": f"{t.name}@{t.version}",
                            "locale": locale.value,
                            "variant": var.name,
                            "size": var.size,
                            "fps": var.fps,
                            "frames": n,
                            "n0": seg.n0,
                            "n1": seg.n1,
                            "generator": self.generator.model_id,
                            "built_s": round(time.perf_counter() - started, 3),
                        },
                        indent=2,
                    )
                )
                os.replace(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            metrics.RENDER_PHASE_SECONDS.labels(phase="generate").observe(time.perf_counter() - started)
            log.info(
                "shared segments %s (%s %s %s) built in %.1fs",
                key,
                t.name,
                locale.value,
                var.size,
                time.perf_counter() - started,
            )
        (root / f"{key}.lock").unlink(missing_ok=True)
        self._prune(keep=key)
        return seg

    def _prune(self, keep: str) -> None:
        root = self.cache_dir / "segments"
        entries = []
        total = 0
        for d in root.iterdir():
            meta = d / "meta.json"
            if d.is_dir() and meta.is_file():
                size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
                entries.append((meta.stat().st_mtime, size, d))
                total += size
        for _, size, d in sorted(entries):
            if total <= self.cache_max_bytes:
                break
            if d.name == keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            total -= size

    def _background_image(self, lt: LoadedTemplate, layer: BackgroundLayer, w: int, h: int) -> Image.Image:
        src = layer.source
        if isinstance(src, GeneratedSource):
            req = GenRequest(
                prompt=src.prompt,
                style=src.style,
                seed=src.seed,
                width=w,
                height=h,
                steps=src.steps,
                negative_prompt=src.negative_prompt,
            )
            img = self.generator.generate([req])[0]
            return img if self.generator.model_id.startswith("procedural") else _scrim(img)
        if isinstance(src, VideoSource):
            raise TemplateError(f"template {lt.template.name}: video backgrounds are not supported yet")
        if not isinstance(src, ImageSource):
            raise TemplateError(f"template {lt.template.name}: unknown background source {src!r}")
        with Image.open(lt.asset(src.path)) as im:
            return _scrim(cover(im.convert("RGB"), w, h))

    def _generation_record(
        self, lt: LoadedTemplate, req: RenderRequested, style: bytes | None, stills: Sequence[Still]
    ) -> dict[str, object]:
        """What the provenance records: every generated plate (model fingerprint and every
        parameter), the still generator, and the brief's reference assets."""
        plates: list[dict[str, object]] = []
        if self.videos is not None:
            for src in _video_sources(lt.template):
                vreq = self.videos.request(src, image=style)
                gen = self.videos.generator_for(vreq)
                plates.append(
                    {"role": "background", "key": plate_key(gen.model_id, vreq), "model": gen.model_id,
                     "params": vreq.key_payload()}
                )  # fmt: skip
        for st in stills:
            plate = st.meta.get("plate")
            if isinstance(plate, Plate):
                plates.append(
                    {"role": "living_photo", "key": plate.key, "model": plate.meta.get("model"),
                     "params": plate.meta.get("params")}
                )  # fmt: skip
        bg = lt.template.layers[0]
        uses_still = isinstance(bg, BackgroundLayer) and isinstance(bg.source, GeneratedSource)
        out: dict[str, object] = {
            "template": f"{lt.template.name}@{lt.template.version}",
            "plates": plates,
            "references": [r.model_dump(mode="json") for r in req.references],
        }
        if uses_still:
            out["still_generator"] = self.generator.model_id
        return out

    def _video_plate(self, lt: LoadedTemplate, src: GeneratedVideoSource, style: bytes | None) -> Plate:
        if self.videos is None:
            raise TemplateError(
                f"template {lt.template.name} has a generated_video background, but this worker has "
                "no video model (set GREETFLOW_VIDEO_MODEL_DIR)"
            )
        req = self.videos.request(src, image=style)
        return self.videos.plate(req, {"template": f"{lt.template.name}@{lt.template.version}"})

    def _shared_stills(
        self, lt: LoadedTemplate, locale: Locale, var: Variant, *, style: bytes | None = None
    ) -> tuple[Still, list[Still]]:
        t = lt.template
        w, h = var.width, var.height
        sc = size_scale(w, h)
        d = t.duration_s
        area = safe_area(w, h)
        base: Still | None = None
        stills: list[Still] = []
        label: Still | None = None
        for i, layer in enumerate(t.layers):
            if t.is_personal(layer):
                continue
            end = t.layer_end(layer)
            if isinstance(layer, BackgroundLayer) and isinstance(layer.source, GeneratedVideoSource):
                plate = self._video_plate(lt, layer.source, style)
                first = Image.fromarray(decode_plate(plate)[0])
                base = Still(layer.id, np.asarray(cover(first, w, h)), 0, 0, meta={"plate": plate})
            elif isinstance(layer, BackgroundLayer):
                drift = layer.drift * sc
                extra = math.ceil(drift * d) + 2
                img = self._background_image(lt, layer, w, h + extra)
                base = Still(
                    layer.id,
                    np.asarray(img.convert("RGB")),
                    0,
                    0,
                    y_expr=f"min({extra},T*{drift:.4f})" if drift > 0 else None,
                    y_at=_linear(0.0, drift, hi=float(extra)),
                )
            elif isinstance(layer, ParticlesLayer):
                speed = layer.speed * sc
                extra = math.ceil(speed * d) + 2
                img_p = particles_image(
                    w,
                    h + extra,
                    layer.style,
                    layer.count,
                    layer.size,
                    layer.opacity,
                    layer.colors,
                    sc,
                    seed=1000 + i,
                )
                up = layer.direction == "up"
                y_expr = f"-T*{speed:.4f}" if up else f"-{extra}+T*{speed:.4f}"
                y_at = _linear(0.0, -speed) if up else _linear(-float(extra), speed)
                stills.append(
                    Still(layer.id, img_p, 0, 0, layer.start, end, 0.0, 0.0, y_expr=y_expr, y_at=y_at)
                )
            elif isinstance(layer, StickerLayer):
                stills.append(self._sticker(lt, layer, locale, w, h, sc, end))
            elif isinstance(layer, TextLayer):
                text = localized(t, locale, layer.text)
                dt = draw_text(
                    text,
                    locale,
                    box_px(area, layer.box),
                    layer.style,
                    sc,
                    font_dirs=self.font_dirs,
                    ornament=layer.ornament,
                )
                stills.append(self._text_motion(layer, np.asarray(dt.image), dt.x, dt.y, end, d, sc))
            elif isinstance(layer, LabelLayer):
                img_l, x, y = label_still(label_text(t), locale, w, h, self.font_dirs)
                label = Still(layer.id, np.asarray(img_l), x, y)
        if base is None:
            raise TemplateError(f"template {t.name} has no background")
        if label is not None:
            stills.append(label)  # always on top
        return base, stills

    def _sticker(
        self, lt: LoadedTemplate, layer: StickerLayer, locale: Locale, w: int, h: int, sc: float, end: float
    ) -> Still:
        if layer.kind == "image":
            if layer.path is None:
                raise TemplateError(f"template {lt.template.name}: image sticker {layer.id} has no path")
            with Image.open(lt.asset(layer.path)) as im:
                img = im.convert("RGBA")
            img.thumbnail((round(w * 0.4), round(h * 0.25)))
            x, y = w - img.width - round(w * 0.05), round(h * 0.02)
        else:
            char_face = None
            if layer.kind == "lanterns":
                char_face = find_font_face(LANTERN_CHAR, locale, weight="bold", extra_dirs=self.font_dirs)
            img, x = hanging_cluster(layer.kind, w, h, char_face, sc)
            y = 0
        bob = max(2, round(7 * sc))
        x -= x % 2
        y_expr = x_expr = None
        y_at = x_at = None
        if layer.motion == "bob":
            y_expr = f"{y - bob - 2}+{bob}*sin(2*PI*T/3.2)"
            y_at = _wave(float(y - bob - 2), float(bob), 3.2)
        elif layer.motion == "sway":
            x_expr = f"{x}+{bob}*sin(2*PI*T/4.1)"
            x_at = _wave(float(x), float(bob), 4.1)
        return Still(
            layer.id,
            np.asarray(img),
            x,
            y,
            layer.start,
            end,
            0.4 if layer.start > 0 else 0.0,
            0.4 if end < lt.template.duration_s else 0.0,
            x_expr=x_expr,
            y_expr=y_expr,
            y_at=y_at,
            x_at=x_at,
        )

    @staticmethod
    def _text_motion(
        layer: TextLayer | PhotoLayer,
        img: np.ndarray,
        x: int,
        y: int,
        end: float,
        d: float,
        sc: float,
        animate: str = "fade",
    ) -> Still:
        anim = layer.animate if isinstance(layer, TextLayer) else animate
        fade = layer.fade_s if anim != "none" else 0.0
        y_expr = None
        y_at = None
        if anim in ("slide", "pop"):
            slide = round(36 * sc)
            start = layer.start
            y_expr = f"{y}+{slide}*pow(max(0,1-(T-{start:.4f})/{SLIDE_S}),2)"

            def y_at(t: float) -> float:
                return y + slide * max(0.0, 1 - (t - start) / SLIDE_S) ** 2

        return Still(
            layer.id,
            img,
            x,
            y,
            layer.start,
            end,
            fade if layer.start > 0 else 0.0,
            fade if end < d else 0.0,
            y_expr=y_expr,
            y_at=y_at,
        )

    def _build_shared(
        self,
        lt: LoadedTemplate,
        locale: Locale,
        var: Variant,
        seg: SharedSegments,
        work: Path,
        *,
        style: bytes | None = None,
    ) -> None:
        t = lt.template
        base, stills = self._shared_stills(lt, locale, var, style=style)
        fps, w, h = var.fps, var.width, var.height
        inputs: list[str] = []
        plate = base.meta.get("plate")
        bg_src = t.layers[0].source if isinstance(t.layers[0], BackgroundLayer) else None
        if isinstance(plate, Plate) and isinstance(bg_src, GeneratedVideoSource):
            cycle = cycle_frames(decode_plate(plate), bg_src.fill)
            ch, cw = cycle.shape[1:3]
            (work / "bg.rgb").write_bytes(np.ascontiguousarray(cycle).tobytes())
            inputs += raw_input_args(work / "bg.rgb", cw, ch, "rgb24", plate.fps)
            fill = fill_filter(bg_src.fill, len(cycle), plate.fps, fps, w, h, seg.n_frames)
            base_line = f"[0:v]{fill},scale=out_color_matrix=bt709:out_range=tv,format=yuv420p[base]"
        else:
            bg_h = base.image.shape[0]
            inputs += raw_input_args(write_raw_frame(work / "bg.rgb", base.image), w, bg_h, "rgb24", fps)
            crop_y = base.y_expr.replace("T", "t") if base.y_expr else "0"
            base_line = (
                f"[0:v]scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,loop=loop=-1:size=1:start=0,"
                f"setpts=N/({fps}*TB),crop=w={w}:h={h}:x=0:y='{crop_y}',trim=end_frame={seg.n_frames}[base]"
            )
        for k, s in enumerate(stills):
            ih, iw = s.image.shape[:2]
            inputs += raw_input_args(
                write_raw_frame(work / f"s{k}.raw", s.image), iw, ih, "rgba" if s.alpha else "rgb24", fps
            )
        lines = [base_line]
        chain, out = overlay_chain("base", stills, 1, fps, 0.0, t.duration_s)
        lines += chain
        parts = []
        if seg.n0 > 0:
            parts.append(("intro", 0, seg.n0))
        parts.append(("plate", seg.n0, seg.n1))
        if seg.n1 < seg.n_frames:
            parts.append(("outro", seg.n1, seg.n_frames))
        labels = "".join(f"[s_{p[0]}]" for p in parts)
        lines.append(f"[{out}]split={len(parts)}{labels}")
        for name, a, b in parts:
            lines.append(f"[s_{name}]trim=start_frame={a}:end_frame={b},setpts=PTS-STARTPTS[o_{name}]")
        outputs: list[str] = []
        for name, a, b in parts:
            if name == "plate":
                outputs += [
                    "-map",
                    f"[o_{name}]",
                    "-f",
                    "rawvideo",
                    "-pix_fmt",
                    "yuv420p",
                    str(work / "plate.yuv"),
                ]
            else:
                outputs += [
                    "-map",
                    f"[o_{name}]",
                    "-frames:v",
                    str(b - a),
                    "-r",
                    str(fps),
                    *x264_args(fps, self.threads),
                    "-an",
                    "-movflags",
                    "+faststart",
                    str(work / f"{name}.mp4"),
                ]
        run_ffmpeg(["-y", *inputs, "-filter_complex", ";".join(lines), *outputs], timeout=self.timeout_s)
        plate_bytes = (work / "plate.yuv").stat().st_size
        want = (seg.n1 - seg.n0) * w * h * 3 // 2
        if plate_bytes != want:
            raise RenderError(f"plate has {plate_bytes} bytes, expected {want}")
        # the shared soundtrack: music bed + effects
        if isinstance(t.audio.music, MusicFile):
            music = _load_music_file(lt.asset(t.audio.music.path), t.duration_s)
            bed = audio_mod.bed_with_effects(t.audio, t.duration_s, music=music)
        else:
            bed = audio_mod.bed_with_effects(t.audio, t.duration_s)
        if (
            isinstance(plate, Plate)
            and isinstance(bg_src, GeneratedVideoSource)
            and bg_src.ambience_gain_db is not None
            and plate.audio is not None
        ):
            # the model's own sound (LTX-2) under the music, looped to the clip's length
            amb = _load_music_file(plate.audio, t.duration_s, loop=True)
            bed = bed + amb * 10 ** (bg_src.ambience_gain_db / 20)
        np.save(work / "bed.npy", bed.astype(np.float32))

    # ------------------------------------------------------------------ per recipient

    def _voice(
        self, t: Template, locale: Locale, name: str, seg: SharedSegments
    ) -> tuple[Speech | None, list[Cue]]:
        v = t.audio.voice
        if v is None:
            return None, []
        text = localized(t, locale, v.text)
        pieces = speech_parts(text, locale, name)
        parts = [p for p, _ in pieces]
        shown = [s for _, s in pieces]
        try:
            speech = fit_voice(self.tts, parts, room_s=v.end - v.start, max_rate=v.max_rate)
        except VoiceDoesNotFit as exc:
            raise PermanentError(
                f"the voice line {substitute(text, merge_values(name))!r} {exc} (template {t.name})"
            ) from exc
        has_captions = any(isinstance(la, CaptionsLayer) for la in t.layers)
        cues = make_cues(shown, speech.spans, v.start, seg.p1 - 0.05) if has_captions else []
        return speech, cues

    def _personal_stills(
        self,
        lt: LoadedTemplate,
        locale: Locale,
        var: Variant,
        name: str,
        photo: Path | None,
        cues: list[Cue],
        *,
        drawn: list[tuple[str, str]] | None = None,
        animate: bool = False,
    ) -> tuple[list[Still], tuple[int, int, int, int] | None, tuple[int, int, int, int] | None, float]:
        """The per-recipient stills; `drawn` gets (layer id, text) of every text drawn."""
        t = lt.template
        w, h = var.width, var.height
        sc = size_scale(w, h)
        area = safe_area(w, h)
        values = merge_values(name)
        stills: list[Still] = []
        name_box: tuple[int, int, int, int] | None = None
        photo_box: tuple[int, int, int, int] | None = None
        ready = t.personal.start
        has_photo_layer = any(isinstance(la, PhotoLayer) for la in t.layers)
        for layer in t.layers:
            if not t.is_personal(layer):
                continue
            end = t.layer_end(layer)
            if isinstance(layer, TextLayer):
                text = substitute(localized(t, locale, layer.text), values)
                if drawn is not None:
                    drawn.append((layer.id, text))
                fbox = layer.box
                if photo is None and has_photo_layer and layer.box_without_photo is not None:
                    fbox = layer.box_without_photo
                dt = draw_text(
                    text,
                    locale,
                    box_px(area, fbox),
                    layer.style,
                    sc,
                    font_dirs=self.font_dirs,
                    ornament=layer.ornament,
                    overflow=layer.overflow,
                )
                stills.append(
                    self._text_motion(layer, np.asarray(dt.image), dt.x, dt.y, end, t.duration_s, sc)
                )
                if name_box is None:
                    name_box = (dt.ink.x0, dt.ink.y0, dt.ink.x1, dt.ink.y1)
                ready = max(ready, layer.start + max(layer.fade_s, SLIDE_S if layer.animate != "fade" else 0))
            elif isinstance(layer, LivingPhotoLayer) and photo is not None and animate:
                live = self._living_photo(lt, layer, photo, box_px(area, layer.box), sc, var.fps, end)
                stills.append(live)
                photo_box = (live.x, live.y, live.x + live.image.shape[1], live.y + live.image.shape[0])
                ready = max(ready, layer.start + layer.fade_s)
            elif isinstance(layer, PhotoLayer):
                if photo is None:
                    continue
                img, x, y = photo_still(
                    photo, box_px(area, layer.box), shape=layer.shape, frame=layer.frame, scale=sc
                )
                rise = round(14 * sc)
                dur = max(0.1, end - layer.start)
                start = layer.start

                def photo_y(
                    tt: float, y: int = y, rise: int = rise, start: float = start, dur: float = dur
                ) -> float:
                    return y + rise - rise * min(1.0, (tt - start) / dur)

                st = Still(
                    layer.id,
                    np.asarray(img),
                    x,
                    y,
                    layer.start,
                    end,
                    layer.fade_s,
                    layer.fade_s if end < t.duration_s else 0.0,
                    y_expr=f"{y + rise}-{rise}*min(1,(T-{start:.4f})/{dur:.4f})",
                    y_at=photo_y,
                )
                stills.append(st)
                photo_box = (x, y, x + img.width, y + img.height)
                ready = max(ready, layer.start + layer.fade_s)
            elif isinstance(layer, CaptionsLayer):
                cbox = box_px(area, layer.box)
                for k, cue in enumerate(cues):
                    if drawn is not None:
                        drawn.append((f"{layer.id}-{k}", cue.text))
                    dt = draw_text(
                        cue.text, locale, cbox, layer.style, sc, font_dirs=self.font_dirs, pill=True
                    )
                    stills.append(
                        Still(
                            f"{layer.id}-{k}",
                            np.asarray(dt.image),
                            dt.x,
                            dt.y,
                            cue.start,
                            min(cue.end, end),
                            0.08,
                            0.08,
                        )
                    )
        poster_t = min(t.personal.end - 0.1, ready + 0.3)
        return stills, name_box, photo_box, poster_t

    def _living_photo(
        self,
        lt: LoadedTemplate,
        layer: LivingPhotoLayer,
        photo: Path,
        box: PixelBox,
        sc: float,
        fps: int,
        end: float,
    ) -> Still:
        """The recipient's photo animated by the image-to-video model, framed like the still
        photo, as raw RGBA frames (one per output frame of the layer)."""
        if self.videos is None:
            raise TemplateError(
                f"template {lt.template.name} animates the photo, but this worker has no "
                "image-to-video model (set GREETFLOW_VIDEO_I2V_MODEL_DIR)"
            )
        crop = face_crop(load_photo(photo))
        side = min(self.videos.defaults.width, self.videos.defaults.height)
        crop = crop.resize((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        req = self.videos.request(layer, image=buf.getvalue(), size=(side, side))
        plate = self.videos.plate(req, {"kind": "living_photo", "layer": layer.id})
        n_out = max(1, _frames(end - layer.start, fps))
        placement = [box.x0, box.y0, box.width, box.height]
        spec = json.dumps([plate.key, placement, layer.shape, layer.frame, sc, fps, n_out, layer.fill])
        tag = hashlib.sha256(spec.encode()).hexdigest()[:24]
        root = self.cache_dir / "living"
        path = root / f"{tag}.rgba"
        first_p = root / f"{tag}.json"
        if not (path.is_file() and first_p.is_file()):
            cycle = cycle_frames(decode_plate(plate), layer.fill)
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".{tag}.{os.getpid()}.tmp"
            x = y = 0
            size: tuple[int, int] = (0, 0)
            with open(tmp, "wb") as f:
                for k in range(n_out):
                    i = k * plate.fps // fps
                    i = min(i, len(cycle) - 1) if layer.fill == "hold" else i % len(cycle)
                    img, x, y = framed_photo(
                        Image.fromarray(cycle[i]),
                        box,
                        shape=layer.shape,
                        frame=layer.frame,
                        scale=sc,
                        find_face=False,
                    )
                    size = img.size
                    f.write(img.tobytes())
            first_p.write_text(json.dumps({"x": x, "y": y, "w": size[0], "h": size[1]}), encoding="utf-8")
            os.replace(tmp, path)
        info = json.loads(first_p.read_text(encoding="utf-8"))
        w, h = int(info["w"]), int(info["h"])
        with open(path, "rb") as f:
            first = np.frombuffer(f.read(w * h * 4), np.uint8).reshape(h, w, 4)
        return Still(
            layer.id,
            first.copy(),
            int(info["x"]),
            int(info["y"]),
            layer.start,
            end,
            layer.fade_s,
            layer.fade_s if end < lt.template.duration_s else 0.0,
            video=path,
            meta={"plate": plate},
        )

    def _encode_personal(
        self,
        seg: SharedSegments,
        stills: list[Still],
        out: Path,
        poster: Path | None,
        poster_t: float,
        *,
        raw: bool = False,
    ) -> list[Path]:
        """Overlay the personal stills on the plate and encode only these frames, in
        chunks encoded side by side (raw=True: write the composited frames as one raw
        yuv420p file instead, for the benchmark's floor). The encoded files, in order."""
        var = seg.variant
        fps = var.fps
        n = seg.n1 - seg.n0
        jobs = self.encode_jobs or available_cpus()
        chunks = [(0, n)] if raw else encode_chunks(n, jobs, fps, stills, seg.p0)
        threads = (
            self.threads if self.threads > 0 else (0 if len(chunks) == 1 else max(1, jobs // len(chunks)))
        )
        outs = (
            [out]
            if len(chunks) == 1
            else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(chunks))]
        )
        with tempfile.TemporaryDirectory(prefix=".stills-", dir=out.parent) as d:
            files: dict[int, Path] = {}
            for k, s in enumerate(stills):
                files[k] = s.video if s.video is not None else write_raw_frame(Path(d) / f"p{k}.raw", s.image)
            cmds = [
                self._overlay_args(
                    seg, stills, files, a, b, dst, raw=raw, threads=threads, whole=len(chunks) == 1
                )
                for (a, b), dst in zip(chunks, outs, strict=True)
            ]
            if len(cmds) == 1:
                run_ffmpeg(cmds[0], timeout=self.timeout_s)
            else:
                with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
                    for f in [pool.submit(run_ffmpeg, c, timeout=self.timeout_s) for c in cmds]:
                        f.result()
        if poster is not None:
            write_poster(seg, stills, poster_t, poster)
        return outs

    def _overlay_args(
        self,
        seg: SharedSegments,
        stills: Sequence[Still],
        files: dict[int, Path],
        a: int,
        b: int,
        out: Path,
        *,
        raw: bool,
        threads: int,
        whole: bool,
    ) -> list[str]:
        """ffmpeg arguments that composite and encode frames [a, b) of the personal window."""
        var = seg.variant
        fps, w, h = var.fps, var.width, var.height
        frame_bytes = w * h * 3 // 2
        t0, t1 = (seg.n0 + a) / fps, (seg.n0 + b) / fps
        inputs: list[str] = []
        if a:
            inputs += ["-skip_initial_bytes", str(a * frame_bytes)]
        inputs += raw_input_args(seg.plate, w, h, "yuv420p", fps)
        # only the stills this chunk shows
        shown = [k for k, s in enumerate(stills) if s.start < t1 and (s.end is None or s.end > t0)]
        for k in shown:
            s = stills[k]
            ih, iw = s.image.shape[:2]
            inputs += raw_input_args(files[k], iw, ih, "rgba" if s.alpha else "rgb24", fps)
        # the plate is raw yuv: say what it is (BT.709, limited range), or ffmpeg would
        # treat it as BT.601 and convert it, shifting colours at the segment joins
        lines = [f"[0:v]{BT709_PARAMS},setpts=N/({fps}*TB)[base]"]
        chain, cur = overlay_chain("base", [stills[k] for k in shown], 1, fps, t0, t1)
        lines += chain
        codec = ["-f", "rawvideo", "-pix_fmt", "yuv420p"] if raw else [*x264_args(fps, threads), "-an"]
        # one chunk of several: its filter graph on one thread, the cores go to x264
        graph_threads = [] if whole else ["-filter_complex_threads", "1"]
        return [
            "-y",
            *graph_threads,
            *inputs,
            "-filter_complex",
            ";".join(lines),
            "-map",
            f"[{cur}]",
            "-frames:v",
            str(b - a),
            "-r",
            str(fps),
            *codec,
            str(out),
        ]

    def _join(self, seg: SharedSegments, personal: Sequence[Path], audio: Path, out: Path) -> None:
        parts = [p for p in (seg.intro, *personal, seg.outro) if p is not None]
        listing = out.with_suffix(".txt")
        listing.write_text("".join(f"file '{_concat_quote(p)}'\n" for p in parts), encoding="utf-8")
        duration = seg.n_frames / seg.variant.fps
        run_ffmpeg(
            [
                "-y",
                "-f",
                "concat",
                "-safe",
                "0",
                "-i",
                str(listing),
                "-i",
                str(audio),
                "-map",
                "0:v",
                "-map",
                "1:a",
                "-c",
                "copy",
                "-t",
                f"{duration:.4f}",
                "-movflags",
                "+faststart",
                str(out),
            ],
            timeout=self.timeout_s,
        )


def observe_phases(timings: dict[str, float]) -> None:
    """greetflow_render_phase_seconds of one render: drawing the personal stills, encoding
    and joining the video, speech and the soundtrack mix. (`generate` is observed when the
    shared segments are built, `upload` by the render step.)"""
    phases = {
        "draw": timings.get("draw"),
        "encode": timings.get("encode_personal", 0.0) + timings.get("join", 0.0),
        "mix": timings.get("tts", 0.0) + timings.get("audio", 0.0),
    }
    for phase, seconds in phases.items():
        if seconds is not None:
            metrics.RENDER_PHASE_SECONDS.labels(phase=phase).observe(seconds)


def _video_sources(t: Template) -> list[GeneratedVideoSource]:
    return [
        la.source
        for la in t.layers
        if isinstance(la, BackgroundLayer) and isinstance(la.source, GeneratedVideoSource)
    ]


def _linear(a: float, b: float, hi: float = math.inf) -> Callable[[float], float]:
    def f(t: float) -> float:
        return min(hi, a + b * t)

    return f


def _wave(base: float, amp: float, period: float) -> Callable[[float], float]:
    def f(t: float) -> float:
        return base + amp * math.sin(2 * math.pi * t / period)

    return f


def write_poster(seg: SharedSegments, stills: Sequence[Still], t: float, path: Path) -> Path:
    """The poster JPEG: the plate frame at global time t with the personal stills on it."""
    var = seg.variant
    k = min(seg.n1 - seg.n0 - 1, max(0, _frames(t, var.fps) - seg.n0))
    size = var.width * var.height * 3 // 2
    with open(seg.plate, "rb") as f:
        f.seek(k * size)
        data = f.read(size)
    frame = composite_at(yuv420_frame_to_rgb(data, var.width, var.height), stills, (seg.n0 + k) / var.fps)
    frame.save(path, format="JPEG", quality=90)
    return path


def renderer_from_settings(settings: Settings) -> TemplateRenderer:
    """The engine as configured by GREETFLOW_* settings (one per worker process)."""
    from pipeline.render.generate import make_generator
    from pipeline.render.tts import make_tts

    cache = settings.resolved_render_cache_dir
    generator = make_generator(
        settings.generator_backend,
        model_dir=settings.generator_model_dir,
        device=settings.render_device,
        dtype=settings.generator_dtype,
        cache_dir=cache / "generated",
    )
    variant = settings.render_variant or None
    videos = None
    if settings.video_model_dir is not None or settings.video_i2v_model_dir is not None:
        from pipeline.adapters.storage import ObjectStore
        from pipeline.render.video import video_plates_from_settings

        videos = video_plates_from_settings(settings, ObjectStore(settings), cache / "plates")
    return TemplateRenderer(
        cache,
        videos=videos,
        generator=generator,
        tts=make_tts(settings.tts_backend, sample_rate=SAMPLE_RATE),
        templates_dir=settings.templates_dir,
        font_dirs=tuple(settings.font_dirs),
        threads=settings.ffmpeg_threads,
        size=None if variant else (settings.render_width, settings.render_height),
        fps=settings.render_fps,
        variant=variant,
        cache_max_bytes=int(settings.render_cache_max_gb * 2**30),
        encode_jobs=settings.render_encode_jobs,
        dedup=settings.render_dedup,
        dedup_max_bytes=int(settings.render_dedup_max_gb * 2**30),
    )


def _box_or_none(v: object) -> tuple[int, int, int, int] | None:
    if not isinstance(v, list) or len(v) != 4:
        return None
    return (int(v[0]), int(v[1]), int(v[2]), int(v[3]))


def _fading_at(stills: Sequence[Still], t: float) -> bool:
    """True when a still is part-way through a fade at global time t."""
    for s in stills:
        if s.fade_in > 0 and s.start < t < s.start + s.fade_in:
            return True
        if s.fade_out > 0 and s.end is not None and s.end - s.fade_out < t < s.end:
            return True
    return False


def encode_chunks(n: int, jobs: int, fps: int, stills: Sequence[Still], t0: float) -> list[tuple[int, int]]:
    """Frame ranges [a, b) of a personal segment of n frames starting at global time t0,
    encoded by separate x264 processes. At most one chunk per keyframe interval, so the
    joined segment has no more IDR frames than one encode would; a cut never falls where
    a still is part-way through a fade (ffmpeg's fade cannot start half done); a moving
    photo layer keeps the segment whole."""
    k = max(1, min(jobs, math.ceil(n / (2 * fps))))
    if k == 1 or any(s.video is not None for s in stills):
        return [(0, n)]
    # the concat demuxer places each file at the sum of the previous durations in
    # microseconds: a chunk must last a whole number of them, or the join jitters
    step = fps // math.gcd(fps, 1_000_000)
    cuts = [0]
    for i in range(1, k):
        want = round(n * i / k)
        for d in range(0, n):
            c = next(
                (
                    c
                    for c in (want - d, want + d)
                    if cuts[-1] + fps // 2 <= c <= n - fps // 2
                    and c % step == 0
                    and not _fading_at(stills, t0 + c / fps)
                ),
                None,
            )
            if c is not None:
                cuts.append(c)
                break
    cuts.append(n)
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _concat_quote(p: Path) -> str:
    return str(p.resolve()).replace("'", "'\\''")


def _scrim(img: Image.Image) -> Image.Image:
    """Darken a photographic / generated background a little so text stays legible."""
    a = np.asarray(img.convert("RGB"), np.float32)
    h, w, _ = a.shape
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    v = np.sqrt(((x - 0.5) * 1.2) ** 2 + (y - 0.45) ** 2)
    a *= (0.78 - 0.3 * np.clip((v - 0.3) / 0.6, 0, 1))[..., None]
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _load_music_file(path: Path, duration_s: float, *, loop: bool = False) -> np.ndarray:
    proc = run_ffmpeg(
        ["-i", path, "-vn", "-ac", "2", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"], timeout=120
    )
    x = np.frombuffer(proc.stdout, "<f4").reshape(-1, 2).astype(np.float64)
    n = round(duration_s * SAMPLE_RATE)
    if loop and 0 < x.shape[0] < n:
        x = np.tile(x, (math.ceil(n / x.shape[0]), 1))
    if x.shape[0] < n:
        x = np.pad(x, ((0, n - x.shape[0]), (0, 0)))
    x = x[:n].copy()
    audio_mod.fade_ends(x, SAMPLE_RATE)
    return x


def segment_parameter_sets(path: Path) -> bytes:
    """The SPS and PPS NAL units at the start of an H.264 MP4 (Annex B), to prove that
    segments can be joined by stream copy."""
    proc = run_ffmpeg(
        [
            "-i",
            path,
            "-c:v",
            "copy",
            "-bsf:v",
            "h264_mp4toannexb",
            "-frames:v",
            "1",
            "-an",
            "-f",
            "h264",
            "-",
        ],
        timeout=60,
    )
    data = proc.stdout
    nals = [n for n in re.split(b"\x00\x00\x00\x01|\x00\x00\x01", data) if n]
    return b"".join(n for n in nals if n[0] & 0x1F in (7, 8))


__all__ = [
    "ENGINE_VERSION",
    "Cue",
    "RenderResult",
    "SharedSegments",
    "TemplateRenderer",
    "Variant",
    "ffmpeg_exe",
    "make_cues",
    "resolve_variant",
    "segment_parameter_sets",
    "speech_parts",
    "write_vtt",
]
