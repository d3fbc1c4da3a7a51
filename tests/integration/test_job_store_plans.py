"""The queries a worker or the review app runs per message walk an index on PostgreSQL:
EXPLAIN of the exact SQL the repositories emit, on 50k jobs and 150k events (ANALYZEd,
so the planner weighs real sizes), shows no Seq Scan on the tables that grow with the
jobs (BIG_TABLES).

Run with `-s` to print the plans (docs/job-store.md quotes them).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, text

from pipeline.adapters.db import Database
from pipeline.progress import ProgressService
from pipeline.repositories import (
    ConsentRepository,
    JobRepository,
    JobSubjectRepository,
    ModerationResultRepository,
    PublishedClipRepository,
)
from schemas.brief import SubjectUse
from schemas.common import Scope
from schemas.jobs import JobState

pytestmark = pytest.mark.integration

JOBS = 50_000
BIG_TABLES = ("jobs", "job_events", "moderation_results", "consents", "job_subjects")

FILL = [
    # Jobs in 20 campaigns, most published, some in every working state, a few in review.
    """
    INSERT INTO jobs (job_id, campaign_id, recipient_id, template_name, template_version, locale,
                      state, request_json, attempts, created_at, updated_at, sweeps, sweeps_total)
    SELECT uuid_in(md5('job' || i)::cstring)::text, 'camp-' || (i % 20), 'r-' || i,
           'lunar-new-year', '1', 'en',
           CASE WHEN i % 500 = 0 THEN 'needs_review'
                ELSE (ARRAY['published','published','published','published','published','published',
                            'requested','rendering','moderating','failed','rejected'])[1 + i % 11] END,
           jsonb_build_object('recipient', jsonb_build_object('name', 'N' || i)), 1,
           now() - interval '2 days' + i * interval '1 second',
           now() - interval '1 day' + i * interval '1 second', 0, 0
    FROM generate_series(1, :n) AS i
    """,
    """
    INSERT INTO job_events (job_id, from_state, to_state, actor, at)
    SELECT job_id, NULL, 'requested', 'intake', created_at FROM jobs
    UNION ALL SELECT job_id, 'requested', 'rendering', 'render@h:1', created_at + interval '1 s' FROM jobs
    UNION ALL SELECT job_id, 'rendering', state, 'mod@h:1', updated_at FROM jobs
    """,
    """
    INSERT INTO consents (record_id, subject_id, action, scopes, purpose, granted_at, recorded_by,
                          created_at)
    SELECT uuid_in(md5('consent' || i)::cstring)::text, 'subject-' || (i % 10000), 'grant',
           '["face"]'::jsonb, '*', now() - interval '1 day', 'test', now() - interval '1 day'
    FROM generate_series(1, 20000) AS i
    """,
    """
    INSERT INTO subject_faces (subject_id, consent_record_id, embedding, model, source_sha256, created_at)
    SELECT subject_id, record_id, '[0.1, 0.2]'::jsonb, 'm', md5(record_id), created_at FROM consents
    """,
    """
    INSERT INTO moderation_results (job_id, decision, findings, decided_by, reason, created_at)
    SELECT job_id, CASE WHEN state = 'needs_review' THEN 'needs_review' ELSE 'approved' END,
           '[]'::jsonb, 'mod@h:1', '', updated_at
    FROM jobs WHERE state IN ('published', 'needs_review')
    """,
    """
    INSERT INTO job_subjects (job_id, subject_id, scopes)
    SELECT job_id, 'subject-' || (abs(hashtext(job_id)) % 10000), '["face"]'::jsonb
    FROM jobs WHERE state = 'published'
    """,
    """
    INSERT INTO published_clips (job_id, object_key, url, sha256, published_at)
    SELECT job_id, 'distribution/' || job_id || '.mp4', 'https://cdn/' || job_id, md5(job_id), updated_at
    FROM jobs WHERE state = 'published'
    """,
    "ANALYZE",
]


class Captured:
    """Every statement (and its parameters) the engine runs while capturing."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.statements: list[tuple[str, Any]] = []

    def _on(self, _c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, many: bool) -> None:
        if not many:
            self.statements.append((statement, parameters))

    @contextmanager
    def capture(self) -> Iterator[list[tuple[str, Any]]]:
        start = len(self.statements)
        out: list[tuple[str, Any]] = []
        event.listen(self.db.engine, "before_cursor_execute", self._on)
        try:
            yield out
        finally:
            event.remove(self.db.engine, "before_cursor_execute", self._on)
            out.extend(self.statements[start:])


