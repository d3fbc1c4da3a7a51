"""SLA escalation, lease expiry and the append-only audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from pipeline.adapters.db import Database
from pipeline.repositories import JobRepository, ModerationResultRepository
from pipeline.review.repository import ReviewRepository
from pipeline.review.service import Conflict, ReviewService
from pipeline.settings import Settings
from schemas.common import utcnow
from schemas.events import Decision, Finding, Severity
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset


class Events:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def publish(
        self, topic: str, payload: Any, *, key: str, trace_id: str | None = None, event_id: Any = None
    ) -> None:
        self.sent.append(payload)


def make(db: Database, clock: Clock, events: Events) -> ReviewService:
    settings = Settings(review_sla_hours=24, review_lease_s=60)
    svc = ReviewService(
        settings, ReviewRepository(db, clock=clock), JobRepository(db), ModerationResultRepository(db),
        None, None, events,  # type: ignore[arg-type]  # consents/store: not used here
    )  # fmt: skip
    for name in ("alice", "bob", "carol", "dave"):
        svc.add_user(name, "reviewer", "correct horse battery staple")
    return svc


def case(db: Database, recipient: str = "r-1") -> uuid.UUID:
    jobs, results = JobRepository(db), ModerationResultRepository(db)
    req = render_request(recipient_id=recipient)
    jobs.create_if_absent(req)
    prev = JobState.REQUESTED
    for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING):
        assert jobs.transition(req.job_id, to_state=st, expected=prev)
        prev = st
    f = Finding(kind="text_abuse", severity=Severity.WARN, message="m")
    results.record(req.job_id, Decision.NEEDS_REVIEW, [f], decided_by="auto")
    assert jobs.transition(req.job_id, to_state=JobState.NEEDS_REVIEW, expected=JobState.MODERATING)
    return req.job_id


def test_overdue_cases_are_escalated_once(db: Database) -> None:
    clock, events = Clock(), Events()
    svc = make(db, clock, events)
    jid = case(db)
    assert svc.escalate_overdue() == []
    clock.offset = timedelta(hours=25)
    assert svc.escalate_overdue() == [jid]
    assert svc.escalate_overdue() == []
    c = svc.repo.case(jid)
    assert c is not None and c.escalated_at is not None and "SLA" in (c.escalation_reason or "")
    assert [a.action for a in svc.repo.audit_log(jid)] == ["escalated"]
    assert svc.repo.queue()[0].case is not None


def test_leases_expire_and_a_stale_holder_cannot_decide(db: Database) -> None:
    clock, events = Clock(), Events()
    svc = make(db, clock, events)
    jid = case(db)
    from pipeline.review.repository import SessionInfo

    a = SessionInfo("alice", "reviewer", "", utcnow())
    b = SessionInfo("bob", "reviewer", "", utcnow())
    svc.claim(jid, a)
    with pytest.raises(Conflict):
        svc.claim(jid, b)
    clock.offset = timedelta(seconds=61)
    svc.claim(jid, b)  # alice's lease expired
    with pytest.raises(Conflict):
        svc.decide(jid, a, True, "late")
    assert svc.decide(jid, b, False, "no").status == "rejected"
    assert len(events.sent) == 1 and events.sent[0].decided_by == "review:bob"


def test_many_concurrent_reviewers_one_decision(db: Database) -> None:
    clock, events = Clock(), Events()
    svc = make(db, clock, events)
    jid = case(db)
    from pipeline.review.repository import SessionInfo

    names = ["alice", "bob", "carol", "dave"]
    barrier = threading.Barrier(len(names))
    won: list[str] = []

    def work(name: str) -> None:
        who = SessionInfo(name, "reviewer", "", utcnow())
        barrier.wait()
        for _ in range(5):
            try:
                svc.claim(jid, who)
                svc.decide(jid, who, True, f"{name} approves")
                won.append(name)
                return
            except Conflict:
                continue

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(events.sent) == 1
    assert JobRepository(db).get(jid).state == JobState.APPROVED  # type: ignore[union-attr]


def test_audit_log_is_append_only(db: Database) -> None:
    repo = ReviewRepository(db)
    repo.audit(None, "alice", "login")
    for stmt in ("UPDATE review_audit SET actor = 'mallory'", "DELETE FROM review_audit"):
        with pytest.raises(DBAPIError), db.engine.begin() as conn:
            conn.execute(text(stmt))
    assert [(a.actor, a.action) for a in repo.audit_log()][-1] == ("alice", "login")


def test_cli_add_user_then_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import cli
    from pipeline.bootstrap import Container
    from pipeline.settings import get_settings

    monkeypatch.setenv("GREETFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GREETFLOW_REVIEW_PASSWORD", "correct horse battery staple")
    get_settings.cache_clear()
    try:
        assert cli.main(["review", "add-user", "lea", "--role", "lead"]) == 0
        c = Container(get_settings())
        try:
            _token, who = c.review_service().login("lea", "correct horse battery staple")
            assert who.role == "lead"
        finally:
            c.close()
    finally:
        get_settings.cache_clear()
