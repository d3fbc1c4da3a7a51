"""Same as `greetflow bench render`: the render-once engine vs naive moviepy vs the floor.

python bench/render_bench.py --recipients 20 --json
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", "render", *sys.argv[1:]]))
