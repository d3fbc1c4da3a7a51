"""Thin Kafka entry points, one module per worker role (pipeline/workers.py), each
wired by pipeline.bootstrap.Container.worker.

Run one with `greetflow worker NAME` or `python -m consumers.NAME`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.workers import ROLES as WORKERS

if TYPE_CHECKING:
    from pipeline.adapters.kafka import ConsumerWorker
    from pipeline.bootstrap import Container

__all__ = ["WORKERS", "build_for", "main"]


def build_for(role: str) -> Callable[[Container], ConsumerWorker[Any]]:
    """`build(container)`: the worker of `role` on that container, not started yet."""

    def build(container: Container) -> ConsumerWorker[Any]:
        return container.worker(role)

    return build


def main(role: str) -> int:
    """`python -m consumers.ROLE` is `greetflow worker ROLE`."""
    from pipeline.cli import main as cli_main

    return cli_main(["worker", role])
