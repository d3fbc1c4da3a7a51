"""Thin Kafka entrypoints: each binds one topic to one pipeline service.

Run one with `greetflow worker NAME` or `python -m consumers.NAME`.
"""

from __future__ import annotations

WORKERS = ("render", "moderate", "publish", "takedown")
