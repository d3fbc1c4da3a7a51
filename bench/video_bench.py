"""The video mode of bench/gpu_generate.py: GPU-seconds per shared plate (text-to-video)
and per living-photo segment (image-to-video) for each backend.

- `--tiny`: every backend's tiny pipeline (built from configs, tests/unit/tiny_video.py),
  saved with save_pretrained and loaded through the product loader, run on the CPU.
- full size (default): each model's FULL-SIZE architecture, built from its published
  config (below; no download) with random weights, in bf16 on a CUDA GPU. Random weights
  time the same as trained ones. Each generation runs a few denoising steps; the per-step
  time is measured with a step callback, and a plate's cost is text encoding + steps x
  per-step time + VAE decode, at the production settings in PRODUCTION.

The last line printed is JSON.
"""

from __future__ import annotations

import gc
import io
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BACKENDS = ("ltx", "ltx2", "wan", "cogvideox")
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24}


@dataclass(frozen=True)
class Job:
    """One timed generation: the plate or the living-photo segment of a backend."""

    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float


# Production settings per backend and role: a 9:16 plate (cropped to 1080x1920 by the
# engine) and a 3 s square living-photo segment.
PRODUCTION: dict[str, dict[str, Job]] = {
    "ltx": {"t2v": Job(480, 832, 121, 24, 30, 3.0), "i2v": Job(480, 480, 73, 24, 30, 3.0)},
    "ltx2": {"t2v": Job(480, 832, 121, 24, 30, 4.0), "i2v": Job(480, 480, 73, 24, 30, 4.0)},
    "wan": {"t2v": Job(480, 832, 81, 16, 40, 5.0), "i2v": Job(480, 480, 49, 16, 40, 5.0)},
    # CogVideoX's position embeddings fix 480x720 (landscape); the engine crops to 9:16
    "cogvideox": {"t2v": Job(720, 480, 49, 8, 50, 6.0), "i2v": Job(720, 480, 49, 8, 50, 6.0)},
}
TINY = {
    "ltx": Job(32, 32, 9, 8, 2, 1.0),
    "ltx2": Job(32, 32, 9, 25, 2, 1.0),
    "wan": Job(16, 32, 9, 8, 2, 1.0),
    "cogvideox": Job(16, 16, 9, 8, 2, 1.0),
}


