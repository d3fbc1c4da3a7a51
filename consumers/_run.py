"""Shared entry: build the worker, stop it cleanly on SIGTERM / SIGINT, exit 0."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.bootstrap import Container


def run_until_signalled(worker: ConsumerWorker[Any], container: Container) -> int:
    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(worker.name).info(
            "received %s, finishing the current message", signal.Signals(signum).name
        )
        worker.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        worker.run()
    finally:
        container.close()
    return 0


def main(build: Callable[[Container], ConsumerWorker[Any]]) -> int:
    """`python -m consumers.NAME`: settings from the environment, run until signalled."""
    from pipeline.logs import setup_logging

    setup_logging()
    container = Container()
    return run_until_signalled(build(container), container)
