#!/usr/bin/env python3
"""Side by side: ``teomq bench`` of two source trees in alternating runs, medians and per-pair ratios.

This machine changes speed by itself for minutes at a time, so a lone run says little: runs of
the two trees alternate (base, new, base, new, ...) and each pair's ratio compares two runs made
a few seconds apart. Each tree must be built in place (``python3 setup.py build_ext --inplace``);
its broker and clients run with ``PYTHONPATH=<tree>``.

    python bench/ab.py --base /tmp/old --new . --pairs 5 -- rpc -producers 4 -consumers 4 -inflight 32
    python bench/ab.py --base . --new . --base-opt log=0 --new-opt log=1 -- rpc   # one tree, two options

Prints, per figure, both medians, the ratio of the medians (new / base) and every pair's ratio;
``--json FILE`` keeps every run's harness document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

FIGURES = [
    ("round trips/s", ("round_trips_per_s",)),
    ("messages/s", ("rate_per_s",)),
    ("p50 us", ("latency_us", "p50")),
    ("p99 us", ("latency_us", "p99")),
    ("broker CPU us/msg", ("broker", "cpu_us_per_message")),
    ("producers CPU us/msg", ("producers", "cpu_us_per_message")),
    ("consumers CPU us/msg", ("consumers", "cpu_us_per_message")),
]


def figure(doc: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value)


def run(tree: Path, opts: list[str], args: list[str], out: Path) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "teomq", "bench", *args, "-no-progress", "-json", str(out)]
    for opt in opts:
        cmd += ["-o", opt]
    res = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench failed in {tree} (exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="source tree of the 'before' runs")
    ap.add_argument("--new", type=Path, required=True, help="source tree of the 'after' runs")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--base-opt", action="append", default=[], metavar="KEY=VALUE", help="driver option, base runs")
    ap.add_argument("--new-opt", action="append", default=[], metavar="KEY=VALUE", help="driver option, new runs")
    ap.add_argument("--json", type=Path, help="write every run's document here")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the teomq bench arguments (workload first)")
    a = ap.parse_args()
    args = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    if not args:
        ap.error("give the teomq bench arguments after --")
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.pairs):
            for side, tree, opts in (("base", a.base, a.base_opt), ("new", a.new, a.new_opt)):
                runs[side].append(run(tree.resolve(), opts, args, Path(tmp) / f"{side}{i}.json"))
                print(f"pair {i + 1}/{a.pairs} {side} done", file=sys.stderr, flush=True)
    print(f"teomq bench {' '.join(args)}: {a.pairs} alternating pairs, base {a.base} {a.base_opt or ''}, "
          f"new {a.new} {a.new_opt or ''}")
    print(f"| figure | base median | new median | new/base | pairs (new/base) |\n|---|---:|---:|---:|---|")
    for name, path in FIGURES:
        got_b = [figure(d, path) for d in runs["base"]]
        got_n = [figure(d, path) for d in runs["new"]]
        b = [x for x in got_b if x is not None]
        n = [x for x in got_n if x is not None]
        if len(b) != len(got_b) or len(n) != len(got_n) or not all(b):
            continue  # not a figure of this workload
        bm, nm = statistics.median(b), statistics.median(n)
        pairs = ", ".join(f"{x / y:.3f}" for x, y in zip(n, b))
        print(f"| {name} | {bm:,.2f} | {nm:,.2f} | {nm / bm:.3f} | {pairs} |")
    if a.json:
        a.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