def _png(size: int) -> bytes:
    img = Image.new("RGB", (size, size), (200, 60, 40))
    for i in range(0, size, max(2, size // 8)):
        img.paste((40, 180, 220), (i, 0, i + max(1, size // 16), size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def timed(
    gen: Any, job: Job, mode: str, sync: Callable[[], None], *, steps: int | None = None
) -> dict[str, Any]:
    """Run one generation through the product generator; split its time into the part
    before the first step, the mean step, and the part after the last (VAE decode)."""
    from pipeline.render.video import VideoRequest

    req = VideoRequest(
        prompt="red lanterns drifting over a night river, festive, cinematic",
        negative_prompt="text, watermark",
        seed=1,
        frames=job.frames,
        fps=job.fps,
        steps=steps or job.steps,
        guidance=job.guidance,
        width=job.width,
        height=job.height,
        image=_png(min(job.width, job.height)) if mode == "i2v" else None,
    )
    stamps: list[float] = []

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync()
        stamps.append(time.perf_counter())
        return {}

    sync()
    t0 = time.perf_counter()
    clip = gen.generate(req, callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    sync()
    t1 = time.perf_counter()
    n = len(stamps)
    step_s = (stamps[-1] - stamps[0]) / (n - 1) if n > 1 else (stamps[0] - t0 if n else t1 - t0)
    pre_s = max(0.0, (stamps[0] - t0) - step_s) if n else 0.0
    post_s = t1 - stamps[-1] if n else 0.0
    return {
        "frames": int(clip.frames.shape[0]),
        "size": [int(clip.frames.shape[2]), int(clip.frames.shape[1])],
        "seconds": round(t1 - t0, 4),
        "steps_run": n,
        "step_s": round(step_s, 4),
        "encode_s": round(pre_s, 4),
        "decode_s": round(post_s, 4),
        "audio": clip.audio is not None,
    }


def run_tiny(backends: tuple[str, ...] = BACKENDS) -> dict[str, Any]:
    """Each backend's tiny t2v and i2v pipelines on the CPU, through the product loader."""
    from pipeline.render.video import DiffusersVideoGenerator
    from tests.unit.tiny_video import build_tiny_video_pipeline

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tiny-video-") as tmp:
        for backend in backends:
            out[backend] = {}
            for mode in ("t2v", "i2v"):
                model = build_tiny_video_pipeline(Path(tmp), backend, mode)
                gen = DiffusersVideoGenerator(model, device="cpu", dtype="float32")
                gen.pipeline  # noqa: B018 - load before timing
                out[backend][mode] = timed(gen, TINY[backend], mode, lambda: None)
    return out


# --------------------------------------------------------------------------- full size


def _tokenizer(max_length: int = 512) -> Any:
    # A character-level tokenizer: token ids fall inside every encoder's vocabulary, and the
    # sequence length (padded to max_sequence_length) is what the timing depends on.
    from tests.unit.tiny_video import tiny_t5_tokenizer

    return tiny_t5_tokenizer(max_length)


def _t5(vocab: int, umt5: bool = False) -> Any:
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = {
        **T5_XXL,
        "vocab_size": vocab,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
    }
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def full_size_pipeline(backend: str, mode: str) -> Any:
    """The published architecture of each backend (random weights), built on the current
    default device and dtype. LTX-Video 0.9 (2B), LTX-2 (19B, Gemma 3 12B), Wan 2.1 14B
    (UMT5-XXL; I2V with the ViT-H/14 image encoder), CogVideoX-5B (T5-XXL)."""
    import diffusers

    i2v = mode == "i2v"
    if backend == "ltx":
        # diffusers' defaults are the LTX-Video 0.9 configs
        comps: dict[str, Any] = {
            "transformer": diffusers.LTXVideoTransformer3DModel(),
            "vae": diffusers.AutoencoderKLLTXVideo(),
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
            "text_encoder": _t5(32128),
            "tokenizer": _tokenizer(128),
        }
        cls = diffusers.LTXImageToVideoPipeline if i2v else diffusers.LTXPipeline
    elif backend == "ltx2":
        from diffusers.pipelines.ltx2 import LTX2TextConnectors
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
        from transformers import (
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )

        gemma = Gemma3Config(
            text_config=Gemma3TextConfig(
                vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                max_position_embeddings=131072,
            ),
            vision_config=SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                image_size=896, patch_size=14,
            ),
        )  # fmt: skip
        comps = {
            "transformer": diffusers.LTX2VideoTransformer3DModel(),  # defaults: LTX-2 19B
            "vae": diffusers.AutoencoderKLLTX2Video(),
            "audio_vae": diffusers.AutoencoderKLLTX2Audio(),
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(),
            "text_encoder": Gemma3ForConditionalGeneration(gemma).eval(),
            "tokenizer": _tokenizer(1024),
            "connectors": LTX2TextConnectors(),
            "vocoder": LTX2Vocoder(),
            "processor": None,
            "prompt_enhancer": None,
            "duration_head": None,
        }
        cls = diffusers.LTX2ImageToVideoPipeline if i2v else diffusers.LTX2Pipeline
    elif backend == "wan":
        extra: dict[str, Any] = {"image_dim": 1280, "added_kv_proj_dim": 5120} if i2v else {}
        comps = {
            "transformer": diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128,
                in_channels=36 if i2v else 16, out_channels=16, text_dim=4096, freq_dim=256,
                ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                eps=1e-6, rope_max_seq_len=1024, **extra,
            ),
            "vae": diffusers.AutoencoderKLWan(),  # defaults: the Wan 2.1 VAE
            "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            "text_encoder": _t5(256384, umt5=True),
            "tokenizer": _tokenizer(512),
            "transformer_2": None,
        }  # fmt: skip
        if i2v:
            from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

            comps["image_encoder"] = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu",
                )
            )  # fmt: skip
            comps["image_processor"] = CLIPImageProcessor(crop_size=224, size=224)
        cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    elif backend == "cogvideox":
        comps = {
            "transformer": diffusers.CogVideoXTransformer3DModel(
                num_attention_heads=48, attention_head_dim=64, in_channels=32 if i2v else 16,
                out_channels=16, time_embed_dim=512, text_embed_dim=4096, num_layers=42,
                sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=226,
                use_rotary_positional_embeddings=True, use_learned_positional_embeddings=i2v,
            ),
            "vae": diffusers.AutoencoderKLCogVideoX(latent_channels=16, scaling_factor=0.7),
            "scheduler": diffusers.CogVideoXDDIMScheduler(),
            "text_encoder": _t5(32128),
            "tokenizer": _tokenizer(226),
        }  # fmt: skip
        cls = diffusers.CogVideoXImageToVideoPipeline if i2v else diffusers.CogVideoXPipeline
    else:
        raise ValueError(f"unknown backend {backend}")
    return cls(**comps)


def run_full(
    backends: tuple[str, ...] = BACKENDS, *, steps_timed: int = 3, budget_s: float = 450.0
) -> dict[str, Any]:
    """Full-size architectures in bf16 on the GPU; refuses without CUDA."""
    import torch

    from pipeline.render.video import DiffusersVideoGenerator

    if not torch.cuda.is_available():
        raise SystemExit(
            "the full-size video bench needs a CUDA GPU (it builds 2B-19B parameter models in bf16); "
            "use --tiny for the CPU plumbing check"
        )
    started = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "steps_timed": steps_timed}
    for backend in backends:
        out[backend] = {}
        for mode in ("t2v", "i2v"):
            if time.perf_counter() - started > budget_s:
                out[backend][mode] = {"skipped": f"bench budget of {budget_s:.0f} s spent"}
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t_build = time.perf_counter()
            prev = torch.get_default_dtype()
            torch.set_default_dtype(torch.bfloat16)
            try:
                with torch.device("cuda"):
                    pipe = full_size_pipeline(backend, mode)
            finally:
                torch.set_default_dtype(prev)
            pipe.to("cuda", torch.bfloat16)
            pipe.set_progress_bar_config(disable=True)
            vae = getattr(pipe, "vae", None)
            if vae is not None and hasattr(vae, "enable_tiling"):
                vae.enable_tiling()
            build_s = time.perf_counter() - t_build
            job = PRODUCTION[backend][mode]
            gen = DiffusersVideoGenerator.from_pipeline(pipe, f"{type(pipe).__name__}:full-size-random")
            r = timed(gen, job, mode, torch.cuda.synchronize, steps=steps_timed)
            per_plate = r["encode_s"] + r["step_s"] * job.steps + r["decode_s"]
            role = "gpu_s_per_plate" if mode == "t2v" else "gpu_s_per_living_photo_segment"
            out[backend][mode] = {
                **r,
                "production_steps": job.steps,
                role: round(per_plate, 2),
                "frames_per_gpu_s": round(r["frames"] / per_plate, 3),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                "build_s": round(build_s, 1),
            }
            print(f"{backend} {mode}: {json.dumps(out[backend][mode])}", file=sys.stderr, flush=True)
            del gen, pipe, vae
            gc.collect()
            torch.cuda.empty_cache()
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out
