"""`greetflow review add-user | serve | escalate` (registered through pipeline.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.settings import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

PASSWORD_ENV = "GREETFLOW_REVIEW_PASSWORD"


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise ConfigError(f"no terminal: pass --password-stdin or set {PASSWORD_ENV}")
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise ConfigError("the passwords differ")
    return first


def cmd_add_user(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container
    from pipeline.review.repository import parse_role

    password = _read_password(args)
    container = Container(get_settings())
    try:
        created = container.review_service().add_user(args.name, parse_role(args.role), password)
    finally:
        container.close()
    print(f"reviewer {args.name} ({args.role}) {'added' if created else 'updated; their sessions ended'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.bootstrap import Container
    from pipeline.review.app import create_app

    settings = get_settings()
    container = Container(settings)
    # /metrics, /healthz, /readyz on the app's port, and on GREETFLOW_METRICS_PORT when set
    # (the probes' port in infra/k8s), sharing one set of readiness probes.
    telemetry = container.telemetry("review")
    try:
        readiness = telemetry.readiness or container.review_readiness()
        app = create_app(container.review_service(), readiness=readiness)
        telemetry.start()
        host = args.host or settings.review_host
        port = args.port or settings.review_port
        print(f"review queue on http://{host}:{port}/ (API docs: /api/docs)", file=sys.stderr)
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info",
            log_config=None,  # uvicorn's records go through the root logger (JSON or console)
            proxy_headers=args.proxy_headers,
        )
    finally:
        telemetry.stop()
        container.close()
    return 0


def cmd_escalate(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container

    container = Container(get_settings())
    try:
        ids = container.review_service().escalate_overdue()
    finally:
        container.close()
    print(f"{len(ids)} case(s) escalated")
    for job_id in ids:
        print(job_id)
    return 0


def app_from_settings() -> FastAPI:
    """For `uvicorn --factory pipeline.cli.review:app_from_settings`: the review app on a
    Container from the GREETFLOW_ environment."""
    from pipeline.bootstrap import Container
    from pipeline.review.app import create_app

    container = Container(get_settings())
    return create_app(container.review_service(), readiness=container.review_readiness())


def register(sub: Any) -> None:
    """Add `greetflow review ...` to the `greetflow` parser."""
    review = sub.add_parser("review", help="the moderation review queue: users, web app, SLA escalation")
    rsub = review.add_subparsers(dest="review_command", required=True)
    p = rsub.add_parser("add-user", help="add a reviewer (or reset their role and password)")
    p.add_argument("name")
    p.add_argument("--role", choices=["reviewer", "lead"], default="reviewer")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help=f"read the password from stdin (else {PASSWORD_ENV} or a prompt)",
    )
    p.set_defaults(func=cmd_add_user)
    p = rsub.add_parser("serve", help="run the review web app and API")
    p.add_argument("--host", default=None, help="default: GREETFLOW_REVIEW_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: GREETFLOW_REVIEW_PORT (8088)")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from a reverse proxy")
    p.set_defaults(func=cmd_serve)
    p = rsub.add_parser(
        "escalate", help="flag the cases waiting longer than the SLA (what the review_sla DAG runs)"
    )
    p.set_defaults(func=cmd_escalate)
