"""Command-line programs: ``teomq broker|consumer|producer|bench`` and ``teomq-broker``.

``teomq bench`` is :mod:`teomq.benchmark.command` (the end-to-end benchmark harness).

Every long option works in the Go original's single-dash form and in the double-dash
form: ``-broker=X``, ``-broker X``, ``--broker X``, ``--broker=X``. Boolean flags also
take Go's explicit form, ``-nomsg=true`` / ``-nomsg=false``.

Lines on stdout (one flushed line each; scripts and tests parse them)::

    broker:    Connected to Teonet, this app address: <address>
               teomq broker listening on <host>:<port>
    consumer:  <name> got message: <message text>
    consumer:  <name> hello answer: <answer text>                                    (-api)
               <name> subscribed to <cmd> | <name> unsubscribed from <cmd>             (-control)
               <name> control error: <error>                                          (-control)
    producer:  <name> got answer: <answer text>
               <name> error for message #<n>: <error>
               <name> done: sent <N>, answered <A>, errors <E>
    -stat:     stat: in=.. out=.. answered=.. queue=.. inflight=.. consumers=.. rate=../s  (broker)
               stat: command <name> routing=.. queued=.. subscribers=.. in=.. out=..       (broker, command scheme)
               stat: web sessions=.. consumers=.. pushes=.. encodes=.. bad_packets=..     (broker, web port on)
               stat: received=.. answered=.. rate=../s                                     (consumer)
               stat: sent=.. answered=.. errors=.. inflight=.. rate=../s                   (producer)

Command scheme: ``teomq broker -command NAME[/PATTERN][:fanout|queue]`` (repeatable) or
``-schema FILE``; ``teomq consumer -subscribe NAME,...``; ``teomq producer -command NAME``
sends ``NAME/<1..100>`` (or ``-message``), and collects every answer of a fanout command
until ``-timeout``.

Message texts are decoded as UTF-8 with replacement; CR and LF are written as ``\\r`` and
``\\n`` so that a record is always one line. Diagnostics go to stderr through logging.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import ipaddress
import logging
import os
import random
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from teomq.addressbook import DEFAULT_PORT, DEFAULT_WEB_PORT, default_data_dir
from teomq.commands import (
    DEFAULT_DLQ_MAX,
    DEFAULT_LEASE,
    DEFAULT_MAX_CRASHES,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_RETRY_BASE,
    DEFAULT_RETRY_MAX,
    Command,
    CommandSchema,
    parse_command_spec,
)
from teomq.errors import AddressError, BrokerError, ConnectionLost, TeomqError
from teomq.protocol import DEFAULT_MAX_PAYLOAD, MAX_PAYLOAD_LIMIT, RECONNECT_DELAY, RECONNECT_MAX_DELAY
from teomq.argtypes import flag, float_value, int_at_least
from teomq.loops import run as run_on_loop
from teomq.stats_printer import command_lines, print_stats, web_line
from teomq.storage import (
    DEFAULT_MEMORY_MAX,
    DEFAULT_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MIN_MEMORY_MAX,
    MIN_SEGMENT_SIZE,
    STORAGE_MODES,
    FsyncPolicy,
)

__all__ = ["build_broker_parser", "build_parser", "broker_main", "main", "parse_listen", "producer_message"]

log = logging.getLogger("teomq.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_MESSAGE = "Hello wold #{n}!"  # the Go example's typo, kept on purpose
BROKER_STAT_FIELDS = ("in", "out", "answered", "queue", "inflight", "consumers")
CONSUMER_STAT_FIELDS = ("received", "answered")
PRODUCER_STAT_FIELDS = ("sent", "answered", "errors", "inflight")
class Backoff:
    """Reconnect waits: about 0.1 s first, doubling up to 2 s, each jittered (half to all of
    it), as teomq.Client's (RECONNECT_DELAY, RECONNECT_MAX_DELAY)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._delay = RECONNECT_DELAY

    def next(self) -> float:
        delay = self._delay
        self._delay = min(delay * 2.0, RECONNECT_MAX_DELAY)
        return random.uniform(delay / 2.0, delay)

_GO_TRUE = frozenset({"1", "t", "true"})
_GO_FALSE = frozenset({"0", "f", "false"})


# -- value parsers -------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (127.0.0.1) -> (host, port); port 0 = any free."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not host or not rest.startswith(":"):
            raise argparse.ArgumentTypeError(f"bad listen address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"bad listen address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise argparse.ArgumentTypeError(f"bad listen address {text!r}: write IPv6 hosts as [::1]:PORT")
        host = host or "127.0.0.1"
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"bad port {port_text!r} in {text!r}: expected 0-65535")
    if any(c.isspace() for c in host):
        raise argparse.ArgumentTypeError(f"bad host {host!r} in {text!r}")
    return host, int(port_text)




