"""Generated visuals: a generator interface with two backends and a content-hash cache.

- `procedural`: festive backgrounds drawn with numpy (no model); the embedded default.
- `diffusers`: a text-to-image pipeline loaded from a LOCAL directory (never a hub) with
  `AutoPipelineForText2Image.from_pretrained(dir)` (falling back to `DiffusionPipeline`),
  on cuda when present else cpu, fp16/bf16 on GPU. The model is loaded once per worker;
  requests that share a prompt are batched together; every image has a fixed seed.

Generated stills are cached on disk by a content hash of (model, prompt, seed, size, steps),
so a campaign generates each shared visual once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

from pipeline.render.draw import REF_H, background, seigaiha, smoothstep, to_u8
from pipeline.render.media import RenderError

log = logging.getLogger(__name__)

Style = Literal["lunar", "mid-autumn", "winter"]


@dataclass(frozen=True)
class GenRequest:
    prompt: str
    style: Style
    seed: int
    width: int
    height: int
    steps: int = 25
    negative_prompt: str = ""


class Generator(Protocol):
    """Makes RGB stills. `model_id` names the model and its weights (part of cache keys)."""

    model_id: str

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image]: ...


# --------------------------------------------------------------------------- procedural


def _stars(img: np.ndarray, rng: np.random.Generator, count: int, top_frac: float = 0.7) -> None:
    h, w, _ = img.shape
    ys = (rng.random(count) ** 1.6 * h * top_frac).astype(int)
    xs = rng.integers(0, w, count)
    bright = rng.uniform(60, 200, count).astype(np.float32)
    for x, y, b in zip(xs, ys, bright, strict=True):
        img[y, x] = np.minimum(255, img[y, x] + b)
        if b > 150 and 0 < x < w - 1 and 0 < y < h - 1:
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                img[y + dy, x + dx] = np.minimum(255, img[y + dy, x + dx] + b * 0.35)


def _clouds(width: int, height: int, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Soft value-noise clouds, float32 (height, width) in 0..1."""
    out = np.zeros((height, width), np.float32)
    for octave, amp in ((4, 0.55), (9, 0.3), (19, 0.15)):
        gh, gw = max(2, int(octave * height / width * scale)), max(2, int(octave * scale))
        grid = rng.random((gh + 1, gw + 1)).astype(np.float32)
        img = Image.fromarray((grid * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
        out += np.asarray(img, np.float32) / 255.0 * amp
    return out


def mid_autumn_background(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Night sky: indigo gradient, stars, a large glowing full moon, drifting clouds, and a
    warm glow on the horizon. uint8 RGB (height, width, 3)."""
    f32 = np.float32
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=f32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=f32)[None, :]
    top, mid, bottom = np.array((10, 14, 48), f32), np.array((34, 30, 92), f32), np.array((92, 44, 70), f32)
    t = y[..., None]
    img = np.where(t < 0.6, top + (mid - top) * (t / 0.6), mid + (bottom - mid) * ((t - 0.6) / 0.4))
    img = np.repeat(img, width, axis=1).astype(f32)
    _stars(img, rng, int(width * height / 2600))
    aspect = f32(width / height)
    mr = f32(0.17 if width < height else 0.24)  # moon radius, fraction of the width (portrait)
    mcx, mcy = f32(0.68), f32(0.2 if width < height else 0.3)
    dx = (x - mcx) * aspect
    dy = y - mcy
    d = np.sqrt(dx**2 + dy**2) / (mr * aspect)
    glow = np.exp(-np.maximum(d - 1.0, 0) * 2.2) * (d > 0.98)
    img += glow[..., None] * np.array((120, 100, 60), f32) * f32(0.55)
    disc = 1.0 - smoothstep(0.985, 1.0, d)
    tex = _clouds(width, height, rng, 3.0)
    moon = np.array((255, 236, 178), f32) * (1 - 0.16 * tex[..., None]) * (1 - 0.12 * (d**2)[..., None])
    img = img * (1 - disc[..., None]) + moon * disc[..., None]
    clouds = _clouds(width, height, rng, 1.4)
    band = (
        smoothstep(0.55, 0.85, clouds)
        * (0.5 + 0.5 * smoothstep(0.1, 0.35, y))
        * (1 - smoothstep(0.7, 0.95, y))
    )
    img = img * (1 - 0.45 * band[..., None]) + np.array((150, 140, 190), f32) * (0.45 * band[..., None])
    horizon = np.exp(-(((y - 1.0) / 0.22) ** 2))
    img += horizon[..., None] * np.array((90, 40, 10), f32)
    v = np.sqrt(((x - 0.5) * 1.2) ** 2 + (y - 0.45) ** 2)
    img *= (1.0 - f32(0.4) * smoothstep(0.4, 0.95, v))[..., None]
    return to_u8(img, rng)


def winter_background(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """Winter night: deep blue-green gradient, faint stars, warm glow behind the text, snowy
    hills along the bottom. uint8 RGB (height, width, 3)."""
    f32 = np.float32
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=f32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=f32)[None, :]
    top, bottom = np.array((8, 26, 54), f32), np.array((10, 70, 70), f32)
    t = (y**1.2)[..., None]
    img = np.repeat(top * (1 - t) + bottom * t, width, axis=1).astype(f32)
    _stars(img, rng, int(width * height / 3500), top_frac=0.6)
    aspect = f32(width / height)
    glow = np.exp(-(((x - 0.5) * aspect) ** 2 + (y - 0.42) ** 2) / f32(0.3**2))
    img += glow[..., None] * np.array((70, 62, 58), f32)
    # two layers of snowy hills
    for base, amp, freq, shade in ((0.82, 0.014, 1.3, 200.0), (0.88, 0.012, 2.1, 235.0)):
        phase = float(rng.uniform(0, 2 * math.pi))
        ridge = (
            base
            + amp * np.sin(2 * math.pi * freq * x + phase)
            + amp * 0.25 * np.sin(2 * math.pi * freq * 2.7 * x)
        )
        cover = smoothstep(-0.004, 0.004, y - ridge)
        snow = (
            np.array((shade * 0.86, shade * 0.93, shade), f32)
            * (1 - 0.25 * smoothstep(0.0, 0.2, y - ridge))[..., None]
        )
        img = img * (1 - cover[..., None]) + snow * cover[..., None]
    band_top = round(height * 0.9)
    scale = height / REF_H
    waves = seigaiha(width, height - band_top, 48 * scale)
    wa = (waves * 0.06)[..., None]
    img[band_top:] = img[band_top:] * (1 - wa) + np.array((255, 255, 255), f32) * wa
    v = np.sqrt(((x - 0.5) * 1.2) ** 2 + (y - 0.45) ** 2)
    img *= (1.0 - f32(0.35) * smoothstep(0.4, 0.95, v))[..., None]
    return to_u8(img, rng)


PROCEDURAL_STYLES = {
    "lunar": background,
    "mid-autumn": mid_autumn_background,
    "winter": winter_background,
}


class ProceduralGenerator:
    """Festive backgrounds from numpy; the prompt is ignored, the style and seed decide."""

    model_id = "procedural-v1"

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image]:
        out = []
        for r in requests:
            fn = PROCEDURAL_STYLES[r.style]
            out.append(Image.fromarray(fn(r.width, r.height, seed=r.seed)))
        return out


# --------------------------------------------------------------------------- diffusers

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]


def resolve_device(device: Device = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RenderError("render_device is cuda but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: DType, device: str) -> Any:
    import torch

    if dtype == "auto":
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def load_diffusion_pipeline(model_dir: Path | str, *, device: Device = "auto", dtype: DType = "auto") -> Any:
    """THE loader (production and tests): a text-to-image pipeline from a local directory.

    Nothing is downloaded: the directory must hold a pipeline saved with
    `save_pretrained` (model_index.json and one folder per component).
    """
    import diffusers

    path = Path(model_dir)
    if not (path / "model_index.json").is_file():
        raise RenderError(
            f"{path} is not a diffusers pipeline directory (no model_index.json); save one with "
            "pipeline.save_pretrained(dir), or use generator_backend=procedural"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    try:
        pipe = diffusers.AutoPipelineForText2Image.from_pretrained(str(path), **kwargs)  # type: ignore[no-untyped-call]
    except (ValueError, KeyError, AttributeError) as exc:
        log.info("AutoPipelineForText2Image cannot load %s (%s); using DiffusionPipeline", path, exc)
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), **kwargs)  # type: ignore[no-untyped-call]
    pipe = pipe.to(dev)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # festive backgrounds; the moderation step checks clips
    return pipe


def model_fingerprint(model_dir: Path | str) -> str:
    """Identity of a local model: its configs and the sizes of its weight files."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(root).as_posix()
        if f.suffix in (".json", ".txt"):
            h.update(rel.encode() + b"\0" + f.read_bytes())
        else:
            h.update(rel.encode() + b"\0" + str(f.stat().st_size).encode())
    return h.hexdigest()[:16]


class DiffusersGenerator:
    """Text-to-image with a local diffusers pipeline, loaded once, batched by prompt."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        device: Device = "auto",
        dtype: DType = "auto",
        batch_size: int = 4,
        native_size: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.native_size = native_size
        self.model_id = f"diffusers:{self.model_dir.name}:{model_fingerprint(self.model_dir)}"
        self._pipe: Any = None
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> Any:
        with self._lock:
            if self._pipe is None:
                self._pipe = load_diffusion_pipeline(self.model_dir, device=self.device, dtype=self.dtype)
            return self._pipe

    def _gen_size(self, width: int, height: int) -> tuple[int, int]:
        """Model-friendly size with the target's aspect (multiples of 8 x the VAE scale)."""
        pipe = self.pipeline
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        native = self.native_size
        if native is None:
            unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
            sample = getattr(getattr(unet, "config", None), "sample_size", 64) or 64
            native = int(sample if isinstance(sample, int) else sample[0]) * vae_scale
        unit = vae_scale * 8
        scale = native / math.sqrt(width * height)
        gw = max(unit, round(width * scale / unit) * unit)
        gh = max(unit, round(height * scale / unit) * unit)
        return gw, gh

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image]:
        import torch

        pipe = self.pipeline
        dev = resolve_device(self.device)
        results: dict[int, Image.Image] = {}
        groups: dict[tuple[str, str, int, int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.prompt, r.negative_prompt, r.steps, r.width, r.height)].append(i)
        for (prompt, negative, steps, width, height), idxs in groups.items():
            gw, gh = self._gen_size(width, height)
            for k in range(0, len(idxs), self.batch_size):
                batch = idxs[k : k + self.batch_size]
                gens = [torch.Generator(device=dev).manual_seed(requests[i].seed) for i in batch]
                kwargs: dict[str, Any] = {
                    "prompt": [prompt] * len(batch),
                    "num_inference_steps": steps,
                    "generator": gens,
                    "height": gh,
                    "width": gw,
                    "output_type": "pil",
                }
                if negative:
                    kwargs["negative_prompt"] = [negative] * len(batch)
                with torch.inference_mode():
                    images = pipe(**kwargs).images
                for i, im in zip(batch, images, strict=True):
                    results[i] = cover(im.convert("RGB"), width, height)
        return [results[i] for i in range(len(requests))]


def cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height and center-crop."""
    s = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * s)), max(height, round(img.height * s))
    img = img.resize((w, h), Image.Resampling.LANCZOS)
    x, y = (w - width) // 2, (h - height) // 2
    return img.crop((x, y, x + width, y + height))


# --------------------------------------------------------------------------- cache


def asset_key(model_id: str, r: GenRequest) -> str:
    """Content hash of (model, prompt, seed, size, steps) (+ style and negative prompt)."""
    payload = {"model": model_id, **asdict(r)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class CachedGenerator:
    """Wraps a generator with an on-disk PNG cache keyed by asset_key."""

    def __init__(self, inner: Generator, cache_dir: Path) -> None:
        self.inner = inner
        self.cache_dir = Path(cache_dir)
        self.model_id = inner.model_id
        self.hits = 0
        self.misses = 0

    def path_for(self, r: GenRequest) -> Path:
        key = asset_key(self.model_id, r)
        return self.cache_dir / key[:2] / f"{key}.png"

    def generate(self, requests: Sequence[GenRequest]) -> list[Image.Image]:
        out: dict[int, Image.Image] = {}
        todo: list[int] = []
        for i, r in enumerate(requests):
            p = self.path_for(r)
            if p.is_file():
                with Image.open(p) as im:
                    out[i] = im.convert("RGB")
                self.hits += 1
            else:
                todo.append(i)
        if todo:
            made = self.inner.generate([requests[i] for i in todo])
            for i, im in zip(todo, made, strict=True):
                p = self.path_for(requests[i])
                p.parent.mkdir(parents=True, exist_ok=True)
                tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
                im.save(tmp, format="PNG")
                os.replace(tmp, p)
                out[i] = im
                self.misses += 1
        return [out[i] for i in range(len(requests))]


_GENERATORS: dict[tuple[str, str, str, str], Generator] = {}
_GEN_LOCK = threading.Lock()


def make_generator(
    backend: Literal["procedural", "diffusers"],
    *,
    model_dir: Path | None = None,
    device: Device = "auto",
    dtype: DType = "auto",
    cache_dir: Path | None = None,
) -> Generator:
    """The generator for the settings; one per process and configuration (model loaded once)."""
    key = (backend, str(model_dir), device + dtype, str(cache_dir))
    with _GEN_LOCK:
        gen = _GENERATORS.get(key)
        if gen is None:
            inner: Generator
            if backend == "procedural":
                inner = ProceduralGenerator()
            elif backend == "diffusers":
                if model_dir is None:
                    raise RenderError("generator_backend=diffusers needs GREETFLOW_GENERATOR_MODEL_DIR")
                inner = DiffusersGenerator(model_dir, device=device, dtype=dtype)
            else:
                raise RenderError(f"unknown generator backend {backend!r}")
            gen = CachedGenerator(inner, cache_dir) if cache_dir is not None else inner
            _GENERATORS[key] = gen
        return gen
