"""The consumer-group probe behind `greetflow dev status`: a backlog nobody drains is
reported as stalled, a drained group as lag 0, on the real broker."""

from __future__ import annotations

import uuid

from pipeline.adapters.kafka import ensure_topics, group_lag
from pipeline.settings import Settings


def test_a_backlog_nobody_drains_is_stalled_and_a_drained_group_is_not(stack: Settings) -> None:
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.structs import OffsetAndMetadata, TopicPartition

    topic = f"lag-{uuid.uuid4().hex[:8]}"
    group = f"lag-group-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack, topics=[topic])
    producer = KafkaProducer(bootstrap_servers=stack.kafka_bootstrap)
    for i in range(3):
        producer.send(topic, f"m{i}".encode(), partition=0).get(timeout=30)
    producer.close()

    (before,) = group_lag(stack, [(group, topic)], sample_s=0.5)
    assert before.lag[0] == 3
    assert before.stalled == [0]
    assert "NO PROGRESS" in before.render()

    consumer = KafkaConsumer(
        bootstrap_servers=stack.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.commit({tp: OffsetAndMetadata(3, "", -1)})
    consumer.close(autocommit=False)

    (after,) = group_lag(stack, [(group, topic)], sample_s=0.5)
    assert after.total == 0
    assert after.stalled == []
    assert after.render().endswith("lag 0")
