"""`greetflow bench ...`: render, faults, scale and latency benchmarks.

Each bench prints progress on stderr; with `--json` its last stdout line is the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.cli.render import _size
from pipeline.settings import get_settings


def _say_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


def cmd_bench_render(args: argparse.Namespace) -> int:
    from pipeline.render.bench import run_bench

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    result = run_bench(
        args.recipients,
        template=args.template,
        naive_count=args.naive,
        photo=not args.no_photo,
        threads=get_settings().ffmpeg_threads,
        size=args.size,
        dedup_s=args.dedup_rate,
        say=say,
    )
    _emit(result, args.json)
    return 0


def cmd_bench_faults(args: argparse.Namespace) -> int:
    from pipeline.bench_faults import run_bench
    from pipeline.bootstrap import Container

    result = run_bench(args.jobs, make_container=Container, say=_say_err)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for name, row in {**result["scenarios"], "total": result["total"]}.items():
            print(f"{name}: {row}")
    return 0


def cmd_bench_scale(args: argparse.Namespace) -> int:
    from pipeline.bench_scale import run_scale_bench

    result = run_scale_bench(
        args.recipients,
        database_url=args.database_url,
        audience_format=args.audience_format,
        chunk_size=args.chunk_size,
        say=_say_err,
    )
    _emit(result, args.json)
    return 0


def cmd_bench_latency(args: argparse.Namespace) -> int:
    from pipeline.bench_latency import run_latency_bench
    from pipeline.bootstrap import Container

    result = run_latency_bench(args.requests, photo=args.photo, say=_say_err, make_container=Container)
    _emit(result, args.json)
    return 0


def register(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    br = bsub.add_parser("render", help="render-once engine vs naive moviepy vs the encode floor")
    br.add_argument("--recipients", type=int, default=20)
    br.add_argument("--template", default="lunar-new-year")
    br.add_argument("--naive", type=int, default=None, help="naive clips to render (default: all)")
    br.add_argument("--no-photo", action="store_true")
    br.add_argument("--size", type=_size, default=None)
    br.add_argument(
        "--dedup-rate",
        type=float,
        nargs="?",
        const=1.1,
        default=None,
        metavar="S",
        help="draw names from a Zipf distribution with exponent S (default 1.1) over 5,000 names, "
        "so repeated names reuse their personal segment",
    )
    br.add_argument("--json", action="store_true")
    br.set_defaults(func=cmd_bench_render)

    bf = bsub.add_parser("faults", help="kill -9 a render worker, the moderator, the publisher mid-batch")
    bf.add_argument("--jobs", type=int, default=30, help="jobs per scenario")
    bf.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    bf.set_defaults(func=cmd_bench_faults)

    bs = bsub.add_parser("scale", help="fan-out of an N-recipient campaign: intake, re-run and report")
    bs.add_argument("--recipients", type=int, default=100_000)
    bs.add_argument(
        "--database-url",
        default=None,
        help="job store to measure (default: the configured one; e.g. postgresql+psycopg://127.0.0.1/test)",
    )
    bs.add_argument("--audience-format", choices=("csv", "parquet", "sql"), default="csv")
    bs.add_argument("--chunk-size", type=int, default=None, help="recipients per intake chunk")
    bs.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    bs.set_defaults(func=cmd_bench_scale)

    bl = bsub.add_parser("latency", help="event-to-published latency of single renders on warm workers")
    bl.add_argument("--requests", type=int, default=20)
    bl.add_argument("--photo", action="store_true", help="each request carries a consented photo")
    bl.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    bl.set_defaults(func=cmd_bench_latency)
