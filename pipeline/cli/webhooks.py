"""`greetflow webhook secret CAMPAIGN` (registered through pipeline.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.settings import get_settings


def cmd_secret(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container

    container = Container(get_settings())
    try:
        rotated = container.webhook_service("cli").rotate_campaign(args.campaign_id)
    finally:
        container.close()
    grace = container.settings.webhook_secret_grace_s
    print(f"webhook endpoint {rotated.endpoint.id} of campaign {args.campaign_id}: {rotated.endpoint.url}")
    print(
        f"signing secret (shown only now; the previous one stays valid for {grace:.0f} s): "
        f"{rotated.secret}"
    )
    return 0


def register(sub: Any) -> None:
    """Add `greetflow webhook ...` to the `greetflow` parser."""
    wh = sub.add_parser("webhook", help="the webhook endpoint of a brief's webhook_url")
    wsub = wh.add_subparsers(dest="webhook_command", required=True)
    p = wsub.add_parser(
        "secret",
        help="rotate and print the signing secret of a campaign's brief webhook "
        "(for endpoints a scheduled run registered)",
    )
    p.add_argument("campaign_id")
    p.set_defaults(func=cmd_secret)
