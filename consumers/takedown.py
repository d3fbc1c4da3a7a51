"""consent.events (revoke / expire) -> TakedownService -> clips.taken_down."""

from __future__ import annotations

from consumers import build_for, main
from pipeline.workers import TAKEDOWN

build = build_for(TAKEDOWN.role)

if __name__ == "__main__":
    raise SystemExit(main(TAKEDOWN.role))
