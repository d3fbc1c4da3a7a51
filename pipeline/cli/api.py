"""`greetflow api serve | key create | key list | key revoke` (registered through
pipeline.cli.COMMAND_MODULES)."""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError
from pipeline.settings import get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

_TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pipeline.api.app import create_app
    from pipeline.bootstrap import Container

    settings = get_settings()
    container = Container(settings)
    telemetry = container.telemetry("api")
    try:
        readiness = telemetry.readiness or container.review_readiness()
        app = create_app(container, readiness=readiness)
        telemetry.start()
        host = args.host or settings.api_host
        port = args.port or settings.api_port
        print(
            f"render API on http://{host}:{port}/v1 (OpenAPI: /v1/openapi.json, docs: /v1/docs)",
            file=sys.stderr,
        )
        uvicorn.run(
            app,
            host=host,
            port=port,
            log_level="info",
            log_config=None,
            proxy_headers=args.proxy_headers,
        )
    finally:
        telemetry.stop()
        container.close()
    return 0


def app_from_settings() -> FastAPI:
    """For `uvicorn --factory pipeline.cli.api:app_from_settings`."""
    from pipeline.api.app import create_app
    from pipeline.bootstrap import Container

    container = Container(get_settings())
    return create_app(container, readiness=container.review_readiness())


def cmd_key_create(args: argparse.Namespace) -> int:
    from pipeline.api.auth import parse_scopes
    from pipeline.api.repository import ApiKeyRepository
    from pipeline.bootstrap import Container

    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        raise ConfigError(f"--scopes: {exc}") from None
    if not _TENANT.match(args.tenant):
        raise ConfigError(f"--tenant {args.tenant!r}: use letters, digits, '-' and '_' (at most 64)")
    if not args.name.strip() or len(args.name) > 128:
        raise ConfigError("--name must be 1 to 128 characters")
    if args.rate_limit is not None and args.rate_limit < 1:
        raise ConfigError("--rate-limit must be at least 1 request per minute")
    container = Container(get_settings())
    try:
        key, token = ApiKeyRepository(container.db).create(
            name=args.name.strip(), tenant=args.tenant, scopes=scopes, rate_limit_per_min=args.rate_limit
        )
    finally:
        container.close()
    print(
        f"key {key.key_id} ({key.name}) for tenant {key.tenant}, scopes {','.join(sorted(key.scopes))}; "
        "shown once, only its hash is stored:",
        file=sys.stderr,
    )
    print(token)
    return 0


def cmd_key_list(args: argparse.Namespace) -> int:
    from pipeline.api.repository import ApiKeyRepository
    from pipeline.bootstrap import Container

    container = Container(get_settings())
    try:
        keys = ApiKeyRepository(container.db).list()
    finally:
        container.close()
    for k in keys:
        state = f"revoked {k.revoked_at.isoformat(timespec='seconds')}" if k.revoked_at else "live"
        print(f"{k.key_id}  {k.tenant}  {k.name}  {','.join(sorted(k.scopes))}  {state}")
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from pipeline.api.repository import ApiKeyRepository
    from pipeline.bootstrap import Container

    container = Container(get_settings())
    try:
        revoked = ApiKeyRepository(container.db).revoke(args.key_id)
    finally:
        container.close()
    if not revoked:
        raise ConfigError(f"no live key {args.key_id}")
    print(f"key {args.key_id} revoked")
    return 0


def register(sub: Any) -> None:
    """Add `greetflow api ...` to the `greetflow` parser."""
    api = sub.add_parser("api", help="the render API: serve it, manage its keys")
    asub = api.add_subparsers(dest="api_command", required=True)
    p = asub.add_parser("serve", help="run the render API (HTTP, under /v1)")
    p.add_argument("--host", default=None, help="default: GREETFLOW_API_HOST (127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="default: GREETFLOW_API_PORT (8090)")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* from a reverse proxy")
    p.set_defaults(func=cmd_serve)
    key = asub.add_parser("key", help="API keys")
    ksub = key.add_subparsers(dest="key_command", required=True)
    p = ksub.add_parser("create", help="create a key; it is printed once, only its hash is stored")
    p.add_argument("--name", required=True)
    p.add_argument("--scopes", required=True, help="comma-separated, e.g. renders:write,jobs:read")
    p.add_argument("--tenant", default="default", help="the tenant whose jobs and campaigns the key sees")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="requests per minute (default: GREETFLOW_API_RATE_LIMIT_PER_MIN)",
    )
    p.set_defaults(func=cmd_key_create)
    p = ksub.add_parser("list", help="every key (never the key itself)")
    p.set_defaults(func=cmd_key_list)
    p = ksub.add_parser("revoke", help="revoke a key by its id")
    p.add_argument("key_id")
    p.set_defaults(func=cmd_key_revoke)
