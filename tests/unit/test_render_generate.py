"""Generated visuals: procedural backgrounds, the content-hash cache, and a tiny diffusers
pipeline built from config and loaded through the production loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.render.generate import (
    CachedGenerator,
    DiffusersGenerator,
    GenRequest,
    ProceduralGenerator,
    asset_key,
    load_diffusion_pipeline,
    make_generator,
)
from pipeline.render.media import RenderError


@pytest.mark.parametrize("style", ["lunar", "mid-autumn", "winter"])
def test_procedural_styles(style: str) -> None:
    gen = ProceduralGenerator()
    a, b, c = gen.generate(
        [
            GenRequest("x", style, 1, 180, 320),
            GenRequest("x", style, 1, 180, 320),  # type: ignore[arg-type]
            GenRequest("x", style, 2, 180, 320),
        ]
    )  # type: ignore[arg-type]
    assert a.size == (180, 320) and a.mode == "RGB"
    arr = np.asarray(a).astype(np.int32)
    assert arr.std() > 8  # not a flat colour
    assert np.array_equal(np.asarray(a), np.asarray(b))  # fixed seed: same image
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_asset_key_covers_model_prompt_seed_size_steps() -> None:
    base = GenRequest("red lanterns", "lunar", 7, 512, 896, steps=25)
    k = asset_key("m1", base)
    variants = [
        asset_key("m2", base),
        asset_key("m1", GenRequest("gold lanterns", "lunar", 7, 512, 896, steps=25)),
        asset_key("m1", GenRequest("red lanterns", "lunar", 8, 512, 896, steps=25)),
        asset_key("m1", GenRequest("red lanterns", "lunar", 7, 512, 512, steps=25)),
        asset_key("m1", GenRequest("red lanterns", "lunar", 7, 512, 896, steps=30)),
    ]
    assert len({k, *variants}) == 6
    assert asset_key("m1", GenRequest("red lanterns", "lunar", 7, 512, 896, steps=25)) == k


class CountingGenerator:
    model_id = "counting"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate(self, requests: list[GenRequest]) -> list[Image.Image]:
        self.calls.append(len(requests))
        return [Image.new("RGB", (r.width, r.height), (r.seed % 256, 0, 0)) for r in requests]


def test_cache_generates_each_asset_once(tmp_path: Path) -> None:
    inner = CountingGenerator()
    gen = CachedGenerator(inner, tmp_path)
    reqs = [GenRequest("p", "lunar", s, 64, 64) for s in (1, 2)]
    first = gen.generate(reqs)
    again = gen.generate([*reqs, GenRequest("p", "lunar", 3, 64, 64)])
    assert inner.calls == [2, 1]  # only the new seed was generated
    assert [im.getpixel((0, 0)) for im in again] == [(1, 0, 0), (2, 0, 0), (3, 0, 0)]
    assert [im.getpixel((0, 0)) for im in first] == [(1, 0, 0), (2, 0, 0)]
    assert gen.hits == 2 and gen.misses == 3
    assert len(list(tmp_path.rglob("*.png"))) == 3


def test_loader_refuses_a_directory_that_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match=r"model_index\.json"):
        load_diffusion_pipeline(tmp_path)
    with pytest.raises(RenderError, match="GENERATOR_MODEL_DIR"):
        make_generator("diffusers", model_dir=None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.tiny_diffusers import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


def test_tiny_diffusers_pipeline_loads_through_the_product_loader(tiny_model: Path, tmp_path: Path) -> None:
    assert (tiny_model / "model_index.json").is_file()
    pipe = load_diffusion_pipeline(tiny_model, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert str(pipe.device) == "cpu"

    # the same generator class the worker uses (make_generator -> DiffusersGenerator)
    gen = make_generator("diffusers", model_dir=tiny_model, device="cpu", cache_dir=tmp_path / "gen")
    assert isinstance(gen, CachedGenerator) and isinstance(gen.inner, DiffusersGenerator)
    assert gen.model_id.startswith("diffusers:tiny-sd:")
    reqs = [
        GenRequest("red lanterns", "lunar", 1, 90, 160, steps=2),
        GenRequest("red lanterns", "lunar", 2, 90, 160, steps=2),  # batched with the first
        GenRequest("full moon", "mid-autumn", 1, 90, 160, steps=2),
    ]
    images = gen.generate(reqs)
    assert [im.size for im in images] == [(90, 160)] * 3
    a = np.asarray(images[0]).astype(np.int32)
    assert a.std() > 1
    # fixed seeds: the same request gives the same image, another seed another one
    again = DiffusersGenerator(tiny_model, device="cpu").generate([reqs[0], reqs[1]])
    assert np.abs(np.asarray(again[0]).astype(np.int32) - a).max() <= 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    # second call is served from the content-hash cache
    inner = gen.inner
    assert isinstance(inner, DiffusersGenerator)
    gen.generate(reqs)
    assert gen.hits == 3
