"""Template files: load, validate, find by name, substitute merge fields, check briefs.

Templates ship in `pipeline/templates/*.yaml`; `GREETFLOW_TEMPLATES_DIR` adds a directory
whose files win over the shipped ones of the same name and version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from pipeline.briefs import DocumentError, decode_utf8, one_line, parse_text, read_capped
from pipeline.errors import PermanentError
from schemas.brief import Recipient, TemplateRef
from schemas.common import Locale
from schemas.provenance import VISIBLE_AI_LABEL
from schemas.template import (
    CaptionsLayer,
    ImageSource,
    LabelLayer,
    MusicFile,
    PhotoLayer,
    StickerLayer,
    Template,
    TextLayer,
    merge_fields_in,
    ruby_text,
    split_merge,
)

if TYPE_CHECKING:
    from pipeline.render.tts import TTS, Speech


class TemplateError(PermanentError):
    """A template file is missing or invalid, or a request does not fit its template."""


@dataclass(frozen=True)
class LoadedTemplate:
    """A validated template, where it came from, and a hash of its content (file + assets)."""

    template: Template
    path: Path
    content_hash: str

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def asset(self, relative: str) -> Path:
        p = (self.base_dir / relative).resolve()
        if not p.is_relative_to(self.base_dir.resolve()):
            raise TemplateError(f"template {self.template.name}: asset {relative!r} is outside its folder")
        if not p.is_file():
            raise TemplateError(f"template {self.template.name}: asset {relative!r} does not exist ({p})")
        return p


def _format_validation(exc: ValidationError, source: str) -> str:
    """Every problem, in one line: `source: not a valid template: loc: msg; loc: msg`."""
    parts: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.extend(f"{loc}: {one_line(part)}" for part in msg.split("; "))
    return f"{source}: not a valid template: {'; '.join(parts)}"


def _asset_paths(t: Template) -> list[str]:
    out: list[str] = []
    for layer in t.layers:
        src = getattr(layer, "source", None)
        if isinstance(src, ImageSource):
            out.append(src.path)
        if isinstance(layer, StickerLayer) and layer.path:
            out.append(layer.path)
    if isinstance(t.audio.music, MusicFile):
        out.append(t.audio.music.path)
    return out


def parse_template(data: object, *, source: str = "template") -> Template:
    try:
        return Template.model_validate(data)
    except ValidationError as exc:
        raise TemplateError(_format_validation(exc, source)) from exc


def load_template_file(
    path: Path | str, *, max_bytes: int | None = None, max_depth: int | None = None
) -> LoadedTemplate:
    """Read and validate one template file (YAML or JSON), including its assets. The size
    and depth limits default to GREETFLOW_INTAKE_MAX_TEMPLATE_BYTES / _MAX_DEPTH."""
    from pipeline.settings import get_settings

    p = Path(path)
    settings = get_settings()
    max_bytes = settings.intake_max_template_bytes if max_bytes is None else max_bytes
    max_depth = settings.intake_max_depth if max_depth is None else max_depth
    try:
        raw = read_capped(p, max_bytes)
        data = parse_text(
            decode_utf8(raw, str(p)),
            source=str(p),
            json_format=p.suffix.lower() == ".json",
            max_depth=max_depth,
        )
    except DocumentError as exc:
        raise TemplateError(str(exc)) from exc
    template = parse_template(data, source=str(p))
    h = hashlib.sha256()
    h.update(json.dumps(template.model_dump(mode="json"), sort_keys=True, ensure_ascii=False).encode())
    loaded = LoadedTemplate(template=template, path=p, content_hash="")
    for rel in _asset_paths(template):
        asset = loaded.asset(rel)
        h.update(rel.encode() + b"\0" + hashlib.sha256(asset.read_bytes()).digest())
    for layer in template.layers:
        if isinstance(layer, StickerLayer) and layer.kind == "image" and not layer.path:
            raise TemplateError(f"{p}: sticker {layer.id} of kind image needs a path")
    return LoadedTemplate(template=template, path=p, content_hash=h.hexdigest())


def shipped_templates_dir() -> Path:
    return Path(str(resources.files("pipeline.templates")))


def template_dirs(extra: Path | None = None) -> tuple[Path, ...]:
    dirs = [shipped_templates_dir()]
    if extra is not None:
        dirs.insert(0, extra)
    return tuple(dirs)


@lru_cache(maxsize=8)
def _catalog(dirs: tuple[Path, ...]) -> dict[tuple[str, str], LoadedTemplate]:
    out: dict[tuple[str, str], LoadedTemplate] = {}
    for d in reversed(dirs):  # earlier directories win
        if not d.is_dir():
            continue
        for f in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
            t = load_template_file(f)
            out[(t.template.name, t.template.version)] = t
    return out


def catalog(extra_dir: Path | None = None) -> dict[tuple[str, str], LoadedTemplate]:
    """Every template found, by (name, version)."""
    return _catalog(template_dirs(extra_dir))


def get_template(ref: TemplateRef | str, extra_dir: Path | None = None) -> LoadedTemplate:
    name, version = (ref, None) if isinstance(ref, str) else (ref.name, ref.version)
    cat = catalog(extra_dir)
    if version is None:
        versions = sorted((v for (n, v) in cat if n == name), key=lambda v: (len(v), v))
        if versions:
            return cat[(name, versions[-1])]
    elif (name, version) in cat:
        return cat[(name, version)]
    known = ", ".join(f"{n}@{v}" for n, v in sorted(cat)) or "(none)"
    want = name if version is None else f"{name}@{version}"
    raise TemplateError(f"no template {want}; known templates: {known}")


# --------------------------------------------------------------------------- merge fields


def merge_values(name: str) -> dict[str, str]:
    return {"recipient.name": name}


def substitute(text: str, values: Mapping[str, str]) -> str:
    """Replace {field} by its value: plain replacement, the value is never interpreted."""
    out: list[str] = []
    for piece, is_field in split_merge(text):
        if is_field:
            if piece not in values:
                raise TemplateError(f"merge field {{{piece}}} has no value")
            out.append(values[piece])
        else:
            out.append(piece)
    return "".join(out)


def localized(t: Template, locale: Locale, key: str) -> str:
    try:
        return t.strings[locale][key]
    except KeyError as exc:
        supported = ", ".join(loc.value for loc in t.locales)
        raise TemplateError(
            f"template {t.name} has no {locale.value} strings (it supports {supported})"
        ) from exc


# --------------------------------------------------------------------------- brief checks


def label_text(t: Template) -> str:
    """The visible AI label the template draws: its label layer's text, else the default."""
    for layer in t.layers:
        if isinstance(layer, LabelLayer) and layer.text:
            return layer.text
    return VISIBLE_AI_LABEL


