"""consent.events (revoke / expire) -> TakedownService -> clips.taken_down."""

from __future__ import annotations

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container, worker_name
from pipeline.topics import CONSENT_EVENTS
from schemas.events import ConsentChanged

GROUP = "greetflow-takedown"


def build(container: Container) -> ConsumerWorker[ConsentChanged]:
    name = worker_name("takedown")
    return ConsumerWorker(
        container.settings,
        name=name,
        topic=CONSENT_EVENTS,
        group_id=GROUP,
        payload_type=ConsentChanged,
        handler=container.takedown_service(name).handle,
        bus=container.bus,
        on_dead_letter=container.fail_job_on_dead_letter,
    )


if __name__ == "__main__":
    from consumers._run import main

    raise SystemExit(main(build))
