"""clips.published, clips.taken_down and the job_events log -> webhook deliveries, and the
loop that sends them (`greetflow worker webhook`)."""

from __future__ import annotations

from consumers import build_for, main
from pipeline.workers import WEBHOOK

build = build_for(WEBHOOK.role)

if __name__ == "__main__":
    raise SystemExit(main(WEBHOOK.role))
