#!/usr/bin/env python3
"""Confirmed publishing: how many messages a second the broker confirms stored, and how soon.

Starts ``teomq broker`` of a source tree (``--tree``, built in place; default this checkout) with
its data directory in a fresh temporary directory (``--dir``: where; the disk is what is
measured), then ``--producers`` processes that each publish ``--size``-byte messages keeping at
most ``--window`` unconfirmed (``await producer.confirmed(window - k)`` after every k publishes,
k = min(32, window / 4)), and one
consumer per producer that acknowledges everything. After ``--warmup`` s it counts for
``--duration`` s: confirmed messages/s, the latency from publish() to its confirmation (every 16th
message is timed), and from the broker's own count at its stop, records per fdatasync.

``--probe`` first measures the disk's fdatasync rate in that directory (4 KiB written and synced,
again and again, for 2 s): the physical bound of ``-fsync always`` is window x producers x that
rate. A tree whose publish() confirms nothing (before confirmations) is measured publishing with a
PING per window instead: what "in memory beside it" means for the commit before.

    python3 bench/confirm_publish.py --window 1024 --probe
    python3 bench/confirm_publish.py --window 32 --probe
    python3 bench/confirm_publish.py --tree /tmp/base --storage memory   # the commit before

Prints one table row per run; ``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def probe_fdatasync(directory: str, seconds: float = 2.0) -> float:
    """fdatasyncs per second of a 4 KiB write in ``directory`` (what one sync round costs)."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = os.urandom(4096)
        n, off = 0, 0
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            os.pwrite(fd, block, off)
            os.fdatasync(fd)
            off += 4096
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)


def producer_main(tree: str, url: str, index: int, size: int, window: int, warmup: float, duration: float,
                  out: Any) -> None:
    sys.path.insert(0, tree)
    import asyncio

    import teomq

    async def run() -> dict[str, Any]:
        body = os.urandom(size)
        lat: list[int] = []
        pc = time.perf_counter_ns
        async with teomq.Producer(url, name=f"pub-{index}", timeout=60) as p:
            confirms = hasattr(p, "confirmed")
            t_start = time.monotonic()
            t0, t1 = t_start + warmup, t_start + warmup + duration
            n0 = n1 = None
            confirmed_total = 0
            tasks: set[Any] = set()

            async def timed(c: Any, t: int) -> None:
                await c
                if t0_ns <= t:
                    lat.append(pc() - t)

            t0_ns = 1 << 62
            chunk = max(1, min(32, window // 4))     # publishes between waits: the window slides
            i = 0
            while True:
                now = time.monotonic()
                if n0 is None and now >= t0:
                    n0 = (i - p.unconfirmed) if confirms else i
                    t0_ns = pc()
                if now >= t1:
                    n1 = (i - p.unconfirmed) if confirms else i
                    break
                for _ in range(chunk):
                    c = p.publish(body)
                    i += 1
                    if confirms and i % 16 == 0:
                        task = asyncio.ensure_future(timed(c, pc()))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                if confirms:
                    if p.unconfirmed > window - chunk:
                        await p.confirmed(window - chunk)
                    else:
                        await asyncio.sleep(0)
                elif i % window < chunk:
                    await p.ping()        # no confirmations: a window per PING
                else:
                    await p.drain()
            if confirms:
                await p.confirmed(0)
            confirmed_total = i
        return {"index": index, "in_window": (n1 or 0) - (n0 or 0), "total": confirmed_total,
                "confirms": confirms, "latency_ns": lat}

    out.put(asyncio.run(run()))


def consumer_main(tree: str, url: str, index: int, stop: Any) -> None:
    sys.path.insert(0, tree)
    import asyncio

    import teomq

    async def run() -> None:
        async with teomq.Consumer(url, lambda data: None, name=f"sub-{index}", prefetch=1024, timeout=60):
            while not stop.is_set():
                await asyncio.sleep(0.2)

    asyncio.run(run())


def run_once(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    tree = str(Path(args.tree).resolve())
    env = dict(os.environ, TEOMQ_HOME=workdir, PYTHONPATH=tree)
    data = os.path.join(workdir, "broker")
    cmd = [sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-noweb", "-nomsg",
           "-data-dir", data, "-log-level", "INFO"]
    if args.storage is not None:
        cmd += ["-storage", args.storage, "-fsync", args.fsync]
    broker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir)
    err_lines: list[str] = []
    threading.Thread(target=lambda: err_lines.extend(broker.stderr), daemon=True).start()  # type: ignore[arg-type]
    url = ""
    assert broker.stdout is not None
    for line in broker.stdout:
        m = re.search(r"listening on (\S+)$", line.strip())
        if m:
            url = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in broker.stdout], daemon=True).start()  # type: ignore[union-attr]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    consumers = [ctx.Process(target=consumer_main, args=(tree, url, i, stop)) for i in range(args.producers)]
    for c in consumers:
        c.start()
    time.sleep(1.0)
    producers = [ctx.Process(target=producer_main, args=(tree, url, i, args.size, args.window, args.warmup,
                                                          args.duration, out)) for i in range(args.producers)]
    for p in producers:
        p.start()
    results = [out.get(timeout=args.warmup + args.duration + 120) for _ in producers]
    for p in producers:
        p.join()
    stop.set()
    for c in consumers:
        c.join(30)
    broker.send_signal(2)
    broker.wait(30)
    time.sleep(0.2)
    stats = next((ln for ln in err_lines if "storage: closed" in ln), "")
    m = re.search(r"(\d+) records in (\d+) batches, (\d+) syncs", stats)
    lat = sorted(x for r in results for x in r["latency_ns"])
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else None
    return {
        "tree": tree, "storage": args.storage or "(the tree's default)", "fsync": args.fsync,
        "producers": args.producers, "window": args.window, "size": args.size,
        "confirmed_per_s": sum(r["in_window"] for r in results) / args.duration,
        "confirmations": all(r["confirms"] for r in results),
        "confirm_p50_ms": q[49] / 1e6 if q else None, "confirm_p99_ms": q[98] / 1e6 if q else None,
        "records": int(m.group(1)) if m else None, "batches": int(m.group(2)) if m else None,
        "syncs": int(m.group(3)) if m else None,
        "records_per_sync": int(m.group(1)) / max(1, int(m.group(3))) if m else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(HERE), help="teomq source tree, built in place (default: this one)")
    ap.add_argument("--storage", choices=("disk", "memory"), default=None,
                    help="the broker's -storage (default: not passed, the tree's default)")
    ap.add_argument("--fsync", default="always", help="the broker's -fsync (default: always)")
    ap.add_argument("--producers", type=int, default=4)
    ap.add_argument("--window", type=int, default=1024, help="unconfirmed messages per producer (default 1024)")
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--dir", default=None, help="where the data directory goes (default: the system's temp dir)")
    ap.add_argument("--probe", action="store_true", help="measure fdatasync/s in that directory first")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.window < 4:
        ap.error("--window must be at least 4")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="teomq-confirm-") as workdir:
        probe = probe_fdatasync(workdir) if args.probe else None
        doc = run_once(args, workdir)
        probe_after = probe_fdatasync(workdir) if args.probe else None
    if probe is not None and probe_after is not None:
        doc["fdatasync_per_s"] = (probe + probe_after) / 2
        doc["physical_bound_per_s"] = doc["fdatasync_per_s"] * args.window * args.producers
        doc["of_bound"] = doc["confirmed_per_s"] / doc["physical_bound_per_s"]
    with open("/proc/cpuinfo") as f:
        doc["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    print(json.dumps(doc, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
