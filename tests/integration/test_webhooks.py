"""Webhooks on the real thing: the API app, the database, real HTTP to a receiver on
loopback, and (first test) the whole pipeline on the embedded broker and S3 server."""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.api.app import create_app
from pipeline.api.repository import ApiKeyRepository
from pipeline.bootstrap import Container
from pipeline.campaigns import BriefError, sample_brief
from pipeline.settings import Settings
from pipeline.webhooks.service import WebhookService
from pipeline.webhooks.signing import verify_signature
from schemas.events import ClipPublished, Envelope
from schemas.jobs import JobState
from tests.integration.db_fixtures import render_request
from tests.integration.pipeline_fixtures import run_workers

pytestmark = pytest.mark.integration

SCOPES = frozenset({"renders:write", "jobs:read", "webhooks:write", "webhooks:read"})
PUBLIC = "93.184.216.34"


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook receiver on loopback: records every request; `script[path]` lists the
    status codes to answer in turn (then 200)."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]

    def events(self, path: str) -> list[str]:
        return [h.headers["greetflow-event"] for h in self.at(path) if h.status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with rec.lock:
                queue = rec.script.get(self.path, [])
                status = queue.pop(0) if queue else 200
                rec.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def _webhook_settings(base: Settings, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_allow_loopback": True,
        "intake_allow_loopback_webhooks": True,
        "webhook_backoff_base_s": 0.05,
        "webhook_backoff_max_s": 0.2,
        "webhook_poll_s": 0.1,
        "webhook_timeout_s": 5.0,
        **extra,
    }
    return base.model_copy(update=values)


def _auth(container: Container, tenant: str) -> dict[str, str]:
    _key, token = ApiKeyRepository(container.db).create(name=f"{tenant}-key", tenant=tenant, scopes=SCOPES)
    return {"Authorization": f"Bearer {token}"}


class Resolver:
    """A DNS that answers what the test says now (rebinding between register and send)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}

    def __call__(self, host: str, _port: int) -> Sequence[str]:
        if host in self.answers:
            return self.answers[host]
        raise OSError(f"{host}: no such name in this test")


def _until(cond: Callable[[], bool], *, timeout_s: float, tick: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout_s} s")
        if tick is not None:
            tick()
        time.sleep(0.05)


def _signed_by(hit: Hit, secret: str) -> bool:
    return verify_signature(secret, hit.headers["greetflow-signature"], hit.body, 300)


# ---------------------------------------------------------------------------- the whole path


def test_published_render_and_completed_brief_reach_their_receivers(
    stack: Settings, receiver: Receiver
) -> None:
    container = Container(_webhook_settings(stack))
    try:
        client = TestClient(create_app(container), base_url="https://testserver")
        acme = _auth(container, "acme")

        # A tenant endpoint through the API; an app's render request through the API.
        r = client.post("/v1/webhooks", json={"url": receiver.url("/tenant")}, headers=acme)
        assert r.status_code == 201, r.text
        tenant_hook, tenant_secret = r.json()["id"], r.json()["secret"]
        r = client.post(
            "/v1/renders",
            json={
                "recipient": {"id": "grandma", "name": "Alice Wong", "locale": "en"},
                "template": {"name": "lunar-new-year", "version": "1"},
            },
            headers=acme,
        )
        assert r.status_code in (200, 201, 202), r.text
        job_id = r.json()["job_id"]

        # A brief with a webhook_url (no tenant): its endpoint and secret come from submit.
        brief = sample_brief(1).model_copy(update={"webhook_url": receiver.url("/brief")})
        submitted = container.campaigns().submit_brief(brief)
        assert submitted.webhook_secret is not None
        assert container.campaigns().submit_brief(brief).webhook_secret is None  # shown once
        # A brief whose webhook_url the guard refuses is refused whole, before any job exists.
        bad = brief.model_copy(update={"campaign_id": "bad-hook", "webhook_url": "https://10.0.0.1/x"})
        with pytest.raises(
            BriefError, match=r"^brief bad-hook: webhook_url: refused: 10.0.0.1 is a private address$"
        ):
            container.campaigns().submit_brief(bad)
        assert container.jobs.list_jobs(campaign_id="bad-hook") == []

        # An endpoint of acme whose name resolves to a public address when registered and
        # to the metadata service when sent to (DNS rebinding): refused at delivery.
        dns = Resolver()
        dns.answers["rebind.test"] = [PUBLIC]
        service = WebhookService(
            container.settings,
            container.webhook_repository,
            owner="webhook-test",
            store=container.store,
            resolver=dns,
        )
        rebind = service.register("acme", "https://rebind.test/hook").endpoint
        dns.answers["rebind.test"] = ["169.254.169.254"]

        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                service.tick()
                stop.wait(0.1)

        sender = threading.Thread(target=loop, daemon=True)
        sender.start()
        try:

            def done() -> bool:
                return receiver.events("/tenant") == ["job.published", "campaign.completed"] and sorted(
                    receiver.events("/brief")
                ) == ["campaign.completed", "job.published"]

            run_workers(
                container,
                [
                    consumers.render.build,
                    consumers.moderate.build,
                    consumers.publish.build,
                    lambda c: c.webhook_workers(service)[0],
                    lambda c: c.webhook_workers(service)[1],
                ],
                done,
                timeout_s=150,
            )
        finally:
            stop.set()
            sender.join(timeout=10)
            service.close()

        job = container.jobs.get(job_id)
        assert job is not None and job.state == JobState.PUBLISHED
        published = receiver.at("/tenant")[0]
        assert _signed_by(published, tenant_secret)
        assert not _signed_by(published, submitted.webhook_secret)
        event = json.loads(published.body)
        assert event["type"] == "job.published" == published.headers["greetflow-event"]
        assert event["data"]["job_id"] == job_id and event["data"]["url"] == job.url
        assert uuid.UUID(published.headers["greetflow-delivery"])
        completed = json.loads(receiver.at("/tenant")[1].body)
        assert completed["data"] == {"campaign_id": "api-acme", "jobs": 1, "states": {"published": 1}}
        for hit in receiver.at("/brief"):
            assert _signed_by(hit, submitted.webhook_secret)
            assert json.loads(hit.body)["data"]["campaign_id"] == brief.campaign_id

        # The delivery log through the API; another tenant's key sees no such endpoint.
        log = client.get(f"/v1/webhooks/{tenant_hook}/deliveries", headers=acme).json()
        assert sorted(d["event_type"] for d in log) == ["campaign.completed", "job.published"]
        assert all(d["state"] == "delivered" and len(d["attempts"]) == 1 for d in log)
        other = _auth(container, "other")
        r = client.get(f"/v1/webhooks/{tenant_hook}/deliveries", headers=other)
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")

        # The rebinding endpoint: one refused attempt per event, dead, dead-lettered in S3.
        refused = client.get(f"/v1/webhooks/{rebind.id}/deliveries", headers=acme).json()
        assert sorted(d["event_type"] for d in refused) == ["campaign.completed", "job.published"]
        for d in refused:
            assert d["state"] == "dead" and len(d["attempts"]) == 1
            assert d["attempts"][0]["status_code"] is None
            assert d["attempts"][0]["error"] == (
                "refused: rebind.test resolves to 169.254.169.254, which is a cloud metadata address"
            )
        bucket = container.settings.dead_letter_bucket or container.settings.bucket_staging
        letters = container.store.list_keys(bucket, f"{container.settings.dead_letter_prefix}/webhooks/")
        assert sorted(letters) == sorted(
            f"{container.settings.dead_letter_prefix}/webhooks/{d['id']}.json" for d in refused
        )
    finally:
        container.close()


# ---------------------------------------------------------------------------- without the broker


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Container, TestClient]]:
    """The API app on a SQLite database (no broker or S3 needed by these routes)."""
    container = Container(_webhook_settings(Settings(data_dir=tmp_path / "data"), webhook_secret_grace_s=1.5))
    try:
        yield container, TestClient(create_app(container), base_url="https://testserver")
    finally:
        container.close()


def _publish_event(container: Container, service: WebhookService, recipient: str) -> Envelope[Any]:
    req = render_request("hooks", recipient)
    container.jobs.create_if_absent(req, owner="acme")
    env: Envelope[Any] = Envelope.wrap(
        ClipPublished(
            job_id=req.job_id,
            campaign_id="hooks",
            recipient_id=recipient,
            object_key=f"hooks/{recipient}/{req.job_id}.mp4",
            url="https://cdn.example/clip.mp4",
            sha256="0" * 64,
        )
    )
    service.handle(env)
    return env


def test_500_twice_then_200_is_received_once_more_with_three_attempts_logged(
    api: tuple[Container, TestClient], receiver: Receiver
) -> None:
    container, client = api
    acme = _auth(container, "acme")
    r = client.post(
        "/v1/webhooks", json={"url": receiver.url("/flaky"), "events": ["job.published"]}, headers=acme
    )
    assert r.status_code == 201, r.text
    hook, secret = r.json()["id"], r.json()["secret"]
    receiver.script["/flaky"] = [500, 500]
    service = container.webhook_service("test")
    env = _publish_event(container, service, "r1")
    service.handle(env)  # a redelivered envelope: still one delivery
    try:
        _until(lambda: len(receiver.at("/flaky")) >= 3, timeout_s=15, tick=service.deliver_due)
        for _ in range(10):  # nothing more is due
            service.deliver_due()
            time.sleep(0.05)
    finally:
        service.close()

    hits = receiver.at("/flaky")
    assert [h.status for h in hits] == [500, 500, 200]
    assert len({h.headers["greetflow-delivery"] for h in hits}) == 1
    assert len({h.body for h in hits}) == 1
    assert all(_signed_by(h, secret) for h in hits)
    assert json.loads(hits[-1].body)["id"] == str(env.id)
    (delivery,) = client.get(f"/v1/webhooks/{hook}/deliveries", headers=acme).json()
    assert delivery["state"] == "delivered"
    assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 200)]
    assert delivery["attempts"][0]["error"] == "HTTP 500"


@pytest.mark.parametrize(
    ("url", "inside"),
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("https://10.0.0.1/hook", "10.0.0.1"),
        ("", "::1"),
    ],
)
def test_internal_addresses_are_refused_at_registration_and_at_delivery(
    tmp_path: Path, receiver: Receiver, url: str, inside: str
) -> None:
    strict = _webhook_settings(Settings(data_dir=tmp_path / "data"), webhook_allow_loopback=False)
    container = Container(strict)
    client = TestClient(create_app(container), base_url="https://testserver")
    url = url or f"http://[::1]:{receiver.port}/hook"
    acme = _auth(container, "acme")
    r = client.post("/v1/webhooks", json={"url": url}, headers=acme)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["status"] == 400 and "refused" in r.json()["detail"]
    assert client.get("/v1/webhooks", headers=acme).json() == []

    # Registered while its name looked public, then the name points inside: refused when sent.
    inside = (
        url.split("//")[1].split("/")[0].rsplit(":", 1)[0].strip("[]") if "[" in url else url.split("/")[2]
    )
    dns = Resolver()
    dns.answers["hook.test"] = [PUBLIC]
    service = WebhookService(strict, container.webhook_repository, owner="test", resolver=dns)
    endpoint = service.register("acme", "https://hook.test/x").endpoint
    dns.answers["hook.test"] = [inside]
    _publish_event(container, service, "r2")
    try:
        for _ in range(5):
            service.deliver_due()
        (delivery,) = client.get(f"/v1/webhooks/{endpoint.id}/deliveries", headers=acme).json()
    finally:
        service.close()
        container.close()
    assert delivery["state"] == "dead"
    assert len(delivery["attempts"]) == 1  # no retry storm
    assert delivery["attempts"][0]["error"].startswith(f"refused: hook.test resolves to {inside}, which is a")
    assert receiver.hits == []


def test_rotation_signs_with_both_secrets_during_grace_then_only_the_new(
    api: tuple[Container, TestClient], receiver: Receiver
) -> None:
    container, client = api
    acme = _auth(container, "acme")
    r = client.post("/v1/webhooks", json={"url": receiver.url("/rot")}, headers=acme)
    hook, old = r.json()["id"], r.json()["secret"]
    r = client.post(f"/v1/webhooks/{hook}/rotate", headers=acme)
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    assert new != old and r.json()["previous_secret_expires_at"] is not None
    service = container.webhook_service("test")
    try:
        _publish_event(container, service, "r3")
        _until(lambda: len(receiver.at("/rot")) >= 1, timeout_s=10, tick=service.deliver_due)
        during = receiver.at("/rot")[0]
        assert during.headers["greetflow-signature"].count("v1=") == 2
        assert _signed_by(during, new) and _signed_by(during, old)

        time.sleep(container.settings.webhook_secret_grace_s + 0.1)
        _publish_event(container, service, "r4")
        _until(lambda: len(receiver.at("/rot")) >= 2, timeout_s=10, tick=service.deliver_due)
    finally:
        service.close()
    after = receiver.at("/rot")[1]
    assert after.headers["greetflow-signature"].count("v1=") == 1
    assert _signed_by(after, new) and not _signed_by(after, old)
    # Rotating another tenant's endpoint is a 404.
    assert client.post(f"/v1/webhooks/{hook}/rotate", headers=_auth(container, "other")).status_code == 404


def test_failed_and_rejected_jobs_come_from_the_job_events_log(
    api: tuple[Container, TestClient], receiver: Receiver
) -> None:
    container, client = api
    acme = _auth(container, "acme")
    events = ["job.failed", "job.rejected", "campaign.completed"]
    r = client.post("/v1/webhooks", json={"url": receiver.url("/final"), "events": events}, headers=acme)
    secret = r.json()["secret"]
    service = container.webhook_service("test")
    failing, rejected = render_request("finals", "r5"), render_request("finals", "r6")
    for req in (failing, rejected):
        container.jobs.create_if_absent(req, owner="acme")
    service.scan_job_events()  # the first pass starts at the end of the log
    jobs = container.jobs
    assert jobs.fail(failing.job_id, "render: ffmpeg exited 1", actor="test")
    state = JobState.REQUESTED
    for nxt in (JobState.RENDERING, JobState.RENDERED, JobState.MODERATING, JobState.REJECTED):
        assert jobs.transition(
            rejected.job_id, to_state=nxt, expected=state, reason="abuse" if nxt == "rejected" else None
        )
        state = nxt
    try:
        for _ in range(3):  # rescans of unsettled rows add nothing
            service.scan_job_events()
        _until(lambda: len(receiver.at("/final")) >= 3, timeout_s=10, tick=service.deliver_due)
        time.sleep(0.3)
        service.deliver_due()
    finally:
        service.close()
    hits = receiver.at("/final")
    assert [h.headers["greetflow-event"] for h in hits] == [
        "job.failed",
        "job.rejected",
        "campaign.completed",
    ]
    assert all(_signed_by(h, secret) for h in hits)
    failed = json.loads(hits[0].body)["data"]
    assert failed["job_id"] == str(failing.job_id) and failed["reason"] == "render: ffmpeg exited 1"
    assert json.loads(hits[2].body)["data"]["states"] == {"failed": 1, "rejected": 1}