def _explain(db: Database, statement: str, parameters: Any) -> str:
    with db.engine.connect() as conn:
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
        conn.rollback()
    return "\n".join(str(r[0]) for r in rows)


def test_per_message_queries_use_indexes(postgres_db: Database) -> None:
    db = postgres_db
    with db.engine.begin() as conn:
        for sql in FILL[:-1]:
            conn.execute(text(sql), {"n": JOBS} if ":n" in sql else {})
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(FILL[-1]))
        pick = conn.execute(
            text(
                "SELECT (SELECT job_id FROM jobs WHERE state = 'requested' LIMIT 1),"
                " (SELECT job_id FROM jobs WHERE state = 'published' LIMIT 1),"
                " (SELECT record_id FROM consents LIMIT 1)"
            )
        ).one()
    requested, published, record_id = str(pick[0]), str(pick[1]), uuid.UUID(pick[2])

    jobs = JobRepository(db)
    consents = ConsentRepository(db)
    results = ModerationResultRepository(db)
    clips = PublishedClipRepository(db)
    subjects = JobSubjectRepository(db)

    def claim_and_move() -> None:
        rec = jobs.claim(
            requested, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED], owner="w", lease_s=60
        )
        assert rec is not None and rec.claim_token is not None
        assert jobs.renew(requested, claim_token=rec.claim_token, lease_s=60)
        assert jobs.transition(
            requested, to_state=JobState.RENDERED, expected=JobState.RENDERING, claim_token=rec.claim_token
        )
        again = jobs.claim(
            requested, to_state=JobState.MODERATING, from_states=[JobState.RENDERED], owner="w", lease_s=60
        )
        assert again is not None and again.claim_token is not None
        assert jobs.release(requested, claim_token=again.claim_token)

    cases: dict[str, Callable[[], object]] = {
        "jobs.get": lambda: jobs.get(published),
        "jobs.claim / renew / transition / release": claim_and_move,
        "jobs.history": lambda: jobs.history(published),
        "jobs.fail": lambda: jobs.fail(requested, "test failure"),
        "consents.records (by subject)": lambda: consents.records("subject-7"),
        "consents.get (by record id)": lambda: consents.get(record_id),
        "consents.subject_faces (by record ids)": lambda: consents.subject_faces([record_id]),
        "consents.face_record_ids (by subject)": lambda: consents.face_record_ids("subject-7"),
        "moderation_results.latest": lambda: results.latest(published),
        "moderation_results.review_queue": lambda: results.review_queue(limit=50),
        "published_clips.get": lambda: clips.get(published),
        "job_subjects.index (by job)": lambda: subjects.index(
            published, [SubjectUse(subject_id="subject-7", scopes=frozenset({Scope.FACE}))]
        ),
        "job_subjects.jobs_using (by subject)": lambda: subjects.jobs_using("subject-7"),
        "jobs.list_jobs (a page of a campaign)": lambda: jobs.list_jobs(
            campaign_id="camp-3", limit=50, after=jobs.list_jobs(campaign_id="camp-3", limit=1)[0].job_id
        ),
        "jobs.counts_by_state (campaign wait, progress)": lambda: jobs.counts_by_state("camp-3"),
        "progress snapshot (campaign status)": lambda: ProgressService(jobs, deadline_s=3600).snapshot(
            "camp-3"
        ),
        "sweeper: jobs.stuck": lambda: jobs.stuck(
            [JobState.RENDERING, JobState.MODERATING], stale_after_s=60, limit=500
        ),
    }
    # Periodic, not per message, and O(working jobs) by what it counts: its plan is printed
    # (two ranges of ix_jobs_state_updated_at, or a scan when a third of the table is at
    # work, as here) but not held to the rule.
    shown_only = {
        "metrics: counts_by_campaign_state": lambda: jobs.counts_by_campaign_state(final_within_s=300),
    }
    captured = Captured(db)
    problems: list[str] = []
    for name, call in {**cases, **shown_only}.items():
        with captured.capture() as statements:
            call()
        assert statements, name
        print(f"\n### {name}")
        for statement, parameters in statements:
            head = statement.lstrip().split(None, 1)[0].upper()
            if head not in ("SELECT", "UPDATE", "DELETE", "INSERT"):
                continue
            plan = _explain(db, statement, parameters)
            print(" ".join(statement.split())[:160])
            print(plan)
            for table in BIG_TABLES:
                if name in cases and f"Seq Scan on {table} " in plan + " ":
                    problems.append(f"{name}: Seq Scan on {table}: {' '.join(statement.split())[:200]}")
    assert not problems, "\n".join(problems)
