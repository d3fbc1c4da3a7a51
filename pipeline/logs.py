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
