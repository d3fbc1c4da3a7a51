"""Rendering: fonts (no tofu), ffmpeg plumbing, the drawing library (pipeline.render.draw)
and the template engine (render once, personalize a segment; docs/templates.md).

The names below are loaded lazily, so importing a light submodule (pipeline.render.service)
does not pull in numpy, Pillow, fontTools and ffmpeg lookups.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.render.engine import RenderResult, TemplateRenderer, renderer_from_settings
    from pipeline.render.fonts import (
        FontFace,
        FontNotFoundError,
        find_font,
        find_font_face,
        missing_glyphs,
    )
    from pipeline.render.media import (
        AudioStats,
        MediaInfo,
        RenderError,
        audio_stats,
        extract_frame,
        ffmpeg_exe,
        probe,
        run_ffmpeg,
    )
    from pipeline.render.templates import LoadedTemplate, TemplateError, get_template

_EXPORTS = {
    "FontFace": "pipeline.render.fonts",
    "FontNotFoundError": "pipeline.render.fonts",
    "find_font": "pipeline.render.fonts",
    "find_font_face": "pipeline.render.fonts",
    "missing_glyphs": "pipeline.render.fonts",
    "AudioStats": "pipeline.render.media",
    "MediaInfo": "pipeline.render.media",
    "RenderError": "pipeline.render.media",
    "audio_stats": "pipeline.render.media",
    "extract_frame": "pipeline.render.media",
    "ffmpeg_exe": "pipeline.render.media",
    "probe": "pipeline.render.media",
    "run_ffmpeg": "pipeline.render.media",
    "RenderResult": "pipeline.render.engine",
    "TemplateRenderer": "pipeline.render.engine",
    "renderer_from_settings": "pipeline.render.engine",
    "LoadedTemplate": "pipeline.render.templates",
    "TemplateError": "pipeline.render.templates",
    "get_template": "pipeline.render.templates",
}

__all__ = [
    "AudioStats",
    "FontFace",
    "FontNotFoundError",
    "LoadedTemplate",
    "MediaInfo",
    "RenderError",
    "RenderResult",
    "TemplateError",
    "TemplateRenderer",
    "audio_stats",
    "extract_frame",
    "ffmpeg_exe",
    "find_font",
    "find_font_face",
    "get_template",
    "missing_glyphs",
    "probe",
    "renderer_from_settings",
    "run_ffmpeg",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
