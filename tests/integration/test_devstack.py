"""The embedded local stack (Tansu broker + moto S3 server), started for real.

These tests fail, never skip, when the broker or the S3 server cannot start.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.adapters.kafka import ensure_topics
from pipeline.adapters.storage import ensure_buckets
from pipeline.dev import stack as devstack
from pipeline.dev.stack import DevStack, DevStackError
from pipeline.settings import Settings
from pipeline.topics import ALL_TOPICS, RENDER_REQUESTS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    broker, s3 = free_port(), free_port()
    while s3 == broker:
        s3 = free_port()
    values: dict[str, object] = {
        "dev_broker_port": broker,
        "dev_s3_port": s3,
        "kafka_bootstrap": f"127.0.0.1:{broker}",
        "s3_endpoint": f"http://127.0.0.1:{s3}",
        "data_dir": data_dir,
        "dev_start_timeout_s": 30.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def pid_gone(pid: int) -> bool:
    """True when pid no longer exists (or is a zombie no one can reap for us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(pid_gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return all(pid_gone(p) for p in pids)


def live_children() -> set[int]:
    """Direct children of this test process that are still running."""
    pids: set[int] = set()
    task_dir = Path(f"/proc/{os.getpid()}/task")
    if not task_dir.exists():
        return pids
    for task in task_dir.iterdir():
        try:
            text = (task / "children").read_text()
        except OSError:
            continue
        pids.update(int(p) for p in text.split())
    return {p for p in pids if not pid_gone(p)}


def port_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- one shared stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevStack, Settings]]:
    settings = make_settings(tmp_path_factory.mktemp("devstack"))
    with DevStack(settings, log=lambda m: print(m)) as running:
        yield running, settings


def test_topics_exist(stack: tuple[DevStack, Settings]) -> None:
    from kafka import KafkaAdminClient

    running, settings = stack
    admin = KafkaAdminClient(bootstrap_servers=running.bootstrap, request_timeout_ms=10_000)
    try:
        assert set(ALL_TOPICS) <= set(admin.list_topics())
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(ALL_TOPICS))}
    finally:
        admin.close()
    assert described[RENDER_REQUESTS] == settings.topic_partitions
    assert described[f"{RENDER_REQUESTS}.dlq"] == 1
    # Idempotent: a second call creates nothing and does not fail.
    assert ensure_topics(settings) == []


def test_buckets_exist(stack: tuple[DevStack, Settings]) -> None:
    from minio import Minio

    _, settings = stack
    client = Minio(
        settings.s3_endpoint.removeprefix("http://"),
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=False,
        region=settings.s3_region,
    )
    names = {b.name for b in client.list_buckets()}
    assert set(settings.buckets) <= names
    assert ensure_buckets(settings) == []


def test_produce_then_consume(stack: tuple[DevStack, Settings]) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    running, _ = stack
    payload = f"hello-{uuid.uuid4()}".encode()
    producer = KafkaProducer(bootstrap_servers=running.bootstrap)
    try:
        producer.send(RENDER_REQUESTS, key=b"job-1", value=payload).get(timeout=10)
        producer.flush(timeout=10)
    finally:
        producer.close()

    consumer = KafkaConsumer(
        RENDER_REQUESTS,
        bootstrap_servers=running.bootstrap,
        group_id=f"test-{uuid.uuid4()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_poll_interval_ms=10_000,
        session_timeout_ms=10_000,
    )
    try:
        seen: list[bytes] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and payload not in seen:
            for records in consumer.poll(timeout_ms=500).values():
                seen.extend(r.value for r in records)
    finally:
        consumer.close()
    assert payload in seen


def test_put_then_get_object(stack: tuple[DevStack, Settings]) -> None:
    from minio import Minio

    running, settings = stack
    client = Minio(
        running.s3_endpoint.removeprefix("http://"),
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=False,
        region=settings.s3_region,
    )
    data = b"\x00greeting\xff" * 1000
    client.put_object(settings.bucket_staging, "a/b/clip.bin", io.BytesIO(data), len(data))
    response = client.get_object(settings.bucket_staging, "a/b/clip.bin")
    try:
        assert response.read() == data
    finally:
        response.close()
        response.release_conn()


