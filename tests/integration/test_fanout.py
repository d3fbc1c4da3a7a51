"""Fan-out of a large audience through the real intake (`CampaignService.submit_brief` on
a Container), the real Tansu broker, moto S3 server and job store (SQLite and PostgreSQL):
the audience streams in chunks, every recipient gets one job row and one render request, a
re-run creates and sends nothing, and the intake's memory does not grow with the audience.

Sizes are what CI affords (tens of thousands); `greetflow bench scale` runs the millions.
The names come from a small pool: the template check measures each distinct name once, and
that cost is the bench's business, not these tests'.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import update

from pipeline.adapters.db import JobRow
from pipeline.audience import AudienceError
from pipeline.bench_faults import worker_env
from pipeline.bench_scale import LAUNCHER
from pipeline.bootstrap import Container
from pipeline.campaigns import parse_brief
from pipeline.dev.stack import DevStack
from pipeline.settings import Settings
from pipeline.topics import RENDER_REQUESTS
from pipeline.trust import check_request_matches_row
from schemas.brief import CampaignBrief, Recipient
from schemas.common import utcnow
from schemas.events import RenderRequested, canonical_json, parse_envelope
from schemas.jobs import JobState
from tests.integration.db_fixtures import postgres_database
from tests.integration.pipeline_fixtures import stack_settings

pytestmark = pytest.mark.integration

NAMES = [("陳大文", "zh-Hant-HK"), ("李小明", "zh-Hans-CN"), ("Alice Wong", "en"), ("佐藤花子", "ja")]
CHUNK = 5_000


def audience_csv(n: int, *, bad_last: bool = False) -> bytes:
    rows = ["id,name,locale"]
    for i in range(n):
        name, loc = NAMES[i % len(NAMES)]
        rows.append(f"r-{i:07d},{name},{loc}")
    if bad_last:
        rows[-1] = f"r-{n - 1:07d},,en"  # a name is required
    return ("\n".join(rows) + "\n").encode("utf-8")


def brief_for(campaign_id: str, key: str) -> CampaignBrief:
    return parse_brief(
        {
            "campaign_id": campaign_id,
            "title": "fan-out",
            "template": {"name": "lunar-new-year", "version": "1"},
            "default_locale": "en",
            "audience_key": key,
        }
    )


class Reader:
    """Reads render.requests from the start, many fetches at a time (the embedded broker's
    end offsets run short of compressed batches, so records are counted, not offsets)."""

    def __init__(self, settings: Settings) -> None:
        from kafka import KafkaConsumer, TopicPartition

        # Assigned partitions, no group: reading starts at once (no join, no rebalance).
        self.consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            enable_auto_commit=False,
            max_partition_fetch_bytes=8 * 2**20,
            fetch_max_bytes=64 * 2**20,
        )
        parts = self.consumer.partitions_for_topic(RENDER_REQUESTS) or set()
        self.consumer.assign([TopicPartition(RENDER_REQUESTS, p) for p in sorted(parts)])
        self.consumer.seek_to_beginning()

    def read(self, expect: int, *, idle_s: float = 2.0) -> list[Any]:
        """The next records: at least `expect`, and whatever else comes within `idle_s`."""
        out: list[Any] = []
        deadline, last = time.monotonic() + 30 + expect / 2_000, time.monotonic()
        while time.monotonic() < deadline:
            batch = [r for rs in self.consumer.poll(timeout_ms=300, max_records=50_000).values() for r in rs]
            out.extend(batch)
            if batch:
                last = time.monotonic()
            elif len(out) >= expect and time.monotonic() - last > idle_s:
                break
        return out

    def close(self) -> None:
        self.consumer.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fanout_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Settings]:
    """The stack, and the job store: a SQLite file or a fresh PostgreSQL schema."""
    settings = stack_settings(tmp_path / "data").model_copy(
        update={"campaign_chunk_size": CHUNK, "render_width": 1080, "render_height": 1920}
    )
    if request.param == "sqlite":
        with DevStack(settings, log=lambda _m: None):
            yield settings
        return
    with postgres_database() as db:
        url = db.url.update_query_dict({"options": f"-csearch_path={db.schema}"})
        with DevStack(settings, log=lambda _m: None):
            yield settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})


def test_an_audience_fans_out_in_chunks_once(fanout_settings: Settings) -> None:
    settings = fanout_settings
    n = 20_000
    c = Container(settings)
    reader = Reader(settings)
    try:
        store = c.store
        # A bad row anywhere fails the intake before any job is written.
        store.put_bytes(
            settings.bucket_assets,
            "aud/bad.csv",
            audience_csv(12_000, bad_last=True),
            content_type="text/csv",
        )
        with pytest.raises(AudienceError, match=r"row 12001: name"):
            c.campaigns().submit_brief(brief_for("fan-bad", "aud/bad.csv"))
        assert sum(c.jobs.counts_by_state("fan-bad").values()) == 0

        store.put_bytes(settings.bucket_assets, "aud/big.csv", audience_csv(n), content_type="text/csv")
        brief = brief_for("fan-big", "aud/big.csv")
        chunks: list[int] = []

        def recorded(b: CampaignBrief) -> Iterator[list[Recipient]]:
            for chunk in c.resolve_audience(b):  # the audience is iterated, never collected
                chunks.append(len(chunk))
                yield chunk

        svc = c.campaigns()
        svc.audience = recorded
        res = svc.submit_brief(brief)
        assert (res.total, res.created, res.requested, res.already_final) == (n, n, n, 0)
        assert res.job_ids == ()  # a streamed audience keeps no ids
        # the audience is read once, in chunks of CHUNK; the submit pass reads the spill
        assert chunks == [CHUNK] * (n // CHUNK)
        assert c.jobs.counts_by_state("fan-big")[JobState.REQUESTED] == n
        messages = reader.read(n)
        assert len(messages) == n and len({m.key for m in messages}) == n

        # The batched envelopes are signed and say exactly what the job rows hold.
        env = parse_envelope(messages[n // 2].value, RenderRequested)
        c.producer_keys.verify(env, what="render request")
        job = c.jobs.get(env.payload.job_id)
        assert job is not None and job.state == JobState.REQUESTED
        check_request_matches_row(env.payload, job.request)

        # A re-run creates nothing and sends nothing: its jobs are fresh, not lost.
        again = c.campaigns().submit_brief(brief)
        assert (again.total, again.created, again.requested) == (n, 0, 0)
        assert reader.read(0) == []

        # Jobs untouched for longer than the sweeper's threshold (their requests lost, or
        # just queued for long): a re-run still sends nothing, and counts the final one;
        # the sweeper re-drives exactly the stuck ones.
        lost = [m.key.decode() for m in messages[:3]]
        final = messages[3].key.decode()
        old = utcnow() - timedelta(seconds=settings.sweep_stale_after_s + 60)
        with c.db.session() as s:
            s.execute(update(JobRow).where(JobRow.job_id.in_([*lost, final])).values(updated_at=old))
            s.execute(update(JobRow).where(JobRow.job_id == final).values(state=JobState.FAILED.value))
        third = c.campaigns().submit_brief(brief)
        assert (third.created, third.requested, third.already_final) == (0, 0, 1)
        assert reader.read(0) == []
        swept = c.job_sweeper("test-sweeper").sweep()
        assert sorted(str(r.job_id) for r in swept.redriven) == sorted(lost)
        assert sorted(m.key.decode() for m in reader.read(3)) == sorted(lost)
    finally:
        reader.close()
        c.close()


def _peak_rss_mb(settings: Settings, brief: Path, cwd: Path) -> float:
    usage = cwd / f"usage-{uuid.uuid4().hex[:6]}.json"
    main = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(usage), sys.executable, "-c", main, "submit", str(brief)],
        cwd=cwd,
        env=worker_env(settings),
        capture_output=True,
        check=True,
    )
    data = json.loads(usage.read_text())
    assert data["rc"] == 0, out.stderr.decode()[-2000:]
    return float(data["max_rss_kb"]) / 1024


def test_intake_memory_does_not_grow_with_the_audience(tmp_path: Path) -> None:
    """Peak RSS of `greetflow submit` (a child spawned from a small launcher, so its peak is
    its own) for 2,000 and for 40,000 recipients, in chunks of 2,000. Measured: the two peaks
    are within 3 MB of each other (about 280 MB, the imports). The former intake held every
    recipient model and every job id at once: 25 MB more at 40,000 (tracemalloc: 21 MB of
    Recipient models, 4 MB of ids). The bound, 15 MB, sits between the two."""
    settings = stack_settings(tmp_path / "data").model_copy(update={"campaign_chunk_size": 2_000})
    with DevStack(settings, log=lambda _m: None):
        c = Container(settings)
        try:
            c.db.migrate()
            peaks = {}
            for n in (2_000, 40_000):
                key = f"aud/mem-{n}.csv"
                c.store.put_bytes(settings.bucket_assets, key, audience_csv(n), content_type="text/csv")
                path = tmp_path / f"mem-{n}.yaml"
                data = {
                    "campaign_id": f"mem-{n}",
                    "title": "memory",
                    "template": {"name": "lunar-new-year", "version": "1"},
                    "default_locale": "en",
                    "audience_key": key,
                }
                path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
                t0 = time.monotonic()
                peaks[n] = _peak_rss_mb(settings, path, tmp_path)
                print(f"intake of {n}: peak RSS {peaks[n]:.1f} MB in {time.monotonic() - t0:.1f} s")
                assert sum(c.jobs.counts_by_state(f"mem-{n}").values()) == n
        finally:
            c.close()
    assert peaks[40_000] - peaks[2_000] < 15, peaks


def test_batched_envelopes_are_the_signed_envelopes_a_consumer_checks(fanout_settings: Settings) -> None:
    """The batched encoder splices each envelope around its payload's canonical text: what a
    consumer parses, re-serializes and verifies is exactly that, whatever a name holds."""
    from pipeline.campaigns import RequestFactory

    c = Container(fanout_settings)
    try:
        brief = brief_for("fan-splice", "aud/none.csv")
        tricky = ['引号"与\\反斜杠', "Zoë O'Neil", "Ĳ ǅ ﬁ", "😀 emoji", "</script>&<b>"]
        recipients = [Recipient(id=f"s-{i}", name=n, locale="en") for i, n in enumerate(tricky)]
        factory = RequestFactory(brief, c.job_ids)
        rows, payloads = factory.build(recipients)
        items = [(row.job_id, p) for row, p in zip(rows, payloads, strict=True)]
        texts = [row.request_text for row in rows]
        for given in (texts, None, [""] * len(texts)):
            _, records = c.bus.encode_payloads(
                RENDER_REQUESTS, RenderRequested.event_type, 1, items, trace_id="t-1", texts=given
            )
            assert len({json.loads(v)["id"] for _, v in records}) == len(records)
            for (key, value), row, r in zip(records, rows, recipients, strict=True):
                env = parse_envelope(value, RenderRequested)
                assert c.producer_keys.verify(env, what="render request")
                assert key.decode() == row.job_id == str(env.payload.job_id)
                assert env.payload.recipient.name == r.name
                # the bytes signed are the canonical bytes the consumer recomputes
                assert value.startswith(env.signed_content()[:-1])
                assert row.request_text == canonical_json(row.request_json)
    finally:
        c.close()


def test_rows_deleted_between_the_passes_are_checked_and_created_again(
    fanout_settings: Settings,
) -> None:
    """A row that existed when its chunk was validated and is gone when the chunk is stored
    (deleted in between) is fitted to the template and created again, not lost."""
    from pipeline.campaigns import RequestFactory, TemplateFit, _Prepared

    c = Container(fanout_settings)
    try:
        brief = brief_for("fan-gone", "aud/none.csv")
        svc = c.campaigns()
        recipients = [Recipient(id=f"g-{i}", name=n, locale=loc) for i, (n, loc) in enumerate(NAMES)]
        factory = RequestFactory(brief, c.job_ids)
        ids, recs = factory.prepare(recipients)
        # the first row still exists; the other three were seen and then deleted
        first, _ = factory.rows_of(ids[:1], recs[:1])
        assert c.jobs.create_many(first, actor="test").created == {ids[0]}
        stored = svc._store(
            brief, _Prepared(ids, recs, [False] * len(ids)), factory, TemplateFit(brief), None
        )
        assert stored.created == frozenset(ids[1:])
        assert [e.job_id for e in stored.existing] == [ids[0]]
        assert sum(c.jobs.counts_by_state("fan-gone").values()) == len(ids)
    finally:
        c.close()
