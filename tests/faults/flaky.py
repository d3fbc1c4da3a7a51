"""Entry point of a render worker process whose renderer fails once per job (a marker file
per job in GREETFLOW_TEST_FLAKY_DIR says the fault already fired)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pipeline.bootstrap
from pipeline.settings import Settings


class FailsOncePerJob:
    def __init__(self, renderer: Any, marks: Path) -> None:
        self.renderer = renderer
        self.marks = marks

    def __getattr__(self, name: str) -> Any:  # prewarm and friends
        return getattr(self.renderer, name)

    def __call__(self, req: Any, out_dir: Path, photo: Path | None) -> Any:
        try:
            (self.marks / str(req.job_id)).touch(exist_ok=False)
        except FileExistsError:
            return self.renderer(req, out_dir, photo)
        raise RuntimeError(f"the renderer crashed (injected, once for job {req.job_id})")


def main() -> None:
    marks = Path(os.environ["GREETFLOW_TEST_FLAKY_DIR"])
    real = pipeline.bootstrap.default_renderer

    def flaky(settings: Settings) -> Any:
        return FailsOncePerJob(real(settings), marks)

    pipeline.bootstrap.default_renderer = flaky
    from pipeline.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))
