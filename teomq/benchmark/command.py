"""``teomq bench rpc|publish|drain``: the command line of the benchmark harness.

Modelled on ``nats bench``: one command starts a server (or takes ``--broker``), runs P
producers and C consumers, draws a progress bar and prints one table; ``--json`` keeps every
figure with the configuration and the machine. Options take the CLI's two forms, ``-count N``
and ``--count N``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from teomq.argtypes import flag, float_value, int_at_least

WORKLOADS = {
    "rpc": "request/answer closed loop: each producer keeps --inflight requests outstanding",
    "publish": "fire and forget: producers publish as fast as flow control allows, consumers count",
    "drain": "publish --count messages with no consumer, then start the consumers and time the drain",
}
DEFAULT_DURATION = 10.0
DEFAULT_DRAIN_COUNT = 100_000


_positive_int = int_at_least(1)
_nonneg_int = int_at_least(0)


def _seconds(positive: bool) -> Callable[[str], float]:
    return float_value(positive=positive)


def _option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def _uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``teomq bench`` (parser: the subcommand's)."""
    default_loop = "uvloop" if _uvloop_available() else "asyncio"
    parser.add_argument("workload", choices=tuple(WORKLOADS), metavar="WORKLOAD",
                        help="; ".join(f"{k}: {v}" for k, v in WORKLOADS.items()))
    flag(parser, "producers", type=_positive_int, default=4, metavar="P", help="producers (default: %(default)s)")
    flag(parser, "consumers", type=_positive_int, default=4, metavar="C", help="consumers (default: %(default)s)")
    flag(parser, "inflight", type=_positive_int, default=32, metavar="W",
          help="rpc: requests outstanding per producer; publish, drain: messages published between "
               "flow-control waits (default: %(default)s)")
    flag(parser, "size", type=_nonneg_int, default=100, metavar="BYTES",
          help="payload bytes; publish stamps the first 8 with the send time (default: %(default)s)")
    flag(parser, "duration", type=_seconds(positive=True), default=None, metavar="S",
          help=f"measured window in seconds, rpc and publish (default: {DEFAULT_DURATION:g})")
    flag(parser, "count", type=_positive_int, default=None, metavar="N",
          help="messages in all instead of a timed window; the whole run is measured, no warmup "
               f"(drain: default {DEFAULT_DRAIN_COUNT:,})")
    flag(parser, "rate", type=_seconds(positive=False), default=0.0, metavar="MSGS",
          help="publish: messages per second of all producers together, paced in batches of --inflight; "
               "0 = as fast as flow control allows (default: %(default)s)")
    flag(parser, "warmup", type=_seconds(positive=False), default=2.0, metavar="S",
          help="load before a timed window, not counted (default: %(default)s)")
    parser.add_argument("-procs", "--procs", dest="procs", action="store_true", default=True,
                        help="each client in its own process (the default)")
    parser.add_argument("-no-procs", "--no-procs", dest="procs", action="store_false",
                        help="all clients in one process, on one event loop")
    flag(parser, "broker", default="", metavar="URL",
          help="use this running server instead of starting one (its CPU and RSS only with --broker-pid)")
    flag(parser, "broker-pid", type=_positive_int, default=None, metavar="PID",
          help="pid of the --broker process, for its CPU, system calls and RSS")
    flag(parser, "loop", choices=("uvloop", "asyncio"), default=default_loop,
          help="event loop of the clients and of a teomq broker started here (default: %(default)s)")
    flag(parser, "driver", default="teomq", metavar="SPEC",
          help="system under test: teomq, package.module:ClassName or path/to/driver.py[:ClassName]; "
               "modules are found from the current directory and its bench/ folder (default: %(default)s)")
    parser.add_argument("-o", "-option", "--option", dest="options", type=_option, action="append", default=[],
                        metavar="KEY=VALUE", help="driver option, repeatable (teomq: prefetch, timeout, mode, "
                                                  "queue_max, log, storage, fsync, confirm, confirm_window, "
                                                  "delayed)")
    flag(parser, "json", default="", metavar="FILE", help="also write every figure as JSON to FILE")
    parser.add_argument("-no-progress", "--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bar (there is none anyway when stderr is not a terminal)")
    flag(parser, "timeout", type=_seconds(positive=True), default=60.0, metavar="S",
          help="give up after this many seconds without progress (default: %(default)s)")
    flag(parser, "profile", default="", metavar="DIR", help="cProfile every client process into DIR")


def config_from_args(args: argparse.Namespace) -> Any:
    """Check the options together and build the run's Config; ValueError says what is wrong."""
    from teomq.benchmark.loader import resolve
    from teomq.benchmark.workers import Config

    wl = args.workload
    if wl == "drain":
        if args.duration is not None:
            raise ValueError("drain is counted: give --count, not --duration")
        count, duration = args.count or DEFAULT_DRAIN_COUNT, 0.0
    elif args.count is not None and args.duration is not None:
        raise ValueError("give --duration or --count, not both")
    else:
        count = args.count or 0
        duration = 0.0 if count else (args.duration if args.duration is not None else DEFAULT_DURATION)
    if args.loop == "uvloop" and not _uvloop_available():
        raise ValueError("--loop uvloop given but uvloop is not installed")
    if args.broker_pid and not args.broker:
        raise ValueError("--broker-pid needs --broker")
    if args.rate and wl != "publish":
        raise ValueError("--rate applies to publish only")
    spec, paths = resolve(args.driver)
    return Config(workload=wl, producers=args.producers, consumers=args.consumers, inflight=args.inflight,
                  size=args.size, duration=duration, count=count, warmup=0.0 if count else args.warmup,
                  procs=args.procs, loop=args.loop, driver=spec, options=dict(args.options),
                  sys_path=tuple(paths), broker=args.broker, broker_pid=args.broker_pid,
                  timeout=args.timeout, profile_dir=os.path.abspath(args.profile) if args.profile else "",
                  rate=args.rate)


def run(args: argparse.Namespace, prog: str = "teomq bench") -> int:
    """Run one benchmark from parsed options; print the table; 0 on success."""
    from teomq.benchmark.harness import BenchError, Harness
    from teomq.benchmark.progress import make_progress
    from teomq.benchmark.report import build, format_table

    try:
        cfg = config_from_args(args)
    except (ValueError, ImportError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if cfg.profile_dir:
        os.makedirs(cfg.profile_dir, exist_ok=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # also when started in the background by a shell, which sets SIGINT to "ignore"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        harness = Harness(cfg, make_progress(args.progress))
    except (ValueError, ImportError) as e:
        print(f"{prog}: driver {args.driver!r}: {e}", file=sys.stderr)
        return 2
    try:
        doc = build(cfg, harness.run())
    except KeyboardInterrupt:
        print(f"{prog}: interrupted, stopping everything", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        harness.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    try:
        print(format_table(doc), flush=True)
    except BrokenPipeError:  # e.g. piped into head
        sys.stdout = open(os.devnull, "w")
    return 0


def build_parser(prog: str = "teomq bench") -> argparse.ArgumentParser:
    """A stand-alone parser (teomq.cli adds the same options to its ``bench`` subcommand)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, allow_abbrev=False)
    add_arguments(parser)
    return parser


DESCRIPTION = ("Benchmark a broker end to end: real server, real sockets, clients in separate processes; "
               "prints messages per second, latency percentiles, CPU per message of the broker and the "
               "clients, and the broker's memory.")


def main(argv: list[str] | None = None) -> int:
    """``python -m teomq.benchmark.command``: the same as ``teomq bench``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
