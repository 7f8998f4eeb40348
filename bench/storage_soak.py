#!/usr/bin/env python3
"""Soak: SIGKILL the broker at random moments while producers publish with confirmations.

Each round starts ``teomq broker`` (disk storage, ``--fsync``) on a fresh data directory; two
producers publish 10,000 messages each keeping 1,024 unconfirmed; the broker is killed with SIGKILL
at a random moment (once a random number of the 20,000 is confirmed); it is started again on the same directory, a
consumer drains it, and every confirmed message must be among those delivered. With
``--power-cut`` the files are also cut back to the last sync before the restart
(``TEOMQ_TEST_SYNCED_RECORD``, ``teomq.storage.power_cut``), as a power failure would: only
``-fsync always`` keeps its promise then.

    python3 bench/storage_soak.py --rounds 200
    python3 bench/storage_soak.py --rounds 50 --power-cut

Prints a line per round (confirmed, delivered, lost, duplicates) and the totals; exits 1 if any
confirmed message was lost. tests/test_storage.py runs 20 rounds of the same in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import teomq  # noqa: E402
from teomq.storage import SYNCED_RECORD_ENV, power_cut  # noqa: E402


class Broker:
    def __init__(self, data: Path, home: Path, fsync: str, record: bool) -> None:
        env = dict(os.environ, TEOMQ_HOME=str(home), PYTHONPATH=str(ROOT))
        if record:
            env[SYNCED_RECORD_ENV] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "teomq", "broker", "-listen", "127.0.0.1:0", "-noweb", "-nomsg",
             "-data-dir", str(data), "-fsync", fsync], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        self.url = ""
        address = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.search(r"this app address: (\S+)$", line.strip())
            if m:
                address = m.group(1)
            m = re.search(r"listening on (\S+)$", line.strip())
            if m:
                self.url = f"{address}@{m.group(1)}"
                break
        if not self.url:
            raise RuntimeError("the broker did not start:\n" + "".join(self.err))
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()  # type: ignore[union-attr]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)


async def publish(url: str, prefix: str, count: int, confirmed: list[bytes], progress: dict[str, int]) -> None:
    sent = []
    try:
        async with teomq.Producer(url, timeout=60) as p:
            for i in range(count):
                m = f"{prefix}-{i}".encode()
                sent.append((m, p.publish(m)))
                if p.unconfirmed >= 1024:
                    await p.confirmed(512)
                    progress[prefix] = len(sent) - p.unconfirmed
            await p.confirmed(0)
    except (teomq.ConnectionLost, OSError):
        pass
    finally:
        confirmed.extend(m for m, c in sent if c.confirmed)


async def drain(url: str, expect: int) -> list[bytes]:
    got: list[bytes] = []
    async with teomq.Consumer(url, lambda d: got.append(bytes(d)), timeout=60, prefetch=1024):
        deadline = time.monotonic() + 120
        while len(got) < expect and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        last = -1
        while last != len(got):
            last = len(got)
            await asyncio.sleep(0.5)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--fsync", default="always")
    ap.add_argument("--power-cut", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lost_total = dupes_total = confirmed_total = 0
    with tempfile.TemporaryDirectory(prefix="teomq-soak-") as tmp:
        for k in range(args.rounds):
            data, home = Path(tmp) / f"d{k}", Path(tmp) / "home"
            home.mkdir(exist_ok=True)
            b = Broker(data, home, args.fsync, args.power_cut)
            confirmed: list[bytes] = []

            async def round_() -> None:
                moment = rng.randrange(0, 19_000)   # killed once this many are confirmed
                progress: dict[str, int] = {}
                tasks = [asyncio.create_task(publish(b.url, f"k{k}p{j}", 10_000, confirmed, progress))
                         for j in range(2)]
                while sum(progress.values()) < moment and not all(t.done() for t in tasks):
                    await asyncio.sleep(0.001)
                await asyncio.sleep(rng.uniform(0.0, 0.01))   # and then at any point of a window
                b.kill9()
                await asyncio.gather(*tasks, return_exceptions=True)

            asyncio.run(round_())
            if args.power_cut:
                power_cut(data)
            again = Broker(data, home, args.fsync, False)
            got = asyncio.run(drain(again.url, len(confirmed)))
            again.stop()
            lost = len(set(confirmed) - set(got))
            dupes = sum(v - 1 for v in collections.Counter(got).values() if v > 1)
            lost_total += lost
            dupes_total += dupes
            confirmed_total += len(confirmed)
            print(f"round {k + 1}: {len(confirmed)} confirmed, {len(got)} delivered, {lost} lost, {dupes} duplicates",
                  flush=True)
    print(f"{args.rounds} kills (fsync {args.fsync}{', power cut' if args.power_cut else ''}): "
          f"{confirmed_total} confirmed, {lost_total} lost, {dupes_total} duplicates")
    return 1 if lost_total else 0


if __name__ == "__main__":
    sys.exit(main())
