"""Resolve a campaign's audience in chunks of validated recipients.

Where the audience comes from (`audience_source`):

- **inline**: the brief's own `recipients`;
- **csv**: `audience_key` ending in `.csv`, an object in the assets bucket (UTF-8, an
  optional BOM, a header row);
- **parquet**: `audience_key` ending in `.parquet`, an object in the assets bucket (read
  with pyarrow, batch by batch);
- **sql**: `audience_key` ending in `.sql`, an object in the assets bucket holding ONE
  SELECT statement, run against `Settings.audience_database_url` and never against the
  Greetflow database (refused when that setting is empty, names the Greetflow database,
  or points at a database holding Greetflow's tables). The query runs in a read-only
  transaction with a statement timeout (PostgreSQL: `SET TRANSACTION READ ONLY` and
  `SET LOCAL statement_timeout`; SQLite: a read-only open, `query_only`, a progress
  handler that interrupts it after the timeout, and an authorizer that allows reading
  and nothing else), streamed, at most `audience_max_rows` rows. A query that reads one
  of Greetflow's own tables (jobs, reviewers, consents, ...) is refused: SQLite's
  authorizer sees every table read, PostgreSQL's plan (`EXPLAIN`) names every relation.

CSV cells are data, never formulas: they are parsed with the csv module and validated,
nothing in them is evaluated, and a cell that a spreadsheet would run (`=`, `+`, `-`,
`@`, tab or CR first) is kept as the text it is; the CSV report neutralizes such cells
when it writes them (pipeline/reports.py).

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
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import ValidationError

from pipeline.adapters.storage import ObjectStore
from pipeline.briefs import one_line
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


class _SeenIds:
    """The recipient ids of an audience so far, in 8 bytes each: a 10M-row audience costs
    80 MB, not the ~900 MB of a set of its id strings. Ids are kept as 64-bit hashes in sorted
    runs, merged like a binary counter; `flush` checks a batch against all earlier ones at
    once. Two distinct ids with the same hash would read as a duplicate: odds of about
    n^2 / 2^65 for n rows (3e-8 at a million)."""

    def __init__(self) -> None:
        self._pending: dict[int, tuple[int, str]] = {}
        self._runs: list[np.ndarray] = []
        self.count = 0

    def add(self, row_no: int, rid: str) -> bool:
        """False when `rid` is already in the current batch."""
        h = hash(rid)
        if h in self._pending:
            return False
        self._pending[h] = (row_no, rid)
        return True

    def flush(self) -> list[tuple[int, str]]:
        """The (row, id) of each id of the current batch that an earlier batch had; the
        batch then joins the earlier ones."""
        if not self._pending:
            return []
        keys = np.fromiter(self._pending, dtype=np.int64, count=len(self._pending))
        keys.sort()
        dup = np.zeros(keys.size, dtype=bool)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run, keys), run.size - 1)
            dup |= run[at] == keys
        found = [self._pending[int(k)] for k in keys[dup]]
        self._pending.clear()
        fresh = keys[~dup]
        self.count += int(fresh.size)
        self._runs.append(fresh)
        while len(self._runs) > 1 and self._runs[-2].size <= 2 * self._runs[-1].size:
            last = self._runs.pop()
            merged = np.concatenate((self._runs.pop(), last))
            merged.sort(kind="stable")
            self._runs.append(merged)
        return found


class _Validator:
    """Turns numbered rows into recipient chunks; collects errors and duplicate ids. A chunk
    is yielded only once its ids are known to be new."""

    def __init__(self, brief: CampaignBrief, chunk_size: int, source: str) -> None:
        self.brief = brief
        self.chunk_size = chunk_size
        self.source = source
        self.seen = _SeenIds()
        self.errors: list[tuple[int, str]] = []
        self.error_count = 0

    def _error(self, row_no: int, msg: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append((row_no, f"row {row_no}: {msg}"))

    def _flush(self) -> None:
        for row_no, rid in self.seen.flush():
            self._error(row_no, f"duplicate recipient id {rid!r}")

    def chunks(self, rows: Iterable[tuple[int, Mapping[str, Any] | Recipient]]) -> Iterator[list[Recipient]]:
        chunk: list[Recipient] = []
        pending = 0
        for row_no, row in rows:
            try:
                r = row if isinstance(row, Recipient) else recipient_from_row(row, self.brief)
            except (ValidationError, ValueError, TypeError) as exc:
                self._error(row_no, _short_error(exc))
                continue
            if not self.seen.add(row_no, r.id):
                self._error(row_no, f"duplicate recipient id {r.id!r}")
                continue
            pending += 1
            if self.error_count:
                if pending >= self.chunk_size:
                    self._flush()
                    pending = 0
                continue  # keep scanning for more errors, stop producing chunks
            chunk.append(r)
            if len(chunk) >= self.chunk_size:
                self._flush()
                pending = 0
                if not self.error_count:
                    yield chunk
                chunk = []
        self._flush()
        if self.error_count:
            more = self.error_count - len(self.errors)
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise AudienceError(
                f"audience {self.source}: {self.error_count} invalid row(s):\n  "
                + "\n  ".join(line for _, line in sorted(self.errors))
                + tail
            )
        if chunk:
            yield chunk
        if not self.seen.count:
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


# Tables of Greetflow's own schema that an audience query may never read. The migrations
# are read too, so a table added later is covered without editing this list.
_OWN_TABLES = frozenset(
    {
        "alembic_version",
        "jobs",
        "job_events",
        "job_subjects",
        "locks",
        "consents",
        "consent_challenges",
        "subject_faces",
        "protected_faces",
        "moderation_results",
        "published_clips",
        "reviewers",
        "review_cases",
        "review_leases",
        "review_audit",
        "review_sessions",
        "review_login_throttle",
    }
)
_CREATE_TABLE_RE = re.compile(r"create_table\(\s*[\"']([A-Za-z_][A-Za-z0-9_]*)[\"']")


@lru_cache(maxsize=1)
def own_tables() -> frozenset[str]:
    names = set(_OWN_TABLES)
    versions = Path(__file__).resolve().parent / "migrations" / "versions"
    for f in versions.glob("*.py"):
        names.update(_CREATE_TABLE_RE.findall(f.read_text(encoding="utf-8")))
    return frozenset(names)


def _same_database(a: Any, b: Any) -> bool:
    """Whether two URLs name one database (credentials and options do not matter)."""
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        da, db = a.database or "", b.database or ""
        if da in ("", ":memory:") or db in ("", ":memory:"):
            return False
        return Path(da).resolve() == Path(db).resolve()
    return (a.host or "localhost", a.port or 5432, a.database) == (
        b.host or "localhost",
        b.port or 5432,
        b.database,
    )


def audience_url(settings: Settings) -> Any:
    """The audience database URL, refused when it is unset or names the Greetflow database."""
    from sqlalchemy.engine import make_url

    from pipeline.adapters.db import normalize_url

    raw = settings.audience_database_url.get_secret_value().strip()
    if not raw:
        raise AudienceError(
            "SQL audiences need their own database: set GREETFLOW_AUDIENCE_DATABASE_URL (a read-only "
            "user on the CRM database); they never run on the Greetflow database"
        )
    try:
        url = normalize_url(raw)
        own = normalize_url(make_url(settings.resolved_database_url))
    except Exception as exc:  # sqlalchemy's ArgumentError, ValueError for an unknown backend
        raise AudienceError(f"GREETFLOW_AUDIENCE_DATABASE_URL is not a usable database URL: {exc}") from None
    if _same_database(url, own):
        raise AudienceError(
            "GREETFLOW_AUDIENCE_DATABASE_URL names the Greetflow database; SQL audiences never run there"
        )
    return url


def _refuse_own_schema(found: Iterable[str]) -> None:
    hits = sorted(set(found) & own_tables())
    if "alembic_version" in hits or len(hits) >= 3:
        raise AudienceError(
            "the audience database holds Greetflow's own tables "
            f"({', '.join(hits[:6])}); SQL audiences never run on the Greetflow database"
        )


def _refuse_own_tables(read: Iterable[str]) -> None:
    hits = sorted({t.lower() for t in read} & own_tables())
    if hits:
        raise AudienceError(f"the audience query reads Greetflow's own table(s) {', '.join(hits)}; refused")


def _check_columns(names: Iterable[str]) -> None:
    cols = set(names)
    if not ({"id", "recipient_id"} & cols) or "name" not in cols:
        raise AudienceError(f"SQL audience columns {sorted(cols)} need 'id' and 'name'")


def _capped(rows: Iterator[dict[str, Any]], max_rows: int) -> Iterator[tuple[int, dict[str, Any]]]:
    for row_no, row in enumerate(rows, start=1):
        if row_no > max_rows:
            raise AudienceError(
                f"the audience query returned more than {max_rows} rows (GREETFLOW_AUDIENCE_MAX_ROWS); "
                "nothing is sent to a cut-off audience"
            )
        yield row_no, row


def _sqlite_rows(query: str, path: str, *, timeout_s: float, batch_size: int) -> Iterator[dict[str, Any]]:
    if path in ("", ":memory:"):
        raise AudienceError("a SQLite audience database must be a file")
    if not Path(path).is_file():
        raise AudienceError(f"the SQLite audience database {path} does not exist")
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")
        ]
        _refuse_own_schema(tables)
        conn.execute("PRAGMA query_only = ON")
        read: set[str] = set()
        own = own_tables()

        def authorize(
            action: int, arg1: str | None, arg2: str | None, dbname: str | None, source: str | None
        ) -> int:
            if action == sqlite3.SQLITE_READ:
                if arg1 is not None and arg1.lower() in own:
                    read.add(arg1)
                    return sqlite3.SQLITE_DENY
                return sqlite3.SQLITE_OK
            if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE):
                return sqlite3.SQLITE_OK
            return sqlite3.SQLITE_DENY

        deadline = time.monotonic() + timeout_s
        timed_out = False

        def progress() -> int:
            nonlocal timed_out
            timed_out = time.monotonic() > deadline
            return 1 if timed_out else 0

        conn.set_authorizer(authorize)
        conn.set_progress_handler(progress, 10_000)
        try:
            cur = conn.execute(query)
            names = [d[0] for d in cur.description or ()]
            _check_columns(names)
            while batch := cur.fetchmany(batch_size):
                for row in batch:
                    yield dict(zip(names, row, strict=True))
        except sqlite3.DatabaseError as exc:
            if read:
                _refuse_own_tables(read)
            if timed_out:
                raise AudienceError(
                    f"the audience query ran longer than {timeout_s:g} s "
                    "(GREETFLOW_AUDIENCE_STATEMENT_TIMEOUT_S)"
                ) from None
            raise AudienceError(f"the audience query failed: {exc}") from None
    finally:
        conn.close()


def _plan_relations(plan: Any) -> set[str]:
    """Every relation an EXPLAIN (FORMAT JSON) plan scans (walked without recursion)."""
    out: set[str] = set()
    stack = [plan]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("Relation Name"), str):
                out.add(node["Relation Name"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


def _postgres_rows(query: str, url: Any, *, timeout_s: float, batch_size: int) -> Iterator[dict[str, Any]]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError, OperationalError

    engine = create_engine(url, pool_pre_ping=False)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(timeout_s * 1000))}")
            try:
                tables = conn.execute(
                    text("SELECT table_name FROM information_schema.tables WHERE table_name = ANY(:names)"),
                    {"names": sorted(own_tables())},
                ).scalars()
                _refuse_own_schema(tables)
                plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {query}")).scalar()
                _refuse_own_tables(_plan_relations(json.loads(plan) if isinstance(plan, str) else plan))
                result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(
                    text(query)
                )
                names = list(result.keys())
                _check_columns(names)
                for part in result.mappings().partitions(batch_size):
                    for row in part:
                        yield dict(row)
            except DBAPIError as exc:
                if "statement timeout" in str(exc.orig):
                    raise AudienceError(
                        f"the audience query ran longer than {timeout_s:g} s "
                        "(GREETFLOW_AUDIENCE_STATEMENT_TIMEOUT_S)"
                    ) from None
                if isinstance(exc, OperationalError) and exc.connection_invalidated:
                    raise
                raise AudienceError(f"the audience query failed: {one_line(str(exc.orig))}") from None
    finally:
        engine.dispose()


def sql_rows(query: str, settings: Settings, *, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Numbered rows of an audience query on the audience database (see the module doc)."""
    url = audience_url(settings)
    body = check_select(query)
    timeout = settings.audience_statement_timeout_s
    if url.get_backend_name() == "sqlite":
        rows = _sqlite_rows(body, url.database or "", timeout_s=timeout, batch_size=batch_size)
    else:
        rows = _postgres_rows(body, url, timeout_s=timeout, batch_size=batch_size)
    yield from _capped(rows, settings.audience_max_rows)


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
        audience_url(settings)  # refused before anything is read
        raw = store.get_bytes(settings.bucket_assets, src.key)
        try:
            query = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise AudienceError(f"audience {src.describe()}: not UTF-8 text") from None
        yield from v.chunks(sql_rows(query, settings, batch_size=size))
        return
    with tempfile.TemporaryDirectory(prefix="greetflow-audience-") as tmp:
        path = store.get_file(settings.bucket_assets, src.key, Path(tmp) / f"audience{Path(src.key).suffix}")
        rows = _csv_rows(path) if src.kind == "csv" else _parquet_rows(path, size)
        yield from v.chunks(rows)
