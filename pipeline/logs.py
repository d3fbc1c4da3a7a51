from __future__ import annotations

import logging
import os


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("GREETFLOW_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("kafka", "urllib3", "botocore", "werkzeug", "moto", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # kafka-python 3's IO thread warns whenever one of its steps takes > 0.1 s. In a worker
    # that renders or decodes video in the same process that is GIL contention, not a stuck
    # coroutine, and it fires on every busy minute; the consumer's own errors still show.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