def _message_format(text: str) -> str:
    try:
        text.format(n=1, rand=1)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise argparse.ArgumentTypeError(
            f"bad message format {text!r} (use {{n}} for the number, {{rand}} for 1..100): {e}") from None
    return text


def _command_spec(text: str) -> Command:
    try:
        return parse_command_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _fsync_policy(text: str) -> str:
    try:
        return str(FsyncPolicy.parse(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _command_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any("/" in n for n in names):
        raise argparse.ArgumentTypeError(f"bad command list {text!r}: expected NAME[,NAME...]")
    return names


def _web_origin(text: str) -> str:
    from teomq.web.gateway import parse_origin

    try:
        return parse_origin(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (what only this machine can reach)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _command_name(text: str) -> str:
    name = text.strip()
    if not name or "/" in name:
        raise argparse.ArgumentTypeError(f"bad command name {text!r}")
    return name


def producer_message(args: argparse.Namespace) -> str:
    """The producer's message format: -message, else NAME/{rand} with -command, else the original's."""
    if args.message:
        return args.message
    return f"{args.command}/{{rand}}" if args.command else DEFAULT_MESSAGE


def _go_bool(text: str) -> bool:
    low = text.lower()
    if low in _GO_TRUE:
        return True
    if low in _GO_FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true/false)")


# -- parsers -------------------------------------------------------------------------


def _uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


class _Parser(argparse.ArgumentParser):
    """ArgumentParser that never takes a prefix for a whole option, as Go's flag package.

    Python 3.11's argparse still matches single-dash prefixes (``-list`` for ``-listen``)
    when allow_abbrev is False; no option here is a short one that takes a glued value.
    """

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        return []



def _bytes_value(low: int) -> Callable[[str], int]:
    """A size in bytes: a whole number, or one with KiB, MiB or GiB after it (``64MiB``)."""
    units = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}

    def parse(text: str) -> int:
        digits = text.rstrip("KMGiB")
        unit = text[len(digits):]
        if not digits.isdigit() or unit not in units:
            raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with KiB, MiB or GiB: 64MiB)")
        value = int(digits) * units[unit]
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is less than {low} bytes")
        return value

    return parse


def _bool_flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A switch: ``-name`` turns it on; Go's ``-name=true|false`` also parses."""
    flag(parser, name, nargs="?", const=True, default=False, type=_go_bool, metavar="true|false", help=help)


