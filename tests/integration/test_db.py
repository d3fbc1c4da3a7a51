"""Database adapter and repositories, on SQLite and PostgreSQL."""

# Fixtures are imported by name, so every test argument "redefines" them.

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError

from pipeline.adapters.db import Base, Database, migrations_dir, normalize_url
from pipeline.consent.rules import covers, effective_grants
from pipeline.repositories import (
    ConsentRecord,
    ConsentRepository,
    JobRecord,
    JobRepository,
    PublishedClipRepository,
)
from schemas.common import Scope
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration

S = JobState
T0 = datetime(2026, 2, 16, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def new_job(
    db: Database, recipient: str = "r-0001", clock: Callable[[], datetime] | None = None
) -> tuple[JobRepository, uuid.UUID]:
    jobs = JobRepository(db, clock=clock) if clock else JobRepository(db)
    req = render_request(recipient_id=recipient)
    assert jobs.create_if_absent(req)
    return jobs, req.job_id


# --- adapter ------------------------------------------------------------------------------


def _head() -> str | None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return ScriptDirectory.from_config(cfg).get_current_head()


def test_migrations_run_and_are_idempotent(db: Database) -> None:
    assert db.current_revision() == _head()
    db.migrate()  # already at head: a no-op
    assert db.current_revision() == _head()
    with db.engine.connect() as conn:
        from sqlalchemy import inspect

        tables = set(inspect(conn).get_table_names())
    assert {"jobs", "job_events", "consents", "published_clips", "alembic_version"} <= tables


def test_migration_matches_models(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []


def test_postgres_schema_isolation(postgres_db: Database) -> None:
    db = postgres_db
    assert db.schema is not None and db.schema.startswith("gf_")
    assert db.url.drivername == "postgresql+psycopg"
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT current_schema()")).scalar() == db.schema
        version_table = conn.execute(text("SELECT to_regclass(current_schema() || '.alembic_version')"))
        assert version_table.scalar() is not None
        assert conn.execute(text("SELECT to_regclass('public.jobs')")).scalar() is None


def test_postgres_search_path_in_url(postgres_db: Database) -> None:
    """A search_path set through the URL's connection options is honoured by migrate()."""
    schema = f"gf_{uuid.uuid4().hex[:12]}"
    with postgres_db.engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = postgres_db.url.update_query_dict({"options": f"-csearch_path={schema}"})
    other = Database(url.render_as_string(hide_password=False))
    try:
        other.migrate()
        assert other.current_revision() == _head()
        assert JobRepository(other).create_if_absent(render_request())
        with other.engine.connect() as conn:
            assert conn.execute(text("SELECT current_schema()")).scalar() == schema
            assert conn.execute(text(f"SELECT count(*) FROM {schema}.jobs")).scalar() == 1
        assert JobRepository(postgres_db).list_jobs() == []  # isolated from the fixture's schema
    finally:
        other.dispose()
        with postgres_db.engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def test_postgres_search_path_to_missing_schema(postgres_db: Database) -> None:
    url = postgres_db.url.update_query_dict({"options": "-csearch_path=gf_does_not_exist"})
    other = Database(url)
    try:
        with pytest.raises(RuntimeError, match="no existing schema"):
            other.migrate()
    finally:
        other.dispose()


def test_sqlite_pragmas(sqlite_db: Database) -> None:
    with sqlite_db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 10_000


def test_url_normalization() -> None:
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"
    with pytest.raises(ValueError, match="unsupported"):
        normalize_url("mysql://u@h/d")


def test_sqlite_creates_parent_dir(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "gf.db"
    d = Database(f"sqlite:///{path}")
    try:
        d.migrate()
        assert path.exists()
    finally:
        d.dispose()


def test_timestamps_are_utc_aware(db: Database) -> None:
    jobs, job_id = new_job(db)
    rec = jobs.get(job_id)
    assert rec is not None
    assert rec.created_at.tzinfo is UTC and rec.updated_at.tzinfo is UTC
    assert abs(rec.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_naive_datetime_is_refused(db: Database) -> None:
    jobs = JobRepository(db, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(Exception, match="naive datetime"):
        jobs.create_if_absent(render_request())


# --- jobs ---------------------------------------------------------------------------------


def test_create_if_absent_is_idempotent(db: Database) -> None:
    jobs = JobRepository(db)
    req = render_request()
    assert jobs.create_if_absent(req) is True
    assert jobs.create_if_absent(req) is False
    assert len(jobs.list_jobs()) == 1
    rec = jobs.get(req.job_id)
    assert rec is not None
    assert rec.state == S.REQUESTED
    assert rec.attempts == 0
    assert rec.campaign_id == "lny-2026" and rec.recipient_id == "r-0001"
    assert rec.template_name == "lunar-new-year" and rec.template_version == "1"
    assert rec.request == req  # the payload round-trips, CJK name included
    assert [(e.from_state, e.to_state) for e in jobs.history(req.job_id)] == [(None, S.REQUESTED)]


def test_create_if_absent_race(db: Database) -> None:
    jobs = JobRepository(db)
    req = render_request()
    barrier = threading.Barrier(8)
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(jobs.create_if_absent(req))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [False] * 7 + [True]
    assert len(jobs.list_jobs()) == 1
    assert len(jobs.history(req.job_id)) == 1


def test_get_unknown_and_malformed(db: Database) -> None:
    jobs = JobRepository(db)
    assert jobs.get(uuid.uuid4()) is None
    with pytest.raises(ValueError):
        jobs.get("not-a-uuid")


def test_claim_race_exactly_one_wins(db: Database) -> None:
    jobs, job_id = new_job(db)
    barrier = threading.Barrier(8)
    won: list[JobRecord] = []
    lost: list[int] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            rec = jobs.claim(
                job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner=f"w{i}", lease_s=60
            )
            (won.append(rec) if rec else lost.append(i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(won) == 1 and len(lost) == 7
    rec = jobs.get(job_id)
    assert rec is not None
    assert rec.state == S.RENDERING
    assert rec.claim_token == won[0].claim_token and rec.claim_token
    assert rec.claimed_by == won[0].claimed_by
    assert rec.attempts == 1
    assert [(e.from_state, e.to_state) for e in jobs.history(job_id)] == [
        (None, S.REQUESTED),
        (S.REQUESTED, S.RENDERING),
    ]


def test_claim_returns_lease(db: Database) -> None:
    clock = FakeClock()
    jobs, job_id = new_job(db, clock=clock)
    rec = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w1", lease_s=30)
    assert rec is not None
    assert rec.state == S.RENDERING
    assert rec.lease_expires_at == T0 + timedelta(seconds=30)
    assert rec.claimed_by == "w1"
    assert rec.claim_token is not None and len(rec.claim_token) == 32


def test_expired_lease_can_be_reclaimed_unexpired_cannot(db: Database) -> None:
    clock = FakeClock()
    jobs, job_id = new_job(db, clock=clock)
    first = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w1", lease_s=30)
    assert first is not None

    clock.advance(29)
    assert jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w2", lease_s=30) is None

    clock.advance(2)  # lease expired: w1 is presumed dead
    second = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w2", lease_s=30)
    assert second is not None
    assert second.claim_token != first.claim_token
    assert second.claimed_by == "w2"
    assert second.attempts == 2
    assert second.lease_expires_at == clock.now + timedelta(seconds=30)

    # The dead worker's token no longer works; the new owner's does.
    assert not jobs.transition(
        job_id, to_state=S.RENDERED, expected=S.RENDERING, claim_token=first.claim_token
    )
    assert jobs.transition(
        job_id,
        to_state=S.RENDERED,
        expected=S.RENDERING,
        claim_token=second.claim_token,
        staging_key="s/k.mp4",
    )
    # Re-claims do not change the state, so the history has one rendering entry.
    assert [e.to_state for e in jobs.history(job_id)] == [S.REQUESTED, S.RENDERING, S.RENDERED]


def test_expired_lease_reclaimed_with_real_clock(db: Database) -> None:
    jobs, job_id = new_job(db)
    assert jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w1", lease_s=0.05)
    import time

    time.sleep(0.1)
    assert jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w2", lease_s=60)


def test_claim_wrong_state_or_unknown_job(db: Database) -> None:
    jobs, job_id = new_job(db)
    assert jobs.claim(job_id, to_state=S.MODERATING, from_states=[S.RENDERED], owner="m", lease_s=30) is None
    assert (
        jobs.claim(uuid.uuid4(), to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w", lease_s=30)
        is None
    )


def test_claim_illegal_transition_raises(db: Database) -> None:
    jobs, job_id = new_job(db)
    with pytest.raises(ValueError, match="illegal transition"):
        jobs.claim(job_id, to_state=S.PUBLISHING, from_states=[S.REQUESTED], owner="w", lease_s=30)
    with pytest.raises(ValueError, match="illegal transition"):
        jobs.claim(
            job_id,
            to_state=S.RENDERING,
            from_states=[S.REQUESTED, S.PUBLISHED],
            owner="w",
            lease_s=30,
        )
    rec = jobs.get(job_id)
    assert rec is not None and rec.state == S.REQUESTED


def test_transition_cas(db: Database) -> None:
    jobs, job_id = new_job(db)
    claimed = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w1", lease_s=60)
    assert claimed is not None

    # wrong expected state loses
    assert not jobs.transition(job_id, to_state=S.MODERATING, expected=S.RENDERED)
    # wrong claim token loses
    assert not jobs.transition(job_id, to_state=S.RENDERED, expected=S.RENDERING, claim_token="0" * 32)
    rec = jobs.get(job_id)
    assert rec is not None and rec.state == S.RENDERING

    assert jobs.transition(
        job_id,
        to_state=S.RENDERED,
        expected=S.RENDERING,
        claim_token=claimed.claim_token,
        actor="w1",
        staging_key="staging/lny-2026/r-0001/x.mp4",
        poster_key="staging/lny-2026/r-0001/x.jpg",
    )
    rec = jobs.get(job_id)
    assert rec is not None
    assert rec.state == S.RENDERED
    assert rec.staging_key == "staging/lny-2026/r-0001/x.mp4"
    assert rec.poster_key == "staging/lny-2026/r-0001/x.jpg"
    assert rec.claim_token is None and rec.lease_expires_at is None and rec.claimed_by is None
    # The same transition again loses: the state moved on.
    assert not jobs.transition(job_id, to_state=S.RENDERED, expected=S.RENDERING)


def test_transition_illegal_raises(db: Database) -> None:
    jobs, job_id = new_job(db)
    with pytest.raises(ValueError, match="illegal transition"):
        jobs.transition(job_id, to_state=S.PUBLISHED, expected=S.REQUESTED)
    with pytest.raises(ValueError, match="illegal transition"):
        jobs.transition(job_id, to_state=S.RENDERING, expected=S.PUBLISHED)
    with pytest.raises(TypeError, match="cannot set"):
        jobs.transition(job_id, to_state=S.RENDERING, expected=S.REQUESTED, state="published")  # type: ignore[call-arg]
    rec = jobs.get(job_id)
    assert rec is not None and rec.state == S.REQUESTED
    assert len(jobs.history(job_id)) == 1


def test_transition_race_exactly_one_wins(db: Database) -> None:
    jobs, job_id = new_job(db)
    for src, dst in [
        (S.REQUESTED, S.RENDERING),
        (S.RENDERING, S.RENDERED),
        (S.RENDERED, S.MODERATING),
    ]:
        assert jobs.transition(job_id, to_state=dst, expected=src)
    barrier = threading.Barrier(8)
    results: list[tuple[JobState, bool]] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        dst = S.APPROVED if i % 2 else S.REJECTED
        try:
            barrier.wait()
            results.append((dst, jobs.transition(job_id, to_state=dst, expected=S.MODERATING, actor=f"m{i}")))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    winners = [dst for dst, won in results if won]
    assert len(winners) == 1
    rec = jobs.get(job_id)
    assert rec is not None and rec.state == winners[0]
    assert jobs.history(job_id)[-1].to_state == winners[0]


def test_full_lifecycle_history(db: Database) -> None:
    jobs, job_id = new_job(db)
    steps = [
        (S.REQUESTED, S.RENDERING),
        (S.RENDERING, S.RENDERED),
        (S.RENDERED, S.MODERATING),
        (S.MODERATING, S.NEEDS_REVIEW),
        (S.NEEDS_REVIEW, S.APPROVED),
        (S.APPROVED, S.PUBLISHING),
    ]
    for src, dst in steps:
        assert jobs.transition(job_id, to_state=dst, expected=src, actor="tester", reason=f"to {dst}")
    assert jobs.transition(
        job_id,
        to_state=S.PUBLISHED,
        expected=S.PUBLISHING,
        published_key="distribution/lny-2026/r-0001/x.mp4",
        url="https://cdn.example/lny-2026/r-0001/x.mp4",
    )
    assert jobs.transition(job_id, to_state=S.TAKEN_DOWN, expected=S.PUBLISHED, reason="consent revoked")
    rec = jobs.get(job_id)
    assert rec is not None
    assert rec.state == S.TAKEN_DOWN
    assert rec.reason == "consent revoked"
    assert rec.published_key == "distribution/lny-2026/r-0001/x.mp4"
    assert rec.url == "https://cdn.example/lny-2026/r-0001/x.mp4"
    hist = jobs.history(job_id)
    assert [(e.from_state, e.to_state) for e in hist] == [
        (None, S.REQUESTED),
        *steps,
        (S.PUBLISHING, S.PUBLISHED),
        (S.PUBLISHED, S.TAKEN_DOWN),
    ]
    assert hist[1].actor == "tester" and hist[1].reason == "to rendering"
    assert all(e.at.tzinfo is UTC for e in hist)
    assert [e.id for e in hist] == sorted(e.id for e in hist)


def test_fail(db: Database) -> None:
    jobs, job_id = new_job(db)
    claimed = jobs.claim(job_id, to_state=S.RENDERING, from_states=[S.REQUESTED], owner="w1", lease_s=60)
    assert claimed is not None
    assert jobs.fail(job_id, "ffmpeg exited 1", actor="w1")
    rec = jobs.get(job_id)
    assert rec is not None
    assert rec.state == S.FAILED and rec.reason == "ffmpeg exited 1"
    assert rec.claim_token is None
    assert not jobs.fail(job_id, "again")  # final: no exit
    assert not jobs.fail(uuid.uuid4(), "unknown job")
    last = jobs.history(job_id)[-1]
    assert (last.from_state, last.to_state, last.reason, last.actor) == (
        S.RENDERING,
        S.FAILED,
        "ffmpeg exited 1",
        "w1",
    )
    # The worker whose job failed under it loses its next transition.
    assert not jobs.transition(
        job_id, to_state=S.RENDERED, expected=S.RENDERING, claim_token=claimed.claim_token
    )


@pytest.mark.parametrize("final", [S.REJECTED, S.PUBLISHED])
def test_fail_refuses_final_states(db: Database, final: JobState) -> None:
    jobs, job_id = new_job(db)
    path = {
        S.REJECTED: [S.RENDERING, S.RENDERED, S.MODERATING, S.REJECTED],
        S.PUBLISHED: [S.RENDERING, S.RENDERED, S.MODERATING, S.APPROVED, S.PUBLISHING, S.PUBLISHED],
    }[final]
    prev = S.REQUESTED
    for nxt in path:
        assert jobs.transition(job_id, to_state=nxt, expected=prev)
        prev = nxt
    assert not jobs.fail(job_id, "too late")
    rec = jobs.get(job_id)
    assert rec is not None and rec.state == final


def test_list_and_count(db: Database) -> None:
    jobs = JobRepository(db)
    reqs = [render_request(recipient_id=f"r-{i}") for i in range(5)]
    reqs.append(render_request(campaign_id="mid-autumn", recipient_id="r-0"))
    for r in reqs:
        assert jobs.create_if_absent(r)
    for r in reqs[:2]:
        assert jobs.transition(r.job_id, to_state=S.RENDERING, expected=S.REQUESTED)
    assert jobs.fail(reqs[2].job_id, "bad photo")

    assert len(jobs.list_jobs()) == 6
    assert len(jobs.list_jobs("lny-2026")) == 5
    assert {r.job_id for r in jobs.list_jobs("lny-2026", [S.RENDERING])} == {
        reqs[0].job_id,
        reqs[1].job_id,
    }
    assert len(jobs.list_jobs(states=[S.REQUESTED])) == 3
    assert len(jobs.list_jobs("lny-2026", limit=2)) == 2
    assert jobs.list_jobs("nope") == []

    counts = jobs.counts_by_state("lny-2026")
    assert set(counts) == set(JobState)
    assert counts[S.RENDERING] == 2 and counts[S.FAILED] == 1 and counts[S.REQUESTED] == 2
    assert sum(counts.values()) == 5
    assert sum(jobs.counts_by_state("nope").values()) == 0


# --- consents -----------------------------------------------------------------------------

FACE, VOICE, NAME = Scope.FACE, Scope.VOICE, Scope.NAME


def grant(
    subject: str = "grandma",
    scopes: set[Scope] | None = None,
    purpose: str = "greeting",
    *,
    at: datetime = T0,
    expires: datetime | None = None,
    supersedes: uuid.UUID | None = None,
) -> ConsentRecord:
    return ConsentRecord(
        subject_id=subject,
        action="grant",
        scopes=frozenset(scopes or {FACE, VOICE}),
        purpose=purpose,
        recorded_by="consent-api",
        granted_at=at,
        expires_at=expires,
        evidence_sha256="a" * 64,
        evidence_key="consent/grandma/1.jpg",
        challenge_code="LNY-4821",
        supersedes=supersedes,
        created_at=at,
    )


def revoke(
    subject: str = "grandma",
    scopes: set[Scope] | None = None,
    *,
    at: datetime,
    supersedes: uuid.UUID | None = None,
    action: str = "revoke",
) -> ConsentRecord:
    return ConsentRecord(
        subject_id=subject,
        action=action,  # type: ignore[arg-type]
        scopes=frozenset(scopes or set()),
        purpose="*",
        recorded_by="consent-api",
        granted_at=at,
        supersedes=supersedes,
        created_at=at,
    )


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def test_consent_roundtrip_and_order(db: Database) -> None:
    repo = ConsentRepository(db)
    g1 = grant(at=T0)
    g2 = grant(scopes={NAME}, at=T0 + hours(1))
    repo.append(g2)
    repo.append(g1)
    assert repo.records("grandma") == [g1, g2]
    assert repo.records("nobody") == []
    repo.append(grant(subject="aunt"))
    assert repo.list_subjects() == ["aunt", "grandma"]


def test_consent_covers_scopes_and_purpose(db: Database) -> None:
    repo = ConsentRepository(db)
    repo.append(grant(scopes={FACE, VOICE}, purpose="greeting", at=T0))
    repo.append(grant(scopes={NAME}, purpose="*", at=T0))
    at = T0 + hours(1)
    assert covers(repo.records("grandma"), [FACE], "greeting", at)
    assert covers(repo.records("grandma"), [FACE, VOICE, NAME], "greeting", at)  # combined grants
    assert covers(repo.records("grandma"), [NAME], "advertising", at)  # "*" purpose
    assert not covers(repo.records("grandma"), [FACE], "advertising", at)
    assert not covers(repo.records("grandma"), [FACE], "greeting", T0 - hours(1))  # not yet granted
    assert not covers(repo.records("someone-else"), [FACE], "greeting", at)


def test_consent_expiry(db: Database) -> None:
    repo = ConsentRepository(db)
    repo.append(grant(at=T0, expires=T0 + hours(24)))
    assert covers(repo.records("grandma"), [FACE], "greeting", T0 + hours(23))
    assert not covers(repo.records("grandma"), [FACE], "greeting", T0 + hours(24))
    assert effective_grants(repo.records("grandma"), T0 + hours(25)) == []
    with pytest.raises(ValueError, match="expires_at"):
        repo.append(grant(at=T0, expires=T0))


def test_consent_revoke_specific_grant(db: Database) -> None:
    repo = ConsentRepository(db)
    g_old = grant(scopes={FACE}, at=T0)
    g_new = grant(scopes={FACE}, at=T0 + hours(1))
    repo.append(g_old)
    repo.append(g_new)
    repo.append(revoke(scopes={FACE}, at=T0 + hours(2), supersedes=g_new.record_id))
    # Only the named grant ends; the other still covers.
    later = effective_grants(repo.records("grandma"), T0 + hours(3))
    assert [g.record_id for g in later] == [g_old.record_id]
    # Before the revocation both were in force.
    assert len(effective_grants(repo.records("grandma"), T0 + hours(1.5))) == 2


def test_consent_blanket_revoke_and_regrant(db: Database) -> None:
    repo = ConsentRepository(db)
    repo.append(grant(scopes={FACE, VOICE}, at=T0))
    repo.append(revoke(scopes={VOICE}, at=T0 + hours(2)))
    at = T0 + hours(3)
    assert covers(repo.records("grandma"), [FACE], "greeting", at)
    assert not covers(repo.records("grandma"), [VOICE], "greeting", at)
    (narrowed,) = effective_grants(repo.records("grandma"), at)
    assert narrowed.scopes == {FACE}
    # Point in time: before the revoke, voice was covered.
    assert covers(repo.records("grandma"), [VOICE], "greeting", T0 + hours(1))

    repo.append(revoke(scopes={FACE, VOICE, NAME}, at=T0 + hours(4), action="expire"))
    assert effective_grants(repo.records("grandma"), T0 + hours(5)) == []

    # A grant made after the revocation is in force again.
    repo.append(grant(scopes={VOICE}, at=T0 + hours(6)))
    assert covers(repo.records("grandma"), [VOICE], "greeting", T0 + hours(7))
    assert not covers(repo.records("grandma"), [FACE], "greeting", T0 + hours(7))
    # The ledger kept everything.
    assert [r.action for r in repo.records("grandma")] == ["grant", "revoke", "expire", "grant"]


def test_consent_regrant_supersedes_old_grant(db: Database) -> None:
    repo = ConsentRepository(db)
    old = grant(scopes={FACE, VOICE}, purpose="*", at=T0)
    repo.append(old)
    repo.append(grant(scopes={FACE}, purpose="greeting", at=T0 + hours(1), supersedes=old.record_id))
    at = T0 + hours(2)
    assert covers(repo.records("grandma"), [FACE], "greeting", at)
    assert not covers(repo.records("grandma"), [VOICE], "greeting", at)
    assert not covers(repo.records("grandma"), [FACE], "advertising", at)


def test_consent_append_validation(db: Database) -> None:
    repo = ConsentRepository(db)
    other = grant(subject="aunt")
    repo.append(other)
    with pytest.raises(ValueError, match="not a record of subject"):
        repo.append(revoke(at=T0 + hours(1), scopes={FACE}, supersedes=other.record_id))
    with pytest.raises(ValueError, match="needs scopes or supersedes"):
        repo.append(revoke(at=T0 + hours(1)))
    with pytest.raises(ValueError, match="at least one scope"):
        repo.append(ConsentRecord("grandma", "grant", frozenset(), "greeting", "consent-api"))
    with pytest.raises(ValueError, match="timezone-aware"):
        effective_grants(repo.records("aunt"), datetime(2026, 1, 1))
    rec = grant(subject="uncle")
    repo.append(rec)
    with pytest.raises(IntegrityError):
        repo.append(rec)  # record ids are unique


def test_consent_ledger_refuses_updates(db: Database) -> None:
    repo = ConsentRepository(db)
    repo.append(grant())
    with pytest.raises(DBAPIError, match="append-only"), db.session() as s:
        s.execute(text("UPDATE consents SET purpose = '*'"))
    new_job(db)
    with pytest.raises(DBAPIError, match="append-only"), db.session() as s:
        s.execute(text("UPDATE job_events SET actor = 'forged'"))
    assert all(r.purpose == "greeting" for r in repo.records("grandma"))


# --- published clips ----------------------------------------------------------------------


def test_published_clips_idempotent(db: Database) -> None:
    _, job_id = new_job(db)
    clips = PublishedClipRepository(db)
    key = "distribution/lny-2026/r-0001/x.mp4"
    assert clips.get(job_id) is None
    assert clips.record(job_id, key, "https://cdn.example/x.mp4", "b" * 64) is True
    assert clips.record(job_id, key, "https://cdn.example/x.mp4", "b" * 64) is False
    clip = clips.get(job_id)
    assert clip is not None
    assert (clip.object_key, clip.sha256, clip.live) == (key, "b" * 64, True)
    assert clip.published_at.tzinfo is UTC

    assert clips.mark_taken_down(job_id, "consent revoked") is True
    assert clips.mark_taken_down(job_id, "again") is False
    clip = clips.get(job_id)
    assert clip is not None
    assert not clip.live and clip.takedown_reason == "consent revoked"
    assert clip.taken_down_at is not None and clip.taken_down_at.tzinfo is UTC
    assert clips.mark_taken_down(uuid.uuid4(), "unknown") is False


def test_published_clips_integrity(db: Database) -> None:
    _, job_a = new_job(db, "r-a")
    _, job_b = new_job(db, "r-b")
    clips = PublishedClipRepository(db)
    assert clips.record(job_a, "distribution/k.mp4", "https://cdn.example/k.mp4", "c" * 64)
    with pytest.raises(IntegrityError):  # another job's object key
        clips.record(job_b, "distribution/k.mp4", "https://cdn.example/k.mp4", "c" * 64)
    with pytest.raises(IntegrityError):  # unknown job (foreign key)
        clips.record(uuid.uuid4(), "distribution/z.mp4", "https://cdn.example/z.mp4", "c" * 64)


def test_published_clips_record_race(db: Database) -> None:
    _, job_id = new_job(db)
    clips = PublishedClipRepository(db)
    barrier = threading.Barrier(8)
    results: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(clips.record(job_id, "distribution/r.mp4", "https://cdn.example/r.mp4", "d" * 64))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(results) == [False] * 7 + [True]
