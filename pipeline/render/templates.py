"""Template files: load, validate, find by name, substitute merge fields, check briefs.

Templates ship in `pipeline/templates/*.yaml`; `GREETFLOW_TEMPLATES_DIR` adds a directory
whose files win over the shipped ones of the same name and version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import ValidationError

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
    lines = [f"{source} is not a valid template:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        for part in msg.split("; "):
            lines.append(f"  - {loc}: {part}")
    return "\n".join(lines)


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


def load_template_file(path: Path | str) -> LoadedTemplate:
    """Read and validate one template file (YAML or JSON), including its assets."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise TemplateError(f"cannot read template {p}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TemplateError(f"{p} is not valid YAML: {exc}") from exc
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


def check_recipient(
    loaded: LoadedTemplate,
    recipient: Recipient,
    locale: Locale,
    *,
    font_dirs: Sequence[Path | str] = (),
) -> list[str]:
    """Problems that would make this recipient's render fail; empty when it is fine."""
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
    return problems


def check_recipients(
    ref: TemplateRef,
    recipients: Iterable[Recipient],
    *,
    extra_dir: Path | None = None,
    font_dirs: Sequence[Path | str] = (),
    limit: int = 20,
) -> list[str]:
    """Validate a brief's audience against its template: the template exists, supports each
    recipient's locale, has what it requires (photo), and every name can be drawn."""
    try:
        loaded = get_template(ref, extra_dir)
    except TemplateError as exc:
        return [str(exc)]
    problems: list[str] = []
    for r in recipients:
        problems.extend(check_recipient(loaded, r, r.locale, font_dirs=font_dirs))
        if len(problems) >= limit:
            problems.append("... (more problems not shown)")
            break
    return problems