def _add_common(parser: argparse.ArgumentParser, what: str) -> None:
    _bool_flag(parser, "nomsg", f"don't log each {what} (default: off)")
    _bool_flag(parser, "stat", "print a 'stat:' line of counters on stdout every -stat-interval seconds (default: off)")
    flag(parser, "stat-interval", type=float_value(positive=True), default=1.0, metavar="SECONDS",
          help="seconds between 'stat:' lines (default: %(default)s)")
    flag(parser, "loop", choices=("uvloop", "asyncio"), default="uvloop" if _uvloop_available() else "asyncio",
          help="event loop implementation (default: %(default)s)")
    flag(parser, "log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", metavar="LEVEL",
          help=f"log level, one of {', '.join(LOG_LEVELS)} (default: %(default)s)")
    flag(parser, "log-file", default=None, metavar="FILE",
          help="write the log to FILE (appended, created if missing) instead of stderr (default: stderr)")


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    flag(parser, "listen", type=parse_listen, default=DEFAULT_LISTEN, metavar="HOST:PORT",
          help="address to listen on; ':PORT' means 127.0.0.1, port 0 any free port (default: %(default)s)")
    flag(parser, "data-dir", default=str(default_data_dir()), metavar="DIR",
          help="directory for the broker's key and data (default: %(default)s, from $TEOMQ_HOME)")
    flag(parser, "storage", choices=STORAGE_MODES, default="disk",
          help="where queues are kept: disk (in DIR/queues of -data-dir, read back at start: they survive "
          "restarts) or memory (lost when the broker stops) (default: %(default)s)")
    flag(parser, "fsync", type=_fsync_policy, default="always", metavar="POLICY",
          help="disk storage: when the log is made durable. always: a message is confirmed once fdatasync "
          "covered it (survives a power loss); interval:MS: written to the OS at once, synced every MS "
          "milliseconds (a process crash loses nothing, a power loss up to MS); never: left to the OS "
          "(a process crash loses nothing, a power loss what the OS had not written) (default: %(default)s)")
    flag(parser, "segment-size", type=int_at_least(MIN_SEGMENT_SIZE, MAX_SEGMENT_SIZE), default=DEFAULT_SEGMENT_SIZE,
          metavar="BYTES", help=f"disk storage: bytes a log segment file is rolled at (preallocated 1 MiB at a time), "
          f"{MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} (default: %(default)s)")
    flag(parser, "queue-max-bytes", type=_bytes_value(0), default=0, metavar="BYTES",
          help="most bytes of messages all queues together may have waiting (a number, or with KiB, MiB or GiB); a "
          "SEND past it is refused with QUEUE_FULL (retryable); per command, a -schema's max_messages and "
          "max_bytes do the same for its queue (default: 0, no bound but the disk's)")
    flag(parser, "memory-max", type=_bytes_value(MIN_MEMORY_MAX), default=DEFAULT_MEMORY_MAX, metavar="BYTES",
          help="disk storage: memory queued messages may hold (a number of bytes, or with KiB, MiB or GiB); past "
          "it new messages are paged out to the log, 20 bytes of memory each, and read back as consumers take "
          "them (default: %(default)s, 64 MiB)")
    flag(parser, "shutdown-timeout", type=float_value(positive=False), default=10.0, metavar="SECONDS",
          help="on SIGTERM or SIGINT: seconds to wait for the answers to the messages consumers hold, with new "
          "messages and deliveries stopped, before closing (what is still unanswered goes back to its queue; "
          "a second signal stops waiting; 0: close at once) (default: %(default)s)")
    flag(parser, "lease", type=float_value(positive=False), default=DEFAULT_LEASE, metavar="SECONDS",
          help="seconds a delivery may stay unanswered; a consumer's running handler keeps extending it (teomq's "
          "client sends TOUCH), a hung or stopped consumer loses it and the message goes to another; per "
          "command a -schema's lease; 0: no lease (default: %(default)s)")
    flag(parser, "max-deliveries", type=int_at_least(0, 10000), default=DEFAULT_MAX_DELIVERIES, metavar="N",
          help="failed deliveries of a message (nacks, handler errors, crashes) before it goes to the "
          "dead-letter queue; per command a -schema's max_deliveries; 0: no limit (default: %(default)s)")
    flag(parser, "max-crashes", type=int_at_least(0, 10000), default=DEFAULT_MAX_CRASHES, metavar="N",
          help="of them, deliveries ended on the consumer's side (its connection died, its lease ran out) before "
          "the message is quarantined in the dead-letter queue; 0: no limit (default: %(default)s)")
    flag(parser, "retry-base", type=float_value(positive=True), default=DEFAULT_RETRY_BASE, metavar="SECONDS",
          help="backoff of a failed delivery the consumer gave no delay for: about base * 2^(n-1) seconds after "
          "its n-th failure, jittered, up to -retry-max (default: %(default)s)")
    flag(parser, "retry-max", type=float_value(positive=True), default=DEFAULT_RETRY_MAX, metavar="SECONDS",
          help="longest such backoff (default: %(default)s)")
    flag(parser, "dlq-max", type=int_at_least(1), default=DEFAULT_DLQ_MAX, metavar="N",
          help="most dead letters kept (in DIR/dlq with disk storage); past it the oldest go, counted and logged "
          "(default: %(default)s; see teomq dlq)")
    flag(parser, "max-payload", type=int_at_least(1, MAX_PAYLOAD_LIMIT), default=DEFAULT_MAX_PAYLOAD,
          metavar="BYTES", help="largest message or answer accepted, in bytes (default: %(default)s)")
    flag(parser, "queue-max", type=int_at_least(1), default=1_000_000, metavar="N",
          help="most messages the broker holds, queued or in flight; producers are held back from 3/4 of it "
          "and a SEND past it is refused with QUEUE_FULL (default: %(default)s)")
    flag(parser, "command", type=_command_spec, action="append", default=[], metavar="NAME[/PATTERN][:ROUTING]",
          help="run the command scheme with this command (repeatable): ROUTING fanout (every subscriber, "
          "the default) or queue (one subscriber, in runs); PATTERN such as {data}/{description} "
          "(e.g. -command num_players -command version/{data}/{description}:fanout)")
    flag(parser, "dispatch-run", type=int_at_least(1, 65535), default=16, metavar="N",
          help="most consecutive messages of one queue a consumer takes (fewer if its free credit is less) "
          "before the next consumer gets its run, 1 to 65535; 1 is a per-message round robin (default: %(default)s)")
    flag(parser, "backlog-max", type=int_at_least(1), default=10_000, metavar="N",
          help="command scheme: most fanout copies waiting for one subscriber; past it that slow consumer "
          "loses new copies instead of holding up the others (default: %(default)s)")
    flag(parser, "schema", metavar="FILE",
          help='run the command scheme with the commands of a JSON file: {"commands": [{"name", '
          '"description", "pattern", "routing", "max_messages", "max_bytes", "lease", "max_deliveries", '
          '"max_crashes"}, ...]} (max_messages, max_bytes: limits on what waits in its queue; the last three: '
          'its own -lease, -max-deliveries, -max-crashes; 0 for none or the broker\'s); combines with -command')
    flag(parser, "web", type=parse_listen, default=f"127.0.0.1:{DEFAULT_WEB_PORT}", metavar="HOST:PORT",
          help="web port: the teoproxy-compatible WebSocket gateway on /ws and the web consumer page; "
          "':PORT' means 127.0.0.1, port 0 any free port (default: %(default)s)")
    flag(parser, "web-origin", type=_web_origin, action="append", default=[], metavar="URL",
          help="let pages of this origin (http(s)://HOST[:PORT]) use the web port too, besides its own "
          "(127.0.0.1, localhost, [::1] and the -web host at its port); repeatable; '*' lets every page in")
    _bool_flag(parser, "noweb", "don't serve the web port (default: off)")
    _add_common(parser, "message received (logged on stderr, or to -log-file)")
    parser.set_defaults(func=_broker)


