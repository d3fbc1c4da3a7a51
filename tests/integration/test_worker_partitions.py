"""No partition starves: two members of one group, a slow handler that holds one member
while the other joins and takes partitions over, then the other leaves again. At every
stage each message is handled and the group's committed offsets reach the log end on
every partition. Real broker."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container
from pipeline.campaigns import render_request_for, sample_brief
from schemas.events import Envelope, RenderRequested

pytestmark = pytest.mark.integration

PARTITIONS = 4
PER_PARTITION = 6
GROUP = "partition-group"


class _Topic:
    """A private topic, its produced messages (envelope id -> partition, offset) and handling."""

    def __init__(self, container: Container) -> None:
        from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
        from kafka.admin import NewTopic

        self.settings = container.settings
        self.name = f"partitions-{uuid.uuid4().hex[:8]}"
        admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        try:
            admin.create_topics([NewTopic(self.name, PARTITIONS, 1), NewTopic(f"{self.name}.dlq", 1, 1)])
        finally:
            admin.close()
        self.producer = KafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap)
        # Reads the group's committed offsets; never subscribes, so never joins the group.
        self.reader = KafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap, group_id=GROUP, enable_auto_commit=False
        )
        self.where: dict[str, tuple[int, int]] = {}
        self.handled: dict[str, int] = {}
        self.lock = threading.Lock()
        self.state = ""

    def produce(self, per_partition: int) -> None:
        brief = sample_brief(1)
        for partition in range(PARTITIONS):
            for _ in range(per_partition):
                env = Envelope.wrap(render_request_for(brief, brief.recipients[0]))
                meta = self.producer.send(
                    self.name, value=env.model_dump_json().encode(), partition=partition
                ).get(timeout=30)
                self.where[str(env.id)] = (meta.partition, meta.offset)

    def handle(self, env: Envelope[RenderRequested]) -> None:
        with self.lock:
            self.handled[str(env.id)] = self.handled.get(str(env.id), 0) + 1

    def lag(self) -> dict[int, int]:
        """Log end minus the group's committed offset, per partition."""
        from kafka.structs import TopicPartition

        tps = [TopicPartition(self.name, p) for p in range(PARTITIONS)]
        ends = self.reader.end_offsets(tps)
        return {tp.partition: ends[tp] - (self.reader.committed(tp) or 0) for tp in tps}

    def drained(self) -> bool:
        with self.lock:
            unhandled = [self.where[i] for i in self.where if i not in self.handled]
        lag = self.lag()
        self.state = f"unhandled (partition, offset): {sorted(unhandled)}; lag per partition: {lag}"
        return not unhandled and not any(lag.values())

    def close(self) -> None:
        self.producer.close(timeout=5)
        self.reader.close()


def _worker(container: Container, topic: _Topic, name: str, handler: Any) -> ConsumerWorker[RenderRequested]:
    return ConsumerWorker(
        container.settings,
        name=name,
        topic=topic.name,
        group_id=GROUP,
        payload_type=RenderRequested,
        handler=handler,
        bus=container.bus,
        max_poll_records=10,
    )


def _wait(
    until: Callable[[], bool],
    threads: list[threading.Thread],
    what: str,
    timeout_s: float = 60,
    state: Callable[[], str] = str,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not until():
        assert all(t.is_alive() for t in threads), "a worker thread died"
        assert time.monotonic() < deadline, f"{what}: not drained; {state()}"
        time.sleep(0.3)


def test_no_partition_starves_across_joins_and_leaves(container: Container) -> None:
    topic = _Topic(container)
    joined = threading.Event()
    holder: dict[str, ConsumerWorker[RenderRequested]] = {}

    def slow_until_b_joined(env: Envelope[RenderRequested]) -> None:
        # a holds its first messages until b owns partitions (a rebalance under a's batch)
        if not joined.is_set() and holder["b"].ready.wait(30):
            time.sleep(1.0)  # b handles and commits its share meanwhile
            joined.set()
        topic.handle(env)

    holder["a"] = _worker(container, topic, "member-a", slow_until_b_joined)
    holder["b"] = _worker(container, topic, "member-b", topic.handle)
    threads = {n: threading.Thread(target=w.run, daemon=True) for n, w in holder.items()}
    try:
        topic.produce(PER_PARTITION)
        threads["a"].start()
        _wait(lambda: holder["a"].ready.is_set(), [threads["a"]], "a joining", timeout_s=30)
        threads["b"].start()
        _wait(topic.drained, list(threads.values()), "two members", state=lambda: topic.state)
        assert joined.is_set()

        holder["b"].stop()
        threads["b"].join(timeout=30)
        topic.produce(PER_PARTITION)
        _wait(topic.drained, [threads["a"]], "after b left", state=lambda: topic.state)
        assert topic.lag() == dict.fromkeys(range(PARTITIONS), 0)
    finally:
        for w in holder.values():
            w.stop()
        for t in threads.values():
            if t.is_alive():
                t.join(timeout=30)
        topic.close()

    assert len(topic.handled) == PARTITIONS * PER_PARTITION * 2
