"""`greetflow stack init` / `stack check` on a real broker and S3 server emptied first,
with a fresh SQLite database. The first init runs as its own process; the other commands
run the same `main()` in this process (each process start costs seconds on CI)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.adapters.kafka import admin_client
from pipeline.adapters.storage import public_read_policy, s3_client
from pipeline.bench_faults import worker_env
from pipeline.cli import main
from pipeline.settings import Settings, get_settings
from pipeline.topics import ALL_TOPICS, RENDER_RESULTS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _empty(settings: Settings) -> None:
    """Remove what the dev stack provisioned: every topic and every (empty) bucket."""
    admin = admin_client(settings.kafka_bootstrap, settings.kafka_client_id, 15)
    try:
        admin.delete_topics(list(ALL_TOPICS))
        assert not set(admin.list_topics()) & set(ALL_TOPICS)
    finally:
        admin.close()
    client = s3_client(settings)
    for bucket in client.list_buckets():
        client.remove_bucket(bucket.name)


def _delete_topic(settings: Settings, topic: str) -> None:
    admin = admin_client(settings.kafka_bootstrap, settings.kafka_client_id, 15)
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()


@pytest.fixture
def greetflow(
    stack: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """Run `greetflow ARGS...` in this process with the stack's settings: (rc, stdout, stderr)."""
    for key, value in worker_env(stack).items():
        if key.startswith("GREETFLOW_"):
            monkeypatch.setenv(key, value)
    get_settings.cache_clear()

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(list(args))
        out, err = capsys.readouterr()
        return rc, out, err

    yield run
    get_settings.cache_clear()


def test_init_twice_then_check_reports_a_deleted_topic(
    stack: Settings, greetflow: Callable[..., tuple[int, str, str]]
) -> None:
    run = greetflow
    _empty(stack)
    rc, out, _ = run("stack", "check")
    assert rc == 1, out
    lines = out.splitlines()
    assert f"topic {RENDER_RESULTS}: missing" in lines
    assert f"bucket {stack.bucket_distribution}: missing" in lines
    assert any(line.startswith("schema database: not migrated") for line in lines), lines

    first = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "stack", "init"],
        env=worker_env(stack),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"created {len(ALL_TOPICS)} topics" in first.stdout
    assert f"created {len(stack.buckets)} buckets" in first.stdout
    assert "applied migrations none ->" in first.stdout
    assert "Traceback" not in first.stderr

    rc, out, err = run("stack", "init")
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "nothing created: every topic, bucket and migration was already there"
    assert "created " not in out.replace("nothing created", "")

    rc, out, err = run("stack", "check")
    assert rc == 0, out + err
    assert out.strip() == "stack ok: every topic, bucket policy and migration is in place"

    # The policies were read back: the distribution bucket is public-read, the rest private.
    client = s3_client(stack)
    policy = json.loads(client.get_bucket_policy(stack.bucket_distribution))
    assert policy["Statement"][0]["Action"] in (["s3:GetObject"], "s3:GetObject")

    # A deleted topic and a staging bucket made public are each reported on one line.
    _delete_topic(stack, RENDER_RESULTS)
    client.set_bucket_policy(stack.bucket_staging, json.dumps(public_read_policy(stack.bucket_staging)))
    rc, out, err = run("stack", "check")
    assert rc == 1, out + err
    assert out.splitlines() == [
        f"topic {RENDER_RESULTS}: missing",
        f"bucket {stack.bucket_staging}: should be private, but its policy allows anonymous s3:GetObject",
    ]
    assert err.strip().endswith("2 problem(s)"), err
