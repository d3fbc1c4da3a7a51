"""Generated motion: text-to-video and image-to-video through local diffusers pipelines,
and a content-addressed plate cache shared by every render node through the assets bucket.

- The loader reads `model_index.json` of a LOCAL directory (never a hub id) and takes the
  pipeline class from its `_class_name`: LTX-Video, LTX-2 (video plus a jointly generated
  audio track), Wan 2.x and CogVideoX, each text-to-video or image-to-video.
- A plate is identified by a content hash of the model fingerprint and every generation
  parameter (prompt, negatives, seed, frames, fps, steps, guidance, size, conditioning
  image bytes). It is stored once in the assets bucket as a near-lossless MP4 (plus the
  LTX-2 audio as WAV and a JSON sidecar); a worker claims a plate with a conditional put
  (`If-None-Match: *`) before generating it, and every other worker waits for the object.
- `GenerationQueue` runs all generations of a worker on one GPU thread (one model per
  process, loaded once), coalesces requests for the same plate, bounds the backlog, and
  encodes finished plates on a CPU pool while the GPU works on the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from PIL import Image

from pipeline.errors import PermanentError
from pipeline.render.generate import Device, DType, model_fingerprint, resolve_device, resolve_dtype
from pipeline.render.media import RenderError, ffmpeg_exe, run_ffmpeg

if TYPE_CHECKING:
    from pipeline.adapters.storage import ObjectStore

log = logging.getLogger(__name__)

Backend = Literal["ltx", "ltx2", "wan", "cogvideox"]
Mode = Literal["t2v", "i2v"]
Fill = Literal["loop", "pingpong", "hold"]
Encoder = Literal["libx264", "h264_nvenc"]

# pipeline class -> (backend, modes it serves)
PIPELINES: dict[str, tuple[Backend, tuple[Mode, ...]]] = {
    "LTXPipeline": ("ltx", ("t2v",)),
    "LTXImageToVideoPipeline": ("ltx", ("i2v",)),
    "LTXConditionPipeline": ("ltx", ("t2v", "i2v")),
    "LTX2Pipeline": ("ltx2", ("t2v",)),
    "LTX2ImageToVideoPipeline": ("ltx2", ("i2v",)),
    "WanPipeline": ("wan", ("t2v",)),
    "WanImageToVideoPipeline": ("wan", ("i2v",)),
    "CogVideoXPipeline": ("cogvideox", ("t2v",)),
    "CogVideoXImageToVideoPipeline": ("cogvideox", ("i2v",)),
}

# frames must be k * step + 1 (the VAE's temporal compression)
_FRAME_STEP: dict[Backend, int] = {"ltx": 8, "ltx2": 8, "wan": 4, "cogvideox": 4}
# height and width must be multiples of this (VAE spatial compression x patch size)
_SIZE_UNIT: dict[Backend, int] = {"ltx": 32, "ltx2": 32, "wan": 16, "cogvideox": 16}


@dataclass(frozen=True)
class VideoRequest:
    """Everything a generated clip depends on (all of it goes into the plate key)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    frames: int = 49
    fps: int = 24
    steps: int = 30
    guidance: float = 5.0
    width: int = 480
    height: int = 832
    # The conditioning image (I2V first frame, LTX condition frame) as PNG/JPEG bytes.
    image: bytes | None = field(default=None, repr=False)

    @property
    def mode(self) -> Mode:
        return "i2v" if self.image is not None else "t2v"

    def key_payload(self) -> dict[str, Any]:
        d = asdict(self)
        img = d.pop("image")
        d["image_sha256"] = hashlib.sha256(img).hexdigest() if img is not None else None
        return d


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 (n, h, w, 3)
    fps: int
    audio: np.ndarray | None = None  # float32 (samples, channels), LTX-2 only
    audio_rate: int = 0


class VideoGenerator(Protocol):
    model_id: str
    backend: Backend
    modes: tuple[Mode, ...]
    calls: int

    def generate(self, req: VideoRequest) -> VideoClip: ...


