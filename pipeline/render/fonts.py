"""Find an installed font that really has glyphs for a text (no tofu, ever).

Coverage is decided by the font's cmap (via fontTools), never by measuring rendered
boxes: a missing glyph renders as a perfectly measurable .notdef box.

Noto Sans CJK ships as .ttc collections with one face per region (JP, KR, SC, TC, HK).
The faces share most glyphs but map some code points to region-specific shapes, so the
face is chosen by its family name for the locale, never by a hard-coded index.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from fontTools.ttLib import TTCollection, TTFont, TTLibError

from schemas.common import Locale

Weight = Literal["regular", "bold"]

DEFAULT_FONT_DIRS: tuple[Path, ...] = (
    Path("/usr/share/fonts"),
    Path("/usr/local/share/fonts"),
    Path("~/.local/share/fonts").expanduser(),
    Path("~/.fonts").expanduser(),
)

FONT_SUFFIXES = frozenset({".ttf", ".otf", ".ttc", ".otc"})

INSTALL_HINT = (
    "install the Noto CJK fonts with `apt-get install fonts-noto-cjk` (or run `make deps`), "
    "or pass a directory holding a font that covers them"
)

# Families tried first, in order, for each locale. Any other installed face that covers
# the text is the fallback (so a Latin name in a zh clip or a CJK name in an en clip works).
PREFERRED_FAMILIES: dict[Locale, tuple[str, ...]] = {
    Locale.ZH_HANT_HK: (
        "Noto Sans CJK HK",
        "Noto Sans CJK TC",
        "Source Han Sans HK",
        "Source Han Sans TC",
        "Noto Sans HK",
        "Noto Sans TC",
    ),
    Locale.ZH_HANS_CN: (
        "Noto Sans CJK SC",
        "Source Han Sans SC",
        "Source Han Sans CN",
        "Noto Sans SC",
    ),
    Locale.JA: (
        "Noto Sans CJK JP",
        "Source Han Sans JP",
        "Source Han Sans",
        "Noto Sans JP",
    ),
    Locale.EN: (
        "Noto Sans",
        "Noto Sans CJK SC",
        "Noto Sans CJK JP",
        "Noto Sans CJK TC",
        "DejaVu Sans",
    ),
}

# Characters that are layout, not glyphs: they are never drawn.
_NOT_DRAWN = frozenset("\n\r\t")


class FontNotFoundError(LookupError):
    """No installed font face covers every character of a text."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing: tuple[str, ...] = tuple(missing)


@dataclass(frozen=True)
class FontFace:
    """One face of a font file (a .ttc/.otc holds several; `index` selects one)."""

    path: Path
    index: int
    family: str
    style: str

    @property
    def is_bold(self) -> bool:
        s = self.style.lower()
        return "bold" in s or "black" in s or "heavy" in s

    def missing(self, text: str) -> list[str]:
        return missing_glyphs(self.path, text, self.index)


def describe_chars(chars: Iterable[str]) -> str:
    """'恭' (U+606D), ... for error messages."""
    return ", ".join(f"{c!r} (U+{ord(c):04X})" for c in chars)


@lru_cache(maxsize=64)
def _cmap(path: str, index: int) -> frozenset[int]:
    try:
        font = TTFont(path, fontNumber=index, lazy=True)
    except (OSError, TTLibError) as exc:
        raise FontNotFoundError(f"cannot read font {path} (face {index}): {exc}") from exc
    try:
        cmap = font.getBestCmap()
    finally:
        font.close()
    return frozenset(cmap or {})


def missing_glyphs(font_path: Path | str, text: str, ttc_index: int = 0) -> list[str]:
    """The distinct characters of `text` (in order) that the face has no glyph for.

    Line breaks and tabs are layout and never count as missing.
    """
    covered = _cmap(str(font_path), ttc_index)
    seen: set[str] = set()
    missing: list[str] = []
    for ch in unicodedata.normalize("NFC", text):
        if ch in _NOT_DRAWN or ch in seen:
            continue
        seen.add(ch)
        if ord(ch) not in covered:
            missing.append(ch)
    return missing


def _name(font: TTFont, *ids: int) -> str:
    table = font["name"]
    for name_id in ids:
        value = table.getDebugName(name_id)
        if value:
            return str(value)
    return ""


@lru_cache(maxsize=256)
def _faces_in_file(path: str) -> tuple[FontFace, ...]:
    p = Path(path)
    faces: list[FontFace] = []
    try:
        if p.suffix.lower() in {".ttc", ".otc"}:
            collection = TTCollection(path, lazy=True)
            fonts = list(collection.fonts)
        else:
            collection = None
            fonts = [TTFont(path, lazy=True)]
    except (OSError, TTLibError):
        return ()
    try:
        for index, font in enumerate(fonts):
            try:
                family = _name(font, 16, 1)  # typographic family first, then legacy family
                style = _name(font, 17, 2) or "Regular"
            except (KeyError, OSError, TTLibError):
                continue
            if family:
                faces.append(FontFace(path=p, index=index, family=family, style=style))
    finally:
        if collection is not None:
            collection.close()
        else:
            fonts[0].close()
    return tuple(faces)