def test_status_of_in_process_stack(stack: tuple[DevStack, Settings]) -> None:
    running, _ = stack
    st = running.status()
    assert st.running and st.healthy
    assert {c.name for c in st.components} == {devstack.BROKER, devstack.S3}
    assert all(c.pid for c in st.components)
    assert len(st.render_lines()) == 3


# --------------------------------------------------------------------------- lifecycle


def test_children_gone_after_exit_even_on_keyboard_interrupt(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    before = live_children()
    pids: list[int] = []
    with pytest.raises(KeyboardInterrupt), DevStack(settings, log=lambda m: None) as running:
        pids = list(running.pids.values())
        assert len(pids) == 2
        assert all(not pid_gone(p) for p in pids)
        raise KeyboardInterrupt
    assert all(pid_gone(p) for p in pids), "children still alive after the with-block"
    assert live_children() <= before
    assert not port_listening(settings.dev_broker_port)
    assert not port_listening(settings.dev_s3_port)


@pytest.mark.parametrize("component", ["broker", "s3"])
def test_port_in_use_fails_fast(tmp_path: Path, component: str) -> None:
    settings = make_settings(tmp_path)
    port = settings.dev_broker_port if component == "broker" else settings.dev_s3_port
    before = live_children()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        started = time.monotonic()
        with pytest.raises(DevStackError) as info:
            DevStack(settings, log=lambda m: None).start()
        elapsed = time.monotonic() - started
    assert elapsed < 3.0
    message = str(info.value)
    assert str(port) in message
    assert ("broker" if component == "broker" else "S3") in message
    assert live_children() <= before


def test_child_that_exits_early_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fake-tansu"
    fake.write_text("#!/bin/sh\necho 'fake broker: something is badly wrong' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    settings = make_settings(tmp_path)
    before = live_children()
    started = time.monotonic()
    with pytest.raises(DevStackError) as info:
        DevStack(settings, log=lambda m: None).start()
    assert time.monotonic() - started < 10.0
    message = str(info.value)
    assert "exited early" in message
    assert "something is badly wrong" in message
    assert live_children() <= before
    assert not port_listening(settings.dev_s3_port)


def test_children_die_with_parent(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from pipeline.dev.stack import DevStack
        from pipeline.settings import Settings
        s = Settings(dev_broker_port=int(sys.argv[1]), dev_s3_port=int(sys.argv[2]),
                     kafka_bootstrap=f"127.0.0.1:{sys.argv[1]}",
                     s3_endpoint=f"http://127.0.0.1:{sys.argv[2]}", data_dir=Path(sys.argv[3]))
        stack = DevStack(s, log=lambda m: None).start()
        print(" ".join(str(p) for p in stack.pids.values()), flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            str(settings.dev_broker_port),
            str(settings.dev_s3_port),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, f"parent printed {line!r}"
        assert all(not pid_gone(p) for p in pids)
        parent.kill()  # SIGKILL: no cleanup code runs in the parent
        parent.wait(timeout=10)
        assert wait_gone(pids, timeout=10), "children outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_run_foreground_stops_on_sigint(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    env = dict(os.environ)
    env.update(
        GREETFLOW_DEV_BROKER_PORT=str(settings.dev_broker_port),
        GREETFLOW_DEV_S3_PORT=str(settings.dev_s3_port),
        GREETFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        GREETFLOW_S3_ENDPOINT=settings.s3_endpoint,
        GREETFLOW_DATA_DIR=str(tmp_path),
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pipeline.dev.stack import run_foreground; from pipeline.settings import Settings;"
            " run_foreground(Settings())",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C" in line:
                break
        out = "".join(lines)
        assert f"127.0.0.1:{settings.dev_broker_port}" in out
        assert f"http://127.0.0.1:{settings.dev_s3_port}" in out
        assert port_listening(settings.dev_broker_port)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "dev stack stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not port_listening(settings.dev_broker_port)
    assert not port_listening(settings.dev_s3_port)


# --------------------------------------------------------------------------- detached


def test_detached_up_status_down(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    messages: list[str] = []
    dev_dir = tmp_path / "dev"

    first = devstack.up(settings, log=messages.append)
    try:
        assert first.running and first.healthy, first.render_lines()
        pids = {c.name: c.pid for c in first.components}
        assert all(pids.values())
        for name in (devstack.BROKER, devstack.S3):
            assert (dev_dir / f"{name}.pid").read_text().strip() == str(pids[name])
            assert (dev_dir / f"{name}.log").exists()
        assert any("created 12 topics" in m for m in messages)

        st = devstack.status(settings)
        assert st.running and st.healthy
        assert {c.name: c.pid for c in st.components} == pids
        assert st.component(devstack.BROKER).address == settings.kafka_bootstrap
        assert st.component(devstack.S3).address == settings.s3_endpoint
        assert st.render_lines()[-1] == "dev stack: up"

        # up again: already running, same processes
        messages.clear()
        again = devstack.up(settings, log=messages.append)
        assert {c.name: c.pid for c in again.components} == pids
        assert any("already" in m for m in messages)
        assert ensure_topics(settings) == []
    finally:
        after = devstack.down(settings, log=messages.append)

    assert not after.running and not after.healthy
    assert wait_gone([p for p in pids.values() if p], timeout=5)
    assert not list(dev_dir.glob("*.pid"))
    assert not port_listening(settings.dev_broker_port)
    assert not port_listening(settings.dev_s3_port)
    st = devstack.status(settings)
    assert not any(c.running or c.healthy for c in st.components)
    assert st.render_lines()[-1] == "dev stack: down"
    # down again is harmless
    devstack.down(settings, log=messages.append)


def test_down_leaves_foreign_pid_alone(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    dev_dir = tmp_path / "dev"
    dev_dir.mkdir(parents=True)
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        (dev_dir / "broker.pid").write_text(f"{stranger.pid}\n")
        (dev_dir / "s3.pid").write_text("999999999\n")  # stale
        st = devstack.status(settings)
        assert not st.component(devstack.BROKER).running
        devstack.down(settings, log=lambda m: None)
        assert stranger.poll() is None, "down killed a process that is not ours"
        assert not (dev_dir / "broker.pid").exists()
        assert not (dev_dir / "s3.pid").exists()
    finally:
        stranger.kill()
        stranger.wait()


def test_detached_stack_outlives_the_process_that_started_it(tmp_path: Path) -> None:
    """What `greetflow dev up` then `greetflow dev down` do: up in one process, down in
    another."""
    settings = make_settings(tmp_path)
    env = dict(os.environ)
    env.update(
        GREETFLOW_DEV_BROKER_PORT=str(settings.dev_broker_port),
        GREETFLOW_DEV_S3_PORT=str(settings.dev_s3_port),
        GREETFLOW_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        GREETFLOW_S3_ENDPOINT=settings.s3_endpoint,
        GREETFLOW_DATA_DIR=str(tmp_path),
    )
    code = (
        "from pipeline.dev import stack; from pipeline.settings import Settings;"
        " print('\\n'.join(stack.up(Settings()).render_lines()))"
    )
    pids: list[int] = []
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "dev stack: up" in done.stdout
        st = devstack.status(settings)
        pids = [c.pid for c in st.components if c.pid]
        assert st.running and st.healthy, st.render_lines()
        assert len(pids) == 2
    finally:
        after = devstack.down(settings, log=lambda m: None)
    assert not after.running
    assert wait_gone(pids, timeout=5)
    assert not port_listening(settings.dev_broker_port)
    assert not port_listening(settings.dev_s3_port)