def plate_key(model_id: str, req: VideoRequest) -> str:
    payload = {"model": model_id, **req.key_payload()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loader


def pipeline_class_name(model_dir: Path | str) -> str:
    path = Path(model_dir)
    index = path / "model_index.json"
    if not index.is_file():
        raise RenderError(
            f"{path} is not a diffusers pipeline directory (no model_index.json); lay the weights "
            "out with pipeline.save_pretrained(dir) (docs/generation.md)"
        )
    try:
        name = str(json.loads(index.read_text(encoding="utf-8"))["_class_name"])
    except (ValueError, KeyError) as exc:
        raise RenderError(f"{index} has no _class_name ({exc})") from exc
    if name not in PIPELINES:
        raise RenderError(
            f"{index} names {name}, which is not a supported video pipeline "
            f"(one of {', '.join(sorted(PIPELINES))})"
        )
    return name


def load_video_pipeline(
    model_dir: Path | str,
    *,
    device: Device = "auto",
    dtype: DType = "auto",
    vae_tiling: bool = True,
    vae_slicing: bool = True,
    cpu_offload: bool = False,
    compile_transformer: bool = False,
) -> Any:
    """THE video loader (production, bench and tests): the pipeline class named by the
    directory's model_index.json, from local files only."""
    import diffusers

    name = pipeline_class_name(model_dir)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cls = getattr(diffusers, name)
    pipe = cls.from_pretrained(str(model_dir), dtype=torch_dtype, local_files_only=True)
    if cpu_offload and dev == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe = pipe.to(dev)
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        if vae_tiling and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()
        if vae_slicing and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()
    if compile_transformer and dev == "cuda":
        import torch

        pipe.transformer = torch.compile(pipe.transformer, mode="max-autotune-no-cudagraphs")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames_for(backend: Backend, frames: int) -> int:
    step = _FRAME_STEP[backend]
    return max(step + 1, round((frames - 1) / step) * step + 1)


def _size_for(backend: Backend, pipe: Any, width: int, height: int) -> tuple[int, int]:
    if backend == "cogvideox":
        cfg = pipe.transformer.config
        if getattr(cfg, "use_learned_positional_embeddings", False):
            # learned position embeddings fix the size: sample_* latents x the VAE scale
            scale = int(getattr(pipe, "vae_scale_factor_spatial", 8))
            return int(cfg.sample_width) * scale, int(cfg.sample_height) * scale
    unit = _SIZE_UNIT[backend]
    return max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)


