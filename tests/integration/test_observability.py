"""Metrics, readiness and JSON logs of REAL worker processes (`greetflow worker
render|moderate|publish`, each on its own metrics port) on the real stack: a private Tansu
broker and moto S3 server, SQLite.

One campaign of 3 recipients plus one malformed render request runs once for the module;
the tests then read what the workers expose: their counters and lag, their JSON log
lines, and their /readyz while the broker and the S3 server are stopped (SIGSTOP) and
resumed (SIGCONT). The readiness test runs last: it is the only one that disturbs the stack.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.bench_faults import (
    WorkerProcs,
    fault_settings,
    free_port,
    lean_brief,
    read_topic,
    stack_running,
    wait_final,
)
from pipeline.bootstrap import Container
from pipeline.dev.stack import DevStack
from pipeline.settings import Settings
from pipeline.topics import CLIPS_PUBLISHED, MODERATION_DECISIONS, RENDER_REQUESTS, RENDER_RESULTS
from pipeline.tracing import parse_traceparent
from pipeline.workers import SPECS

pytestmark = pytest.mark.integration

ROLES = ("render", "moderate", "publish")
N = 3


@dataclass
class Observed:
    settings: Settings
    stack: DevStack
    container: Container
    procs: WorkerProcs
    ports: dict[str, int]
    campaign_id: str
    job_ids: list[uuid.UUID]

    def url(self, role: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}{path}"


def get(url: str, timeout_s: float = 3.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def scrape(obs: Observed, role: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(obs.url(role, "/metrics"))
    assert status == 200, f"{role} /metrics answered {status}"
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(what: str, cond: Any, *, timeout_s: float, every_s: float = 0.25) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        time.sleep(every_s)
    return time.monotonic() - started


def ready(obs: Observed, role: str) -> bool:
    try:
        return get(obs.url(role, "/readyz"), timeout_s=2.0)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observability")
    ports = {role: free_port() for role in ROLES}
    settings = fault_settings(
        tmp / "data",
        metrics_role_ports=ports,
        metrics_lag_interval_s=1.0,
        metrics_jobs_interval_s=1.0,
        readiness_interval_s=0.5,
        readiness_timeout_s=1.0,
    )
    with stack_running(settings) as stack:
        container = Container(settings)
        try:
            _ = container.db  # migrated before the workers start
            with WorkerProcs(settings, tmp / "logs", extra_env={"GREETFLOW_LOG_FORMAT": "json"}) as procs:
                for role in ROLES:
                    procs.start(role)
                brief = lean_brief(N)
                result = container.campaigns().submit(brief)
                from kafka import KafkaProducer

                producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
                try:
                    producer.send(RENDER_REQUESTS, value=b'{"not": "an envelope"', key=b"bad").get(timeout=30)
                finally:
                    producer.close(timeout=5)
                job_ids = list(result.job_ids)
                wait_final(container, job_ids, timeout_s=150, procs=procs, stall_s=90)
                yield Observed(settings, stack, container, procs, ports, brief.campaign_id, job_ids)
                procs.check_alive()
        finally:
            container.close()


def test_counters_match_the_campaign_and_lag_drains(observed: Observed) -> None:
    obs = observed
    states = obs.container.jobs.states_of(obs.job_ids)
    assert {s.value for s in states.values()} == {"published"}, states
    render_topic, moderate_topic, publish_topic = RENDER_REQUESTS, RENDER_RESULTS, MODERATION_DECISIONS
    expect = {
        "render": (render_topic, N + 1, N, 1),
        "moderate": (moderate_topic, N, N, 0),
        "publish": (publish_topic, N, N, 0),
    }

    def lag_of(role: str) -> dict[str, float]:
        spec = SPECS[role]
        m = scrape(obs, role)
        return {
            dict(labels)["partition"]: v
            for (name, labels), v in m.items()
            if name == "greetflow_consumer_lag"
            and dict(labels).get("group") == spec.group_id
            and dict(labels).get("topic") == spec.topic
        }

    # the lag gauge is refreshed every second in the background: wait for a sample at the end
    for role in ROLES:
        wait_until(
            f"{role} lag 0 on every partition",
            lambda role=role: (lag := lag_of(role)) and len(lag) == obs.settings.topic_partitions
            and not any(lag.values()),
            timeout_s=20,
        )  # fmt: skip
    for role, (topic, consumed, succeeded, dead) in expect.items():
        m = scrape(obs, role)
        got = (
            value(m, "greetflow_messages_consumed_total", topic=topic),
            value(m, "greetflow_messages_succeeded_total", topic=topic),
            value(m, "greetflow_messages_dead_lettered_total", topic=topic),
        )
        assert got == (consumed, succeeded, dead), f"{role}: consumed/succeeded/dead-lettered {got}"
        assert value(m, "greetflow_handler_seconds_count", step=role) >= succeeded
        assert value(m, "greetflow_worker_ready") == 1.0
    render = scrape(obs, "render")
    assert value(render, "greetflow_segment_cache_total", result="miss") >= 1
    assert value(render, "greetflow_segment_cache_total", result="miss") + value(
        render, "greetflow_segment_cache_total", result="hit"
    ) == N  # fmt: skip
    for phase in ("generate", "draw", "encode", "mix", "upload"):
        assert value(render, "greetflow_render_phase_seconds_count", phase=phase) >= 1, phase
    moderate = scrape(obs, "moderate")
    assert value(moderate, "greetflow_moderation_decisions_total", outcome="approved") == N
    publish = scrape(obs, "publish")
    assert value(publish, "greetflow_published_total") == N
    assert value(publish, "greetflow_taken_down_total") == 0
    # jobs by state: a cached GROUP BY, the same from every worker
    wait_until(
        "greetflow_jobs shows the campaign published",
        lambda: (
            value(scrape(obs, "publish"), "greetflow_jobs", campaign_id=obs.campaign_id, state="published")
            == N
        ),
        timeout_s=10,
    )


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def test_log_lines_are_json_with_job_and_trace_ids(observed: Observed) -> None:
    obs = observed
    logs = {p.role: _json_lines(p.log_path) for p in obs.procs.procs}
    for role in ROLES:
        assert len(logs[role]) >= 3, f"{role}: too few JSON log lines"
        assert all({"timestamp", "level", "logger", "message"} <= d.keys() for d in logs[role]), role
    job = str(obs.job_ids[0])
    rendered = [d for d in logs["render"] if d.get("job_id") == job]
    assert rendered, "no render log line carries the job id"
    trace_ids = {d.get("trace_id") for d in rendered}
    assert len(trace_ids) == 1 and None not in trace_ids, trace_ids
    (trace_id,) = trace_ids
    assert all(d["worker"].startswith("render@") and d["step"] == "render" for d in rendered)
    assert all(d.get("campaign_id") == obs.campaign_id for d in rendered)
    for role in ("moderate", "publish"):
        lines = [d for d in logs[role] if d.get("job_id") == job]
        assert lines, f"no {role} log line for job {job}"
        assert {d.get("trace_id") for d in lines} == {trace_id}, role
        assert {d.get("step") for d in lines} == {role}
    # the malformed request: dead-lettered with the worker's context, no job id
    dead = [d for d in logs["render"] if "dead-lettering" in d["message"]]
    assert len(dead) == 1 and dead[0]["level"] == "error" and "job_id" not in dead[0]


def test_trace_id_travels_as_traceparent(observed: Observed) -> None:
    obs = observed
    for topic in (RENDER_REQUESTS, RENDER_RESULTS, MODERATION_DECISIONS, CLIPS_PUBLISHED):
        records = [r for r in read_topic(obs.settings, topic) if r.key != b"bad"]
        assert len(records) >= N, topic
        for r in records:
            env = json.loads(r.value)
            parsed = parse_traceparent(dict(r.headers).get("traceparent"))
            assert parsed is not None, f"{topic}: no traceparent header"
            assert parsed[0] == env["trace_id"], topic


def test_review_app_has_the_same_routes(observed: Observed) -> None:
    from fastapi.testclient import TestClient

    from pipeline.review.app import create_app

    obs = observed
    readiness = obs.container.review_readiness()
    app = create_app(obs.container.review_service(), readiness=readiness)
    try:
        with TestClient(app, base_url="https://testserver") as client:
            assert client.get("/healthz").status_code == 200
            body = client.get("/metrics").text
            assert "# TYPE greetflow_messages_consumed_total counter" in body
            wait_until("review app ready", lambda: client.get("/readyz").status_code == 200, timeout_s=10)
            assert set(client.get("/readyz").json()["checks"]) == {"database", "s3", "broker"}
            pid = obs.stack.pids["s3"]
            stopped_at = time.monotonic()
            _signal(pid, signal.SIGSTOP)
            try:
                wait_until(
                    "review app non-ready", lambda: client.get("/readyz").status_code == 503, timeout_s=5
                )
                print(f"s3 stopped: review app non-ready after {time.monotonic() - stopped_at:.2f} s")
            finally:
                _signal(pid, signal.SIGCONT)
            wait_until(
                "review app ready again", lambda: client.get("/readyz").status_code == 200, timeout_s=30
            )
    finally:
        readiness.stop()


def test_readyz_follows_the_broker_and_s3(observed: Observed) -> None:
    obs = observed
    for role in ROLES:
        assert ready(obs, role), f"{role} not ready before the faults"
        assert get(obs.url(role, "/healthz"))[0] == 200
    for component in ("broker", "s3"):
        pid = obs.stack.pids[component]
        stopped_at = time.monotonic()
        _signal(pid, signal.SIGSTOP)
        try:
            for role in ROLES:
                wait_until(
                    f"{role} /readyz non-ready after {component} stopped",
                    lambda role=role: not ready(obs, role),
                    timeout_s=max(0.5, 5.0 - (time.monotonic() - stopped_at)),
                    every_s=0.1,
                )
            took = time.monotonic() - stopped_at
            print(f"{component} stopped: every worker non-ready after {took:.2f} s")
            status, body = get(obs.url("render", "/readyz"))
            checks = json.loads(body)["checks"]
            assert status == 503 and not checks[component]["ok"], checks
            # liveness and scrapes do not hang on the stopped dependency
            t0 = time.monotonic()
            assert get(obs.url("render", "/healthz"))[0] == 200
            scrape(obs, "render")
            assert time.monotonic() - t0 < 1.5
        finally:
            _signal(pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        for role in ROLES:
            wait_until(
                f"{role} ready after {component} resumed", lambda role=role: ready(obs, role), timeout_s=30
            )
        print(f"{component} resumed: every worker ready after {time.monotonic() - resumed_at:.2f} s")


def _signal(pid: int, sig: signal.Signals) -> None:
    import os

    try:
        os.killpg(pid, sig)
    except OSError:
        os.kill(pid, sig)


def test_takeovers_and_sweeps_are_counted(observed: Observed) -> None:
    """In this process: a step taking over an expired lease, then the sweeper re-driving the
    job it released (failed right after, so the render worker skips the re-driven request)."""
    from pipeline.metrics import REGISTRY
    from pipeline.steps import claim_step
    from pipeline.sweeper import JobSweeper
    from schemas.jobs import JobState
    from tests.integration.db_fixtures import render_request

    c = observed.container
    req = render_request(observed.campaign_id, "r-takeover")
    c.jobs.create_if_absent(req)
    assert c.jobs.claim(req.job_id, to_state=JobState.RENDERING, from_states=[JobState.REQUESTED],
                        owner="dead", lease_s=0.3) is not None  # fmt: skip

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    takeovers = sample("greetflow_step_takeovers_total", step="render")
    step = claim_step(c.jobs, req.job_id, from_states=[JobState.REQUESTED], to_state=JobState.RENDERING,
                      owner="test", lease_s=5, wait_s=5, heartbeat=False)  # fmt: skip
    assert step is not None
    assert sample("greetflow_step_takeovers_total", step="render") == takeovers + 1
    step.release()
    redriven = sample("greetflow_sweeps_total", action="redriven")
    sweeper = JobSweeper(
        c.settings.model_copy(update={"sweep_stale_after_s": 0.1}),
        c.jobs, c.locks, c.moderation_results, c.store, c.events, owner="test-sweeper",
    )  # fmt: skip
    time.sleep(0.3)
    try:
        report = sweeper.sweep()
    finally:
        sweeper.release()
        c.jobs.fail(req.job_id, "test over", actor="test")  # the render worker skips it then
    assert [r.job_id for r in report.redriven] == [req.job_id]
    assert sample("greetflow_sweeps_total", action="redriven") == redriven + 1