def drawn_texts(t: Template, locale: Locale) -> list[str]:
    """Every string the template draws for a locale, with merge fields left in."""
    out: list[str] = []
    for layer in t.layers:
        if isinstance(layer, TextLayer | StickerLayer) and layer.text:
            out.append(localized(t, locale, layer.text))
        elif isinstance(layer, CaptionsLayer) and t.audio.voice is not None:
            # captions show the base of a reading annotation, never the reading
            out.append(ruby_text(localized(t, locale, t.audio.voice.text), locale, spoken=False))
    return out


def _longest_fitting_prefix(name: str, fits: Callable[[str], bool]) -> int:
    """How many leading characters of `name` fit (binary search; 0 when none does)."""
    lo, hi = 0, len(name) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(name[:mid].rstrip()):
            lo = mid
        else:
            hi = mid - 1
    return lo


_FIT_CACHE: dict[tuple[object, ...], tuple[str, ...]] = {}


def fit_problems(
    loaded: LoadedTemplate,
    recipient: Recipient,
    locale: Locale,
    *,
    frame: tuple[int, int],
    tts: TTS | None,
    font_dirs: Sequence[Path | str] = (),
) -> list[str]:
    """Whether the recipient's name fits every personal text layer, the voice line and its
    captions at the render size `frame`, with the renderer's own fitting code
    (`pipeline.render.layout`): what passes here cannot fail at render for want of room."""
    key = (loaded.content_hash, locale, recipient.name, recipient.photo_key is None, frame, tuple(font_dirs))
    hit = _FIT_CACHE.get(key)
    if hit is None:
        hit = tuple(_fit_problems(loaded, recipient, locale, frame=frame, tts=tts, font_dirs=font_dirs))
        if len(_FIT_CACHE) > 50_000:
            _FIT_CACHE.clear()
        _FIT_CACHE[key] = hit
    return list(hit)


