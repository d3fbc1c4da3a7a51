"""The review app's login throttling, lockout, bounded password hashing and lease
ownership, against the app running as a real uvicorn process (real argon2 cost) on the
real stack, plus the throttle's database logic on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from pipeline.adapters.db import Database
from pipeline.bootstrap import Container
from pipeline.review.app import create_app
from pipeline.review.repository import Attempt, ReviewRepository, Throttle, ThrottleScope
from pipeline.review.service import Forbidden, LoginBusy, LoginThrottled, ReviewService
from pipeline.settings import Settings
from schemas.events import Decision
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request
from tests.review_support import CAMPAIGN, PASSWORD, add_reviewers, free_port, text_abuse

pytestmark = pytest.mark.integration

RSS_LIMIT_KB = 300 * 1024


def rss_kb(pid: int) -> int:
    """VmRSS of the process and all its descendants."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


@dataclass
class App:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    data_dir: Path


CHEAP_HASHES = {"review_argon2_memory_kib": 64, "review_argon2_time_cost": 1, "review_argon2_parallelism": 1}


def cheap_settings(data_dir: Path) -> Settings:
    """Login, leases and the audit touch only the database (a real SQLite file): the
    broker and S3 ports point at nothing, so any use of them would fail the test."""
    return Settings(
        data_dir=data_dir,
        s3_endpoint=f"http://127.0.0.1:{free_port()}",
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        **CHEAP_HASHES,
    )


def case_in_review(c: Container) -> uuid.UUID:
    """A job in needs_review with its moderation result (no media: nothing here plays it)."""
    req = render_request(CAMPAIGN, "r-1")
    c.jobs.create_if_absent(req)
    prev = JobState.REQUESTED
    for st in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING):
        extra = {"staging_key": f"{CAMPAIGN}/r-1/{req.job_id}.mp4"} if st == JobState.RENDERED else {}
        assert c.jobs.transition(req.job_id, to_state=st, expected=prev, actor="test", **extra)
        prev = st
    c.moderation_results.record(
        req.job_id, Decision.NEEDS_REVIEW, (text_abuse(),), decided_by="moderate@test", reason="test"
    )
    assert c.jobs.transition(req.job_id, to_state=JobState.NEEDS_REVIEW, expected=prev, actor="test")
    return req.job_id


@pytest.fixture
def review_app(tmp_path: Path) -> Iterator[App]:
    """`uvicorn --factory pipeline.cli.review:app_from_settings` on a data dir of its own,
    with the product's default argon2 cost and hashing pool (backoff and lockout short to
    keep this fast)."""
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GREETFLOW_")}
    env.update(
        GREETFLOW_DATA_DIR=str(data),
        GREETFLOW_S3_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        GREETFLOW_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}",
        GREETFLOW_REVIEW_COOKIE_SECURE="false",
        GREETFLOW_REVIEW_LOGIN_BACKOFF_S="1.5",
        GREETFLOW_REVIEW_LOGIN_LOCKOUT_FAILURES="6",
        GREETFLOW_REVIEW_LOGIN_LOCKOUT_S="2",
    )
    log = tmp_path / "review-app.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "pipeline.cli.review:app_from_settings",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the review app exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/login", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the review app did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    try:
        yield App(proc, url, log, data)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def login(url: str, name: str, password: str, ip: str | None = None) -> httpx.Response:
    # uvicorn trusts X-Forwarded-For from loopback: one distinct client per ip.
    headers = {"X-Forwarded-For": ip} if ip else {}
    return httpx.post(f"{url}/api/session", json={"name": name, "password": password}, headers=headers,
                      timeout=60)  # fmt: skip


def test_real_process_throttling_memory_lockout_and_leases(review_app: App) -> None:
    # The reviewers' own hashes are cheap (the app verifies a stored hash at its own cost
    # and rehashes it at the real cost on the first success); every unknown name in the
    # burst below is verified at the app's real cost.
    container = Container(cheap_settings(review_app.data_dir))
    try:
        svc = add_reviewers(container, alice="reviewer", bob="reviewer", carol="lead")
        jid = case_in_review(container)
        check_app(review_app, svc, jid)
    finally:
        container.close()


