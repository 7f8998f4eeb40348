#!/usr/bin/env python3
"""Command-mode routing end to end: does routing a command cost the broker the same with 1
subscribed consumer as with 1,000?

Scenarios (``M`` = ``--many``, default 1,000; every broker has the same schema of M + 1
commands: ``work`` (queue), ``news`` (fanout) and ``c0`` .. ``c<M-2>`` (queue)):

    queue-1            1 consumer subscribed to work
    queue-1+<M-1>idle  the same, plus M - 1 consumers each subscribed to its own c<i>, which no
                       message names: M subscribed consumers, one takes work (the per-command
                       subscriber index says routing should not change)
    queue-<M>          M consumers all subscribed to work (round robin over M)
    fanout-1           1 consumer subscribed to news
    fanout-<M>         M consumers subscribed to news: each message is M deliveries

Each measurement is one run of the package harness (teomq/benchmark/) with a fresh broker
started through the CLI by tests/procs.py (``python -m teomq broker -listen :0 -data-dir <tmp>
-nomsg -schema <tmp>/schema.json -log-level WARNING -loop L``): every consumer in one process
(one event loop), every producer in another, the broker in a third. Producers keep W requests
in flight each (default 4 x 32) with ``work/xxx...`` or ``news/xxx...`` (``--size`` bytes): queue commands
through ``Producer.send(data, callback)``, fanout commands through a task per message awaiting
``Producer.collect(data, expect=<subscribers>)`` (a round trip = every answer in). Consumers
(``Consumer(url, handler)`` + ``subscribe(NAME)``, prefetch 64) answer with their index. Before
the window, a probe checks that every consumer is connected and subscribed: each subscriber of
the measured command answers (round robin or fanout) and each idle consumer answers its c<i>.
The window is fixed (``--warmup`` + ``--duration``); the broker's CPU comes from /proc/<pid>/stat
at its edges, the clients' from getrusage. Scenarios alternate (the order rotates and reverses
from one repetition to the next); each figure is the median of ``--repeat`` runs.

    python bench/command_routing.py                         # 5 scenarios x 3 runs, 2 s + 5 s each: ~3 min
    python bench/command_routing.py --repeat 1 --many 100 --duration 2 --warmup 1
    python bench/command_routing.py --scenarios queue-1,queue-1000 --json out.json --md out.md

Prints a Markdown report (stdout) with the command line used; ``--json`` keeps every run's
full harness document. RLIMIT_NOFILE's soft limit is raised to the hard one first; the broker
and the client processes inherit it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import signal
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import teomq
from teomq.benchmark.driver import ConsumerSide, Done, Handler, ProducerSide, Server
from teomq.benchmark.harness import BenchError, GroupProc, Harness
from teomq.benchmark.loader import resolve
from teomq.benchmark.report import build, machine_info
from teomq.benchmark.teomq_driver import TeomqDriver, _TeomqConsumer, _TeomqProducer
from teomq.benchmark.workers import Config
from teomq.errors import RequestTimeout

ROOT = Path(__file__).resolve().parent.parent
QUEUE, FANOUT = "work", "news"
#: queue commands go to consumers in runs of up to this many (the broker's -dispatch-run default)
DISPATCH_RUN = 16
PROBE_ROUNDS = 5  # rounds of DISPATCH_RUN x `subscribers` requests until every subscriber answered


@dataclass(frozen=True)
class Scenario:
    name: str
    command: str  # QUEUE or FANOUT
    subscribers: int  # consumers subscribed to the command
    idle: int = 0  # more consumers, each subscribed to its own c<i>

    @property
    def fanout(self) -> bool:
        return self.command == FANOUT

    @property
    def consumers(self) -> int:
        return self.subscribers + self.idle


def scenarios(many: int) -> list[Scenario]:
    return [Scenario("queue-1", QUEUE, 1), Scenario(f"queue-1+{many - 1}idle", QUEUE, 1, many - 1),
            Scenario(f"queue-{many}", QUEUE, many), Scenario("fanout-1", FANOUT, 1),
            Scenario(f"fanout-{many}", FANOUT, many)]


def schema_doc(idle_commands: int) -> dict[str, Any]:
    return {"commands": [{"name": QUEUE, "routing": "queue"}, {"name": FANOUT, "routing": "fanout"},
                         *({"name": f"c{i}", "routing": "queue"} for i in range(idle_commands))]}


def command_payload(command: str, size: int) -> bytes:
    return f"{command}/".encode().ljust(size, b"x")


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the driver and the harness (also imported by the client processes) ----------------------


class CommandDriver(TeomqDriver):
    """teomq in command mode. Options: command, subscribers, idle, idle_commands (schema), size,
    prefetch, timeout."""

    description = ("teomq command mode: Consumer(url, handler) + subscribe(NAME), answering its index; "
                   "Producer.send() of NAME/xxx.. (queue), a task per Producer.collect(expect=N) (fanout)")
    broker_proc: Any = None  # tests/procs.py CliProc: argv, stderr lines

    def _scenario(self) -> Scenario:
        return Scenario("", self._opt("command", QUEUE), int(self._opt("subscribers", "1")),
                        int(self._opt("idle", "0")))

    def start_server(self, workdir: str) -> Server:
        if str(ROOT / "tests") not in sys.path:
            sys.path.insert(0, str(ROOT / "tests"))
        from procs import ProcGroup  # tests/procs.py: starts the CLI, reads its 'listening on' line

        schema = Path(workdir) / "schema.json"
        schema.write_text(json.dumps(schema_doc(int(self._opt("idle_commands", "0")))))
        group = ProcGroup(Path(workdir))
        try:
            proc, _address, port = group.broker("-nomsg", "-schema", str(schema), "-log-level", "WARNING",
                                                loop=self.loop)
        except BaseException:
            group.cleanup()
            raise
        self.broker_proc = proc
        return Server(url=f"127.0.0.1:{port}", pid=proc.pid, stop=group.cleanup, version=teomq.__version__)

    async def consumer(self, url: str, index: int, workload: str, queue: str, handler: Handler) -> ConsumerSide:
        from teomq.client import Consumer

        sc = self._scenario()
        answer = str(index).encode()
        client = Consumer(url, lambda _data: answer, name=f"cmd-consumer-{index}",
                          prefetch=int(self._opt("prefetch", "64")), timeout=float(self._opt("timeout", "10")))
        await client.start()
        await client.subscribe(sc.command if index < sc.subscribers else f"c{index - sc.subscribers}")
        return _TeomqConsumer(client)

    async def producer(self, url: str, index: int, workload: str, queue: str) -> ProducerSide:
        from teomq.client import Producer

        sc = self._scenario()
        client = Producer(url, name=f"cmd-producer-{index}", timeout=float(self._opt("timeout", "10")))
        await client.connect()
        payload = command_payload(sc.command, int(self._opt("size", "100")))
        if index == 0:
            await probe(client, sc, payload)
        return _CommandProducer(client, payload, sc.subscribers if sc.fanout else 0)


class _CommandProducer(_TeomqProducer):
    """The teomq driver's rpc producer, sending one command string; fanout (expect > 0): a task
    per message awaiting collect(expect=N), an error when fewer than N answers came in time."""

    def __init__(self, client: Any, payload: bytes, expect: int) -> None:
        super().__init__(client, "request" if expect else "send")
        self._payload, self._expect = payload, expect

    def request(self, payload: bytes, done: Done) -> None:
        super().request(self._payload, done)

    async def _request(self, payload: bytes, done: Done) -> None:
        try:
            answers = await self._client.collect(self._payload, expect=self._expect)
        except Exception as exc:
            done(exc)
            return
        done(None if len(answers) >= self._expect else
             RequestTimeout(f"{len(answers)} of {self._expect} fanout answers in time"))


async def probe(client: Any, sc: Scenario, payload: bytes) -> None:
    """Every consumer is connected and subscribed (each answers with its index), or raise."""
    want = {str(i).encode() for i in range(sc.subscribers)}
    seen: set[bytes] = set()
    if sc.fanout:
        seen.update(await client.collect(payload, expect=sc.subscribers))
    else:
        for _ in range(PROBE_ROUNDS):
            seen.update(await asyncio.gather(*(client.request(payload)
                                               for _ in range(DISPATCH_RUN * sc.subscribers))))
            if seen >= want:
                break
    idle = await asyncio.gather(*(client.request(f"c{i}/probe".encode()) for i in range(sc.idle)))
    wrong = [i for i, a in enumerate(idle) if a != str(sc.subscribers + i).encode()]
    if want - seen or wrong:
        raise RuntimeError(f"probe: {len(want - seen)} of {sc.subscribers} subscribers of {sc.command} and "
                           f"{len(wrong)} of {sc.idle} idle consumers did not answer")


class TwoProcessHarness(Harness):
    """The package harness with every consumer in one process and every producer in another
    (its ``--procs`` gives each client a process of its own; ``--no-procs`` one for all)."""

    def spawn(self, members_list: list[list[tuple[str, int]]]) -> list[GroupProc]:
        return super().spawn([[m for members in members_list for m in members]])


# -- runs -------------------------------------------------------------------------------------


def measure(sc: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    """One harness run of a scenario: its figures, the harness document, the broker's argv and stderr."""
    spec, paths = resolve(f"{Path(__file__).resolve()}:CommandDriver")
    options = {"command": sc.command, "subscribers": str(sc.subscribers), "idle": str(sc.idle),
               "idle_commands": str(args.many - 1), "size": str(args.size), "prefetch": str(args.prefetch),
               "timeout": str(args.request_timeout)}
    cfg = Config(workload="rpc", producers=args.producers, consumers=sc.consumers, inflight=args.inflight,
                 size=args.size, duration=args.duration, count=0, warmup=args.warmup, procs=True, loop=args.loop,
                 driver=spec, options=options, sys_path=tuple(paths))
    harness = TwoProcessHarness(cfg)
    try:
        raw = harness.run()
        doc = build(cfg, raw)
    finally:
        harness.close()
    fan = sc.subscribers if sc.fanout else 1
    subs = [w["in_window"] for g in raw["groups"] for w in g["workers"]
            if w["role"] == "consumer" and w["index"] < sc.subscribers]
    b, lat = doc["broker"], doc["latency_us"]
    us = b["cpu_us_per_message"]
    figures = {
        "msgs_per_s": doc["rate_per_s"], "deliveries_per_s": doc["rate_per_s"] * fan,
        "p50_us": lat["p50"], "p99_us": lat["p99"],
        "broker_us_per_msg": us, "broker_us_per_delivery": us / fan if us is not None else None,
        "broker_cpu_pct": b["cpu_percent_of_core"], "producers_cpu_pct": doc["producers"]["cpu_percent_of_core"],
        "consumers_cpu_pct": doc["consumers"]["cpu_percent_of_core"], "broker_rss_mib": (b["rss_kib"] or 0) / 1024,
        "broker_reads_per_msg": b["reads_per_message"], "errors": doc["errors"],
        "subscriber_min": min(subs), "subscriber_max": max(subs),
    }
    broker = harness.driver.broker_proc
    return {"scenario": sc.name, "figures": figures, "doc": doc, "broker_argv": broker.argv,
            "broker_stderr": broker.err_lines[-20:]}


