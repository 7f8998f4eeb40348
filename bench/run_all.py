#!/usr/bin/env python3
"""teomq side by side with NATS, Redis and RabbitMQ: one command, same harness, same workloads.

    python bench/run_all.py                 # install the peers, run everything (about 15 minutes)
    python bench/run_all.py --quick         # smoke run: 2 s windows, 1 s warmup, drain 20,000
    python bench/run_all.py --no-install --systems teomq,nats --workloads rpc-4x4x32-100B --repeat 3

For every workload, every system runs through the package harness,
``python -m teomq bench <workload> --driver <spec> ... --json <tmp> --no-progress``, with the
same producers, consumers, in-flight window, payload size and duration. The order of the
systems rotates from one workload to the next (and from one repetition to the next), so that
the noise of this shared 2-core machine falls on all of them alike; with ``--repeat N`` each
figure is the median of N runs.

Writes ``bench/results/<date>.json`` (every run's full harness document, the machine and the
versions), ``bench/results/<date>.md`` (a table per workload, ratios teomq / best peer) and
``bench/results/<date>.png`` (bench/chart.py). The harness starts and stops each server; this
script stops each harness run it started (SIGINT, then SIGTERM, then SIGKILL), on a timeout,
an error or Ctrl-C, and the harness stops its server on the way out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")

SYSTEMS = {
    "teomq": "teomq",
    "nats": "peers.nats_driver:NatsDriver",
    "redis": "peers.redis_driver:RedisDriver",
    "rabbitmq": "peers.rabbitmq_driver:RabbitDriver",
}


@dataclass(frozen=True)
class Workload:
    key: str
    workload: str  # rpc | publish | drain
    producers: int
    consumers: int
    inflight: int
    size: int
    count: int = 0  # drain: messages; 0 = timed
    teomq_opts: tuple[str, ...] = ()  # teomq driver options (-o KEY=VALUE), e.g. its durable mode
    #: only with --workloads naming it (long: the durable peers take minutes for it)
    optional: bool = False

    def args(self, duration: float, warmup: float, count: int | None) -> list[str]:
        a = [self.workload, "--producers", str(self.producers), "--consumers", str(self.consumers),
             "--inflight", str(self.inflight), "--size", str(self.size)]
        if self.workload == "drain":
            return a + ["--count", str(count or self.count)]
        return a + ["--duration", f"{duration:g}", "--warmup", f"{warmup:g}"]

    def title(self) -> str:
        size = f"{self.size // 1024} KiB" if self.size >= 1024 else f"{self.size} B"
        if self.workload == "drain":
            return f"drain {self.count:,} x {size} ({self.producers} producers fill, {self.consumers} consumers drain)"
        if self.workload == "publish":
            return f"publish {self.producers}x{self.consumers}, batches of {self.inflight}, {size}"
        return f"rpc {self.producers}x{self.consumers}x{self.inflight}, {size}"


WORKLOADS = [
    Workload("rpc-4x4x32-100B", "rpc", 4, 4, 32, 100),
    Workload("rpc-1x1x1-100B", "rpc", 1, 1, 1, 100),
    Workload("rpc-4x4x32-1KiB", "rpc", 4, 4, 32, 1024),
    Workload("rpc-4x4x32-64KiB", "rpc", 4, 4, 32, 65536),
    Workload("publish-4x4-100B", "publish", 4, 4, 32, 100),
    Workload("drain-100k-100B", "drain", 4, 4, 32, 100, count=100_000),
    # every system durable, each producer with at most 1,024 unconfirmed enqueues (a batch of
    # 1,024, confirmed before the next; NATS: publish_async_max_pending 1,024, a sliding window)
    Workload("drain-1M-100B-durable", "drain", 4, 4, 1024, 100, count=1_000_000,
             teomq_opts=("storage=disk", "fsync=always", "confirm=1", "queue_max=4000000"), optional=True),
]


# -- running -------------------------------------------------------------------------------


def run_one(cmd: list[str], log_path: str, timeout: float) -> int:
    """Run one harness process; on timeout or Ctrl-C stop it politely, then firmly. Returns its code."""
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\nrun_all: timed out after {timeout:g} s, stopping it\n")
            _stop(proc)
            return -1
        except BaseException:  # Ctrl-C (the child got its own SIGINT from the terminal) or an error
            _stop(proc)
            raise


def _stop(proc: subprocess.Popen[Any]) -> None:
    # SIGINT and SIGTERM both make the harness stop its clients and its server
    for sig, wait in ((signal.SIGINT, 60.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
        except KeyboardInterrupt:  # a second Ctrl-C: go on to the next, firmer signal
            continue


def tail(path: str, n: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def machine_info() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    except (OSError, StopIteration):
        pass
    packages: dict[str, str | None] = {}
    for name in ("teomq", "uvloop", "nats-py", "redis", "hiredis", "aio-pika", "aiormq", "numpy", "matplotlib"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    commit = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return {"hostname": platform.node(), "cpus": os.cpu_count(), "cpu_model": cpu, "mem_gib": round(mem / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version(), "packages": packages,
            "teomq_commit": commit, "loadavg_at_start": os.getloadavg()}


def install(no_install: bool) -> float:
    if no_install:
        return 0.0
    t = time.monotonic()
    res = subprocess.run(["sh", os.path.join(BENCH, "peers", "install.sh")], cwd=ROOT,
                         env=dict(os.environ, PYTHON=sys.executable), check=False)
    if res.returncode != 0:
        raise SystemExit(f"run_all: bench/peers/install.sh failed with {res.returncode}")
    return time.monotonic() - t


# -- figures -------------------------------------------------------------------------------


def figures(doc: dict[str, Any]) -> dict[str, Any]:
    """The figures the table and the chart show, from one harness document."""
    lat = doc.get("latency_us") or {}
    broker = doc.get("broker") or {}
    clients = doc.get("clients") or {}
    out = {
        "rate": doc.get("rate_per_s"),
        "p50": lat.get("p50"), "p99": lat.get("p99"), "latency_kind": lat.get("kind"),
        "broker_cpu_us": broker.get("cpu_us_per_message"),
        "client_cpu_us": clients.get("cpu_us_per_message"),
        "rss_mib": (broker.get("peak_rss_kib") or 0) / 1024 or None,
        "errors": doc.get("errors"),
        "cpu_all": doc.get("cpu_percent_of_core_all"),
    }
    if doc.get("drain"):
        d = doc["drain"]
        out["fill_rate"] = d.get("fill_rate_per_s")
        out["rate"] = d.get("drain_rate_per_s", out["rate"])
        out["rss_mib"] = max(out["rss_mib"] or 0, (d.get("rss_kib_full") or 0) / 1024) or None
    if doc.get("publish"):
        out["published_rate"] = doc["publish"].get("published_per_s")
    return out


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r["figures"] for r in runs if r.get("figures")]
    if not ok:
        return {}
    out: dict[str, Any] = {}
    for k in ok[0]:
        vals = [f[k] for f in ok if isinstance(f.get(k), (int, float))]
        out[k] = statistics.median(vals) if vals else ok[0][k]
    out["runs"] = len(ok)
    return out


def _num(v: Any, fmt: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# teomq vs peers, {result['date']}{' (quick run)' if result['quick'] else ''}",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['mem_gib']} GiB, Linux {m['kernel']}, Python {m['python']}, "
        f"uvloop {m['packages'].get('uvloop')}; teomq {m['teomq_commit']}. Load average at start: "
        + ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"]) + ".",
        "",
        (f"Each figure: median of {result['repeat']} run(s) through `python -m teomq bench` "
        f"(window {result['duration']:g} s after {result['warmup']:g} s warmup; drain counted). Systems alternate "
        "per workload. Clients and servers share the 2 cores: every figure is a ceiling of this box."),
        "",
        "| system | server | client library | durability |",
        "|---|---|---|---|",
    ]
    for name, info in result["systems"].items():
        lines.append(f"| {name} | {info.get('version', '')} | {info.get('description', '')} | {info.get('durability', '')} |")
    lines.append("")
    for wl in result["workloads"]:
        rows = result["table"].get(wl["key"], {})
        lines += [f"## {wl['title']}", ""]
        drain = wl["workload"] == "drain"
        publish = wl["workload"] == "publish"
        lat_note = " (one-way)" if publish else ""
        if drain:
            lines += [("| system | drain msgs/s | fill msgs/s (accepted) | broker CPU µs/msg | client CPU µs/msg | "
                      "broker RSS MiB (peak) | errors |"), "|---|---:|---:|---:|---:|---:|---:|"]
        else:
            lines += [(f"| system | msgs/s | p50 µs{lat_note} | p99 µs{lat_note} | broker CPU µs/msg | client CPU µs/msg | "
                       "broker RSS MiB (peak) | errors |" + (" published msgs/s |" if publish else "")),
                      "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if publish else "")]
        for system in result["systems"]:
            f = rows.get(system)
            if not f:
                err = result["errors"].get(f"{wl['key']}/{system}", "no result")
                lines.append(f"| {system} | failed: {err.splitlines()[-1][:120] if err else ''} |")
                continue
            if drain:
                lines.append(f"| {system} | {_num(f['rate'])} | {_num(f.get('fill_rate'))} | "
                             f"{_num(f['broker_cpu_us'], '.1f')} | {_num(f['client_cpu_us'], '.1f')} | "
                             f"{_num(f['rss_mib'], '.1f')} | {_num(f['errors'])} |")
            else:
                lines.append(f"| {system} | {_num(f['rate'])} | {_num(f['p50'])} | {_num(f['p99'])} | "
                             f"{_num(f['broker_cpu_us'], '.1f')} | {_num(f['client_cpu_us'], '.1f')} | "
                             f"{_num(f['rss_mib'], '.1f')} | {_num(f['errors'])} |"
                             + (f" {_num(f.get('published_rate'))} |" if publish else ""))
        if publish:
            lines += ["", ("msgs/s = messages consumed in the window. Where producers publish faster than the "
                      "consumers take, the backlog grows and the one-way latency is mostly time spent in it.")]
        if drain:
            lines += ["", "Durability differs: " + "; ".join(
                f"{name}: {info.get('durability', '?')}" for name, info in result["systems"].items()) + "."]
        r = result["ratios"].get(wl["key"])
        if r:
            parts = [f"throughput x{r['rate']:.2f} (best peer {r['rate_peer']})"]
            if r.get("p50") is not None:
                parts.append(f"p50 x{r['p50']:.2f} (best peer {r['p50_peer']}; below 1 = teomq faster)")
            if r.get("broker_cpu") is not None:
                parts.append(f"broker CPU/msg x{r['broker_cpu']:.2f} (best peer {r['broker_cpu_peer']}; "
                             "below 1 = teomq cheaper)")
            lines += ["", "teomq / best peer: " + "; ".join(parts) + "."]
        lines.append("")
    if result["errors"]:
        lines += ["## Failed runs", ""]
        for k, v in result["errors"].items():
            lines += [f"- {k}:", "", "```", v.strip()[-800:], "```", ""]
    return "\n".join(lines)


def ratios(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, rows in table.items():
        t = rows.get("teomq")
        peers = {k: v for k, v in rows.items() if k != "teomq" and v}
        if not t or not peers:
            continue
        r: dict[str, Any] = {}
        best = max(peers, key=lambda k: peers[k].get("rate") or 0)
        if t.get("rate") and peers[best].get("rate"):
            r["rate"], r["rate_peer"] = t["rate"] / peers[best]["rate"], best
        with_p50 = {k: v for k, v in peers.items() if v.get("p50")}
        if t.get("p50") and with_p50:
            b = min(with_p50, key=lambda k: with_p50[k]["p50"])
            r["p50"], r["p50_peer"] = t["p50"] / with_p50[b]["p50"], b
        with_cpu = {k: v for k, v in peers.items() if v.get("broker_cpu_us")}
        if t.get("broker_cpu_us") and with_cpu:
            b = min(with_cpu, key=lambda k: with_cpu[k]["broker_cpu_us"])
            r["broker_cpu"], r["broker_cpu_peer"] = t["broker_cpu_us"] / with_cpu[b]["broker_cpu_us"], b
        if r:
            out[key] = r
    return out


# -- main ----------------------------------------------------------------------------------


def _on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run_all.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 s windows, 1 s warmup, drain 20,000")
    ap.add_argument("--no-install", action="store_true", help="do not run bench/peers/install.sh")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ",".join(SYSTEMS))
    ap.add_argument("--workloads", default="", help="comma-separated subset of: " + ",".join(w.key for w in WORKLOADS))
    ap.add_argument("--repeat", type=int, default=1, help="runs per system and workload; figures are medians")
    ap.add_argument("--duration", type=float, default=None, help="measured window, s (default 10; --quick 2)")
    ap.add_argument("--warmup", type=float, default=None, help="warmup, s (default 2; --quick 1)")
    ap.add_argument("--drain-count", type=int, default=None, help="drain messages (default 100,000; --quick 20,000)")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--out", default="", help="results path without extension (default bench/results/<date>)")
    ap.add_argument("--render", default="", metavar="JSON",
                    help="run nothing: rewrite the .md and .png of an existing result JSON")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            saved = json.load(f)
        base = args.render.rsplit(".", 1)[0]
        with open(base + ".md", "w") as f:
            f.write(markdown(saved))
        sys.path.insert(0, BENCH)
        import chart

        chart.render(saved, base + ".png")
        print(f"run_all: wrote {base}.md, {base}.png")
        return 0

    systems = [s for s in args.systems.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"unknown system {s!r}")
    workloads = [w for w in WORKLOADS if not w.optional]
    if args.workloads:
        wanted = args.workloads.split(",")
        workloads = [w for w in WORKLOADS if w.key in wanted]
        if len(workloads) != len(wanted):
            ap.error(f"unknown workload in {args.workloads!r}")
    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    drain_count = args.drain_count or (20_000 if args.quick else None)

    signal.signal(signal.SIGTERM, _on_term)
    t_start = time.monotonic()
    install_s = install(args.no_install)
    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(RESULTS, date + ("-quick" if args.quick else ""))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="teomq-run-all-")
    result: dict[str, Any] = {
        "schema": "teomq-peers/1", "date": date, "quick": args.quick, "duration": duration, "warmup": warmup,
        "repeat": args.repeat, "machine": machine_info(), "install_s": round(install_s, 1),
        "workloads": [{"key": w.key, "title": w.title() if w.workload != "drain" or not drain_count
                       else Workload(w.key, w.workload, w.producers, w.consumers, w.inflight, w.size,
                                     drain_count).title(),
                       "workload": w.workload, "producers": w.producers, "consumers": w.consumers,
                       "inflight": w.inflight, "size": w.size,
                       "count": (drain_count or w.count) if w.workload == "drain" else None} for w in workloads],
        "systems": {s: {"driver": SYSTEMS[s]} for s in systems},
        "runs": [], "table": {}, "ratios": {}, "errors": {},
    }
    interrupted = False
    try:
        n = 0
        for rep in range(args.repeat):
            for wi, w in enumerate(workloads):
                shift = (wi + rep) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    n += 1
                    json_path = os.path.join(tmp, f"{w.key}-{system}-{rep}.json")
                    log_path = os.path.join(tmp, f"{w.key}-{system}-{rep}.log")
                    cmd = [sys.executable, "-m", "teomq", "bench", *w.args(duration, warmup, drain_count),
                           "--driver", SYSTEMS[system], "--loop", args.loop, "--json", json_path, "--no-progress"]
                    if system == "teomq":
                        cmd += [a for o in w.teomq_opts for a in ("-o", o)]
                    limit = duration + warmup + 240.0 + ((drain_count or w.count) / 2000 if w.workload == "drain" else 0)
                    print(f"[{n}] {w.key} {system} (repeat {rep + 1}/{args.repeat}) ...", end=" ", flush=True)
                    load_before = os.getloadavg()
                    t = time.monotonic()
                    code = run_one(cmd, log_path, limit)
                    elapsed = time.monotonic() - t
                    run: dict[str, Any] = {"workload": w.key, "system": system, "repeat": rep, "code": code,
                                           "elapsed_s": round(elapsed, 1), "command": cmd[1:],
                                           "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
                    if code == 0 and os.path.exists(json_path):
                        with open(json_path) as f:
                            doc = json.load(f)
                        run["doc"] = doc
                        run["figures"] = figures(doc)
                        sysinfo = result["systems"][system]
                        sysinfo.update({k: doc["system"].get(k) for k in ("version", "description", "durability")})
                        f_ = run["figures"]
                        print(f"{_num(f_['rate'])} msgs/s, p50 {_num(f_['p50'])} µs, {elapsed:.0f} s", flush=True)
                    else:
                        err = tail(log_path)
                        run["error"] = err
                        result["errors"][f"{w.key}/{system}"] = err
                        print(f"FAILED (exit {code}, {elapsed:.0f} s); log tail:\n{err[-600:]}", flush=True)
                    result["runs"].append(run)
    except KeyboardInterrupt:
        interrupted = True
        print("\nrun_all: interrupted; writing what was measured", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for w in workloads:
        rows = {}
        for system in systems:
            runs = [r for r in result["runs"] if r["workload"] == w.key and r["system"] == system]
            rows[system] = median_figures(runs)
        result["table"][w.key] = rows
    # a failure that a later repetition made up for is not a failure of the figure
    result["errors"] = {k: v for k, v in result["errors"].items()
                        if not result["table"].get(k.split("/")[0], {}).get(k.split("/")[1])}
    result["ratios"] = ratios(result["table"])
    result["interrupted"] = interrupted
    result["total_s"] = round(time.monotonic() - t_start, 1)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(out + ".md", "w") as f:
        f.write(markdown(result))
    chart_note = ""
    try:
        sys.path.insert(0, BENCH)
        import chart

        chart.render(result, out + ".png")
    except Exception as e:  # noqa: BLE001 - the figures are written; a chart problem must not lose them
        chart_note = f" (chart failed: {e!r})"
    print(f"run_all: wrote {out}.json, {out}.md, {out}.png{chart_note} in {result['total_s']:.0f} s")
    return 130 if interrupted else (1 if result["errors"] else 0)


if __name__ == "__main__":
    sys.exit(main())
