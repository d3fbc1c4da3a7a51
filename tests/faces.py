"""Real face photos for likeness tests, from sample data that ships in common wheels:
Grace Hopper (matplotlib) and Eileen Collins, the astronaut (scikit-image). Two different
real people (dlib distance ~0.7); an augmented copy of one photo stays close (~0.2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps


def grace_image() -> Image.Image:
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        return im.convert("RGB")


def astronaut_image() -> Image.Image:
    import skimage.data

    return Image.fromarray(np.asarray(skimage.data.astronaut()))


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)
    return path


def grace(directory: Path) -> Path:
    return _save(grace_image(), directory / "grace_hopper.jpg")


def astronaut(directory: Path) -> Path:
    return _save(astronaut_image(), directory / "astronaut.jpg")


def augmented(img: Image.Image) -> Image.Image:
    """Another picture of the same person: mirrored, rotated, rescaled, brighter."""
    out = ImageOps.mirror(img).rotate(6, resample=Image.Resampling.BICUBIC, fillcolor=(90, 90, 90))
    out = out.resize((int(out.width * 0.7), int(out.height * 0.7)), Image.Resampling.LANCZOS)
    return ImageEnhance.Brightness(out).enhance(1.15)


def grace_selfie(directory: Path) -> Path:
    return _save(augmented(grace_image()), directory / "grace_selfie.jpg")


def _face_crop(img: Image.Image, box: tuple[int, int, int, int], side: int) -> Image.Image:
    return img.crop(box).resize((side, side), Image.Resampling.LANCZOS)


def pair(directory: Path) -> Path:
    """Both people side by side in one square photo, faces large enough to survive the
    renderer's portrait frame."""
    side = 400
    canvas = Image.new("RGB", (2 * side, 2 * side), (200, 200, 200))
    canvas.paste(_face_crop(grace_image(), (110, 60, 410, 360), side), (0, side // 2))
    canvas.paste(_face_crop(astronaut_image(), (140, 40, 310, 210), side), (side, side // 2))
    return _save(canvas, directory / "pair.jpg")


def astronaut_portrait(directory: Path) -> Path:
    """A tighter crop of the astronaut photo: her face fills the picture (a different image
    from the full photo that the gallery enrols)."""
    return _save(astronaut_image().crop((100, 0, 350, 250)), directory / "astronaut_portrait.jpg")
