#!/usr/bin/env python3
"""The broker's memory with many delayed messages: ``--count`` messages of ``--size`` bytes
published with a delay of an hour (no consumer), confirmed, into a ``teomq broker`` started
through the CLI; its resident set (``VmRSS`` from /proc) is read before and after, for each
storage asked (``--storage disk`` with the default ``-memory-max`` 64 MiB: past it a delayed
message's payload stays on disk; ``memory``: all of it in memory).

    python3 bench/delayed_memory.py --count 1000000 --storage disk --storage memory

Prints, per storage: RSS at start, RSS with the messages delayed, the difference per message,
and the broker's ``delayed`` and ``delayed_paged_out`` counters (its /stats).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from teomq.client import Producer  # noqa: E402


def rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def start(data: Path, home: Path, storage: str) -> tuple[subprocess.Popen[str], str, int]:
    env = dict(os.environ, TEOMQ_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-web", "127.0.0.1:0",
                             "-nomsg", "-data-dir", str(data), "-queue-max", "100000000", "-storage", storage,
                             "-fsync", "never"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    address, url, web = "", "", 0
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.strip()
        if m := re.search(r"this app address: (\S+)$", line):
            address = m.group(1)
        if m := re.search(r"web .*http://[^:]+:(\d+)", line):
            web = int(m.group(1))
        if m := re.search(r"listening on (\S+)$", line):
            url = f"{address}@{m.group(1)}"
        if url and web:
            break
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    if not url or not web:
        proc.kill()
        raise RuntimeError("the broker did not start")
    return proc, url, web


async def fill(url: str, count: int, size: int) -> None:
    body = b"x" * size
    async with Producer(url, timeout=120.0) as p:
        for i in range(count):
            p.publish(body, delay=3600.0)
            if i % 4096 == 4095:
                await p.confirmed(16384)
        await p.confirmed(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--storage", action="append", choices=["disk", "memory"])
    args = ap.parse_args()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    print(f"{args.count:,} messages of {args.size} bytes delayed by an hour; CPU {cpu}")
    for storage in args.storage or ["disk"]:
        with tempfile.TemporaryDirectory() as tmp:
            proc, url, web = start(Path(tmp) / "data", Path(tmp), storage)
            try:
                time.sleep(0.5)
                before = rss(proc.pid)
                t0 = time.monotonic()
                asyncio.run(fill(url, args.count, args.size))
                took = time.monotonic() - t0
                time.sleep(1.0)
                after = rss(proc.pid)
                with urllib.request.urlopen(f"http://127.0.0.1:{web}/stats", timeout=30) as r:
                    st = json.loads(r.read())["broker"]
                print(f"{storage:6}: RSS {before / 2**20:.1f} MiB at start, {after / 2**20:.1f} MiB with "
                      f"{st['delayed']:,} delayed ({st['delayed_paged_out']:,} of them paged out): "
                      f"{(after - before) / args.count:.0f} bytes each; published in {took:.1f} s")
            finally:
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    main()