def _add_client_args(parser: argparse.ArgumentParser, role: str) -> None:
    flag(parser, "broker", required=True, metavar="BROKER",
          help="broker to use: <address> (looked up in the local address book), <address>@host:port, "
          "host:port or :port (required)")
    flag(parser, "name", default=None, help=f"name of this {role} in output lines (default: {role}-<pid>)")


def _add_consumer_args(parser: argparse.ArgumentParser) -> None:
    _add_client_args(parser, "consumer")
    flag(parser, "prefetch", type=int_at_least(1), default=64, metavar="N",
          help="most unanswered messages the broker hands this consumer at once (default: %(default)s)")
    flag(parser, "work-ms", type=float_value(positive=False), default=0.0, metavar="MS",
          help="simulated processing time per message in milliseconds, an async sleep (default: %(default)s)")
    flag(parser, "reconnect", nargs="?", const=True, default=True, type=_go_bool, metavar="true|false",
          help="if the broker connection fails or is lost, connect again (after about 0.1 s, doubling up to 2 s, "
          "jittered) instead of exiting 1; -reconnect=false exits (default: on)")
    flag(parser, "subscribe", type=_command_names, action="append", default=[], metavar="NAME[,NAME...]",
          help="command scheme: subscribe to these commands of the broker's schema (repeatable)")
    _bool_flag(parser, "api", "subscribe through the broker's API command 130 (msg subscribe/NAME) and say "
               "hello with API command 129, as the original's consumer_api -api does (default: off)")
    _bool_flag(parser, "control", "command scheme: read 'subscribe NAME' and 'unsubscribe NAME' lines on stdin "
               "and change subscriptions while running (default: off)")
    _add_common(parser, "message received (on stdout)")
    parser.set_defaults(func=_consumer)


def _add_producer_args(parser: argparse.ArgumentParser) -> None:
    _add_client_args(parser, "producer")
    flag(parser, "delay", type=int_at_least(0), default=1_000_000, metavar="MICROSECONDS",
          help="pause between sends in microseconds; 0 = as fast as -window allows (default: %(default)s)")
    flag(parser, "count", type=int_at_least(0), default=0, metavar="N",
          help="messages to send, then wait for their answers and exit; 0 = until stopped (default: %(default)s)")
    flag(parser, "window", type=int_at_least(1), default=64, metavar="N",
          help="most requests waiting for an answer at once (default: %(default)s)")
    flag(parser, "timeout", type=float_value(positive=True), default=5.0, metavar="SECONDS",
          help="how long to wait for each answer (default: %(default)s)")
    flag(parser, "reconnect", nargs="?", const=True, default=True, type=_go_bool, metavar="true|false",
          help="if the broker connection is lost, connect again (after about 0.1 s, doubling up to 2 s, jittered) "
          "and send again the requests it was waiting for; -reconnect=false exits 1 (default: on)")
    flag(parser, "message", type=_message_format, default=None, metavar="FORMAT",
          help="message text; {n} becomes the message number 1, 2, ..., {rand} a random 1..100 "
          f"(default: {DEFAULT_MESSAGE!r}, or NAME/{{rand}} with -command)")
    flag(parser, "expect", type=int_at_least(0), default=0, metavar="N",
          help="fanout commands: stop collecting a message's answers once N have come; 0 = collect until "
          "-timeout (default: %(default)s)")
    flag(parser, "command", type=_command_name, default=None, metavar="NAME",
          help="command scheme: send command NAME with a random value, NAME/<1..100>, as the original's "
          "users_servers producer (default: off)")
    _add_common(parser, "answer received (on stdout)")
    parser.set_defaults(func=_producer)