def _to_uint8_frames(frames: Any) -> np.ndarray:
    arr = np.asarray(frames[0] if isinstance(frames, list | tuple) or np.ndim(frames) == 5 else frames)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        arr = np.clip(np.asarray(arr, np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr[..., :3])


class DiffusersVideoGenerator:
    """One local video pipeline, loaded on first use and kept for the process."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: Device = "auto",
        dtype: DType = "auto",
        vae_tiling: bool = True,
        vae_slicing: bool = True,
        cpu_offload: bool = False,
        compile_transformer: bool = False,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.class_name = pipeline_class_name(self.model_dir)
        self.backend, self.modes = PIPELINES[self.class_name]
        self.fingerprint = model_fingerprint(self.model_dir)
        self.model_id = f"{self.class_name}:{self.model_dir.name}:{self.fingerprint}"
        self.device = device
        self.dtype = dtype
        self._opts = {
            "vae_tiling": vae_tiling,
            "vae_slicing": vae_slicing,
            "cpu_offload": cpu_offload,
            "compile_transformer": compile_transformer,
        }
        self._pipe: Any = None
        self._lock = threading.Lock()
        self.calls = 0

    @classmethod
    def from_pipeline(cls, pipe: Any, model_id: str) -> DiffusersVideoGenerator:
        """A generator around a pipeline already in memory (the bench's full-size models
        with random weights); `model_id` names it."""
        gen = cls.__new__(cls)
        gen.model_dir = Path(model_id)
        gen.class_name = type(pipe).__name__
        if gen.class_name not in PIPELINES:
            raise RenderError(f"{gen.class_name} is not a supported video pipeline")
        gen.backend, gen.modes = PIPELINES[gen.class_name]
        gen.fingerprint = hashlib.sha256(model_id.encode()).hexdigest()[:16]
        gen.model_id = model_id
        gen.device, gen.dtype = "auto", "auto"
        gen._opts = {}
        gen._pipe = pipe
        gen._lock = threading.Lock()
        gen.calls = 0
        return gen

    @property
    def pipeline(self) -> Any:
        with self._lock:
            if self._pipe is None:
                self._pipe = load_video_pipeline(
                    self.model_dir, device=self.device, dtype=self.dtype, **self._opts
                )
            return self._pipe

    def call_kwargs(self, req: VideoRequest) -> dict[str, Any]:
        import inspect

        import torch

        pipe = self.pipeline
        if req.mode not in self.modes:
            raise PermanentError(f"{self.class_name} cannot do {req.mode} (it does {', '.join(self.modes)})")
        width, height = _size_for(self.backend, pipe, req.width, req.height)
        params = inspect.signature(pipe.__call__).parameters
        kw: dict[str, Any] = {
            "prompt": req.prompt,
            "height": height,
            "width": width,
            "num_frames": _frames_for(self.backend, req.frames),
            "num_inference_steps": req.steps,
            "guidance_scale": req.guidance,
            "generator": torch.Generator(device="cpu").manual_seed(req.seed),
            "output_type": "np",
        }
        if req.negative_prompt and "negative_prompt" in params:
            kw["negative_prompt"] = req.negative_prompt
        if "frame_rate" in params:
            kw["frame_rate"] = float(req.fps)
        if "max_sequence_length" in params:
            limit = int(params["max_sequence_length"].default)
            if self.backend == "cogvideox":
                limit = int(getattr(pipe.transformer.config, "max_text_seq_length", limit))
            tok = getattr(pipe, "tokenizer", None)
            tok_max = int(getattr(tok, "model_max_length", limit) or limit)
            kw["max_sequence_length"] = min(limit, tok_max)
        if req.image is not None:
            import io

            with Image.open(io.BytesIO(req.image)) as im:
                img = _cover(im.convert("RGB"), width, height)
            if self.class_name == "LTXConditionPipeline":
                from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

                kw["conditions"] = [LTXVideoCondition(image=img, frame_index=0)]
            else:
                kw["image"] = img
            if "image_crf" in params:
                kw["image_crf"] = 0  # PyAV re-compression of the first frame: not needed here
        return kw

    def generate(self, req: VideoRequest, **extra: Any) -> VideoClip:
        """One clip for `req`; `extra` goes to the pipeline call as is (the bench's step
        callback)."""
        import torch

        kw = {**self.call_kwargs(req), **extra}
        with self._lock, torch.inference_mode():
            out = self._pipe(**kw)
            self.calls += 1
        frames = _to_uint8_frames(out.frames)
        audio = getattr(out, "audio", None)
        rate = 0
        samples: np.ndarray | None = None
        if audio is not None:
            a = audio[0] if isinstance(audio, list | tuple) else audio
            a = a.detach().float().cpu().numpy() if hasattr(a, "detach") else np.asarray(a, np.float32)
            if a.ndim == 3:
                a = a[0]
            samples = np.ascontiguousarray(a.T if a.shape[0] <= 2 else a, dtype=np.float32)
            vocoder = getattr(self._pipe, "vocoder", None)
            rate = int(getattr(getattr(vocoder, "config", None), "output_sampling_rate", 24000) or 24000)
        return VideoClip(frames=frames, fps=req.fps, audio=samples, audio_rate=rate)


def _cover(img: Image.Image, width: int, height: int) -> Image.Image:
    from pipeline.render.generate import cover

    return cover(img, width, height)


# --------------------------------------------------------------------------- fill and fit


def cycle_frames(frames: np.ndarray, fill: Fill) -> np.ndarray:
    """The frames one period of the fill shows: loop as is, ping-pong forward then back
    (end frames not doubled); hold shows the frames once (ffmpeg clones the last one)."""
    if fill == "pingpong" and len(frames) > 2:
        return np.concatenate([frames, frames[-2:0:-1]])
    return frames


def fill_filter(fill: Fill, cycle_len: int, src_fps: int, out_fps: int, w: int, h: int, n_out: int) -> str:
    """ffmpeg filter (after the plate input) that fills `n_out` frames at out_fps, scaled to
    cover w x h and centre-cropped."""
    if fill == "hold":
        timing = f"setpts=N/({src_fps}*TB),tpad=stop_mode=clone:stop=-1"
    else:
        timing = f"loop=loop=-1:size={cycle_len}:start=0,setpts=N/({src_fps}*TB)"
    return (
        f"{timing},fps={out_fps},scale={w}:{h}:force_original_aspect_ratio=increase:flags=lanczos,"
        f"crop={w}:{h},setsar=1,trim=end_frame={n_out}"
    )


# --------------------------------------------------------------------------- encoding


_NVENC_OK: bool | None = None


def nvenc_available() -> bool:
    """Whether this ffmpeg can open h264_nvenc on this machine (a one-frame test encode)."""
    global _NVENC_OK
    if _NVENC_OK is None:
        proc = subprocess.run(
            [
                ffmpeg_exe(),
                "-hide_banner",
                "-nostdin",
                "-f",
                "lavfi",
                "-i",
                "color=c=black:s=256x256:d=0.1",
                "-frames:v",
                "1",
                "-c:v",
                "h264_nvenc",
                "-f",
                "null",
                "-",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        _NVENC_OK = proc.returncode == 0
    return _NVENC_OK


def plate_encoder_args(encoder: Encoder) -> list[str]:
    """Near-lossless H.264 for stored plates; h264_nvenc when asked and present."""
    if encoder == "h264_nvenc":
        if nvenc_available():
            return ["-c:v", "h264_nvenc", "-preset", "p5", "-cq", "12", "-pix_fmt", "yuv420p"]
        log.warning(
            "video_encoder=h264_nvenc but this GPU/ffmpeg has no NVENC (H100/H200 have none); "
            "encoding plates with libx264 on the CPU"
        )
    return ["-c:v", "libx264", "-preset", "fast", "-crf", "10", "-pix_fmt", "yuv420p"]


def encode_plate(clip: VideoClip, out: Path, encoder: Encoder = "libx264") -> Path:
    n, h, w, _ = clip.frames.shape
    pw, ph = w + (w % 2), h + (h % 2)
    run_ffmpeg(
        [
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{w}x{h}",
            "-r",
            str(clip.fps),
            "-i",
            "-",
            "-vf",
            f"pad={pw}:{ph},scale=out_color_matrix=bt709:out_range=tv",
            *plate_encoder_args(encoder),
            "-colorspace",
            "bt709",
            "-color_primaries",
            "bt709",
            "-color_trc",
            "bt709",
            "-frames:v",
            str(n),
            "-movflags",
            "+faststart",
            str(out),
        ],
        input_bytes=clip.frames.tobytes(),
        timeout=600,
    )
    return out


def write_wav(samples: np.ndarray, rate: int, out: Path) -> Path:
    import wave

    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(out), "wb") as wf:
        wf.setnchannels(pcm.shape[1] if pcm.ndim == 2 else 1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(pcm.tobytes())
    return out


# --------------------------------------------------------------------------- the shared cache


@dataclass(frozen=True)
class Plate:
    key: str
    video: Path  # MP4 at the generation size
    frames: int
    fps: int
    audio: Path | None  # WAV (LTX-2's ambience), None when the model makes no sound
    generated_here: bool
    meta: dict[str, Any]


class PlateCache:
    """Plates in the assets bucket (`<prefix>/<key>.mp4|.wav|.json`) and a local copy.

    The JSON sidecar is written last: its presence means the plate is complete. A worker
    that does not find it puts `<key>.claim` with If-None-Match: * ; the one whose put
    succeeds generates, the others wait for the sidecar. A claim older than `claim_ttl_s`
    whose plate never appeared (its worker died) is taken over by overwriting it with
    `If-Match` on its ETag: one node wins, the others keep waiting.
    """

    def __init__(
        self,
        store: ObjectStore | None,
        bucket: str,
        local_dir: Path,
        *,
        prefix: str = "generated/plates",
        claim_ttl_s: float = 1800.0,
        wait_timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        encoder: Encoder = "libx264",
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.local_dir = Path(local_dir)
        self.prefix = prefix.strip("/")
        self.claim_ttl_s = claim_ttl_s
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.encoder = encoder
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.hits = 0
        self.misses = 0

    def _k(self, key: str, ext: str) -> str:
        return f"{self.prefix}/{key[:2]}/{key}.{ext}"

    def _local(self, key: str) -> Path:
        return self.local_dir / key[:2] / key

    def _plate_from_local(self, key: str, generated: bool) -> Plate | None:
        d = self._local(key)
        meta_p = d / "plate.json"
        if not meta_p.is_file():
            return None
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        audio = d / "audio.wav"
        return Plate(
            key,
            d / "plate.mp4",
            int(meta["frames"]),
            int(meta["fps"]),
            audio if audio.is_file() else None,
            generated,
            meta,
        )

    def _download(self, key: str) -> Plate | None:
        if self.store is None:
            return None
        if not self.store.exists(self.bucket, self._k(key, "json")):
            return None
        meta = json.loads(self.store.get_bytes(self.bucket, self._k(key, "json")))
        d = self._local(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=self._ensure(d.parent)))
        try:
            self.store.get_file(self.bucket, self._k(key, "mp4"), tmp / "plate.mp4")
            if meta.get("audio"):
                self.store.get_file(self.bucket, self._k(key, "wav"), tmp / "audio.wav")
            (tmp / "plate.json").write_text(json.dumps(meta), encoding="utf-8")
            self._publish_local(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return self._plate_from_local(key, False)

    @staticmethod
    def _ensure(p: Path) -> Path:
        p.mkdir(parents=True, exist_ok=True)
        return p

    @staticmethod
    def _publish_local(tmp: Path, final: Path) -> None:
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "plate.json").is_file():
                raise

    def _claim_body(self) -> bytes:
        return json.dumps({"owner": self.owner, "at": time.time()}).encode()

    def _claim(self, key: str) -> bool:
        if self.store is None:
            return True
        return self.store.put_if_absent(self.bucket, self._k(key, "claim"), self._claim_body())

    def _take_over_stale(self, key: str) -> str | None:
        """The previous owner when this node replaced a claim older than `claim_ttl_s` with
        its own, else None. The replace is conditional on the ETag of the stale claim as
        read, so of the nodes taking it over at the same moment exactly one wins."""
        if self.store is None:
            return None  # without a shared store every claim is this node's own
        got = self.store.get_versioned(self.bucket, self._k(key, "claim"))
        if got is None:
            return None  # the claim vanished: look again (its plate may be there now)
        body, etag = got
        try:
            info = json.loads(body)
            at, owner = float(info.get("at", 0)), str(info.get("owner", "?"))
        except (ValueError, TypeError, AttributeError):
            at, owner = 0.0, "?"  # S3 puts are atomic: an unreadable claim is garbage
        if time.time() - at <= self.claim_ttl_s:
            return None
        if not self.store.replace_if_match(self.bucket, self._k(key, "claim"), self._claim_body(), etag):
            return None  # another node took it over first
        return owner

    def get(self, key: str, make: Callable[[], VideoClip], meta: dict[str, Any]) -> Plate:
        """The plate `key`, generating it with `make()` only when no node has it."""
        local = self._plate_from_local(key, False)
        if local is not None:
            self.hits += 1
            return local
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            got = self._download(key)
            if got is not None:
                self.hits += 1
                return got
            if self._claim(key):
                return self._generate_claimed(key, make, meta)
            previous = self._take_over_stale(key)
            if previous is not None:
                log.warning(
                    "plate %s: took over the claim of %s (older than %.0f s, no plate)",
                    key, previous, self.claim_ttl_s,
                )  # fmt: skip
                got = self._download(key)  # its owner may have finished after all
                if got is not None:
                    self._release(key)
                    self.hits += 1
                    return got
                return self._generate_claimed(key, make, meta)
            if time.monotonic() > deadline:
                raise RenderError(
                    f"plate {key} did not appear within {self.wait_timeout_s:.0f} s "
                    "(another worker claimed it)"
                )
            time.sleep(self.poll_s)

    def _generate_claimed(self, key: str, make: Callable[[], VideoClip], meta: dict[str, Any]) -> Plate:
        """Generate under this node's claim, and release the claim however it ends."""
        try:
            plate = self._generate(key, make, meta)
        finally:
            self._release(key)
        self.misses += 1
        return plate

    def _release(self, key: str) -> None:
        if self.store is not None:
            self.store.remove(self.bucket, self._k(key, "claim"))

    def _generate(self, key: str, make: Callable[[], VideoClip], meta: dict[str, Any]) -> Plate:
        started = time.perf_counter()
        clip = make()
        gen_s = time.perf_counter() - started
        d = self._local(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:8]}-", dir=self._ensure(d.parent)))
        try:
            encode_plate(clip, tmp / "plate.mp4", self.encoder)
            audio = clip.audio if clip.audio is not None and clip.audio.size > 0 else None
            has_audio = audio is not None
            if audio is not None:
                write_wav(audio, clip.audio_rate, tmp / "audio.wav")
            n, h, w, _ = clip.frames.shape
            full = {
                **meta,
                "key": key,
                "frames": n,
                "fps": clip.fps,
                "width": w,
                "height": h,
                "audio": has_audio,
                "audio_rate": clip.audio_rate,
                "generation_s": round(gen_s, 3),
                "generated_by": self.owner,
            }
            (tmp / "plate.json").write_text(json.dumps(full, sort_keys=True), encoding="utf-8")
            if self.store is not None:
                self.store.put_file(
                    self.bucket, self._k(key, "mp4"), tmp / "plate.mp4", content_type="video/mp4"
                )
                if has_audio:
                    self.store.put_file(
                        self.bucket, self._k(key, "wav"), tmp / "audio.wav", content_type="audio/wav"
                    )
                self.store.put_bytes(
                    self.bucket,
                    self._k(key, "json"),
                    (tmp / "plate.json").read_bytes(),
                    content_type="application/json",
                )
            self._publish_local(tmp, d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        plate = self._plate_from_local(key, True)
        if plate is None:
            raise RenderError(f"plate {key}: generated, but {d} holds no readable plate")
        return plate


# --------------------------------------------------------------------------- GPU scheduling


class GenerationQueue:
    """The GPU side of a worker process: one model per process (loaded once), one GPU
    thread running generations from a bounded queue, and same-plate requests coalesced.

    Only the diffusion runs on the GPU thread; the caller's thread claims, encodes (x264 on
    the CPU) and uploads, so the GPU starts the next generation while a plate is encoded.
    """

    def __init__(self, cache: PlateCache, *, max_pending: int = 8) -> None:
        self.cache = cache
        self._jobs: queue.Queue[tuple[Callable[[], VideoClip], Future[VideoClip]] | None] = queue.Queue(
            maxsize=max(1, max_pending)
        )
        self._inflight: dict[str, Future[Plate]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.coalesced = 0

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            fn, fut = item
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiting caller
                fut.set_exception(exc)

    def _on_gpu(self, fn: Callable[[], VideoClip]) -> VideoClip:
        fut: Future[VideoClip] = Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="gpu-generate", daemon=True)
                self._thread.start()
        self._jobs.put((fn, fut))  # blocks while the backlog is full
        return fut.result()

    def plate(self, gen: VideoGenerator, req: VideoRequest, meta: dict[str, Any] | None = None) -> Plate:
        key = plate_key(gen.model_id, req)
        local = self.cache._plate_from_local(key, False)
        if local is not None:
            self.cache.hits += 1
            return local
        full_meta = {
            "model": gen.model_id,
            "backend": gen.backend,
            "params": req.key_payload(),
            **(meta or {}),
        }
        with self._lock:
            fut = self._inflight.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._inflight[key] = fut
            else:
                self.coalesced += 1
        if not owner:
            return fut.result()
        try:
            plate = self.cache.get(key, lambda: self._on_gpu(lambda: gen.generate(req)), full_meta)
            fut.set_result(plate)
            return plate
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)


