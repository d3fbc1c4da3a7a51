"""moderation.decisions (approved) -> PublishService -> clips.published."""

from __future__ import annotations

from consumers import build_for, main
from pipeline.workers import PUBLISH

build = build_for(PUBLISH.role)

if __name__ == "__main__":
    raise SystemExit(main(PUBLISH.role))
