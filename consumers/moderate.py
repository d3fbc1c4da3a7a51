"""render.results -> ModerationService -> moderation.decisions."""

from __future__ import annotations

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container, worker_name
from pipeline.topics import RENDER_RESULTS
from schemas.events import ClipRendered

GROUP = "greetflow-moderate"


def build(container: Container) -> ConsumerWorker[ClipRendered]:
    name = worker_name("moderate")
    return ConsumerWorker(
        container.settings,
        name=name,
        topic=RENDER_RESULTS,
        group_id=GROUP,
        payload_type=ClipRendered,
        handler=container.moderation_service(name).handle,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
    )


if __name__ == "__main__":
    from consumers._run import main

    raise SystemExit(main(build))
