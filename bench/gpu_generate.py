"""Generated-visuals throughput on a GPU: images per second through the product's loader.

    # a real text-to-image model saved with save_pretrained (no hub access needed):
    python bench/gpu_generate.py --model-dir /models/sdxl-turbo --steps 4 --size 1024 --batch 4
    # no model at hand: build a tiny pipeline from config and time that (plumbing check)
    python bench/gpu_generate.py --tiny
    # video: every backend (ltx, ltx2, wan, cogvideox), text- and image-to-video
    python bench/gpu_generate.py --video --tiny --json   # tiny pipelines, CPU, product loader
    python bench/gpu_generate.py --video --json          # full-size architectures, bf16, CUDA

It loads the model ONCE with `pipeline.render.generate.load_diffusion_pipeline` (cuda when
present, bf16/fp16 there), warms up, then times `DiffusersGenerator.generate` on batches of
requests that share a prompt (different seeds), exactly as the render worker calls it. The
last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=None, help="local diffusers pipeline directory")
    p.add_argument("--tiny", action="store_true", help="build a tiny pipeline from config and use it")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=512, help="native generation size (square-equivalent)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--prompt", default="red and gold chinese new year background, glowing lanterns, no text")
    p.add_argument("--video", action="store_true", help="time the video backends (bench/video_bench.py)")
    p.add_argument("--json", action="store_true", help="video: print only the JSON line")
    p.add_argument("--backends", default="ltx,ltx2,wan,cogvideox", help="video: comma-separated backends")
    p.add_argument("--steps-timed", type=int, default=3, help="video, full size: denoising steps run")
    a = p.parse_args(argv)
    if a.video:
        return _video(a)

    import torch

    from pipeline.render.generate import DiffusersGenerator, GenRequest, resolve_device

    tmp = None
    model_dir = a.model_dir
    if a.tiny:
        from tests.unit.tiny_diffusers import build_tiny_pipeline

        tmp = tempfile.TemporaryDirectory(prefix="tiny-sd-")
        model_dir = build_tiny_pipeline(Path(tmp.name))
    if model_dir is None:
        p.error("give --model-dir DIR (a save_pretrained pipeline) or --tiny")
    device = resolve_device(a.device)
    if device != "cuda":
        print(f"warning: no CUDA device ({torch.__version__}); timing on {device}", file=sys.stderr)
    gen = DiffusersGenerator(
        model_dir, device=a.device, dtype=a.dtype, batch_size=a.batch, native_size=None if a.tiny else a.size
    )
    t0 = time.perf_counter()
    _ = gen.pipeline
    load_s = time.perf_counter() - t0
    w, h = (a.size * 9 // 16 // 8 * 8, a.size) if not a.tiny else (72, 128)
    reqs = [GenRequest(a.prompt, "lunar", seed, w, h, steps=a.steps) for seed in range(a.images)]
    gen.generate(reqs[: a.batch])  # warm-up: kernels, allocator
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    images = gen.generate(reqs)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    result = {
        "model": gen.model_id,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "dtype": str(gen.pipeline.dtype),
        "steps": a.steps,
        "batch": a.batch,
        "images": len(images),
        "size": list(images[0].size),
        "load_s": round(load_s, 3),
        "seconds": round(dt, 3),
        "images_per_s": round(len(images) / dt, 3),
    }
    print(f"{len(images)} images in {dt:.2f} s on {device}: {len(images) / dt:.2f} images/s")
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return 0


def _video(a: argparse.Namespace) -> int:
    from bench.video_bench import BACKENDS, run_full, run_tiny

    backends = tuple(b.strip() for b in a.backends.split(",") if b.strip())
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(f"unknown backend(s) {', '.join(unknown)} (known: {', '.join(BACKENDS)})", file=sys.stderr)
        return 2
    started = time.perf_counter()
    result = run_tiny(backends) if a.tiny else run_full(backends, steps_timed=a.steps_timed)
    result = {"mode": "tiny-cpu" if a.tiny else "full-size-gpu", **result}
    if not a.json:
        for b in backends:
            for mode, r in result[b].items():
                print(f"{b:10} {mode}: {r.get('frames', '-')} frames in {r.get('seconds', '-')} s")
        print(f"total {time.perf_counter() - started:.1f} s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
