"""Audience resolution (pipeline/audience.py) from inline, CSV, Parquet and SQL sources.
The object store is a stand-in here; tests/integration/test_campaign_dag_audience.py
reads the same formats from the real S3 server."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.audience import (
    AudienceError,
    audience_source,
    check_select,
    iter_audience,
    parse_subjects,
)
from pipeline.settings import Settings
from schemas.brief import CampaignBrief
from schemas.common import Locale, Scope


class FakeStore:
    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects

    def exists(self, bucket: str, key: str) -> bool:
        return key in self.objects

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self.objects[key]

    def get_file(self, bucket: str, key: str, path: Path) -> Path:
        path.write_bytes(self.objects[key])
        return path


def brief(**kw: Any) -> CampaignBrief:
    data: dict[str, Any] = {
        "campaign_id": "aud",
        "title": "Audience test",
        "template": {"name": "lunar-new-year"},
        "default_locale": "zh-Hant-HK",
    }
    data.update(kw)
    return CampaignBrief.model_validate(data)


def resolve(b: CampaignBrief, objects: dict[str, bytes], chunk: int = 2, **settings: Any) -> list[list[Any]]:
    s = Settings(**settings)
    return list(iter_audience(b, store=FakeStore(objects), settings=s, chunk_size=chunk))  # type: ignore[arg-type]


CSV = (
    "\ufeffid,name,locale,subjects,photo_key\n"
    "r-1,陳大文,,,\n"
    "r-2,Alice Wong,en,alice:name,\n"
    'r-3,李小明,zh-Hans-CN,"[{""subject_id"": ""li"", ""scopes"": [""face"", ""name""]}]",photos/li.jpg\n'
    "r-4,Ben,en,ben:face|voice;mum:name,photos/ben.jpg\n"
    "r-5,張偉,,,\n"
).encode()


def test_inline_recipients_come_in_chunks() -> None:
    b = brief(recipients=[{"id": f"r{i}", "name": f"N{i}"} for i in range(5)])
    assert audience_source(b).kind == "inline"
    chunks = resolve(b, {})
    assert [len(c) for c in chunks] == [2, 2, 1]


def test_csv_rows_become_validated_recipients_in_chunks() -> None:
    b = brief(audience_key="audiences/lny.csv")
    chunks = resolve(b, {"audiences/lny.csv": CSV})
    assert [len(c) for c in chunks] == [2, 2, 1]
    r1, r2, r3, r4, r5 = (r for c in chunks for r in c)
    assert (r1.id, r1.name, r1.locale) == ("r-1", "陳大文", Locale.ZH_HANT_HK)  # default locale
    assert r2.locale == Locale.EN and r2.subjects[0].subject_id == "alice"
    assert r3.photo_key == "photos/li.jpg" and r3.subjects[0].scopes == {Scope.FACE, Scope.NAME}
    assert [(s.subject_id, s.scopes) for s in r4.subjects] == [
        ("ben", frozenset({Scope.FACE, Scope.VOICE})),
        ("mum", frozenset({Scope.NAME})),
    ]
    assert r5.name == "張偉"


def test_parquet_rows_are_read_batch_by_batch(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "recipient_id": [f"p-{i}" for i in range(7)],
            "name": [f"名字{i}" for i in range(7)],
            "locale": ["en", None, "ja", "zh-Hans-CN", "", "en", "en"],
            "extra_column": list(range(7)),
        }
    )
    path = tmp_path / "a.parquet"
    pq.write_table(table, path, row_group_size=3)
    chunks = resolve(brief(audience_key="a/b.parquet"), {"a/b.parquet": path.read_bytes()}, chunk=3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    flat = [r for c in chunks for r in c]
    assert [r.locale for r in flat[:3]] == [Locale.EN, Locale.ZH_HANT_HK, Locale.JA]
    assert flat[4].locale == Locale.ZH_HANT_HK


def test_sql_audience_runs_one_select_read_only(tmp_path: Path) -> None:
    db = tmp_path / "crm.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (cid TEXT, full_name TEXT, lang TEXT, optin INT)")
        conn.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?)",
            [(f"c-{i}", f"Customer {i}", "en" if i % 2 else "", i % 3 != 0) for i in range(10)],
        )
    query = (
        b"-- opted-in customers\n"
        b"SELECT cid AS id, full_name AS name, lang AS locale FROM customers WHERE optin = 1;"
    )
    chunks = resolve(
        brief(audience_key="q/optin.sql"),
        {"q/optin.sql": query},
        chunk=4,
        audience_database_url=f"sqlite:///{db}",
    )
    ids = [r.id for c in chunks for r in c]
    assert ids == [f"c-{i}" for i in range(10) if i % 3 != 0]
    assert [len(c) for c in chunks] == [4, 2]
    # The read-only pragma is not left on the file's later connections.
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO customers VALUES ('x', 'X', 'en', 1)")


@pytest.mark.parametrize(
    "query",
    [
        "DELETE FROM customers",
        "SELECT 1 AS id, 'a' AS name; DROP TABLE customers",
        "PRAGMA query_only = OFF",
        "",
    ],
)
def test_sql_audience_refuses_anything_but_one_select(query: str) -> None:
    with pytest.raises(AudienceError):
        check_select(query)


def test_bad_rows_fail_with_row_numbers_and_duplicates_are_errors() -> None:
    data = b"id,name,locale\nr-1,Ann,en\nr-2,,en\nr-1,Dup,en\nbad id!,X,en\nr-5,Eve,xx-YY\n"
    with pytest.raises(AudienceError) as err:
        resolve(brief(audience_key="a.csv"), {"a.csv": data})
    msg = str(err.value)
    assert "4 invalid row(s)" in msg
    assert "row 3: name" in msg
    assert "row 4: duplicate recipient id 'r-1'" in msg
    assert "row 5: id" in msg
    assert "row 6: locale" in msg


def test_missing_columns_empty_audience_and_unknown_format() -> None:
    with pytest.raises(AudienceError, match="needs an 'id' and a 'name'"):
        resolve(brief(audience_key="a.csv"), {"a.csv": b"who,what\n1,2\n"})
    with pytest.raises(AudienceError, match="is empty"):
        resolve(brief(audience_key="a.csv"), {"a.csv": b"id,name\n"})
    with pytest.raises(AudienceError, match="unknown audience format"):
        audience_source(brief(audience_key="a.xlsx"))
    with pytest.raises(ValidationError, match="not both"):
        brief(audience_key="a.csv", recipients=[{"id": "r", "name": "R"}])


def test_parse_subjects_forms() -> None:
    assert parse_subjects(None) == [] and parse_subjects("  ") == []
    assert parse_subjects("a:face|name") == [{"subject_id": "a", "scopes": ["face", "name"]}]
    assert parse_subjects('[{"subject_id": "b", "scopes": ["voice"]}]') == [
        {"subject_id": "b", "scopes": ["voice"]}
    ]
    with pytest.raises(ValueError):
        parse_subjects("a")


def test_a_duplicate_in_a_later_chunk_names_its_row_and_no_chunk_is_returned() -> None:
    rows = "".join(f"r-{i},Name {i},en\n" for i in range(1, 8)) + "r-2,Again,en\nr-9,Nine,en\n"
    with pytest.raises(AudienceError) as err:
        resolve(brief(audience_key="a.csv"), {"a.csv": b"id,name,locale\n" + rows.encode()}, chunk=3)
    assert "1 invalid row(s)" in str(err.value)
    assert "row 9: duplicate recipient id 'r-2'" in str(err.value)


def test_seen_ids_find_repeats_across_batches_in_eight_bytes_an_id() -> None:
    from pipeline.audience import _SeenIds

    seen = _SeenIds()
    for batch in range(20):
        assert all(seen.add(i, f"id-{i}") for i in range(batch * 500, (batch + 1) * 500))
        assert seen.flush() == []
    assert seen.count == 10_000
    assert sum(run.nbytes for run in seen._runs) == 8 * 10_000
    assert len(seen._runs) <= 5  # merged like a binary counter
    assert seen.add(20_000, "id-7") and seen.add(20_001, "new") and not seen.add(20_002, "new")
    assert seen.flush() == [(20_000, "id-7")]
    assert seen.count == 10_001
