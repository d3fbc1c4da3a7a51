"""Helpers shared by the campaign DAG integration tests (no Airflow import here)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

import consumers.moderate
import consumers.publish
import consumers.render
from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import sample_brief
from pipeline.settings import Settings


def greetflow_env(settings: Settings, campaigns: Path, *, poll_s: float = 1.0) -> dict[str, str]:
    """The GREETFLOW_ variables that make the DAG's tasks use this test's private stack."""
    return {
        "GREETFLOW_CAMPAIGNS_DIR": str(campaigns),
        "GREETFLOW_DATA_DIR": str(settings.data_dir),
        "GREETFLOW_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "GREETFLOW_S3_ENDPOINT": settings.s3_endpoint,
        "GREETFLOW_DATABASE_URL": settings.resolved_database_url,
        "GREETFLOW_RENDER_WIDTH": str(settings.render_width),
        "GREETFLOW_RENDER_HEIGHT": str(settings.render_height),
        "GREETFLOW_HANDLER_RETRY_BACKOFF_S": str(settings.handler_retry_backoff_s),
        "GREETFLOW_CAMPAIGN_POLL_INTERVAL_S": str(poll_s),
        "GREETFLOW_CAMPAIGN_DEADLINE_S": "600",
    }


def write_campaign(folder: Path, recipients: int, campaign_id: str) -> Path:
    """The bundled Lunar New Year brief, cut or extended to N recipients, as a brief file."""
    brief = sample_brief(recipients).model_copy(update={"campaign_id": campaign_id})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{campaign_id}.yaml"
    path.write_text(
        yaml.safe_dump(brief.model_dump(mode="json", exclude_none=True), allow_unicode=True),
        encoding="utf-8",
    )
    return path


@contextmanager
def workers_running(container: Container) -> Iterator[list[ConsumerWorker[Any]]]:
    """The real render, moderate and publish consumer-group members, in threads."""
    builds = [consumers.render.build, consumers.moderate.build, consumers.publish.build]
    workers: list[ConsumerWorker[Any]] = [b(container) for b in builds]  # type: ignore[misc]
    threads = [threading.Thread(target=w.run, daemon=True, name=w.name) for w in workers]
    for t in threads:
        t.start()
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()
        for t in threads:
            t.join(timeout=60)
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"worker threads did not stop: {alive}"


def end_offsets(settings: Settings, topic: str) -> int:
    """How many messages the topic has ever received (sum of the partitions' end offsets)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        return sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()
