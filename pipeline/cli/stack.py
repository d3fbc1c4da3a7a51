"""`greetflow stack init | check` (registered through pipeline.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pipeline.settings import get_settings

# `stack check` (and `stack init` when something is still wrong afterwards).
PROBLEMS_EXIT = 1


def _quiet_clients() -> None:
    # An unreachable broker is reported as one line; kafka-python's reconnect chatter is noise.
    for name in ("kafka", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container

    _quiet_clients()
    container = Container(get_settings(), migrate=False)
    try:
        report = container.stack_service().init()
    finally:
        container.close()
    for line in report.lines():
        print(line)
    return PROBLEMS_EXIT if report.problems else 0


def cmd_check(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container

    _quiet_clients()
    container = Container(get_settings(), migrate=False)
    try:
        problems = container.stack_service().check()
    finally:
        container.close()
    for p in problems:
        print(p.render())
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return PROBLEMS_EXIT
    print("stack ok: every topic, bucket policy and migration is in place")
    return 0


def register(sub: Any) -> None:
    stack = sub.add_parser(
        "stack", help="set up (init) or verify (check) the topics, buckets and database schema"
    )
    stack_sub = stack.add_subparsers(dest="stack_command", required=True)
    init = stack_sub.add_parser(
        "init",
        help="create missing topics (and .dlq twins) and buckets with their policies, migrate; idempotent",
    )
    init.set_defaults(func=cmd_init)
    check = stack_sub.add_parser(
        "check", help=f"report what is missing or misconfigured, one line each; exit {PROBLEMS_EXIT} if any"
    )
    check.set_defaults(func=cmd_check)