def decode_plate(plate: Plate) -> np.ndarray:
    """The plate's frames, uint8 (n, h, w, 3) at the generation size."""
    w, h = int(plate.meta["width"]), int(plate.meta["height"])
    pw, ph = w + (w % 2), h + (h % 2)
    proc = run_ffmpeg(
        ["-i", str(plate.video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        timeout=600,
    )
    frames = np.frombuffer(proc.stdout, np.uint8).reshape(-1, ph, pw, 3)
    return frames[:, :h, :w]


@dataclass(frozen=True)
class VideoDefaults:
    """What a layer gets for the generation fields it leaves out (GREETFLOW_VIDEO_*)."""

    frames: int = 49
    fps: int = 24
    steps: int = 30
    guidance: float = 5.0
    seed: int = 0
    width: int = 480
    height: int = 832


class VideoPlates:
    """The render engine's access to generated motion: the text-to-video generator (shared
    plates), the image-to-video one (living photos), and the shared plate cache."""

    def __init__(
        self,
        queue: GenerationQueue,
        *,
        t2v: VideoGenerator | None = None,
        i2v: VideoGenerator | None = None,
        defaults: VideoDefaults = VideoDefaults(),
    ) -> None:
        self.queue = queue
        self.t2v = t2v
        self.i2v = i2v
        self.defaults = defaults

    def request(
        self,
        src: Any,
        *,
        image: bytes | None = None,
        size: tuple[int, int] | None = None,
    ) -> VideoRequest:
        """The request for a GeneratedVideoSource or a LivingPhotoLayer (fields left out:
        the defaults)."""
        d = self.defaults
        w, h = size or (d.width, d.height)

        def pick(name: str) -> Any:
            v = getattr(src, name, None)
            return getattr(d, name) if v is None else v

        return VideoRequest(
            prompt=src.prompt,
            negative_prompt=src.negative_prompt,
            seed=int(pick("seed")),
            frames=int(pick("frames")),
            fps=int(pick("fps")),
            steps=int(pick("steps")),
            guidance=float(pick("guidance")),
            width=w,
            height=h,
            image=image,
        )

    def style_image(self, refs: Sequence[Any]) -> bytes | None:
        """The first style reference's bytes (from the assets bucket), or None."""
        store = self.queue.cache.store
        for r in refs:
            if getattr(r, "kind", None) == "style" and store is not None:
                local = self.queue.cache.local_dir / "refs" / hashlib.sha256(r.key.encode()).hexdigest()
                if not local.is_file():
                    store.get_file(self.queue.cache.bucket, r.key, local)
                return local.read_bytes()
        return None

    def generator_for(self, req: VideoRequest) -> VideoGenerator:
        if req.mode == "i2v":
            gen = self.i2v
            if gen is None and self.t2v is not None and "i2v" in self.t2v.modes:
                gen = self.t2v
            if gen is None:
                raise PermanentError(
                    "this template animates a photo or conditions on an image, but no image-to-video "
                    "model is configured (GREETFLOW_VIDEO_I2V_MODEL_DIR)"
                )
            return gen
        if self.t2v is None:
            raise PermanentError(
                "this template has a generated_video background, but no text-to-video model is "
                "configured (GREETFLOW_VIDEO_MODEL_DIR)"
            )
        return self.t2v

    def key(self, req: VideoRequest) -> str:
        return plate_key(self.generator_for(req).model_id, req)

    def plate(self, req: VideoRequest, meta: dict[str, Any] | None = None) -> Plate:
        return self.queue.plate(self.generator_for(req), req, meta)


_PLATES: dict[tuple[str, ...], VideoPlates] = {}
_PLATES_LOCK = threading.Lock()


def video_plates_from_settings(settings: Any, store: ObjectStore | None, local_dir: Path) -> VideoPlates:
    """The engine's VideoPlates for GREETFLOW_VIDEO_* settings: one per process and
    configuration, so each model is loaded once per worker (on first use)."""
    ident = (
        str(settings.video_model_dir),
        str(settings.video_i2v_model_dir),
        str(local_dir),
        settings.s3_endpoint,
        settings.bucket_assets,
    )
    with _PLATES_LOCK:
        got = _PLATES.get(ident)
        if got is None:
            got = _PLATES[ident] = _video_plates(settings, store, local_dir)
        return got


def _video_plates(settings: Any, store: ObjectStore | None, local_dir: Path) -> VideoPlates:
    opts: dict[str, Any] = {
        "device": settings.video_device,
        "dtype": settings.video_dtype,
        "vae_tiling": settings.video_vae_tiling,
        "vae_slicing": settings.video_vae_slicing,
        "cpu_offload": settings.video_cpu_offload,
        "compile_transformer": settings.video_compile,
    }
    t2v = DiffusersVideoGenerator(settings.video_model_dir, **opts) if settings.video_model_dir else None
    i2v = (
        DiffusersVideoGenerator(settings.video_i2v_model_dir, **opts)
        if settings.video_i2v_model_dir
        else None
    )
    cache = PlateCache(
        store,
        settings.bucket_assets,
        local_dir,
        prefix=settings.video_plate_prefix,
        claim_ttl_s=settings.video_claim_ttl_s,
        wait_timeout_s=settings.video_wait_s,
        encoder=settings.video_encoder,
    )
    defaults = VideoDefaults(
        frames=settings.video_frames,
        fps=settings.video_fps,
        steps=settings.video_steps,
        guidance=settings.video_guidance,
        seed=settings.video_seed,
        width=settings.video_width,
        height=settings.video_height,
    )
    return VideoPlates(
        GenerationQueue(cache, max_pending=settings.video_queue_max), t2v=t2v, i2v=i2v, defaults=defaults
    )


__all__ = [
    "PIPELINES",
    "DiffusersVideoGenerator",
    "GenerationQueue",
    "Plate",
    "PlateCache",
    "VideoClip",
    "VideoDefaults",
    "VideoGenerator",
    "VideoPlates",
    "VideoRequest",
    "cycle_frames",
    "decode_plate",
    "fill_filter",
    "load_video_pipeline",
    "plate_key",
    "video_plates_from_settings",
]
