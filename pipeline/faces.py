"""Faces: find faces in photos and clips, embed them (dlib, 128-d) and measure distances.

Models come from the face-recognition-models package (found without importing it: its
__init__ imports pkg_resources) or from `settings.likeness_models_dir`. Nothing is
downloaded. Detection is dlib's HOG frontal-face detector: fast on a CPU, blind to
profiles, and it finds faces from about 80 px only. So a photo is rescaled before detection
(its short side to 1200 px: faces from about 7 % of it, however small the file), a clip is
sampled at a fixed analysis width, and where a clip may show a small face (where the
renderer draws the photo) that part of a frame is upscaled until the smallest face that
must be found (`likeness_min_face_px`) is 80 px. Consent (reference faces) and moderation
(who is in a clip) both use this module; the rules that judge the faces live with them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import queue
import re
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import ConfigError, PermanentError
from pipeline.repositories import FaceEmbedding
from pipeline.settings import Settings

MODEL_NAME = "dlib-resnet-v1"
"""Stored with every embedding: embeddings of different models never compare."""

_MODEL_FILES = ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat")
_HOG_WINDOW_PX = 80  # dlib's frontal detector finds faces from about this size
_PHOTO_SHORT_SIDE = 1200  # a photo is detected at this short side (faces from ~7 % of it)
_PHOTO_MAX_PIXELS = 6_000_000  # ... unless that makes it larger than this (a panorama)
PHOTO_MAX_SIDE = 4096  # photos are decoded at most this large for detection
_MAX_REGION_SCALE = 4.0  # upscaling a frame region further only magnifies blur
_CACHE_ENTRIES = 512


class LikenessError(PermanentError):
    """A photo or clip cannot be analysed (unreadable, no face, several faces...)."""


def models_dir(override: Path | None = None) -> Path:
    """Directory of the dlib model files (shape predictor, ResNet face encoder)."""
    if override is not None:
        d = Path(override)
    else:
        spec = importlib.util.find_spec("face_recognition_models")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise ConfigError(
                "the face-recognition-models package is not installed "
                "(pip install face-recognition-models) and GREETFLOW_LIKENESS_MODELS_DIR is not set"
            )
        d = Path(locations[0]) / "models"
    missing = [f for f in _MODEL_FILES if not (d / f).is_file()]
    if missing:
        raise ConfigError(f"dlib model files missing in {d}: {', '.join(missing)}")
    return d


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the analysed image's pixels
    score: float
    embedding: tuple[float, ...]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]


class FaceEngine:
    """dlib detector + 5-point landmarks + ResNet encoder, loaded once per process.

    dlib objects are not documented as thread-safe, so no object is used by two threads at
    once: each concurrent detection takes a HOG detector of its own from a pool (they are
    cheap to build, and dlib releases the GIL while one runs), while the landmarks and the
    encoder (one loaded model each) are used under a lock.
    """

    def __init__(self, models: Path | None = None, *, min_score: float = 0.3) -> None:
        import dlib

        d = models_dir(models)
        self.min_score = min_score
        self._detectors: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._detectors.put(dlib.get_frontal_face_detector())
        self._shape = dlib.shape_predictor(str(d / _MODEL_FILES[0]))
        self._encoder = dlib.face_recognition_model_v1(str(d / _MODEL_FILES[1]))
        self._dlib = dlib
        self._lock = threading.Lock()
        # Detections by image content: the shared intro and outro of a template decode to
        # the same pixels in every clip, so their frames are analysed once per process.
        self._cache: OrderedDict[tuple[bytes, tuple[int, ...], int], tuple[DetectedFace, ...]] = OrderedDict()

    def detect(
        self,
        rgb: np.ndarray,
        *,
        upsample: int = 0,
        cache: bool = False,
        skip: Callable[[tuple[int, int, int, int]], bool] | None = None,
    ) -> list[DetectedFace]:
        """Faces in an RGB uint8 image, highest detection score first. With `cache`, the
        result is kept by the image's content hash and reused for identical pixels. A
        detection whose box `skip` accepts is dropped before it is embedded (the costly
        part); such a search is not cached."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError("detect() needs an RGB uint8 image of shape (h, w, 3)")
        img = np.ascontiguousarray(rgb)
        key = None
        if cache and skip is None:
            key = (hashlib.blake2b(img.data, digest_size=20).digest(), img.shape, upsample)
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return list(hit)
        out: list[DetectedFace] = []
        try:
            detector = self._detectors.get_nowait()
        except queue.Empty:
            detector = self._dlib.get_frontal_face_detector()
        try:
            rects, scores, _ = detector.run(img, upsample, 0.0)
        finally:
            self._detectors.put(detector)
        with self._lock:
            for rect, score in zip(rects, scores, strict=True):
                if score < self.min_score:
                    continue
                box = (
                    max(0, rect.left()),
                    max(0, rect.top()),
                    min(img.shape[1], rect.right()),
                    min(img.shape[0], rect.bottom()),
                )
                if skip is not None and skip(box):
                    continue
                shape = self._shape(img, rect)
                desc = self._encoder.compute_face_descriptor(img, shape)
                out.append(DetectedFace(box=box, score=float(score), embedding=tuple(float(v) for v in desc)))
            out.sort(key=lambda f: -f.score)
            if key is not None:
                self._cache[key] = tuple(out)
                while len(self._cache) > _CACHE_ENTRIES:
                    self._cache.popitem(last=False)
        return out

    def detect_scaled(
        self,
        rgb: np.ndarray,
        region: tuple[int, int, int, int],
        scale: float,
        *,
        cache: bool = False,
        skip: Callable[[tuple[int, int, int, int]], bool] | None = None,
    ) -> list[DetectedFace]:
        """Faces in `region` (x0, y0, x1, y1) of `rgb`, searched at `scale` times its size
        (so faces from 80 / scale px are found); boxes (and `skip`'s) in `rgb`'s pixels."""
        h, w = rgb.shape[:2]
        x0, y0 = max(0, region[0]), max(0, region[1])
        x1, y1 = min(w, region[2]), min(h, region[3])
        if x1 - x0 < 8 or y1 - y0 < 8:
            return []
        crop = rgb[y0:y1, x0:x1]
        if abs(scale - 1.0) > 0.02:
            size = (max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale)))
            method = Image.Resampling.BICUBIC if scale > 1.0 else Image.Resampling.LANCZOS
            crop = np.asarray(Image.fromarray(crop).resize(size, method))
        sx, sy = crop.shape[1] / (x1 - x0), crop.shape[0] / (y1 - y0)

        def back(b: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
            return (
                x0 + int(b[0] / sx),
                y0 + int(b[1] / sy),
                min(w, x0 + round(b[2] / sx)),
                min(h, y0 + round(b[3] / sy)),
            )

        found = self.detect(crop, cache=cache, skip=None if skip is None else (lambda b: skip(back(b))))
        return [DetectedFace(box=back(f.box), score=f.score, embedding=f.embedding) for f in found]


@lru_cache(maxsize=4)
def face_engine(models: Path | None = None, min_score: float = 0.3) -> FaceEngine:
    """The process-wide engine for these settings (loading the models takes ~0.4 s)."""
    return FaceEngine(models, min_score=min_score)


# --------------------------------------------------------------------------- photos


def load_rgb(path: Path, *, max_side: int = 2000) -> np.ndarray:
    """An image file as RGB uint8, EXIF-rotated, its long side capped at max_side."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im = im.convert("RGB")
            if max(im.size) > max_side:
                im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(im)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise LikenessError(f"cannot read image {path}: {exc}") from exc


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def photo_detection_scale(width: int, height: int) -> float:
    """How much a photo is scaled for detection: its short side to 1200 px (a small photo is
    upscaled, a large one reduced), at most 6 megapixels in all."""
    return min(_PHOTO_SHORT_SIDE / min(width, height), math.sqrt(_PHOTO_MAX_PIXELS / (width * height)))


def faces_in_rgb(engine: FaceEngine, rgb: np.ndarray) -> list[DetectedFace]:
    """Faces in a decoded photo, whatever its size: detected at `photo_detection_scale`,
    boxes in `rgb`'s pixels."""
    h, w = rgb.shape[:2]
    if min(h, w) < 8:
        return []
    return engine.detect_scaled(rgb, (0, 0, w, h), photo_detection_scale(w, h))


def faces_in_photo(engine: FaceEngine, path: Path) -> list[DetectedFace]:
    """Faces in a photo file (`faces_in_rgb` of the photo decoded at most 4096 px large)."""
    return faces_in_rgb(engine, load_rgb(path, max_side=PHOTO_MAX_SIDE))


def reference_embedding(engine: FaceEngine, path: Path) -> FaceEmbedding:
    """The embedding of the one person in a consent or gallery photo.

    Refuses a photo with no face or with several (crop it to the person).
    """
    faces = faces_in_photo(engine, path)
    if not faces:
        raise LikenessError(f"no face found in {path}: use a clear, frontal photo of the person")
    if len(faces) > 1:
        raise LikenessError(
            f"{len(faces)} faces found in {path}: a reference photo must show only the person (crop it)"
        )
    return FaceEmbedding(
        values=faces[0].embedding, model=MODEL_NAME, source_sha256=sha256_bytes(path.read_bytes())
    )


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def min_distance(probe: Sequence[float], refs: Sequence[Sequence[float]]) -> float:
    if not refs:
        return float("inf")
    diff = np.asarray(refs, dtype=np.float64) - np.asarray(probe, dtype=np.float64)
    return float(np.min(np.linalg.norm(diff, axis=1)))


# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Frame:
    t: float
    image: np.ndarray  # RGB uint8 (h, w, 3) at the analysis size
    scene_change: bool = False


_PTS_TIME = re.compile(r"pts_time:\s*(-?[\d.]+)")


def sample_frames(
    video: Path,
    *,
    width: int,
    height: int,
    interval_s: float = 1.0,
    scene_threshold: float = 0.3,
    max_frames: int = 120,
    dense_until_s: float = 0.0,
    dense_interval_s: float = 0.5,
    timeout_s: float = 300.0,
) -> Iterator[Frame]:
    """Decode sampled frames of `video`, scaled to width x height, one at a time.

    Selected: the first frame, then one at least every `interval_s`, every frame whose
    scene-change score exceeds `scene_threshold`, and one every `dense_interval_s`
    before `dense_until_s` (the visible-label window). At most `max_frames`.
    """
    from pipeline.render.media import RenderError, ffmpeg_exe

    def first_in_each(step: float) -> str:
        # the first frame of every `step`-long slot of the timeline (no drift)
        return f"gt(floor(t/{step:.4f})\\,floor(prev_selected_t/{step:.4f}))"

    terms = ["isnan(prev_selected_t)", first_in_each(interval_s), f"gt(scene\\,{scene_threshold:.3f})"]
    if dense_until_s > 0:
        terms.append(f"lt(t\\,{dense_until_s:.3f})*{first_in_each(dense_interval_s)}")
    vf = f"select='{'+'.join(terms)}',showinfo,scale={width}:{height}:flags=area,format=rgb24"
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "info", "-i", str(video),
        "-an", "-vf", vf, "-fps_mode", "passthrough", "-frames:v", str(max_frames),
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    times: queue.Queue[float | None] = queue.Queue()
    tail: list[str] = []

    stderr, stdout = proc.stderr, proc.stdout
    if stderr is None or stdout is None:
        proc.kill()
        raise RuntimeError("ffmpeg started without its output pipes")

    def drain() -> None:
        for raw in stderr:
            line = raw.decode("utf-8", "replace")
            if "Parsed_showinfo" in line:
                m = _PTS_TIME.search(line)
                if m:
                    times.put(float(m[1]))
            else:
                tail.append(line)
                del tail[:-40]
        times.put(None)

    reader = threading.Thread(target=drain, name="ffmpeg-stderr", daemon=True)
    reader.start()
    size = width * height * 3
    killer = threading.Timer(timeout_s, proc.kill)
    killer.start()
    count = 0
    try:
        while True:
            buf = stdout.read(size)
            if not buf:
                break
            if len(buf) != size:
                raise RenderError(f"short frame from ffmpeg while sampling {video}")
            t = times.get(timeout=timeout_s)
            if t is None:
                raise RenderError(f"ffmpeg gave a frame without a timestamp while sampling {video}")
            count += 1
            yield Frame(t=t, image=np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3))
        rc = proc.wait(timeout=timeout_s)
        if rc != 0 or count == 0:
            raise LikenessError(
                f"cannot decode frames of {video} (ffmpeg exit {rc}): {''.join(tail[-8:]).strip()}"
            )
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)


