"""moderation.decisions (approved) -> PublishService -> clips.published."""

from __future__ import annotations

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container, worker_name
from pipeline.topics import MODERATION_DECISIONS
from schemas.events import ModerationDecided

GROUP = "greetflow-publish"


def build(container: Container) -> ConsumerWorker[ModerationDecided]:
    name = worker_name("publish")
    return ConsumerWorker(
        container.settings,
        name=name,
        topic=MODERATION_DECISIONS,
        group_id=GROUP,
        payload_type=ModerationDecided,
        handler=container.publish_service(name).handle,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
    )


if __name__ == "__main__":
    from consumers._run import main

    raise SystemExit(main(build))
