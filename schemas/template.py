"""Template files: a declarative greeting clip (YAML), validated before anything renders.

A template names its canvas and variants, its duration (at most 15 s), its layers in time,
its audio (music bed, voice line, effects) and its strings per locale. Strings may hold
merge fields such as `{recipient.name}`; `{{` and `}}` stand for literal braces. Merge
fields are substituted by plain string replacement, never evaluated.

The clip is cut into three segments: the *intro* [0, personal.start), the *personal*
window [personal.start, personal.end) and the *outro* [personal.end, duration). Only
layers that use a merge field (the name text, the subject photo, the captions of the
voice line) may change per recipient, and they must lie inside the personal window; the
rest is rendered once per (template, locale, variant, generator settings) and reused.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas.common import Locale, Slug
from schemas.provenance import VISIBLE_AI_LABEL

MAX_DURATION_S = 15.0

# Fields a template may use, and where their values come from (the render request).
MERGE_FIELDS: dict[str, str] = {
    "recipient.name": "the recipient's display name (RenderRequested.recipient.name)",
}

_FIELD_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_COLOR_RE = r"^#[0-9a-fA-F]{6}$"

Color = Annotated[str, Field(pattern=_COLOR_RE)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def merge_fields_in(text: str) -> list[str]:
    """The merge fields a string uses, in order. Raises ValueError on a malformed brace."""
    out: list[str] = []
    for m in _FIELD_RE.finditer(text):
        tok = m.group(0)
        if tok in ("{{", "}}"):
            continue
        if m.group(1) is None:
            raise ValueError(f"unbalanced {tok!r} in {text!r} (write {{{{ or }}}} for a literal brace)")
        name = m.group(1).strip()
        if name not in MERGE_FIELDS:
            known = ", ".join("{" + k + "}" for k in MERGE_FIELDS)
            raise ValueError(f"unknown merge field {{{name}}} in {text!r}; known fields: {known}")
        out.append(name)
    return out


def split_merge(text: str) -> list[tuple[str, bool]]:
    """A string cut into (literal text, False) and (field name, True) pieces, in order."""
    merge_fields_in(text)  # validates
    pieces: list[tuple[str, bool]] = []
    buf: list[str] = []
    pos = 0
    for m in _FIELD_RE.finditer(text):
        buf.append(text[pos : m.start()])
        tok = m.group(0)
        if tok == "{{":
            buf.append("{")
        elif tok == "}}":
            buf.append("}")
        else:
            if "".join(buf):
                pieces.append(("".join(buf), False))
            buf = []
            pieces.append((str(m.group(1)).strip(), True))
        pos = m.end()
    buf.append(text[pos:])
    if "".join(buf):
        pieces.append(("".join(buf), False))
    return pieces


# A reading in a Japanese voice line: `｜BASE《READING》`, or `BASE《READING》` where BASE is
# the run of kanji just before (Aozora Bunko's ruby notation). The captions show BASE; the
# TTS speaks READING. eSpeak's Japanese voice reads kana only, so a line written for the ear
# alone would put kana where a Japanese reader expects kanji. Only Japanese: in Chinese,
# 《》 are title marks.
_KANJI = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff々〆ヶ"
_RUBY_RE = re.compile(rf"｜([^｜《》]+)《([^｜《》]+)》|([{_KANJI}]+)《([^｜《》]+)》")


def ruby_text(text: str, locale: Locale, *, spoken: bool) -> str:
    """`text` with each reading annotation resolved: its reading (spoken) or its base (shown)."""
    if locale != Locale.JA:
        return text

    def resolve(m: re.Match[str]) -> str:
        return str(m.group(2) or m.group(4)) if spoken else str(m.group(1) or m.group(3))

    return _RUBY_RE.sub(resolve, text)


def check_ruby(text: str) -> None:
    """Raises ValueError on a stray ｜, 《 or 》 (a reading annotation that does not parse)."""
    rest = _RUBY_RE.sub("", text)
    stray = sorted({c for c in rest if c in "｜《》"})
    if stray:
        raise ValueError(
            f"malformed reading annotation in {text!r} (stray {''.join(stray)}); "
            "write ｜BASE《READING》 or KANJI《READING》"
        )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Size(_Model):
    width: int = Field(ge=64, le=4096)
    height: int = Field(ge=64, le=4096)

    @model_validator(mode="after")
    def _even(self) -> Self:
        if self.width % 2 or self.height % 2:
            raise ValueError("width and height must be even (yuv420p)")
        return self


def _default_variants() -> dict[str, Size]:
    return {
        "9x16": Size(width=1080, height=1920),
        "1x1": Size(width=1080, height=1080),
        "16x9": Size(width=1920, height=1080),
    }


class Canvas(_Model):
    fps: int = Field(default=30, ge=12, le=60)
    default_variant: Slug = "9x16"
    variants: dict[Slug, Size] = Field(default_factory=_default_variants)

    @model_validator(mode="after")
    def _default_exists(self) -> Self:
        if self.default_variant not in self.variants:
            raise ValueError(
                f"default_variant {self.default_variant!r} is not one of {sorted(self.variants)}"
            )
        return self


class Window(_Model):
    start: float = Field(ge=0)
    end: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.end <= self.start:
            raise ValueError(f"end ({self.end}) must be after start ({self.start})")
        return self


class Box(_Model):
    """A rectangle in fractions of the platform safe area (x, y of the top-left corner)."""

    x: Fraction = 0.0
    y: Fraction = 0.0
    w: Fraction = 1.0
    h: Fraction = 1.0

    @model_validator(mode="after")
    def _inside(self) -> Self:
        if self.w <= 0 or self.h <= 0:
            raise ValueError("w and h must be positive")
        if self.x + self.w > 1.0001 or self.y + self.h > 1.0001:
            raise ValueError("the box must lie inside the safe area (x + w <= 1, y + h <= 1)")
        return self


# --------------------------------------------------------------------------- sources


class GeneratedSource(_Model):
    """A still made by the generator backend (procedural numpy, or a diffusers model)."""

    kind: Literal["generated"] = "generated"
    # Procedural look; the diffusers backend uses `prompt` instead.
    style: Literal["lunar", "mid-autumn", "winter"]
    prompt: str = Field(min_length=1, max_length=500)
    negative_prompt: str = Field(default="", max_length=500)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    steps: int = Field(default=25, ge=1, le=200)


class GeneratedVideoSource(_Model):
    """A moving plate made by the text-to-video backend (docs/generation.md), generated once
    per content hash (model fingerprint + every field here) and shared by every render node.
    The plate fills the template's duration by `fill` and is scaled and cropped to cover
    the canvas (9:16 at 1080x1920, or the 2K variant)."""

    kind: Literal["generated_video"] = "generated_video"
    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str = Field(default="", max_length=1000)
    # None: the worker's GREETFLOW_VIDEO_{SEED,FRAMES,FPS,STEPS,GUIDANCE}
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    frames: int | None = Field(default=None, ge=9, le=257)
    fps: int | None = Field(default=None, ge=8, le=60)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    fill: Literal["loop", "pingpong", "hold"] = "pingpong"
    # The sound the model generated with the picture (LTX-2), mixed into the music bed at
    # this gain; None: not used. Models without audio ignore it.
    ambience_gain_db: float | None = Field(default=None, ge=-40, le=6)


class ImageSource(_Model):
    kind: Literal["image"] = "image"
    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]*$")  # relative to the template file
    license: str = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _no_parent(cls, v: str) -> str:
        if ".." in v.split("/"):
            raise ValueError("path must not contain '..'")
        return v


class VideoSource(ImageSource):
    kind: Literal["video"] = "video"  # type: ignore[assignment]


Source = Annotated[
    GeneratedSource | GeneratedVideoSource | ImageSource | VideoSource, Field(discriminator="kind")
]


# --------------------------------------------------------------------------- layers


class _Layer(_Model):
    id: Slug
    start: float = Field(default=0.0, ge=0)
    end: float | None = Field(default=None, gt=0)  # None: until the end of the clip


class BackgroundLayer(_Layer):
    type: Literal["background"] = "background"
    source: Source
    # Slow vertical drift (px per second at 1920 px tall) for a living background.
    drift: float = Field(default=8.0, ge=0, le=200)


class ParticlesLayer(_Layer):
    type: Literal["particles"] = "particles"
    style: Literal["bokeh", "snow", "sparkle"]
    count: int = Field(default=60, ge=1, le=2000)
    size: tuple[float, float] = (4.0, 15.0)  # radius range, px at 1920 px tall
    opacity: tuple[Fraction, Fraction] = (0.25, 0.7)
    speed: float = Field(default=22.0, ge=0, le=600)  # px per second at 1920 px tall
    direction: Literal["up", "down"] = "up"
    colors: tuple[Color, ...] = Field(default=("#ffd678", "#ffba50", "#ffecbe"), min_length=1)


class StickerLayer(_Layer):
    type: Literal["sticker"] = "sticker"
    kind: Literal["lanterns", "baubles", "image"]
    path: str | None = None  # kind image: relative to the template file
    text: str | None = None  # a string key drawn on the sticker (lanterns: 福)
    motion: Literal["none", "bob", "sway"] = "bob"


class TextStyle(_Model):
    weight: Literal["regular", "bold"] = "bold"
    fill: tuple[Color, ...] = Field(default=("#fff6e2",), min_length=1, max_length=4)
    stroke: Color | None = None
    glow: Color | None = None
    max_size: int = Field(default=120, ge=8, le=600)  # px at 1920 px tall
    min_size: int = Field(default=40, ge=6, le=600)
    leading: float = Field(default=1.25, ge=0.8, le=3.0)
    max_lines: int = Field(default=2, ge=1, le=6)

    @model_validator(mode="after")
    def _sizes(self) -> Self:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        return self


# What a text layer does with text (a long recipient name) that does not fit its box at
# the style's min_size in max_lines lines: `shrink` below min_size (to half of it), `wrap`
# onto more lines (two more, at most 6), `reject` refuses it. Brief intake runs the same
# fitting code as the renderer, so a name that still does not fit is refused at intake.
Overflow = Literal["shrink", "wrap", "reject"]


class TextLayer(_Layer):
    type: Literal["text"] = "text"
    text: str = Field(min_length=1, max_length=40)  # a key of `strings`
    box: Box
    overflow: Overflow = "reject"
    # Where the text goes when the template has a photo layer but the recipient no photo.
    box_without_photo: Box | None = None
    style: TextStyle = TextStyle()
    animate: Literal["none", "fade", "slide", "pop"] = "fade"
    fade_s: float = Field(default=0.6, ge=0, le=5)
    ornament: bool = False  # a small gold divider under the text


class PhotoLayer(_Layer):
    type: Literal["photo"] = "photo"
    box: Box
    shape: Literal["rounded", "circle"] = "rounded"
    frame: Color = "#f2c45c"
    required: bool = False  # True: a recipient without a photo is refused at brief time
    fade_s: float = Field(default=0.5, ge=0, le=5)


class LivingPhotoLayer(PhotoLayer):
    """The recipient's photo, animated (image-to-video) for the personal window.

    It runs only when every pictured subject holds a consent with scope `animate` (besides
    `face`). A brief whose subjects lack it is refused at intake, unless `fallback` is
    "still": then those recipients get the still photo instead.
    """

    type: Literal["living_photo"] = "living_photo"  # type: ignore[assignment]
    prompt: str = Field(default="the person smiles and waves gently", min_length=1, max_length=1000)
    negative_prompt: str = Field(default="", max_length=1000)
    # None: the worker's GREETFLOW_VIDEO_{SEED,FRAMES,FPS,STEPS,GUIDANCE}
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    frames: int | None = Field(default=None, ge=9, le=257)
    fps: int | None = Field(default=None, ge=8, le=60)
    steps: int | None = Field(default=None, ge=1, le=200)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    fill: Literal["loop", "pingpong", "hold"] = "hold"
    fallback: Literal["none", "still"] = "none"


class LabelLayer(_Layer):
    """The visible AI-generated label, always at the top-left of the safe area. The renderer
    draws `text`, and the moderation check of a clip looks for the same text."""

    type: Literal["label"] = "label"
    text: str = VISIBLE_AI_LABEL


class CaptionsLayer(_Layer):
    """The voice line as timed text (burned in), following the voice."""

    type: Literal["captions"] = "captions"
    box: Box = Box(x=0.0, y=0.86, w=1.0, h=0.14)
    style: TextStyle = TextStyle(weight="bold", max_size=60, min_size=28, max_lines=2)


Layer = Annotated[
    BackgroundLayer
    | ParticlesLayer
    | StickerLayer
    | TextLayer
    | PhotoLayer
    | LivingPhotoLayer
    | LabelLayer
    | CaptionsLayer,
    Field(discriminator="type"),
]

# Layers that never change per recipient unless a merge field says so.
# Within the label band (top of the safe area) nothing but the label may be drawn.
LABEL_BAND = 0.08


# --------------------------------------------------------------------------- audio


class MusicBed(_Model):
    kind: Literal["procedural"] = "procedural"
    mode: Literal["pentatonic", "major", "minor-pentatonic"] = "pentatonic"
    tempo_bpm: float = Field(default=96.0, ge=40, le=200)
    root_midi: int = Field(default=62, ge=36, le=84)
    bells: bool = True
    seed: int = 0


class MusicFile(_Model):
    kind: Literal["file"] = "file"
    path: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9/_.-]*$")
    license: str = Field(min_length=1)


class VoiceLine(_Model):
    text: str = Field(min_length=1, max_length=40)  # a key of `strings`
    start: float = Field(ge=0)
    # Where the voice must have ended; a longer line is spoken faster (up to max_rate).
    end: float = Field(gt=0)
    max_rate: float = Field(default=1.5, ge=1.0, le=2.5)
    duck_db: float = Field(default=-10.0, ge=-40, le=0)
    gain_db: float = Field(default=0.0, ge=-20, le=12)


class Effect(_Model):
    kind: Literal["chime", "sparkle", "boom"]
    at: float = Field(ge=0)
    gain_db: float = Field(default=-6.0, ge=-40, le=6)


class Audio(_Model):
    music: Annotated[MusicBed | MusicFile, Field(discriminator="kind")] = MusicBed()
    music_gain_db: float = Field(default=0.0, ge=-30, le=12)
    voice: VoiceLine | None = None
    effects: tuple[Effect, ...] = ()
    target_lufs: float = Field(default=-14.0, ge=-30, le=-8)
    true_peak_db: float = Field(default=-1.0, ge=-6, le=0)


# --------------------------------------------------------------------------- the template


class Template(_Model):
    """One greeting template (`pipeline/templates/<name>.yaml`)."""

    name: Slug
    version: Slug = "1"
    title: str = Field(min_length=1, max_length=200)
    description: str = ""
    duration_s: float = Field(gt=1.0, le=MAX_DURATION_S)
    canvas: Canvas = Canvas()
    personal: Window
    palette: dict[Slug, Color] = Field(default_factory=dict)
    strings: dict[Locale, dict[Slug, str]] = Field(min_length=1)
    layers: tuple[Layer, ...] = Field(min_length=1)
    audio: Audio = Audio()

    @property
    def locales(self) -> tuple[Locale, ...]:
        return tuple(loc for loc in Locale if loc in self.strings)

    def layer_end(self, layer: _Layer) -> float:
        return self.duration_s if layer.end is None else layer.end

    def is_personal(self, layer: _Layer) -> bool:
        """Whether a layer changes per recipient (it is rendered in the personal window)."""
        if isinstance(layer, PhotoLayer | CaptionsLayer):
            return True
        if isinstance(layer, TextLayer):
            return any(merge_fields_in(s.get(layer.text, "")) for s in self.strings.values())
        return False

    def fields_used(self) -> set[str]:
        out: set[str] = set()
        for strings in self.strings.values():
            for text in strings.values():
                out.update(merge_fields_in(text))
        return out

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        errors: list[str] = []
        d = self.duration_s
        if self.personal.end > d:
            errors.append(f"personal window ends at {self.personal.end} s, after the clip ({d} s)")
        if self.personal.start <= 0 and self.personal.end >= d:
            errors.append("the personal window must leave a shared intro or outro")
        # strings: every locale has every key, and merge fields are known and well formed
        keys = {loc: set(s) for loc, s in self.strings.items()}
        all_keys = set().union(*keys.values())
        for loc, ks in keys.items():
            missing = sorted(all_keys - ks)
            if missing:
                errors.append(f"strings.{loc.value} lacks {', '.join(missing)}")
            for k, text in self.strings[loc].items():
                try:
                    merge_fields_in(text)
                except ValueError as exc:
                    errors.append(f"strings.{loc.value}.{k}: {exc}")
                if not text.strip():
                    errors.append(f"strings.{loc.value}.{k} is empty")
        ids: set[str] = set()
        labels = 0
        backgrounds = 0
        seen_personal: str | None = None
        for i, layer in enumerate(self.layers):
            where = f"layers[{i}] ({layer.id})"
            if layer.id in ids:
                errors.append(f"{where}: duplicate layer id")
            ids.add(layer.id)
            end = self.layer_end(layer)
            if end > d + 1e-6:
                errors.append(f"{where}: ends at {end} s, after the clip ({d} s)")
            if end <= layer.start:
                errors.append(f"{where}: end ({end}) must be after start ({layer.start})")
            key = layer.text if isinstance(layer, TextLayer | StickerLayer) else None
            if key and key not in all_keys:
                errors.append(f"{where}: text {key!r} is not a key of strings")
            if isinstance(layer, TextLayer | PhotoLayer | CaptionsLayer) and layer.box.y < LABEL_BAND:
                errors.append(f"{where}: box.y must be >= {LABEL_BAND} (the AI label band)")
            if isinstance(layer, LabelLayer):
                labels += 1
                if layer.start > 0 or end < d:
                    errors.append(f"{where}: the AI label must show for the whole clip")
            if isinstance(layer, BackgroundLayer):
                backgrounds += 1
                if i != 0:
                    errors.append(f"{where}: the background must be the first layer")
            try:
                personal = self.is_personal(layer)
            except ValueError:
                personal = False  # reported above
            if personal:
                seen_personal = seen_personal or layer.id
                if layer.start < self.personal.start - 1e-6 or end > self.personal.end + 1e-6:
                    errors.append(
                        f"{where}: changes per recipient, so it must lie inside the personal "
                        f"window [{self.personal.start}, {self.personal.end}] s (it spans "
                        f"[{layer.start}, {end}] s)"
                    )
            elif seen_personal is not None and not isinstance(layer, LabelLayer):
                overlaps = layer.start < self.personal.end and end > self.personal.start
                if overlaps:
                    errors.append(
                        f"{where}: a shared layer listed after the personal layer {seen_personal!r} "
                        "overlaps the personal window; there personal layers are drawn over all "
                        "shared ones, so list it before them"
                    )
        if labels != 1:
            errors.append(f"a template needs exactly one label layer (the visible AI label), found {labels}")
        if backgrounds != 1:
            errors.append(f"a template needs exactly one background layer, found {backgrounds}")
        voice = self.audio.voice
        if voice is not None:
            if voice.text not in all_keys:
                errors.append(f"audio.voice.text {voice.text!r} is not a key of strings")
            try:
                check_ruby(self.strings.get(Locale.JA, {}).get(voice.text, ""))
            except ValueError as exc:
                errors.append(f"strings.ja.{voice.text}: {exc}")
            if voice.end <= voice.start:
                errors.append("audio.voice.end must be after audio.voice.start")
            if voice.start < self.personal.start or voice.end > self.personal.end:
                errors.append(
                    f"audio.voice [{voice.start}, {voice.end}] s must lie inside the personal window "
                    f"[{self.personal.start}, {self.personal.end}] s (its captions are personal)"
                )
        for e in self.audio.effects:
            if e.at >= d:
                errors.append(f"audio effect {e.kind} at {e.at} s is after the end of the clip")
        if errors:
            raise ValueError("; ".join(errors))
        return self
