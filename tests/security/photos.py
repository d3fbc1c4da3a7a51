"""Photos for the likeness probes, made from the test faces of tests/faces.py: the
astronaut (enrolled as a protected person) at small sizes, and scenes in which her face
is small."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from tests import faces

# The astronaut's face box is about 93 px wide in the 512 px photo.
_FACE_IN_ASTRONAUT = 93 / 512


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=92)
    return path


def resized(img: Image.Image, width: int) -> Image.Image:
    return img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)


def protected_at_width(directory: Path, width: int) -> Path:
    """The protected person's photo scaled down to `width` px (270: a face of ~50 px)."""
    return _save(resized(faces.astronaut_image(), width), directory / f"astronaut-{width}.jpg")


def grace_at_width(directory: Path, width: int) -> Path:
    return _save(resized(faces.grace_image(), width), directory / f"grace-{width}.jpg")


def landscape_thumbnail(directory: Path) -> Path:
    """A 274x171 landscape thumbnail with the protected person at its left (face ~31 px)."""
    canvas = Image.new("RGB", (274, 171), (60, 120, 60))
    canvas.paste(resized(faces.astronaut_image(), 171), (20, 0))
    return _save(canvas, directory / "astronaut-274x171.jpg")


def face_in_scene(directory: Path, face_px: int, size: tuple[int, int] = (1200, 900)) -> Path:
    """The protected person's face at about `face_px` px in the middle of a plain scene.

    At 70 px in 1200x900 the renderer's face finder misses it, so the whole scene is
    drawn into the photo box and the face shows at ~22 px in a 540x960 clip (44 px at
    1920): above the smallest face moderation must find, below what a whole-frame search
    finds."""
    img = faces.astronaut_image()
    side = round(face_px / _FACE_IN_ASTRONAUT)
    canvas = Image.new("RGB", size, (70, 100, 130))
    canvas.paste(
        img.resize((side, side), Image.Resampling.LANCZOS), ((size[0] - side) // 2, (size[1] - side) // 2)
    )
    return _save(canvas, directory / f"scene-face-{face_px}.jpg")
