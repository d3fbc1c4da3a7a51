"""render.results -> ModerationService -> moderation.decisions."""

from __future__ import annotations

from consumers import build_for, main
from pipeline.workers import MODERATE

build = build_for(MODERATE.role)

if __name__ == "__main__":
    raise SystemExit(main(MODERATE.role))
