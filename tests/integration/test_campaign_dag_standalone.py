"""End to end through Airflow itself: the documented `infra/airflow/standalone.sh`
starts Airflow 3 (api-server, scheduler, dag-processor, triggerer) on free ports; the test
logs in through the REST API (JWT from /auth/token, as the simple auth manager needs),
unpauses and triggers a campaign DAG through /api/v2, and polls until the run succeeds,
while the real workers run in threads. Teardown leaves no process behind: every process
Airflow started carries a marker variable, and the test fails if one survives."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.bootstrap import Container
from schemas.jobs import JobState
from tests.dags.airflow_env import REPO
from tests.dags.campaign_helpers import greetflow_env, workers_running, write_campaign

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CAMPAIGN = "e2e-standalone"
DAG_ID = f"campaign_{CAMPAIGN}"
RECIPIENTS = 3
MARKER = "GREETFLOW_E2E_AIRFLOW_MARKER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.token: str | None = None

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process."""
    out: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # zombies are already gone, only not yet reaped
            out[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return out


def _ours(root: int, groups: set[int], marker: str) -> set[int]:
    """Descendants of `root`, members of `groups`, and processes carrying the marker
    (setproctitle overwrites the environment block of some, hence all three)."""
    procs = _procs()
    found: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, (ppid, _) in procs.items():
            if ppid == pid and child not in found:
                found.add(child)
                frontier.append(child)
    found |= {pid for pid, (_, pgid) in procs.items() if pgid in groups}
    needle = f"{MARKER}={marker}".encode()
    for pid in procs:
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    found.discard(os.getpid())
    return {p for p in found if p in procs}


def _stop(proc: subprocess.Popen[bytes], marker: str) -> list[int]:
    """Stop the documented way (SIGINT to the script, as Ctrl-C does) and return the
    processes that outlived the script; those are then killed by pid."""
    groups = {pgid for pid, (_, pgid) in _procs().items() if pid in _ours(proc.pid, set(), marker)}
    groups.discard(os.getpgrp())
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
    survivors = sorted(_ours(proc.pid, groups, marker))
    for pid in survivors:  # only processes this test started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.fixture
def airflow_standalone(container: Container, tmp_path: Path) -> Iterator[tuple[Api, Path]]:
    home = tmp_path / "airflow"
    home.mkdir()
    password = secrets.token_urlsafe(18)
    passwords = home / "passwords.json"
    passwords.write_text(json.dumps({"admin": password}), encoding="utf-8")
    port = _free_port()
    marker = uuid.uuid4().hex
    campaigns = tmp_path / "campaigns"
    write_campaign(campaigns, RECIPIENTS, CAMPAIGN)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "GREETFLOW_"))}
    env.update(greetflow_env(container.settings, campaigns, poll_s=2))
    env.update(
        {
            MARKER: marker,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW_PORT": str(port),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    log_path = tmp_path / "standalone.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", str(REPO / "infra" / "airflow" / "standalone.sh")],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = Api(f"http://127.0.0.1:{port}")
    failed = True
    try:
        _wait_healthy(api, proc, log_path)
        status, body = api.call("POST", "/auth/token", {"username": "admin", "password": password})
        assert status == 201, (status, body)
        api.token = body["access_token"]
        yield api, log_path
        failed = False
    finally:
        survivors = _stop(proc, marker)
        if failed:
            print(_tail(log_path))
    assert proc.returncode is not None
    assert not survivors, f"processes left behind after stopping standalone.sh: {survivors}"


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_healthy(api: Api, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"standalone exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            status, body = api.call("GET", "/api/v2/monitor/health", timeout=5)
        except OSError as exc:
            last = exc
        else:
            last = body
            if status == 200 and all(
                (body.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")
            ):
                return
        time.sleep(1)
    raise AssertionError(f"Airflow not healthy within {timeout_s} s (last: {last}):\n{_tail(log_path)}")


def _poll(what: str, fn, timeout_s: float, interval_s: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        done, last = fn()
        if done:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"{what} not reached within {timeout_s} s (last: {last})")


def test_campaign_dag_triggered_through_rest_api_runs_to_success(
    container: Container, airflow_standalone: tuple[Api, Path]
) -> None:
    api, log_path = airflow_standalone
    t0 = time.monotonic()

    def dag_listed() -> tuple[bool, Any]:
        status, body = api.call("GET", f"/api/v2/dags/{DAG_ID}")
        return status == 200, (status, body)

    _poll("the DAG parsed and listed", dag_listed, 120)
    status, body = api.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
    assert status == 200 and body["is_paused"] is False, (status, body)
    status, body = api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": {}})
    assert status == 200, (status, body)
    run_id = body["dag_run_id"]

    def finished() -> tuple[bool, Any]:
        status, body = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
        assert status == 200, (status, body)
        return body["state"] in ("success", "failed"), body["state"]

    with workers_running(container):
        state = _poll("the DAG run finished", finished, 360, interval_s=2)
    elapsed = time.monotonic() - t0
    if state != "success":
        _, tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        pytest.fail(f"run {run_id} ended {state}: {tis}\n{_tail(log_path)}")
    print(f"\nREST-triggered run of {DAG_ID} ({RECIPIENTS} recipients) succeeded after {elapsed:.1f} s")

    _, tis = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
    assert states["check_complete"] == "success" and states["write_report"] == "success", states
    jobs = container.jobs.list_jobs(campaign_id=CAMPAIGN)
    assert len(jobs) == RECIPIENTS and {j.state for j in jobs} == {JobState.PUBLISHED}
    reports = container.store.list_keys(container.settings.bucket_reports, f"campaigns/{CAMPAIGN}/")
    assert any(k.endswith("/report.json") for k in reports)