def _fit_problems(
    loaded: LoadedTemplate,
    recipient: Recipient,
    locale: Locale,
    *,
    frame: tuple[int, int],
    tts: TTS | None,
    font_dirs: Sequence[Path | str],
) -> list[str]:
    from pipeline.render.compose import box_px, size_scale
    from pipeline.render.draw import safe_area
    from pipeline.render.engine import make_cues, speech_parts
    from pipeline.render.fonts import find_font_face
    from pipeline.render.layout import TextDoesNotFit, VoiceDoesNotFit, fit_text_box, fit_voice

    t = loaded.template
    w, h = frame
    scale, area = size_scale(w, h), safe_area(w, h)
    name = recipient.name
    where = f"recipient {recipient.id}: name {name!r} ({len(name)} characters)"
    at = f"template {t.name} ({locale.value}, {w}x{h})"
    has_photo_layer = any(isinstance(la, PhotoLayer) for la in t.layers)
    problems: list[str] = []

    for layer in t.layers:
        if not isinstance(layer, TextLayer):
            continue
        raw = localized(t, locale, layer.text)
        if "recipient.name" not in merge_fields_in(raw):
            continue
        fbox = layer.box
        if recipient.photo_key is None and has_photo_layer and layer.box_without_photo is not None:
            fbox = layer.box_without_photo
        px = box_px(area, fbox)

        def fits(
            value: str, layer: TextLayer = layer, raw: str = raw, bw: int = px.width, bh: int = px.height
        ) -> bool:
            text = substitute(raw, merge_values(value))
            face = find_font_face(
                text.replace("\n", ""), locale, weight=layer.style.weight, extra_dirs=font_dirs
            )
            try:
                fit_text_box(
                    text,
                    face,
                    box_width=bw,
                    box_height=bh,
                    style=layer.style,
                    scale=scale,
                    ornament=layer.ornament,
                    overflow=layer.overflow,
                    check_only=True,
                )
            except TextDoesNotFit:
                return False
            return True

        if not fits(name):
            limit = _longest_fitting_prefix(name, fits)
            problems.append(
                f"{where} does not fit text layer {layer.id!r} of {at} (overflow: {layer.overflow}); "
                f"at most {limit} characters of it fit"
            )

    voice = t.audio.voice
    if (
        voice is None
        or tts is None
        or "recipient.name" not in merge_fields_in(localized(t, locale, voice.text))
    ):
        return problems
    voice_text = localized(t, locale, voice.text)
    room = voice.end - voice.start

    def speak(value: str) -> tuple[list[str], Speech] | None:
        pieces = speech_parts(voice_text, locale, value)
        try:
            speech = fit_voice(tts, [p for p, _ in pieces], room_s=room, max_rate=voice.max_rate)
        except VoiceDoesNotFit:
            return None
        return [shown for _, shown in pieces], speech

    spoken = speak(name)
    if spoken is None:
        limit = _longest_fitting_prefix(name, lambda v: speak(v) is not None)
        problems.append(
            f"{where} is too long for the voice line of {at}: spoken at up to {voice.max_rate:.2f}x it "
            f"still takes longer than the {room:.2f} s the template leaves; at most {limit} characters "
            "of it fit"
        )
        return problems
    shown, speech = spoken
    captions = [la for la in t.layers if isinstance(la, CaptionsLayer)]
    for cap in captions:
        cbox = box_px(area, cap.box)
        cues = make_cues(shown, speech.spans, voice.start, t.personal.end)
        for cue in cues:
            face = find_font_face(
                cue.text.replace("\n", ""), locale, weight=cap.style.weight, extra_dirs=font_dirs
            )
            try:
                fit_text_box(
                    cue.text,
                    face,
                    box_width=cbox.width,
                    box_height=cbox.height,
                    style=cap.style,
                    scale=scale,
                    pill=True,
                    check_only=True,
                )
            except TextDoesNotFit:
                problems.append(f"{where} does not fit the captions layer {cap.id!r} of {at}")
                break
    return problems


