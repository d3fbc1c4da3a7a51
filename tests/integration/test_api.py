"""The render API as a real uvicorn server on the real stack (broker, S3 server, database)."""

# Fixtures are imported by name, so every test argument "redefines" them.

from __future__ import annotations

import io
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from PIL import Image

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.api.app import create_app
from pipeline.api.repository import ApiKeyRepository, IdempotencyRepository, hash_token
from pipeline.bootstrap import Container
from pipeline.dev.stack import DevStack
from pipeline.settings import Settings
from schemas.jobs import JobState
from tests.integration.db_fixtures import scratch_postgres_database
from tests.integration.pipeline_fixtures import run_workers, stack_settings

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
ALL_SCOPES = "renders:write,jobs:read,campaigns:write,campaigns:read,assets:write,consent:write,consent:read"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Api:
    container: Container
    base: str
    http: httpx.Client
    thread: threading.Thread

    def key(self, tenant: str, scopes: str = ALL_SCOPES, rate_limit: int | None = None) -> dict[str, str]:
        _, token = ApiKeyRepository(self.container.db).create(
            name=f"{tenant}-key",
            tenant=tenant,
            scopes=frozenset(scopes.split(",")),
            rate_limit_per_min=rate_limit,
        )
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture(params=["sqlite"])
def api(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Api]:
    """The API on the real stack; on SQLite, or (parametrized indirectly) on PostgreSQL."""
    with ExitStack() as stack:
        database_url = ""
        if request.param == "postgresql":
            engine = stack.enter_context(scratch_postgres_database())
            database_url = engine.url.render_as_string(hide_password=False)
        yield stack.enter_context(_serve(tmp_path, database_url))


@contextmanager
def _serve(tmp_path: Any, database_url: str) -> Iterator[Api]:
    settings: Settings = stack_settings(tmp_path / "data", database_url).model_copy(
        update={"api_upload_max_bytes": 2 * 2**20, "api_upload_max_pixels": 4_000_000}
    )
    with DevStack(settings, log=lambda _m: None):
        container = Container(settings)
        port = _free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_app(container), host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive(), "the API server died on start"
            assert time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            yield Api(container, base, http, thread)
        server.should_exit = True
        thread.join(timeout=10)
        container.close()


def _render_body(recipient: str = "r-alice", name: str = "Alice Wong") -> dict[str, Any]:
    return {
        "recipient": {"id": recipient, "name": name},
        "template": {"name": "lunar-new-year", "version": "1"},
        "locale": "en",
    }


def _is_problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers
    doc: dict[str, Any] = resp.json()
    assert doc["status"] == status and doc["title"] and doc["detail"] and doc["type"]
    assert "Traceback" not in resp.text
    return doc


def _jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_render_over_http_is_published_once_per_idempotency_key(api: Api) -> None:
    key = api.key("acme")
    headers = {**key, "Idempotency-Key": "order-42"}
    first = api.http.post("/v1/renders", json=_render_body(), headers=headers)
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    assert first.json()["status_url"] == f"{api.base}/v1/jobs/{job_id}"

    again = api.http.post("/v1/renders", json=_render_body(), headers=headers)
    assert again.status_code == 202 and again.json() == first.json()
    other = api.http.post("/v1/renders", json=_render_body(name="Alice W."), headers=headers)
    assert "different request body" in _is_problem(other, 409)["detail"]
    assert [str(j.job_id) for j in api.container.jobs.list_jobs(campaign_id="api-acme")] == [job_id]
    # A request refused after its key was reserved does not bind the key: the same recipient
    # with other content is 409, and the key is then free for another body.
    clash = api.http.post(
        "/v1/renders", json=_render_body(name="Alice W."), headers={**key, "Idempotency-Key": "k2"}
    )
    assert "already exists" in _is_problem(clash, 409)["detail"]
    freed = api.http.post(
        "/v1/renders", json=_render_body("r-bob", "Bob"), headers={**key, "Idempotency-Key": "k2"}
    )
    assert freed.status_code == 202 and freed.json()["job_id"] != job_id

    def published() -> bool:
        job = api.container.jobs.get(job_id)
        return job is not None and job.state == JobState.PUBLISHED

    run_workers(
        api.container, [consumers.render.build, consumers.moderate.build, consumers.publish.build], published
    )
    status = api.http.get(f"/v1/jobs/{job_id}", headers=key)
    assert status.status_code == 200, status.text
    doc = status.json()
    assert doc["state"] == "published" and doc["final"] is True and doc["failure_reason"] is None
    assert doc["url"].endswith(f"{job_id}.mp4") and doc["captions_url"].endswith(f"{job_id}.vtt")
    states = [e["to_state"] for e in doc["history"]]
    assert states[0] == "requested" and states[-1] == "published"
    assert httpx.get(doc["url"], timeout=10).content[4:8] == b"ftyp"  # the clip itself


