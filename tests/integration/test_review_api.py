"""The review web app and API on the real broker, S3 server and database: sessions, CSRF,
escaping, leases, four eyes, publication of an approved case, appeals."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import consumers.publish
from pipeline.bootstrap import Container
from pipeline.review.app import SESSION_COOKIE, create_app
from pipeline.review.service import ReviewService
from pipeline.topics import MODERATION_DECISIONS
from schemas.events import Finding, Severity
from schemas.jobs import JobState
from tests.integration.pipeline_fixtures import consume_all, run_workers
from tests.review_support import PASSWORD, XSS_NAME, add_reviewers, needs_review_case, state

pytestmark = pytest.mark.integration


@pytest.fixture
def svc(container: Container) -> ReviewService:
    return add_reviewers(container, alice="reviewer", bob="reviewer", lea="lead", leo="lead")


@pytest.fixture
def app_client(svc: ReviewService) -> Iterator[TestClient]:
    # https: the session cookie is Secure by default, and a client only returns it over TLS.
    with TestClient(create_app(svc), base_url="https://testserver", follow_redirects=False) as client:
        yield client


def client_for(svc: ReviewService, name: str) -> tuple[TestClient, str]:
    client = TestClient(create_app(svc), base_url="https://testserver", follow_redirects=False)
    r = client.post("/api/session", json={"name": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return client, str(r.json()["csrf_token"])


def test_no_session_no_access(container: Container, app_client: TestClient, tmp_path: Path) -> None:
    req = needs_review_case(container, tmp_path, "r-1")
    jid = req.job_id
    assert app_client.get("/api/cases").status_code == 401
    r = app_client.post(f"/api/cases/{jid}/decision", json={"decision": "approve", "reason": "ok"})
    assert r.status_code == 401
    assert app_client.post(f"/api/cases/{jid}/lease").status_code == 401
    assert app_client.get(f"/api/cases/{jid}").status_code == 401
    # Pages send you to the login form, and a form post without a session changes nothing.
    assert app_client.get("/").headers["location"] == "/login"
    r = app_client.post(
        f"/cases/{jid}/decision", data={"decision": "approve", "reason": "ok", "csrf_token": "x"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/login"
    # A forged or stale cookie is no session either.
    app_client.cookies.set(SESSION_COOKIE, "forged", domain="testserver")
    assert app_client.get("/api/cases").status_code == 401
    assert state(container, jid) == JobState.NEEDS_REVIEW
    assert container.moderation_results.latest(jid).decided_by == "moderate@test"  # type: ignore[union-attr]


def test_every_state_change_needs_the_csrf_token(
    container: Container, svc: ReviewService, tmp_path: Path
) -> None:
    jid = needs_review_case(container, tmp_path, "r-1").job_id
    client, csrf = client_for(svc, "alice")
    assert client.get("/api/cases").status_code == 200
    for headers in ({}, {"X-CSRF-Token": "wrong"}):
        assert client.post(f"/api/cases/{jid}/lease", headers=headers).status_code == 403
        r = client.post(
            f"/api/cases/{jid}/decision", json={"decision": "approve", "reason": "ok"}, headers=headers
        )
        assert r.status_code == 403
        assert client.delete("/api/session", headers=headers).status_code == 403
    for data in ({}, {"csrf_token": "wrong"}):
        assert client.post(f"/cases/{jid}/claim", data=data).status_code == 403
        r = client.post(f"/cases/{jid}/decision", data={"decision": "reject", "reason": "no", **data})
        assert r.status_code == 403
        assert client.post("/logout", data=data).status_code == 403
    assert svc.repo.lease(jid) is None and state(container, jid) == JobState.NEEDS_REVIEW
    # The login form needs its own double-submit token.
    anon = TestClient(create_app(svc), base_url="https://testserver", follow_redirects=False)
    r = anon.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": "guess"})
    assert r.status_code == 403 and SESSION_COOKIE not in r.cookies
    # With the token everything works.
    assert client.post(f"/api/cases/{jid}/lease", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert client.delete("/api/session", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get("/api/cases").status_code == 401  # logged out for good


def test_session_cookie_flags_and_headers(svc: ReviewService) -> None:
    client = TestClient(create_app(svc), base_url="https://testserver", follow_redirects=False)
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    r = client.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(SESSION_COOKIE))
    flags = {p.strip().lower() for p in cookie.split(";")}
    assert {"httponly", "secure", "samesite=strict"} <= flags
    queue = client.get("/")
    assert queue.status_code == 200
    assert "script-src 'none'" in queue.headers["content-security-policy"]
    assert queue.headers["cache-control"] == "no-store"
    bad = client.post("/login", data={"name": "alice", "password": "nope", "csrf_token": "x"})
    assert bad.status_code == 403  # token was consumed with the cookie: reload needed


def test_recipient_name_shows_as_text(container: Container, svc: ReviewService, tmp_path: Path) -> None:
    jid = needs_review_case(container, tmp_path, "r-x", name=XSS_NAME).job_id
    client, _ = client_for(svc, "alice")
    for html in (client.get("/").text, client.get(f"/cases/{jid}").text):
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert XSS_NAME not in html
        assert "<b>rude</b>" not in html  # flagged text from a finding, escaped too
    assert client.get("/api/cases").json()[0]["recipient_name"] == XSS_NAME  # JSON keeps the data


def test_queue_oldest_first_with_filters_and_sla_age(
    container: Container, svc: ReviewService, tmp_path: Path
) -> None:
    first = needs_review_case(container, tmp_path, "r-1").job_id
    second = needs_review_case(container, tmp_path, "r-2", face=True).job_id
    client, _ = client_for(svc, "alice")
    rows = client.get("/api/cases").json()
    assert [r["job_id"] for r in rows] == [str(first), str(second)]
    assert rows[0]["age_s"] >= 0 and rows[0]["overdue"] is False
    assert [r["four_eyes"] for r in rows] == [False, True]
    assert [r["job_id"] for r in client.get("/api/cases?kind=unknown_face").json()] == [str(second)]
    assert client.get("/api/cases?campaign=other").json() == []
    assert client.get("/api/cases?min_age_h=5").json() == []
    html = client.get("/?kind=text_abuse").text
    assert str(first) in html and str(second) not in html
    detail = client.get(f"/api/cases/{second}").json()
    (face,) = [f for f in detail["findings"] if f["kind"] == "unknown_face"]
    assert face["crop_url"] and face["evidence"]["nearest"]["distance"] == 0.6812
    assert detail["clip_url"].startswith(container.settings.s3_endpoint)
    assert detail["consents"]["grandma"][0]["action"] == "grant"
    assert [h["to"] for h in detail["history"]][-1] == "needs_review"
    assert client.get("/openapi.json").status_code == 404
    paths = client.get("/api/openapi.json").json()["paths"]
    assert "/api/cases" in paths and "/api/cases/{job_id}/decision" in paths


def test_two_reviewers_never_hold_or_decide_the_same_case(
    container: Container, svc: ReviewService, tmp_path: Path
) -> None:
    jid = needs_review_case(container, tmp_path, "r-1").job_id
    a, a_csrf = client_for(svc, "alice")
    b, b_csrf = client_for(svc, "bob")
    barrier = threading.Barrier(2)
    claims: dict[str, int] = {}

    def claim(name: str, client: TestClient, csrf: str) -> None:
        barrier.wait()
        claims[name] = client.post(f"/api/cases/{jid}/lease", headers={"X-CSRF-Token": csrf}).status_code

    threads = [
        threading.Thread(target=claim, args=("alice", a, a_csrf)),
        threading.Thread(target=claim, args=("bob", b, b_csrf)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claims.values()) == [200, 409]
    decisions: dict[str, int] = {}

    def decide(name: str, client: TestClient, csrf: str, verdict: str) -> None:
        barrier.wait()
        decisions[name] = client.post(
            f"/api/cases/{jid}/decision",
            json={"decision": verdict, "reason": f"{name} says {verdict}"},
            headers={"X-CSRF-Token": csrf},
        ).status_code

    threads = [
        threading.Thread(target=decide, args=("alice", a, a_csrf, "approve")),
        threading.Thread(target=decide, args=("bob", b, b_csrf, "reject")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(decisions.values()) == [200, 409]
    human = [r for r in container.moderation_results.history(jid) if r.decided_by.startswith("review:")]
    assert len(human) == 1
    actions = [e.action for e in svc.repo.audit_log(jid)]
    assert actions.count("approved") + actions.count("rejected") == 1
    assert len(consume_all(container.settings, MODERATION_DECISIONS, expect=1)) == 1


def test_four_eyes_case_is_not_published_on_one_approval(
    container: Container, svc: ReviewService, tmp_path: Path
) -> None:
    jid = needs_review_case(container, tmp_path, "r-1", face=True).job_id
    alice, alice_csrf = client_for(svc, "alice")
    lea, lea_csrf = client_for(svc, "lea")
    bob, bob_csrf = client_for(svc, "bob")
    leo, leo_csrf = client_for(svc, "leo")

    def act(client: TestClient, csrf: str, verb: str = "approve") -> tuple[int, dict[str, str]]:
        h = {"X-CSRF-Token": csrf}
        client.post(f"/api/cases/{jid}/lease", headers=h)
        r = client.post(
            f"/api/cases/{jid}/decision", json={"decision": verb, "reason": "looks fine"}, headers=h
        )
        return r.status_code, r.json()

    code, body = act(alice, alice_csrf)
    assert code == 200 and body["status"] == "pending_second_approval"
    assert state(container, jid) == JobState.NEEDS_REVIEW
    # The first approver cannot give the second one; a plain reviewer cannot either.
    assert alice.post(f"/api/cases/{jid}/lease", headers={"X-CSRF-Token": alice_csrf}).status_code == 403
    code, _ = act(bob, bob_csrf)
    assert code == 403
    bob.delete(f"/api/cases/{jid}/lease", headers={"X-CSRF-Token": bob_csrf})
    # Nothing went to the publisher: run it and see nothing published.
    run_workers(container, [consumers.publish.build], until=lambda: True, timeout_s=5)
    assert state(container, jid) == JobState.NEEDS_REVIEW
    assert container.store.list_keys(container.settings.bucket_distribution) == []
    # A lead's approval is the second pair of eyes.
    code, body = act(lea, lea_csrf)
    assert code == 200 and body["status"] == "approved"
    assert state(container, jid) == JobState.APPROVED
    code, _ = act(leo, leo_csrf)
    assert code == 409  # already decided
    run_workers(
        container, [consumers.publish.build], until=lambda: state(container, jid) == JobState.PUBLISHED
    )
    (msg,) = consume_all(container.settings, MODERATION_DECISIONS, expect=1)
    payload = json.loads(msg.value)["payload"]
    assert payload["decision"] == "approved" and payload["decided_by"] == "review:lea"
    assert "first approval by alice" in payload["reason"]
    actions = [(e.actor, e.action) for e in svc.repo.audit_log(jid)]
    assert ("alice", "approval_pending") in actions and ("lea", "approved") in actions


def test_a_lead_reopens_a_likeness_rejection_on_appeal(
    container: Container, svc: ReviewService, tmp_path: Path
) -> None:
    protected = Finding(
        kind="protected_person",
        severity=Severity.BLOCK,
        message="a face at 0.0 s matches protected person 'Someone Famous' (distance 0.410 < 0.6)",
        evidence={"person": "Someone Famous", "distance": 0.41, "threshold": 0.6},
    )
    consent = Finding(kind="consent_missing", severity=Severity.BLOCK, message="no consent", evidence={})
    jid = needs_review_case(container, tmp_path, "r-1", findings=(protected,), final=JobState.REJECTED).job_id
    other = needs_review_case(container, tmp_path, "r-2", findings=(consent,), final=JobState.REJECTED).job_id
    alice, alice_csrf = client_for(svc, "alice")
    lea, lea_csrf = client_for(svc, "lea")
    r = alice.post(
        f"/api/cases/{jid}/reopen", json={"reason": "look-alike"}, headers={"X-CSRF-Token": alice_csrf}
    )
    assert r.status_code == 403
    r = lea.post(f"/api/cases/{other}/reopen", json={"reason": "x"}, headers={"X-CSRF-Token": lea_csrf})
    assert r.status_code == 409  # consent rejections are not appealable here
    r = lea.post(
        f"/api/cases/{jid}/reopen", json={"reason": "verified look-alike"}, headers={"X-CSRF-Token": lea_csrf}
    )
    assert r.status_code == 200 and state(container, jid) == JobState.NEEDS_REVIEW
    (row,) = alice.get("/api/cases").json()
    assert row["job_id"] == str(jid) and row["four_eyes"] is True


def test_unknown_case_is_404_and_bad_id_is_422(svc: ReviewService) -> None:
    client, csrf = client_for(svc, "alice")
    assert client.get(f"/api/cases/{uuid.uuid4()}").status_code == 404
    assert client.get("/api/cases/not-a-uuid").status_code == 422
    r = client.post(f"/api/cases/{uuid.uuid4()}/lease", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 404
