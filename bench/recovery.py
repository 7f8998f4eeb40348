#!/usr/bin/env python3
"""Recovery speed: how fast ``teomq broker`` reads a large log back when it starts.

Fills a data directory with ``--gib`` GiB of queued messages (``--size`` bytes each, published
with ``-fsync never`` by two producers, no consumer), kills the broker with SIGKILL, then starts
it on that directory ``--repeat`` times, each time reading its own figure from its log line
(``storage: ... N messages restored in S s (R MB/s)``: from opening the directory to the last
message back in its queue). Warm: the log is in the page cache. Cold (``--cold``): the page cache
is dropped before each start (``/proc/sys/vm/drop_caches``, root only; skipped where it cannot be).

    python3 bench/recovery.py --gib 1 --repeat 3 --cold

Prints the median of each, and the messages restored.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import teomq  # noqa: E402

LINE = re.compile(r"storage: .* \((\d+) bytes of log\).* (\d+) messages restored.* in ([\d.]+) s \((\d+) MB/s\)")


def start(data: Path, home: Path, *extra: str) -> tuple[subprocess.Popen[str], str, list[str]]:
    env = dict(os.environ, TEOMQ_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-noweb", "-nomsg",
                             "-data-dir", str(data), "-queue-max", "100000000", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    url, address = "", ""
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := re.search(r"this app address: (\S+)$", line.strip()):
            address = m.group(1)
        if m := re.search(r"listening on (\S+)$", line.strip()):
            url = f"{address}@{m.group(1)}"
            break
    if not url:
        proc.wait()
        raise RuntimeError("the broker did not start:\n" + "".join(err))
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    return proc, url, err


async def fill(url: str, count: int, size: int) -> None:
    async def one(n: int) -> None:
        body = os.urandom(size)
        async with teomq.Producer(url, timeout=120) as p:
            for i in range(n):
                p.publish(body)
                if i % 256 == 255:
                    await p.drain()
            await p.ping()

    await asyncio.gather(one(count // 2), one(count - count // 2))


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    count = int(args.gib * (1 << 30) / (args.size + 32))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="teomq-recovery-") as tmp:
        data, home = Path(tmp) / "data", Path(tmp) / "home"
        home.mkdir()
        proc, url, _ = start(data, home, "-fsync", "never")
        asyncio.run(fill(url, count, args.size))
        proc.kill()
        proc.wait()
        runs: dict[str, list[tuple[float, float, int, int]]] = {"warm": [], "cold": []}
        kinds = ["warm"] + (["cold"] if args.cold else [])
        for _ in range(args.repeat):
            for kind in kinds:
                if kind == "cold" and not drop_caches():
                    print("cold: cannot drop the page cache here (not root?): skipped")
                    kinds.remove("cold")
                    continue
                proc, url, err = start(data, home)
                proc.kill()
                proc.wait()
                m = next((LINE.search(ln) for ln in err if LINE.search(ln)), None)
                if m is None:
                    raise RuntimeError("no recovery line:\n" + "".join(err))
                runs[kind].append((float(m.group(3)), float(m.group(4)), int(m.group(2)), int(m.group(1))))
                print(f"{kind}: {m.group(2)} messages, {int(m.group(1)) / 1e6:.0f} MB of log, "
                      f"{m.group(3)} s, {m.group(4)} MB/s", flush=True)
        for kind, rs in runs.items():
            if rs:
                print(f"{kind}: median {statistics.median(r[0] for r in rs):.3f} s, "
                      f"{statistics.median(r[1] for r in rs):.0f} MB/s over {len(rs)} starts "
                      f"({rs[0][2]} messages, {rs[0][3] / 2**30:.2f} GiB of log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
