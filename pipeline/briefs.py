"""Loading brief and template files safely: the one place that turns bytes into data.

Every file is size-capped before it is parsed and decoded as strict UTF-8. JSON is
checked for nesting depth by a flat scan before `json.loads` sees it, so a 100k-deep
document is refused instead of raising RecursionError. YAML is walked event by event
(libyaml when available) before it is constructed: aliases are refused outright, so an
alias bomb ("billion laughs") never expands, and nesting deeper than the limit is refused
without recursion. Every problem becomes a `DocumentError` with one line of text that
starts with the file name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PermanentError

DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_MAX_DEPTH = 32


class DocumentError(PermanentError):
    """A brief or template file that cannot be read, decoded or parsed (one line)."""


class BriefError(DocumentError):
    """A brief that cannot be loaded, or that fails validation at intake."""


def one_line(text: str) -> str:
    """Collapse whitespace (newlines included) so an error prints as a single line."""
    return " ".join(str(text).split())


def read_capped(path: Path, max_bytes: int) -> bytes:
    """At most `max_bytes` of a file; a larger file is refused without reading it whole."""
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except IsADirectoryError:
        raise DocumentError(f"{path}: is a directory, not a file") from None
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise DocumentError(f"{path}: larger than the limit of {max_bytes} bytes")
    return data


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        raise DocumentError(f"{source}: not UTF-8 text (byte 0x{bad} at offset {exc.start})") from None


def json_depth_ok(text: str, max_depth: int) -> int | None:
    """Scan JSON text without recursion; return the offset where nesting first exceeds
    `max_depth`, or None. Brackets inside strings do not count."""
    depth = 0
    in_string = False
    escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return i
        elif ch in "]}":
            depth -= 1
    return None


def _parse_json(text: str, source: str, max_depth: int) -> Any:
    at = json_depth_ok(text, max_depth)
    if at is not None:
        raise DocumentError(f"{source}: JSON nested deeper than {max_depth} levels (at offset {at})")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(
            f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise DocumentError(f"{source}: not valid JSON: {one_line(str(exc))}") from None


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _parse_yaml(text: str, source: str, max_depth: int) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent):
                mark = event.start_mark
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
                raise DocumentError(f"{source}: YAML aliases (*{event.anchor}) are not allowed{where}")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    mark = event.start_mark
                    where = f" at line {mark.line + 1}" if mark else ""
                    raise DocumentError(f"{source}: YAML nested deeper than {max_depth} levels{where}")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        # Checked above: no aliases, bounded depth, so constructing is linear and shallow.
        return yaml.load(text, Loader=loader)  # a SafeLoader (C or Python)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise DocumentError(f"{source}: not valid YAML: {one_line(problem)}{_yaml_where(exc)}") from None
    except RecursionError:
        raise DocumentError(f"{source}: YAML nested too deeply") from None


def parse_text(text: str, *, source: str, json_format: bool, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """YAML (or JSON when `json_format`) text -> plain data, with the limits above."""
    if json_format:
        return _parse_json(text, source, max_depth)
    return _parse_yaml(text, source, max_depth)


def load_document(
    path: Path | str,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Read, decode and parse one YAML or JSON file (`.json`: JSON, anything else: YAML).

    Raises DocumentError with one line naming the file.
    """
    p = Path(path)
    text = decode_utf8(read_capped(p, max_bytes), str(p))
    return parse_text(text, source=str(p), json_format=p.suffix.lower() == ".json", max_depth=max_depth)