def font_dirs(extra_dirs: Sequence[Path | str] = ()) -> tuple[Path, ...]:
    """Directories searched, extra ones first, existing ones only, no duplicates."""
    out: list[Path] = []
    for d in (*(Path(x) for x in extra_dirs), *DEFAULT_FONT_DIRS):
        d = d.expanduser()
        if d.is_dir() and d not in out:
            out.append(d)
    return tuple(out)


@lru_cache(maxsize=16)
def _installed_faces(dirs: tuple[Path, ...]) -> tuple[FontFace, ...]:
    faces: list[FontFace] = []
    for d in dirs:
        files = sorted(f for f in d.rglob("*") if f.suffix.lower() in FONT_SUFFIXES and f.is_file())
        for f in files:
            faces.extend(_faces_in_file(str(f)))
    return tuple(faces)


def installed_faces(extra_dirs: Sequence[Path | str] = ()) -> tuple[FontFace, ...]:
    """Every face in the font directories (results are cached per directory list)."""
    return _installed_faces(font_dirs(extra_dirs))


def _weight_rank(face: FontFace, weight: Weight) -> int:
    style = face.style.lower()
    if weight == "bold":
        return 0 if style == "bold" else 1 if face.is_bold else 2
    return 0 if style in {"regular", "book", "normal"} else 1 if not face.is_bold else 2


def _candidates(faces: Sequence[FontFace], locale: Locale, weight: Weight) -> list[FontFace]:
    preferred = PREFERRED_FAMILIES.get(locale, ())

    def key(face: FontFace) -> tuple[int, int]:
        fam_rank = preferred.index(face.family) if face.family in preferred else len(preferred)
        return (fam_rank, _weight_rank(face, weight))

    # sorted() is stable: ties keep directory order, so extra_dirs win over system dirs
    return sorted(faces, key=key)


def find_font_face(
    text: str,
    locale: Locale,
    *,
    weight: Weight = "bold",
    extra_dirs: Sequence[Path | str] = (),
) -> FontFace:
    """The best installed face that has a glyph for every character of `text`.

    Preference: the locale's families (PREFERRED_FAMILIES) in order, then the requested
    weight, then any other face that covers the text. Raises FontNotFoundError naming
    the characters that no face covers.
    """
    dirs = font_dirs(extra_dirs)
    faces = _installed_faces(dirs)
    for face in _candidates(faces, locale, weight):
        if not face.missing(text):
            return face
    # Nothing covers all of it: name the characters that no face at all covers.
    uncovered = missing_glyphs_everywhere(text, faces)
    searched = ", ".join(str(d) for d in dirs) or "(no font directory exists)"
    if uncovered:
        msg = (
            f"no installed font has glyphs for {describe_chars(uncovered)} "
            f"in {text!r} (locale {locale.value}); {INSTALL_HINT}. Searched: {searched}"
        )
        raise FontNotFoundError(msg, uncovered)
    msg = (
        f"no single installed font covers all of {text!r} (locale {locale.value}); "
        f"{INSTALL_HINT}. Searched: {searched}"
    )
    raise FontNotFoundError(msg, [])


def missing_glyphs_everywhere(text: str, faces: Sequence[FontFace]) -> list[str]:
    """Characters of `text` that none of `faces` has a glyph for."""
    remaining = missing_glyphs(faces[0].path, text, faces[0].index) if faces else None
    if remaining is None:
        seen: dict[str, None] = {}
        for ch in unicodedata.normalize("NFC", text):
            if ch not in _NOT_DRAWN:
                seen.setdefault(ch)
        return list(seen)
    for face in faces[1:]:
        if not remaining:
            break
        still = set(face.missing("".join(remaining)))
        remaining = [c for c in remaining if c in still]
    return remaining


def find_font(
    text: str,
    locale: Locale,
    *,
    weight: Weight = "bold",
    extra_dirs: Sequence[Path | str] = (),
) -> Path:
    """Path of the best font file for `text` (see find_font_face, which also gives the
    face index a .ttc needs)."""
    return find_font_face(text, locale, weight=weight, extra_dirs=extra_dirs).path


def require_glyphs(face: FontFace, text: str) -> None:
    """Raise FontNotFoundError unless `face` has a glyph for every character of `text`."""
    missing = face.missing(text)
    if missing:
        raise FontNotFoundError(
            f"font {face.family} {face.style} ({face.path}, face {face.index}) has no glyph for "
            f"{describe_chars(missing)} in {text!r}; {INSTALL_HINT}",
            missing,
        )