def analysis_size(src_w: int, src_h: int, width: int) -> tuple[int, int]:
    """Width x height (both even) that keeps the aspect ratio at the analysis width."""
    w = max(2, width - width % 2)
    h = max(2, round(src_h * w / src_w / 2) * 2)
    return w, h


@dataclass(frozen=True)
class FaceSighting:
    """One detected face in one sampled frame of a clip (or in the job's input photo)."""

    t: float
    box: tuple[int, int, int, int]
    score: float
    embedding: tuple[float, ...]
    crop_jpeg: bytes | None = field(default=None, repr=False, compare=False)
    source: str = "clip"  # clip | photo

    @property
    def where(self) -> str:
        return "in the input photo" if self.source == "photo" else f"at {self.t:.1f}s"


def crop_jpeg(image: np.ndarray, box: tuple[int, int, int, int], *, size: int = 192) -> bytes:
    """A square JPEG around a face (with a margin) for the review queue."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) * 0.8
    h, w = image.shape[:2]
    left, top = int(max(0, cx - half)), int(max(0, cy - half))
    right, bottom = int(min(w, cx + half)), int(min(h, cy + half))
    im = Image.fromarray(image[top:bottom, left:right])
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=85)
    return out.getvalue()


@dataclass(frozen=True)
class FaceRegion:
    """Where and when a clip may show a face smaller than a whole-frame search finds (where
    the renderer draws the subject photo): a box in fractions of the frame, a time span."""

    start_s: float
    end_s: float
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)  # x0, y0, x1, y1

    def covers(self, t: float) -> bool:
        # half-open: the frame at end_s already belongs to the next (shared) segment
        return self.start_s - 1e-3 <= t < self.end_s - 1e-3

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box
        return (
            max(0, int(x0 * width)),
            max(0, int(y0 * height)),
            min(width, round(x1 * width)),
            min(height, round(y1 * height)),
        )


REFERENCE_HEIGHT_PX = 1920
"""`likeness_min_face_px` is in pixels of a frame this high; it scales with a clip's height."""


