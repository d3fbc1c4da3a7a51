"""render.requests -> RenderService -> render.results."""

from __future__ import annotations

from consumers import build_for, main
from pipeline.workers import RENDER

build = build_for(RENDER.role)

if __name__ == "__main__":
    raise SystemExit(main(RENDER.role))