@pytest.mark.parametrize("api", ["sqlite", "postgresql"], indirect=True)
def test_keys_scopes_tenants_rate_limit_and_problems(api: Api) -> None:
    a, b = api.key("tenant-a"), api.key("tenant-b")
    resp = api.http.post("/v1/renders", json=_render_body(), headers=a)
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]

    # No key, an unknown key: 401; a key of another tenant: 404 (not 403); wrong scope: 403.
    assert "Bearer" in _is_problem(api.http.get(f"/v1/jobs/{job_id}"), 401)["detail"]
    _is_problem(api.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer gf_forged"}), 401)
    _is_problem(api.http.get(f"/v1/jobs/{job_id}", headers=b), 404)
    _is_problem(api.http.get(f"/v1/jobs/{uuid.uuid4()}", headers=a), 404)
    _is_problem(api.http.get("/v1/campaigns/api-tenant-a", headers=b), 404)
    assert api.http.get("/v1/campaigns/api-tenant-a", headers=a).json()["counts"] == {"requested": 1}
    reader = api.key("tenant-a", "jobs:read")
    assert api.http.get(f"/v1/jobs/{job_id}", headers=reader).status_code == 200
    assert (
        "renders:write"
        in _is_problem(api.http.post("/v1/renders", json=_render_body(), headers=reader), 403)["detail"]
    )
    # Tenant B cannot take tenant A's campaign id.
    taken = api.http.post("/v1/renders", json={**_render_body(), "campaign_id": "api-tenant-a"}, headers=b)
    _is_problem(taken, 409)

    # Problems for routing, validation and intake errors too.
    _is_problem(api.http.get("/v1/nowhere", headers=a), 404)
    _is_problem(api.http.delete("/v1/renders", headers=a), 405)
    bad_json = api.http.post(
        "/v1/renders", content=b"{nope", headers={**a, "content-type": "application/json"}
    )
    _is_problem(bad_json, 422)
    assert (
        "recipient.name"
        in _is_problem(
            api.http.post(
                "/v1/renders", json={"recipient": {"id": "r-1"}, "template": {"name": "x"}}, headers=a
            ),
            422,
        )["detail"]
    )
    too_long = _is_problem(api.http.post("/v1/renders", json=_render_body(name="N" * 300), headers=a), 422)
    assert "not a valid campaign brief" in too_long["detail"]
    unknown = _is_problem(
        api.http.post(
            "/v1/renders", json={**_render_body(), "template": {"name": "no-such-template"}}, headers=a
        ),
        422,
    )
    assert "no-such-template" in unknown["detail"]
    photo_of_b = {
        **_render_body(),
        "recipient": {"id": "r-p", "name": "P", "photo_key": "tenants/tenant-b/x.jpg"},
    }
    _is_problem(api.http.post("/v1/renders", json=photo_of_b, headers=a), 422)

    # Rate limit: 2 a minute (burst 2), then 429 with Retry-After.
    slow = api.key("tenant-c", "jobs:read", rate_limit=2)
    codes = [api.http.get(f"/v1/jobs/{job_id}", headers=slow).status_code for _ in range(2)]
    assert codes == [404, 404]
    limited = api.http.get(f"/v1/jobs/{job_id}", headers=slow)
    _is_problem(limited, 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert api.http.get(f"/v1/jobs/{job_id}", headers=a).status_code == 200  # other keys are unaffected

    spec = api.http.get("/v1/openapi.json").json()
    assert {"/v1/renders", "/v1/jobs/{job_id}", "/v1/assets", "/v1/campaigns"} <= set(spec["paths"])


def test_uploads_refuse_bombs_truncated_and_foreign_files_and_the_server_stays_up(api: Api) -> None:
    key = api.key("uploader")
    ok = api.http.post("/v1/assets", content=_jpeg(), headers={**key, "content-type": "image/jpeg"})
    assert ok.status_code == 201, ok.text
    asset = ok.json()
    assert asset["key"].startswith("tenants/uploader/photos/") and asset["width"] == 320
    assert api.container.store.exists(api.container.settings.bucket_assets, asset["key"])

    # A 50 megapixel PNG of a few kilobytes: refused from its header, never decoded.
    buf = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 100_000
    t0 = time.monotonic()
    bomb = api.http.post("/v1/assets", content=buf.getvalue(), headers=key)
    assert "50.0 MP" in _is_problem(bomb, 413)["detail"]
    assert time.monotonic() - t0 < 2.0

    jpeg = _jpeg((800, 600))
    truncated = api.http.post("/v1/assets", content=jpeg[: len(jpeg) // 2], headers=key)
    assert "truncated" in _is_problem(truncated, 422)["detail"].lower()
    _is_problem(api.http.post("/v1/assets", content=b"GIF89a" + bytes(200), headers=key), 415)
    _is_problem(api.http.post("/v1/assets", content=b"%PDF-1.7\n" + bytes(200), headers=key), 415)
    huge = api.http.post("/v1/assets", content=bytes(3 * 2**20), headers=key)
    _is_problem(huge, 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap holds while streaming
        for _ in range(40):
            yield bytes(100_000)

    _is_problem(api.http.post("/v1/assets", content=chunks(), headers=key), 413)

    assert api.thread.is_alive()
    assert api.http.get("/healthz").status_code == 200
    again = api.http.post("/v1/assets", content=_jpeg((64, 64)), headers=key)
    assert again.status_code == 201, again.text


def test_campaigns_and_consent_over_http(api: Api) -> None:
    key = api.key("brand")
    brief = {
        "campaign_id": "brand-lny",
        "title": "Lunar New Year",
        "template": {"name": "lunar-new-year", "version": "1"},
        "recipients": [
            {"id": "r-1", "name": "Alice Wong", "locale": "en"},
            {"id": "r-2", "name": "陳大文", "locale": "zh-Hant-HK"},
        ],
    }
    resp = api.http.post("/v1/campaigns", json=brief, headers=key)
    assert resp.status_code == 202, resp.text
    assert resp.json()["jobs"] == 2 and resp.json()["requested"] == 2
    status = api.http.get("/v1/campaigns/brand-lny", headers=key).json()
    assert status["total"] == 2 and status["counts"] == {"requested": 2} and status["report_key"] is None
    jobs = api.container.jobs.list_jobs(campaign_id="brand-lny")
    assert {j.owner for j in jobs} == {"brand"}
    _is_problem(api.http.post("/v1/campaigns", json={**brief, "recipients": []}, headers=key), 422)
    _is_problem(api.http.post("/v1/campaigns", json=brief, headers=api.key("other")), 409)

    challenge = api.http.post("/v1/consent/s-alice/challenge", json={}, headers=key)
    assert challenge.status_code == 200, challenge.text
    code = challenge.json()["code"]
    png = io.BytesIO()
    Image.effect_noise((200, 200), 50).convert("RGB").save(png, "PNG")
    form = {"scopes": "name", "purpose": "greetings", "code": code}
    files = {"evidence": ("form.png", png.getvalue(), "image/png")}
    granted = api.http.post("/v1/consent/s-alice/grant", data=form, files=files, headers=key)
    assert granted.status_code == 200, granted.text
    assert [g["scopes"] for g in granted.json()["effective"]] == [["name"]]
    wrong = api.http.post(
        "/v1/consent/s-alice/grant", data={**form, "code": "WRONG1"}, files=files, headers=key
    )
    _is_problem(wrong, 422)
    revoked = api.http.post("/v1/consent/s-alice/revoke", json={}, headers=key)
    assert revoked.status_code == 200 and revoked.json()["effective"] == []
    assert api.http.get("/v1/consent/s-alice", headers=key).json()["records"][-1]["action"] == "revoke"


def test_key_and_idempotency_repositories_on_postgres(postgres_db: Any) -> None:
    keys = ApiKeyRepository(postgres_db)
    key, token = keys.create(name="n", tenant="t", scopes=frozenset({"jobs:read"}))
    with postgres_db.engine.connect() as conn:  # closed: an open one would block the schema's drop
        row_hashes = [r[0] for r in conn.exec_driver_sql("SELECT key_hash FROM api_keys").fetchall()]
    assert row_hashes == [hash_token(token)] and token not in str(row_hashes)
    found = keys.by_token(token)
    assert found is not None and found.key_id == key.key_id and found.scopes == frozenset({"jobs:read"})
    assert keys.revoke(key.key_id) and keys.by_token(token) is None

    idem = IdempotencyRepository(postgres_db, ttl_s=86_400)
    job = uuid.uuid4()
    assert idem.remember("t", "k", "h1", job).job_id == job
    assert idem.remember("t", "k", "h2", uuid.uuid4()).request_hash == "h1"  # the first one stays
    assert idem.get("u", "k") is None  # per tenant