def small_face_scale(min_face_px: float, *, src_height: int, src_width: int, analysis_width: int) -> float:
    """The factor (1 = none) a frame region is upscaled by so that a face of `min_face_px` at
    1920 px of clip height reaches the detector's 80 px in the analysed frame (at most 4)."""
    face = min_face_px * src_height / REFERENCE_HEIGHT_PX * analysis_width / src_width
    if face <= 0:
        return _MAX_REGION_SCALE
    return min(_MAX_REGION_SCALE, max(1.0, _HOG_WINDOW_PX / face))


def _inside(box: tuple[int, int, int, int], other: tuple[int, int, int, int]) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return other[0] <= cx <= other[2] and other[1] <= cy <= other[3]


def faces_in_frame(
    engine: FaceEngine,
    frame: Frame,
    *,
    keep_crops: bool = True,
    regions: Sequence[FaceRegion] = (),
    region_scale: float = 1.0,
) -> list[FaceSighting]:
    """Faces of one sampled frame: the whole frame at its size, and each region covering the
    frame's time upscaled by `region_scale` (a face found by both counts once)."""
    faces = engine.detect(frame.image, cache=True)
    if region_scale > 1.0:
        h, w = frame.image.shape[:2]
        for region in regions:
            if not region.covers(frame.t):
                continue
            known = list(faces)

            def seen(box: tuple[int, int, int, int], known: list[DetectedFace] = known) -> bool:
                return any(_inside(box, f.box) or _inside(f.box, box) for f in known)

            faces.extend(engine.detect_scaled(frame.image, region.pixels(w, h), region_scale, skip=seen))
    out = []
    for face in faces:
        out.append(
            FaceSighting(
                t=frame.t,
                box=face.box,
                score=face.score,
                embedding=face.embedding,
                crop_jpeg=crop_jpeg(frame.image, face.box) if keep_crops else None,
            )
        )
    return out


@dataclass(frozen=True)
class ClipSampling:
    """How a clip is sampled for analysis: the analysis size and the frame schedule."""

    width: int
    height: int
    duration_s: float
    src_width: int
    src_height: int
    frames: Iterator[Frame]


def sample_clip(video: Path, settings: Settings) -> ClipSampling:
    """Probe `video` and schedule its sampled frames at the settings' analysis width: every
    `likeness_sample_interval_s`, every scene change, and densely over the label window.
    Both the likeness and the visible-label checks read a clip through this."""
    from pipeline.render.media import RenderError, probe

    try:
        info = probe(video)
    except RenderError as exc:
        raise LikenessError(f"cannot read the clip {video.name}: {exc}") from exc
    if not info.width or not info.height:
        raise LikenessError(f"the clip {video.name} has no video stream")
    w, h = analysis_size(info.width, info.height, settings.likeness_analysis_width)
    frames = sample_frames(
        video,
        width=w,
        height=h,
        interval_s=settings.likeness_sample_interval_s,
        scene_threshold=settings.likeness_scene_threshold,
        max_frames=settings.likeness_max_frames,
        dense_until_s=settings.label_min_seconds,
    )
    return ClipSampling(w, h, info.duration_s, info.width, info.height, frames)