def order(items: list[Scenario], rep: int) -> list[Scenario]:
    """Repetition ``rep``'s order: rotated by rep, reversed on odd reps."""
    k = rep % len(items)
    rotated = items[k:] + items[:k]
    return rotated[::-1] if rep % 2 else rotated


def median(values: list[Any]) -> Any:
    nums = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(nums) if nums else None


# -- report ------------------------------------------------------------------------------------


def _n(v: Any, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    head = [
        f"# teomq command routing, {result['date'][:10]}", "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}, "
        f"loop {c['loop']} {m['loop_version']}; teomq {m['teomq_commit']}. Load average at start: "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"]) + ".", "",
        f"Command: `{result['command']}`", "",
        f"Broker (one per run): `{result['broker_command']}`; schema: {c['many'] + 1:,} commands, `work` (queue), "
        f"`news` (fanout), `c0`..`c{c['many'] - 2}` (queue).", "",
        f"Clients: {c['producers']} producers x {c['inflight']} in flight in one process, {c['size']} B payloads "
        f"`work/xxx...` or `news/xxx...`; the consumers (prefetch {c['prefetch']}, answer = their index, a few bytes) in another. "
        f"Each figure: median of {c['repeat']} run(s), window {c['duration']:g} s after {c['warmup']:g} s warmup; "
        "scenarios alternate. Clients and broker share the machine's cores.", "",
        "| scenario | consumers: subscribed / connected | msgs/s | deliveries/s | p50 µs | p99 µs | "
        "broker µs/msg | broker µs/delivery | CPU % of a core: broker / producers / consumers | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows, per_run = [], []
    for s in result["scenarios"]:
        f = s["median"]
        rows.append(f"| {s['name']} | {s['subscribers']:,} / {s['consumers']:,} | {_n(f['msgs_per_s'])} | "
                    f"{_n(f['deliveries_per_s'])} | {_n(f['p50_us'])} | {_n(f['p99_us'])} | "
                    f"{_n(f['broker_us_per_msg'], '.2f')} | {_n(f['broker_us_per_delivery'], '.2f')} | "
                    f"{_n(f['broker_cpu_pct'])} / {_n(f['producers_cpu_pct'])} / {_n(f['consumers_cpu_pct'])} | "
                    f"{_n(f['errors'])} |")
        runs = [r["figures"] for r in s["runs"]]
        per_run.append(f"| {s['name']} | " + "; ".join(_n(r["msgs_per_s"]) for r in runs) + " | "
                       + "; ".join(_n(r["broker_us_per_msg"], ".2f") for r in runs) + " | "
                       + "; ".join(_n(r["broker_reads_per_msg"], ".3f") for r in runs) + " | "
                       + "; ".join(_n(r["broker_rss_mib"], ".0f") for r in runs) + " | "
                       + "; ".join(f"{r['subscriber_min']:,}..{r['subscriber_max']:,}" for r in runs) + " |")
    base = {s["name"]: s["median"] for s in result["scenarios"]}
    ratios = []
    for s in result["scenarios"]:
        ref_name = "fanout-1" if s["command"] == FANOUT else "queue-1"
        ref, mine = base.get(ref_name), s["median"]["broker_us_per_delivery"]
        if s["name"] != ref_name and ref and ref["broker_us_per_delivery"] and mine is not None:
            ratios.append(f"{s['name']} x{mine / ref['broker_us_per_delivery']:.2f} of {ref_name}")
    tail = ["", "Broker CPU per delivery against the one-consumer case: " + ("; ".join(ratios) or "n/a") + ".",
            "", "Every run (in the order of the repetitions):", "",
            "| scenario | msgs/s | broker µs/msg | broker read() calls/msg | broker RSS MiB | "
            "messages per subscribed consumer in the window (min..max) |",
            "|---|---|---|---|---|---|", *per_run]
    warned = {s["name"]: n for s in result["scenarios"] if (n := sum(len(r["broker_stderr"]) for r in s["runs"]))}
    tail += ["", "Broker stderr (log level WARNING): " + (", ".join(f"{k}: {v} lines" for k, v in warned.items())
                                                         if warned else "empty in every run") + "."]
    if result["failures"]:
        tail += ["", "Failed runs:", "", *(f"- {k}: {v}" for k, v in result["failures"].items())]
    return "\n".join(head + rows + tail) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/command_routing.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--many", type=int, default=1000, help="consumers of the many-consumer scenarios (default 1000)")
    ap.add_argument("--scenarios", default="", help="comma-separated subset of the scenario names (default: all)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each scenario; figures are medians (default 3)")
    ap.add_argument("--duration", type=float, default=5.0, help="measured window, s (default 5)")
    ap.add_argument("--warmup", type=float, default=2.0, help="load before the window, s (default 2)")
    ap.add_argument("--producers", type=int, default=4, help="producers, all in one process (default 4)")
    ap.add_argument("--inflight", type=int, default=32, help="requests in flight per producer (default 32)")
    ap.add_argument("--size", type=int, default=100, help="payload bytes, 'work/' or 'news/' + padding (default 100)")
    ap.add_argument("--prefetch", type=int, default=64, help="consumer credit (default 64)")
    ap.add_argument("--request-timeout", type=float, default=10.0, help="request / collect timeout, s (default 10)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop of every process")
    ap.add_argument("--json", default="", metavar="FILE", help="write every figure and run document as JSON")
    ap.add_argument("--md", default="", metavar="FILE", help="also write the Markdown report to FILE")
    args = ap.parse_args(argv)
    if args.many < 2 or args.size < 6 or min(args.repeat, args.producers, args.inflight, args.prefetch) < 1:
        ap.error("--many must be at least 2, --size at least 6, the counts at least 1")
    return args


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from run_all import machine_info as box_info  # bench/run_all.py: machine, commit, load average

    everything = scenarios(args.many)
    chosen = [s for s in everything if not args.scenarios or s.name in args.scenarios.split(",")]
    if not chosen:
        print(f"no such scenario; choose from {', '.join(s.name for s in everything)}", file=sys.stderr)
        return 2
    command = " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else "bench/command_routing.py",
                        *(sys.argv[1:] if argv is None else argv)])
    print(f"$ python {command}", file=sys.stderr, flush=True)
    box = box_info()
    box["loop_version"] = machine_info(args.loop)["loop_version"]
    raise_nofile()
    signal.signal(signal.SIGTERM, _on_term)
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in chosen}
    failures: dict[str, str] = {}
    broker_argv: list[str] = []
    total, k = args.repeat * len(chosen), 0
    try:
        for rep in range(args.repeat):
            for sc in order(chosen, rep):
                k += 1
                try:
                    run = measure(sc, args)
                except BenchError as e:
                    failures[f"{sc.name} run {rep + 1}"] = str(e).splitlines()[0]
                    print(f"[{k}/{total}] {sc.name}: FAILED: {e}", file=sys.stderr, flush=True)
                    continue
                broker_argv = run.pop("broker_argv")
                runs[sc.name].append(run)
                f = run["figures"]
                print(f"[{k}/{total}] {sc.name}: {f['msgs_per_s']:,.0f} msgs/s, p50 {_n(f['p50_us'])} µs, broker "
                      f"{_n(f['broker_us_per_msg'], '.2f')} µs/msg, errors {f['errors']}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: reporting the runs so far", file=sys.stderr)
    tmp = str(Path(broker_argv[broker_argv.index("-data-dir") + 1]).parent) if broker_argv else ""
    result = {
        "schema": "teomq-bench-commands/1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": f"python {command}",
        "broker_command": " ".join(["python", *broker_argv[1:]]).replace(tmp, "<tmp>") if tmp else "",
        "machine": box, "config": {k: v for k, v in vars(args).items() if k not in ("json", "md")},
        "scenarios": [{"name": s.name, "command": s.command, "subscribers": s.subscribers,
                       "consumers": s.consumers,
                       "median": {key: median([r["figures"][key] for r in runs[s.name]])
                                  for key in runs[s.name][0]["figures"]},
                       "runs": runs[s.name]} for s in chosen if runs[s.name]],
        "failures": failures,
    }
    report = markdown(result)
    print(report, end="")
    if args.md:
        Path(args.md).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
