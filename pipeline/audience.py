"""Resolve a campaign's audience in chunks of validated recipients.

Where the audience comes from (`audience_source`):

- **inline**: the brief's own `recipients`;
- **csv**: `audience_key` ending in `.csv`, an object in the assets bucket (UTF-8, an
  optional BOM, a header row);
- **parquet**: `audience_key` ending in `.parquet`, an object in the assets bucket (read
  with pyarrow, batch by batch);
- **sql**: `audience_key` ending in `.sql`, an object in the assets bucket holding ONE
  SELECT statement, run against `Settings.audience_database_url` (default: the Greetflow
  database) in a read-only transaction, streamed.

Every external row has the columns of a `Recipient`: `id` (or `recipient_id`), `name`,
and optionally `locale` (empty: the brief's `default_locale`), `photo_key` and
`subjects`. `subjects` is either JSON (`[{"subject_id": "ann", "scopes": ["face"]}]`) or
the spreadsheet-friendly `ann:face|voice;bob:name`.

Rows are validated with the same pydantic model as an inline brief. A bad row or a
duplicate recipient id fails the whole resolution with the first errors and their row
numbers: a campaign is never sent to a silently trimmed audience.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from pipeline.adapters.storage import ObjectStore
from pipeline.errors import PermanentError
from pipeline.settings import Settings
from schemas.brief import CampaignBrief, Recipient

SourceKind = Literal["inline", "csv", "parquet", "sql"]
_SUFFIX_KIND: dict[str, SourceKind] = {".csv": "csv", ".parquet": "parquet", ".sql": "sql"}
_COLUMNS = ("id", "name", "locale", "photo_key", "subjects")
MAX_REPORTED_ERRORS = 20


class AudienceError(PermanentError):
    """The audience cannot be resolved: a missing source, a bad row, a duplicate id."""


@dataclass(frozen=True)
class AudienceSource:
    kind: SourceKind
    key: str | None = None

    def describe(self) -> str:
        return self.kind if self.key is None else f"{self.kind}:{self.key}"


def audience_source(brief: CampaignBrief) -> AudienceSource:
    if brief.audience_key is None:
        return AudienceSource("inline")
    suffix = Path(brief.audience_key).suffix.lower()
    kind = _SUFFIX_KIND.get(suffix)
    if kind is None:
        raise AudienceError(
            f"audience_key {brief.audience_key!r}: unknown audience format {suffix or '(none)'!r}; "
            "use .csv, .parquet or .sql"
        )
    if brief.recipients:
        raise AudienceError("a brief names either inline recipients or an audience_key, not both")
    return AudienceSource(kind, brief.audience_key)


def check_source(brief: CampaignBrief, store: ObjectStore, settings: Settings) -> AudienceSource:
    """Fail early (at validation) when the audience object is missing."""
    src = audience_source(brief)
    if src.key is not None and not store.exists(settings.bucket_assets, src.key):
        raise AudienceError(f"audience object {src.key!r} not found in bucket {settings.bucket_assets!r}")
    return src


# --------------------------------------------------------------------------- rows


def parse_subjects(value: Any) -> list[dict[str, Any]]:
    """`subjects` cell -> list of SubjectUse dicts (JSON text, compact text, or a list)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [dict(v) for v in value]
    text = str(value).strip()
    if not text:
        return []
    if text.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError("subjects JSON must be a list")
        return [dict(v) for v in data]
    out: list[dict[str, Any]] = []
    for item in text.split(";"):
        item = item.strip()
        if not item:
            continue
        subject_id, sep, scopes = item.partition(":")
        if not sep or not scopes.strip():
            raise ValueError(f"subjects entry {item!r}: expected 'subject:scope|scope'")
        out.append(
            {
                "subject_id": subject_id.strip(),
                "scopes": [s.strip() for s in scopes.split("|") if s.strip()],
            }
        )
    return out


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def recipient_from_row(row: Mapping[str, Any], brief: CampaignBrief) -> Recipient:
    """One external row -> Recipient (raises ValueError / ValidationError)."""
    rid = row.get("id")
    if _blank(rid):
        rid = row.get("recipient_id")
    data: dict[str, Any] = {
        "id": None if _blank(rid) else str(rid).strip(),
        "name": row.get("name"),
        "locale": brief.default_locale if _blank(row.get("locale")) else str(row["locale"]).strip(),
        "subjects": parse_subjects(row.get("subjects")),
    }
    if not _blank(row.get("photo_key")):
        data["photo_key"] = str(row["photo_key"]).strip()
    return Recipient.model_validate(data)


def _short_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(row)'}: {e['msg']}" for e in exc.errors())
    return str(exc)