def build_broker_parser(prog: str = "teomq-broker") -> argparse.ArgumentParser:
    """The parser of ``teomq-broker`` (the same options as ``teomq broker``)."""
    parser = _Parser(prog=prog, description="Run a teomq message broker.", allow_abbrev=False)
    _add_broker_args(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``teomq`` with its ``broker``, ``consumer``, ``producer``, ``bench`` and ``dlq`` subcommands."""
    parser = _Parser(
        prog="teomq",
        description="teomq message queue: a broker and example consumer and producer.",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    _add_broker_args(
        sub.add_parser("broker", help="run a broker", description="Run a teomq message broker.", allow_abbrev=False)
    )
    _add_consumer_args(
        sub.add_parser(
            "consumer",
            help="run the example consumer (answers 'Answer to <message>')",
            description="Run the example consumer: it answers each message with 'Answer to <message>'.",
            allow_abbrev=False,
        )
    )
    _add_producer_args(
        sub.add_parser(
            "producer",
            help="run the example producer (sends 'Hello wold #<n>!')",
            description="Run the example producer: it sends numbered messages and logs the answers.",
            allow_abbrev=False,
        )
    )
    from teomq.benchmark import command as bench  # argparse only; the harness is imported on use

    bench.add_arguments(
        sub.add_parser("bench", help="benchmark a broker end to end (rpc, publish, drain)",
                       description=bench.DESCRIPTION, allow_abbrev=False)
    )
    from teomq import dlq_cli

    dlq_cli.add_arguments(
        sub.add_parser("dlq", help="the broker's dead-letter queue: list, show, replay, purge",
                       description=dlq_cli.DESCRIPTION, allow_abbrev=False)
    )
    # listed here for --help; main() hands everything after "example" to teomq.example_cli
    sub.add_parser("example", add_help=False,
                   help="run one of the original's example programs: teomq example NAME ROLE [flags] "
                   "(teomq example --help lists them)")
    return parser


# -- running -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``teomq``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["example"]:  # the example's own flags follow: its parser, not ours, reads them
        from teomq.example_cli import main as example_main

        return example_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.subcommand == "bench":  # runs its own processes and loops: no logging set-up, no loop here
        from teomq.benchmark.command import run as run_bench

        return run_bench(args)
    return _execute(args)


def broker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``teomq-broker``."""
    return _execute(build_broker_parser().parse_args(argv))


def _execute(args: argparse.Namespace) -> int:
    level = getattr(logging, args.log_level)
    if args.log_file is not None:
        try:
            logging.basicConfig(level=level, format=LOG_FORMAT, filename=args.log_file, encoding="utf-8")
        except OSError as e:
            print(f"teomq: cannot open -log-file {args.log_file}: {e.strerror}", file=sys.stderr)
            return 2
    else:
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger().setLevel(level)
    if args.loop == "uvloop" and not _uvloop_available():
        print("teomq: -loop=uvloop given but uvloop is not installed", file=sys.stderr)
        return 2
    try:
        return run_on_loop(args.func(args), args.loop)
    except KeyboardInterrupt:  # a signal before our handlers were installed
        return 130


def _stderr_fd() -> int:
    """The descriptor of stderr, for the core's per-message log lines (2 if stderr has none)."""
    try:
        sys.stderr.flush()
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def _emit(line: str) -> None:
    """Write one line to stdout and flush it; a closed stdout stops output, not the program."""
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def _fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").replace("\r", "\\r").replace("\n", "\\n")


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Stopper:
    """SIGINT/SIGTERM handling: the first signal sets ``stop``, any further one sets ``force``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> _Stopper:
        self._loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread / Windows
                self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        again = self.stop.is_set()
        log.info("got %s%s, stopping", signal.Signals(sig).name, " again" if again else "")
        (self.force if again else self.stop).set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopped first; True if stopped."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)
        return self.stop.is_set()


async def _first(*aws: Any) -> set[asyncio.Future[Any]]:
    """Wait until one of ``aws`` finishes; cancel the rest; return the finished ones."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return done


def _start_stats(args: argparse.Namespace, sample: Callable[[], dict[str, int]], fields: Sequence[str],
                 rate_key: str, more: Callable[[], Sequence[str]] | None = None) -> asyncio.Task[None] | None:
    """With -stat, a task printing a 'stat:' line every -stat-interval seconds."""
    if not args.stat:
        return None
    return asyncio.ensure_future(print_stats(args.stat_interval, sample, fields, rate_key, _emit, more))


async def _stop_task(task: asyncio.Task[Any] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _broker(args: argparse.Namespace) -> int:
    from teomq.broker import Broker

    host, port = args.listen
    schema: CommandSchema | None = None
    if args.schema or args.command:
        try:
            schema = CommandSchema.load(args.schema) if args.schema else CommandSchema()
            for command in args.command:
                schema.add(command)
        except (OSError, ValueError) as e:
            _fail(f"teomq broker: bad command schema: {e}")
            return 1
        log.info("command scheme, %d command%s: %s", len(schema), "" if len(schema) == 1 else "s", ", ".join(
            f"{c.name} ({c.routing}{', ' + c.pattern if c.pattern else ''})" for c in schema))
    broker = Broker(host, port, data_dir=args.data_dir, max_payload=args.max_payload, queue_max=args.queue_max,
                    log_messages=not args.nomsg, commands=schema, backlog_max=args.backlog_max,
                    dispatch_run=args.dispatch_run, storage=args.storage, fsync=args.fsync,
                    segment_size=args.segment_size, memory_max=args.memory_max,
                    queue_max_bytes=args.queue_max_bytes, lease=args.lease,
                    max_deliveries=args.max_deliveries, max_crashes=args.max_crashes,
                    retry_base=args.retry_base, retry_max=args.retry_max, dlq_max=args.dlq_max,
                    message_log=args.log_file if args.log_file is not None else _stderr_fd())
    try:
        await broker.start()
    except (OSError, TeomqError, ValueError) as e:
        if isinstance(e, OSError):
            where = f"use data dir {e.filename}" if e.filename else f"listen on {_endpoint(host, port)}"
            _fail(f"teomq broker: cannot {where}: {e.strerror or e}")
        else:
            _fail(f"teomq broker: cannot start: {e}")
        await asyncio.gather(broker.close(), return_exceptions=True)
        return 1
    web = None
    if not args.noweb:
        from teomq.web import WebGateway

        web = WebGateway(broker, *args.web, origins=args.web_origin)
        try:
            await web.start()
        except OSError as e:
            _fail(f"teomq broker: cannot serve the web port on {_endpoint(*args.web)}: {e.strerror or e} "
                  "(choose another with -web HOST:PORT, or turn it off with -noweb)")
            await broker.close()
            return 1
    with _Stopper() as stopper:
        _emit(f"Connected to Teonet, this app address: {broker.address}")
        _emit(f"teomq broker listening on {_endpoint(broker.host, broker.port)}")
        if web is not None:
            _emit(f"teomq web consumer on http://{_endpoint(web.host, web.port)}/ (WebSocket /ws)")
        bound = [("-listen", broker.host, broker.port)]
        if web is not None:
            bound.append(("-web", web.host, web.port))
        for what, bound_host, bound_port in bound:
            if not _is_loopback(bound_host):
                log.warning("%s %s is reachable from other machines and there is no authentication yet: "
                            "anyone who reaches it can read and send this broker's messages",
                            what, _endpoint(bound_host, bound_port))

        def more_lines() -> list[str]:
            lines = command_lines(broker.command_stats()) if schema is not None else []
            if web is not None:
                lines.append(web_line(web.stats()))
            return lines

        stats = _start_stats(args, broker.stats, BROKER_STAT_FIELDS, "in", more_lines)
        serve = asyncio.ensure_future(broker.serve_forever())
        try:
            await _first(serve, stopper.stop.wait())
        finally:
            await _stop_task(stats)
            if stopper.stop.is_set() and args.shutdown_timeout > 0:
                # drain first (the web gateway's pages are clients like any other), until the
                # -shutdown-timeout or a second signal
                drain = asyncio.ensure_future(broker.drain(args.shutdown_timeout))
                await _first(asyncio.shield(drain), stopper.force.wait())
                if not drain.done():
                    log.info("stopping now: a second signal")
                    drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            if web is not None:
                await web.close()
            await broker.close()
            await _stop_task(serve)
    if not stopper.stop.is_set() and serve.done() and not serve.cancelled() and serve.exception():
        _fail(f"teomq broker: stopped on error: {serve.exception()!r}")
        return 1
    return 0


async def _consumer(args: argparse.Namespace) -> int:
    from teomq.client import Consumer

    name = args.name or f"consumer-{os.getpid()}"
    counters = {"received": 0, "answered": 0}
    work = args.work_ms / 1000.0

    def received(data: bytes) -> None:
        counters["received"] += 1
        if not args.nomsg:
            _emit(f"{name} got message: {_text(data)}")

    def handle(data: bytes) -> bytes:
        received(data)
        counters["answered"] += 1
        return b"Answer to " + data

    async def handle_slowly(data: bytes) -> bytes:
        received(data)
        await asyncio.sleep(work)
        counters["answered"] += 1
        return b"Answer to " + data

    handler = handle_slowly if work > 0 else handle
    commands = [n for group in args.subscribe for n in group]

    async def subscribe(consumer: Consumer) -> None:
        """-subscribe and -api: raises BrokerError when the broker refuses."""
        if commands and consumer.scheme != "command":
            raise TeomqError(f"broker {consumer.address} runs the basic scheme (no command schema): "
                             "nothing to subscribe to")
        for command in commands:
            if args.api:  # the original's consumer_api: API command 130 with subscribe/NAME
                await consumer.call_api("msg", f"subscribe/{command}")
            else:
                await consumer.subscribe(command)
        if commands:
            log.info("%s subscribed to %s", name, ", ".join(commands))
        if args.api:
            _emit(f"{name} hello answer: {_text(await consumer.hello(name))}")

    async def control(consumer: Consumer, lines: asyncio.StreamReader) -> None:
        """-control: subscription changes read from stdin, one per line, each confirmed on stdout."""
        while line := (await lines.readline()).decode("utf-8", "replace"):
            verb, _, command = line.strip().partition(" ")
            command = command.strip()
            if not verb:
                continue
            try:
                if verb not in ("subscribe", "unsubscribe") or not command:
                    raise ValueError(f"expected 'subscribe NAME' or 'unsubscribe NAME', not {line.strip()!r}")
                if consumer.scheme != "command":
                    raise TeomqError("the broker runs the basic scheme: nothing to subscribe to")
                if args.api:
                    await consumer.call_api("msg", f"{verb}/{command}")
                elif verb == "subscribe":
                    await consumer.subscribe(command)
                else:
                    await consumer.unsubscribe(command)
                if verb == "subscribe" and command not in commands:
                    commands.append(command)  # made again after a -reconnect
                elif verb == "unsubscribe" and command in commands:
                    commands.remove(command)
                _emit(f"{name} {verb}d {'to' if verb == 'subscribe' else 'from'} {command}")
            except (TeomqError, ValueError) as e:
                _emit(f"{name} control error: {e}")

    async def stdin_reader() -> asyncio.StreamReader:
        reader = asyncio.StreamReader()
        await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return reader

    lines = await stdin_reader() if args.control else None
    with _Stopper() as stopper:
        stats = _start_stats(args, lambda: counters, CONSUMER_STAT_FIELDS, "received")
        last_error = ""  # with -reconnect, a failure to connect that repeats is reported once
        backoff = Backoff()
        again: set[asyncio.Task[None]] = set()

        def resubscribed(task: asyncio.Task[None]) -> None:
            again.discard(task)
            if not task.cancelled() and task.exception() is not None:
                _fail(f"teomq consumer {name}: subscribing again failed: {task.exception()}")

        def connection(connected: bool, _reason: str) -> None:
            # (the client logs the loss and the reconnect, one line each; it subscribes again
            # itself: -api's subscriptions go through the API, made again here)
            if connected and args.api:
                task = asyncio.create_task(subscribe(consumer))
                again.add(task)
                task.add_done_callback(resubscribed)

        consumer = Consumer(args.broker, handler, name=name, prefetch=args.prefetch, reconnect=args.reconnect,
                            on_connection=connection)
        try:
            while True:    # the first connection (the client makes the next ones itself)
                if stopper.stop.is_set():
                    return 0
                try:
                    await consumer.start()
                    break
                except (OSError, TeomqError) as e:
                    await asyncio.gather(consumer.close(), return_exceptions=True)
                    error = f"teomq consumer {name}: cannot connect to broker {args.broker}: {e}"
                    if error != last_error:
                        _fail(error)
                    last_error = error
                    if not args.reconnect or isinstance(e, (AddressError, BrokerError)):
                        return 1
                    await stopper.sleep(backoff.next())
            log.info("%s connected to broker %s", name, consumer.address)
            try:
                await subscribe(consumer)
            except (TeomqError, ValueError) as e:
                _fail(f"teomq consumer {name}: {e}")
                return 1
            controller = asyncio.ensure_future(control(consumer, lines)) if lines is not None else None
            done = await _first(consumer.wait_closed(), stopper.stop.wait())
            await _stop_task(controller)
            if stopper.stop.is_set():
                return 0
            why = next((t.exception() for t in done if t.exception() is not None), None)
            _fail(f"teomq consumer {name}: {why or 'connection to broker lost'}")
            return 1
        finally:
            for task in list(again):
                await _stop_task(task)
            await asyncio.gather(consumer.close(), return_exceptions=True)
            await _stop_task(stats)


async def _producer(args: argparse.Namespace) -> int:
    from teomq.client import Producer
    from teomq.errors import Reconnecting

    name = args.name or f"producer-{os.getpid()}"
    counters = {"sent": 0, "answered": 0, "errors": 0, "inflight": 0, "resent": 0}
    pending: dict[int, bytes] = {}  # messages sent and not yet answered or failed, by number
    again: collections.deque[int] = collections.deque()  # in flight when the connection broke: sent again
    wake = asyncio.Event()   # a message to send again
    window = asyncio.Semaphore(args.window)
    idle = asyncio.Event()
    idle.set()
    lost = asyncio.Event()
    closing = False  # set once we close the producer ourselves

    message = producer_message(args)
    fanout: set[str] = set()  # fanout commands of the broker's schema: every answer is collected

    def got(answer: bytes) -> None:
        counters["answered"] += 1
        if not args.nomsg:
            _emit(f"{name} got answer: {_text(answer)}")

    def finish(n: int, answer: bytes | None, err: BaseException | None, counted: bool = False) -> None:
        if n not in pending:
            return  # already counted (gave up waiting for it)
        del pending[n]
        counters["inflight"] -= 1
        window.release()
        if err is None:
            if not counted:
                got(answer or b"")
        else:
            counters["errors"] += 1
            _emit(f"{name} error for message #{n}: {err}")
            if isinstance(err, ConnectionError) and not closing:
                lost.set()
        if not pending:
            idle.set()

    def result(n: int, answer: bytes | None, err: BaseException | None) -> None:
        if isinstance(err, ConnectionLost) and producer.reconnecting and not closing and n in pending:
            again.append(n)   # in flight when the connection broke: sent again once it is back
            wake.set()
            return
        finish(n, answer, err)

    def callback_for(n: int) -> Callable[[int, bytes | None, BaseException | None], None]:
        return lambda _id, answer, err: result(n, answer, err)


    def collected(n: int, task: asyncio.Future[list[bytes]]) -> None:
        err = ConnectionLost("producer stopped") if task.cancelled() else task.exception()
        if err is None and not task.result():
            log.warning("%s: no answer to message #%d within %g s (has the command a subscriber?)",
                        name, n, args.timeout)
        finish(n, None, err, counted=True)

    def send_one(n: int, data: bytes) -> None:
        if data.split(b"/", 1)[0].decode("utf-8", "replace") in fanout:
            task = asyncio.ensure_future(producer.collect(data, timeout=args.timeout, expect=args.expect or None,
                                                          on_answer=got))
            task.add_done_callback(lambda t: collected(n, t))
        else:
            producer.send(data, callback_for(n), timeout=args.timeout)

    async def send_all() -> None:
        delay = args.delay / 1e6
        n = 0
        while not lost.is_set():
            if again:
                k = again.popleft()
                counters["resent"] += 1
            elif args.count == 0 or n < args.count:
                if n and delay:
                    await asyncio.sleep(delay)
                await window.acquire()
                n += 1
                k = n
                counters["sent"] += 1
                counters["inflight"] += 1
                pending[k] = message.format(n=k, rand=random.randint(1, 100)).encode()
                idle.clear()
            elif pending:    # all sent: until answered, or one comes back to be sent again
                wake.clear()
                await _first(wake.wait(), idle.wait())
                continue
            else:
                break
            with contextlib.suppress(ConnectionLost):
                await producer.drain()  # at once unless the broker reads slower, or we reconnect
            if lost.is_set():
                break
            try:
                send_one(k, pending[k])
            except Reconnecting:
                again.appendleft(k)   # lost between drain() and now: after the reconnect
            except (OSError, TeomqError, ValueError) as e:
                finish(k, None, e)
                if not lost.is_set():
                    _fail(f"teomq producer {name}: send failed: {e}")
                break

    producer = Producer(args.broker, name=name, timeout=args.timeout, reconnect=args.reconnect)
    try:
        await producer.connect()
    except (OSError, TeomqError) as e:
        await asyncio.gather(producer.close(), return_exceptions=True)
        _fail(f"teomq producer {name}: cannot connect to broker {args.broker}: {e}")
        return 1
    fanout.update(c.name for c in producer.commands or () if c.routing == "fanout")
    with _Stopper() as stopper:
        stats = _start_stats(args, lambda: counters, PRODUCER_STAT_FIELDS, "answered")
        try:
            for task in await _first(send_all(), stopper.stop.wait()):
                task.result()  # a bug in send_all must not pass silently
            if pending:  # each is bounded by -timeout; a second signal stops waiting
                await _first(idle.wait(), stopper.force.wait(), asyncio.sleep(args.timeout + 5.0))
            closing = True
            await producer.close()
            for n in sorted(pending):
                finish(n, None, ConnectionLost("producer stopped before the answer arrived"))
        finally:
            await _stop_task(stats)
            await asyncio.gather(producer.close(), return_exceptions=True)
    if lost.is_set():
        _fail(f"teomq producer {name}: connection to broker {args.broker} lost")
    resent = f", sent again after a reconnect {counters['resent']}" if counters["resent"] else ""
    _emit(f"{name} done: sent {counters['sent']}, answered {counters['answered']}, errors {counters['errors']}{resent}")
    return 0 if counters["errors"] == 0 else 1
