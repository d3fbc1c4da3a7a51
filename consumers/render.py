"""render.requests -> RenderService -> render.results."""

from __future__ import annotations

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container, worker_name
from pipeline.topics import RENDER_REQUESTS
from schemas.events import RenderRequested

GROUP = "greetflow-render"


def build(container: Container) -> ConsumerWorker[RenderRequested]:
    name = worker_name("render")
    return ConsumerWorker(
        container.settings,
        name=name,
        topic=RENDER_REQUESTS,
        group_id=GROUP,
        payload_type=RenderRequested,
        handler=container.render_service(name).handle,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
        max_poll_records=2,
    )


if __name__ == "__main__":
    from consumers._run import main

    raise SystemExit(main(build))
