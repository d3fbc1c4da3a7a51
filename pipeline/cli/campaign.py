"""`greetflow campaign status ID [--watch]` (registered through pipeline.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import ConfigError
from pipeline.settings import get_settings

# `campaign status` of a campaign that has no jobs.
NO_JOBS_EXIT = 2


def _deadline(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"--deadline {value!r}: use ISO 8601, e.g. 2027-02-05T20:00+08:00") from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container
    from pipeline.progress import ProgressView, watch

    deadline = _deadline(args.deadline)
    container = Container(get_settings())
    try:
        service = container.progress_service()
        if service.snapshot(args.campaign_id, deadline=deadline).total == 0:
            print(f"campaign {args.campaign_id}: no jobs", file=sys.stderr)
            return NO_JOBS_EXIT
        with ProgressView() as view:
            watch(
                service,
                args.campaign_id,
                view,
                interval_s=args.interval,
                until=lambda p: not args.watch or p.remaining == 0,
                deadline=deadline,
            )
    finally:
        container.close()
    return 0


def register(sub: Any) -> None:
    campaign = sub.add_parser("campaign", help="campaign progress")
    campaign_sub = campaign.add_subparsers(dest="campaign_command", required=True)
    status = campaign_sub.add_parser(
        "status", help="counts by state, throughput, ETA to the deadline, dead letters"
    )
    status.add_argument("campaign_id")
    status.add_argument(
        "--watch", action="store_true", help="refresh until every job is final (Ctrl-C stops)"
    )
    status.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="with --watch")
    status.add_argument(
        "--deadline",
        default=None,
        metavar="ISO8601",
        help="the campaign's deadline (default: its first job's creation + GREETFLOW_CAMPAIGN_DEADLINE_S)",
    )
    status.set_defaults(func=cmd_status)