def check_app(review_app: App, svc: ReviewService, jid: uuid.UUID) -> None:
    url, pid = review_app.url, review_app.proc.pid
    baseline = rss_kb(pid)

    # 32 parallel wrong logins, each from its own client and for its own name (so no
    # throttle applies and every one wants an argon2 verification).
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(32) as pool:
        burst = list(
            pool.map(lambda i: login(url, f"intruder{i}", "wrong password", f"198.51.100.{i + 1}"), range(32))
        )
    done.set()
    sampler.join()
    codes = sorted(r.status_code for r in burst)
    assert set(codes) <= {403, 503}, codes
    assert all(r.headers.get("retry-after") for r in burst if r.status_code == 503)
    assert peak[0] < RSS_LIMIT_KB, f"RSS {baseline} kB -> peak {peak[0]} kB"
    print(f"\nRSS baseline {baseline // 1024} MB, peak {peak[0] // 1024} MB; burst answers {codes}")

    # One account: five wrong passwords, then the sixth try is throttled without a
    # verification (fast), even with the right password.
    for i in range(5):
        assert login(url, "alice", f"wrong {i}").status_code == 403
    t0 = time.monotonic()
    sixth = login(url, "alice", PASSWORD)
    throttled_s = time.monotonic() - t0
    assert sixth.status_code == 429, sixth.text
    assert int(sixth.headers["retry-after"]) >= 1
    print(f"6th try: 429 in {throttled_s * 1000:.0f} ms, Retry-After {sixth.headers['retry-after']}")
    # The block is in the database: another process (this one) sees it too.
    with pytest.raises(LoginThrottled):
        svc.login("alice", PASSWORD, ip="203.0.113.7")

    # After the backoff a sixth failure locks the account; the lockout holds even for the
    # right password and is cleared by a successful login once it has expired.
    time.sleep(float(sixth.headers["retry-after"]) + 0.2)
    assert login(url, "alice", "wrong again").status_code == 403
    locked = login(url, "alice", PASSWORD)
    assert locked.status_code == 429 and "locked" in locked.json()["detail"]

    # The app still serves everyone else, and a lease is its holder's alone.
    bob = httpx.Client(base_url=url, timeout=30)
    r = bob.post("/api/session", json={"name": "bob", "password": PASSWORD})
    assert r.status_code == 200, r.text
    bob_h = {"X-CSRF-Token": r.json()["csrf_token"]}
    carol = httpx.Client(base_url=url, timeout=30)
    r = carol.post("/api/session", json={"name": "carol", "password": PASSWORD})
    carol_h = {"X-CSRF-Token": r.json()["csrf_token"]}
    assert bob.post(f"/api/cases/{jid}/lease", headers=bob_h).status_code == 200
    refused = carol.delete(f"/api/cases/{jid}/lease", headers=carol_h)
    assert refused.status_code == 403, refused.text
    assert carol.get(f"/api/cases/{jid}").json()["lease"]["reviewer"] == "bob"
    assert bob.delete(f"/api/cases/{jid}/lease", headers=bob_h).status_code == 204
    assert carol.get(f"/api/cases/{jid}").json()["lease"] is None

    time.sleep(float(locked.headers["retry-after"]) + 0.2)
    assert login(url, "alice", PASSWORD).status_code == 200
    assert login(url, "alice", "wrong after success").status_code == 403  # count cleared

    audit = bob.get("/api/audit", params={"limit": 5000}).json()
    mine = [(a["action"], a["detail"].get("scope")) for a in audit if a["actor"] == "alice"]
    assert mine.count(("login_failed", None)) == 7
    assert ("login_throttled", "account") in mine
    assert ("login_locked", "account") in mine
    assert [a for a in audit if a["action"] == "release_refused" and a["actor"] == "carol"]
    assert review_app.proc.poll() is None


# --- the throttle's database logic, on both backends ---


def block_after_5(scope: ThrottleScope, failures: int) -> tuple[float, bool] | None:
    return (60.0, failures >= 10) if failures >= 5 else None


def test_parallel_tries_cannot_slip_under_the_limit(db: Database) -> None:
    repo = ReviewRepository(db)

    def one(_i: int) -> Attempt | Throttle:
        return repo.reserve_login_attempt([("account", "alice")], window_s=3600, block_for=block_after_5)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    allowed = [r for r in results if isinstance(r, Attempt)]
    assert len(allowed) == 5, results
    assert sorted(a.failures["account"] for a in allowed) == [1, 2, 3, 4, 5]
    assert all(isinstance(r, Throttle) and r.failures == 5 for r in results if r not in allowed), results
    # A success forgets the account's failures.
    repo.login_succeeded("alice", None)
    assert isinstance(one(0), Attempt)


