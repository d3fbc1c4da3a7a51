"""A name that no installed font can draw, for the "no tofu, fail early" tests.

Tries scripts that CJK/Latin font sets rarely cover; fails (never skips) when every one
is covered, so the test cannot silently stop testing anything.
"""

from __future__ import annotations

from pipeline.render.fonts import installed_faces, missing_glyphs_everywhere

CANDIDATES = ("สมชาย", "ᱚᱞ ᱪᱤᱠᱤ", "ꦲꦏ꧀ꦱꦫ", "𐌰𐌱𐌲𐌳")  # Thai, Ol Chiki, Javanese, Gothic


def name_without_font() -> tuple[str, str]:
    """(name, 'U+XXXX' of its first character that no installed font has)."""
    faces = installed_faces()
    for name in CANDIDATES:
        missing = missing_glyphs_everywhere(name, faces)
        if missing:
            return name, f"U+{ord(missing[0]):04X}"
    raise AssertionError(f"every candidate script has a font installed here: {CANDIDATES}")