def check_recipient(
    loaded: LoadedTemplate,
    recipient: Recipient,
    locale: Locale,
    *,
    font_dirs: Sequence[Path | str] = (),
    frame: tuple[int, int] | None = None,
    tts: TTS | None = None,
) -> list[str]:
    """Problems that would make this recipient's render fail; empty when it is fine.
    With `frame` (the render size) the name is also fitted into the personal text layers,
    and with `tts` into the voice line and its captions."""
    from pipeline.render.fonts import FontNotFoundError, describe_chars, find_font_face

    t = loaded.template
    where = f"recipient {recipient.id}"
    if locale not in t.strings:
        supported = ", ".join(loc.value for loc in t.locales)
        return [f"{where}: template {t.name} has no {locale.value} strings (it supports {supported})"]
    problems: list[str] = []
    if any(isinstance(la, PhotoLayer) and la.required for la in t.layers) and not recipient.photo_key:
        problems.append(f"{where}: template {t.name} needs a subject photo (photo_key) for every recipient")
    values = merge_values(recipient.name)
    for text in drawn_texts(t, locale):
        try:
            drawn = substitute(text, values)
        except TemplateError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if "recipient.name" in merge_fields_in(text):
            try:
                find_font_face(drawn.replace("\n", ""), locale, extra_dirs=font_dirs)
            except FontNotFoundError as exc:
                chars = describe_chars(exc.missing) if exc.missing else repr(recipient.name)
                problems.append(f"{where}: name {recipient.name!r} cannot be drawn: no font has {chars}")
                break
    if not problems and frame is not None:
        problems.extend(fit_problems(loaded, recipient, locale, frame=frame, tts=tts, font_dirs=font_dirs))
    return problems


def check_recipients(
    ref: TemplateRef,
    recipients: Iterable[Recipient],
    *,
    extra_dir: Path | None = None,
    font_dirs: Sequence[Path | str] = (),
    limit: int = 20,
    size: tuple[int, int] | None = None,
    variant: str | None = None,
    tts: TTS | None = None,
) -> list[str]:
    """Validate a brief's audience against its template: the template exists, supports each
    recipient's locale, has what it requires (photo), every name can be drawn, and (given
    the render `size` or `variant`) every name fits its text layers and voice line."""
    try:
        loaded = get_template(ref, extra_dir)
    except TemplateError as exc:
        return [str(exc)]
    frame: tuple[int, int] | None = size
    if variant:
        sizes = loaded.template.canvas.variants
        if variant not in sizes:
            return [f"template {loaded.template.name} has no variant {variant!r} (it has {', '.join(sizes)})"]
        frame = (sizes[variant].width, sizes[variant].height)
    problems: list[str] = []
    for r in recipients:
        problems.extend(check_recipient(loaded, r, r.locale, font_dirs=font_dirs, frame=frame, tts=tts))
        if len(problems) >= limit:
            problems.append("... (more problems not shown)")
            break
    return problems