class _Validator:
    """Turns numbered rows into recipient chunks; collects errors and duplicate ids."""

    def __init__(self, brief: CampaignBrief, chunk_size: int, source: str) -> None:
        self.brief = brief
        self.chunk_size = chunk_size
        self.source = source
        self.seen: set[str] = set()
        self.errors: list[str] = []
        self.error_count = 0

    def _error(self, row_no: int, msg: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(f"row {row_no}: {msg}")

    def chunks(self, rows: Iterable[tuple[int, Mapping[str, Any] | Recipient]]) -> Iterator[list[Recipient]]:
        chunk: list[Recipient] = []
        for row_no, row in rows:
            try:
                r = row if isinstance(row, Recipient) else recipient_from_row(row, self.brief)
            except (ValidationError, ValueError, TypeError) as exc:
                self._error(row_no, _short_error(exc))
                continue
            if r.id in self.seen:
                self._error(row_no, f"duplicate recipient id {r.id!r}")
                continue
            self.seen.add(r.id)
            if self.error_count:
                continue  # keep scanning for more errors, stop producing chunks
            chunk.append(r)
            if len(chunk) >= self.chunk_size:
                yield chunk
                chunk = []
        if self.error_count:
            more = self.error_count - len(self.errors)
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise AudienceError(
                f"audience {self.source}: {self.error_count} invalid row(s):\n  "
                + "\n  ".join(self.errors)
                + tail
            )
        if chunk:
            yield chunk
        if not self.seen:
            raise AudienceError(f"audience {self.source} is empty")


# --------------------------------------------------------------------------- readers


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            return
        names = {n.strip() for n in reader.fieldnames if n}
        if not ({"id", "recipient_id"} & names) or "name" not in names:
            raise AudienceError(f"CSV header {reader.fieldnames} needs an 'id' and a 'name' column")
        for row in reader:
            # reader.line_num is the physical line of the row's end (header = line 1).
            yield reader.line_num, {(k or "").strip(): v for k, v in row.items()}


def _parquet_rows(path: Path, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow ships with the airflow extra
        raise AudienceError("Parquet audiences need pyarrow: pip install 'greetflow[airflow]'") from exc
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if not ({"id", "recipient_id"} & names) or "name" not in names:
        raise AudienceError(f"Parquet columns {sorted(names)} need an 'id' and a 'name' column")
    cols = [c for c in (*_COLUMNS, "recipient_id") if c in names]
    row_no = 0
    for batch in pf.iter_batches(batch_size=batch_size, columns=cols):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def check_select(query: str) -> str:
    """Accept exactly one SELECT (or WITH ... SELECT) statement; return it without ';'."""
    q = query.strip().rstrip(";").strip()
    lines = [ln for ln in q.splitlines() if not ln.strip().startswith("--")]
    body = "\n".join(lines).strip()
    first = body.split(None, 1)[0].lower() if body else ""
    if first not in ("select", "with"):
        raise AudienceError("an audience .sql object must hold one SELECT statement")
    if ";" in body:
        raise AudienceError("an audience .sql object must hold exactly one statement (found ';')")
    return body


def _sql_rows(query: str, url: str, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    from sqlalchemy import create_engine, text

    from pipeline.adapters.db import normalize_url

    engine = create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                conn.exec_driver_sql("PRAGMA query_only = ON")
            elif engine.dialect.name == "postgresql":
                conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            try:
                result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
                    text(check_select(query))
                )
                names = set(result.keys())
                if not ({"id", "recipient_id"} & names) or "name" not in names:
                    raise AudienceError(f"SQL audience columns {sorted(names)} need 'id' and 'name'")
                row_no = 0
                for part in result.mappings().partitions(batch_size):
                    for row in part:
                        row_no += 1
                        yield row_no, dict(row)
            finally:
                if engine.dialect.name == "sqlite":
                    conn.exec_driver_sql("PRAGMA query_only = OFF")
    finally:
        engine.dispose()


def iter_audience(
    brief: CampaignBrief,
    *,
    store: ObjectStore,
    settings: Settings,
    chunk_size: int | None = None,
) -> Iterator[list[Recipient]]:
    """Yield the audience as chunks of at most `chunk_size` validated, unique recipients.

    External sources are streamed (the object is downloaded to a temporary file, then
    read row by row or batch by batch), so memory stays bounded by the chunk size.
    """
    size = chunk_size or settings.campaign_chunk_size
    src = audience_source(brief)
    v = _Validator(brief, size, src.describe())
    if src.kind == "inline":
        yield from v.chunks(enumerate(brief.recipients, start=1))
        return
    if src.key is None:
        raise AudienceError(f"audience {src.describe()} names no object key")
    if src.kind == "sql":
        query = store.get_bytes(settings.bucket_assets, src.key).decode("utf-8")
        url = settings.audience_database_url.get_secret_value() or settings.resolved_database_url
        yield from v.chunks(_sql_rows(query, url, size))
        return
    with tempfile.TemporaryDirectory(prefix="greetflow-audience-") as tmp:
        path = store.get_file(settings.bucket_assets, src.key, Path(tmp) / f"audience{Path(src.key).suffix}")
        rows = _csv_rows(path) if src.kind == "csv" else _parquet_rows(path, size)
        yield from v.chunks(rows)