def test_window_forgets_old_failures(db: Database) -> None:
    repo = ReviewRepository(db)
    for _ in range(3):
        repo.reserve_login_attempt([("ip", "192.0.2.1")], window_s=3600, block_for=block_after_5)
    fresh = repo.reserve_login_attempt([("ip", "192.0.2.1")], window_s=0.0, block_for=block_after_5)
    assert isinstance(fresh, Attempt) and fresh.failures == {"ip": 1}


# --- the service at low argon2 cost (its settings expose it) ---


@pytest.fixture
def cheap(tmp_path: Path) -> Iterator[Container]:
    """The review service on a real SQLite database at low argon2 cost."""
    c = Container(cheap_settings(tmp_path / "cheap"))
    yield c
    c.close()


def test_throttled_tries_never_hash_and_ip_limit(cheap: Container) -> None:
    svc = add_reviewers(cheap, alice="reviewer")
    verified: list[str] = []
    real_verify = svc.hashes.verify

    def counting(stored: str, password: str) -> bool:
        verified.append(password)
        return real_verify(stored, password)

    svc.hashes.verify = counting  # type: ignore[method-assign]
    for i in range(5):
        with pytest.raises(Forbidden):
            svc.login("alice", f"nope {i}", ip="192.0.2.10")
    for _ in range(3):
        with pytest.raises(LoginThrottled):
            svc.login("alice", PASSWORD, ip="192.0.2.10")
    assert len(verified) == 5
    # Per IP: 20 failures over many names, then that IP is throttled for any name.
    for i in range(20):
        with pytest.raises(Forbidden):
            svc.login(f"user{i}", "x", ip="192.0.2.99")
    with pytest.raises(LoginThrottled) as exc:
        svc.login("alice-2", "x", ip="192.0.2.99")
    assert exc.value.retry_after_s >= 1 and len(verified) == 25
    actions = [a.action for a in svc.repo.audit_log(limit=5000)]
    assert actions.count("login_failed") == 25 and actions.count("login_throttled") == 4
    # The login page says so too, with the status and Retry-After, and a fresh form.
    client = TestClient(create_app(svc), base_url="https://testserver", follow_redirects=False)
    token = client.get("/login").text.split('name="csrf_token" value="')[1].split('"')[0]
    page = client.post("/login", data={"name": "alice", "password": PASSWORD, "csrf_token": token})
    assert page.status_code == 429 and int(page.headers["retry-after"]) >= 1
    assert "Too many failed logins: try again in" in page.text and 'name="csrf_token"' in page.text
    assert len(verified) == 25


def test_hash_pool_refuses_beyond_its_bound(cheap: Container) -> None:
    settings = cheap.settings.model_copy(
        update={"review_hash_concurrency": 1, "review_hash_wait_s": 0.2, "review_hash_max_waiting": 1}
    )
    c = Container(settings)
    try:
        svc: ReviewService = add_reviewers(c, alice="reviewer")
        with svc.hashes.slot():  # the only slot is taken
            t0 = time.monotonic()
            with pytest.raises(LoginBusy) as exc:
                svc.login("alice", PASSWORD, ip="192.0.2.20")
            assert time.monotonic() - t0 < 2 and exc.value.retry_after_s >= 1
        assert svc.login("alice", PASSWORD, ip="192.0.2.20")[1].reviewer == "alice"
    finally:
        c.close()


def test_default_backoff_schedule() -> None:
    """The defaults documented in docs/security.md: the 6th try waits 5 s, then 10, 20, 40,
    80 s; the 10th failure locks for 15 minutes. Per IP from the 20th, locked at 100."""
    svc = ReviewService(Settings(), *([None] * 6))  # type: ignore[arg-type]
    account = [svc._block_for("account", n) for n in range(1, 12)]
    assert (
        account
        == [None] * 4 + [(5, False), (10, False), (20, False), (40, False), (80, False)] + [(900, True)] * 2
    )
    assert [svc._block_for("ip", n) for n in (19, 20, 21, 99, 100)] == [
        None, (5, False), (10, False), (300, False), (900, True),
    ]  # fmt: skip
