#!/usr/bin/env python3
"""End-to-end load generator: ``teomq bench rpc`` under its original name and flags.

The harness now lives in the package (teomq.benchmark, see bench/README.md); this script keeps
the old command line working::

    python bench/load.py --producers 4 --consumers 4 --inflight 32 --size 100 --duration 10 \\
        [--warmup 2] [--broker HOST:PORT [--broker-pid PID]] [--loop uvloop|asyncio] \\
        [--mode send|request] [--prefetch 64] [--timeout 10] [--json out.json] [--profile DIR]

is ``teomq bench rpc`` with the same numbers, ``--mode``, ``--prefetch`` and ``--timeout``
(request timeout) becoming teomq driver options. The printed table and the JSON are
``teomq bench``'s (schema "teomq-bench/1"); the JSON's ``round_trips_per_s``,
``latency_us.p50``... keep their names, per-round-trip CPU figures are now
``broker.cpu_us_per_message`` etc. Run from anywhere: the repository root is put on sys.path.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from teomq.benchmark import command  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    default_loop = "uvloop" if command._uvloop_available() else "asyncio"
    ap = argparse.ArgumentParser(prog="bench/load.py", description="teomq end-to-end load generator "
                                 "(teomq bench rpc).", allow_abbrev=False)
    ap.add_argument("--producers", type=command._positive_int, default=4, help="producer processes (default 4)")
    ap.add_argument("--consumers", type=command._positive_int, default=4, help="consumer processes (default 4)")
    ap.add_argument("--inflight", type=command._positive_int, default=32,
                    help="requests outstanding per producer (default 32)")
    ap.add_argument("--size", type=command._nonneg_int, default=100, help="payload bytes (default 100)")
    ap.add_argument("--duration", type=command._seconds(positive=True), default=10.0,
                    help="measured window, seconds (default 10)")
    ap.add_argument("--warmup", type=command._seconds(positive=False), default=2.0,
                    help="load before the window, seconds (default 2)")
    ap.add_argument("--broker", default="", metavar="HOST:PORT",
                    help="use this broker instead of starting one (its CPU/RSS only with --broker-pid)")
    ap.add_argument("--broker-pid", type=int, default=None, help="pid of the --broker process, for CPU and RSS")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop,
                    help=f"event loop of the clients and of the broker started here (default {default_loop})")
    ap.add_argument("--mode", choices=("send", "request"), default="send",
                    help="Producer.send(data, callback), or a task per request awaiting Producer.request "
                         "(default send)")
    ap.add_argument("--prefetch", type=command._positive_int, default=64, help="consumer prefetch (default 64)")
    ap.add_argument("--timeout", type=float, default=10.0, help="request timeout, seconds (default 10)")
    ap.add_argument("--json", default="", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--profile", default="", metavar="DIR", help="cProfile every client process into DIR")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def to_bench_argv(args: argparse.Namespace) -> list[str]:
    """The ``teomq bench rpc`` arguments these load.py options mean."""
    argv = ["rpc", "--producers", str(args.producers), "--consumers", str(args.consumers),
            "--inflight", str(args.inflight), "--size", str(args.size), "--duration", repr(args.duration),
            "--warmup", repr(args.warmup), "--loop", args.loop,
            "-o", f"mode={args.mode}", "-o", f"prefetch={args.prefetch}", "-o", f"timeout={args.timeout!r}"]
    if args.broker:
        argv += ["--broker", args.broker]
        if args.broker_pid:
            argv += ["--broker-pid", str(args.broker_pid)]
    if args.json:
        argv += ["--json", args.json]
    if args.profile:
        argv += ["--profile", args.profile]
    if args.no_progress:
        argv.append("--no-progress")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bench_args = command.build_parser("bench/load.py").parse_args(to_bench_argv(args))
    return command.run(bench_args, prog="bench/load.py")


if __name__ == "__main__":
    sys.exit(main())
