"""Instructions per message in the broker's core, counted by valgrind (deterministic, unlike time).

Timings on a shared 2-core VM swing by 1.5x between minutes; an instruction count does not. This
runs the dispatch micro benchmark's rig (test_micro_dispatch.Rig: 1,000 SENDs of 100 B, 4
consumers) under ``valgrind --tool=cachegrind`` for each source tree given, twice (``rounds`` and
a third of it) so start-up cancels, and prints per message the instructions spent in the core's
own code (teomq/_core C and the CRC), then the functions whose count differs most.

    python3 bench/micro/instructions.py OLD_TREE NEW_TREE [--phase rig|send] [--rounds 120]

Each tree must be built in place (python3 setup.py build_ext --inplace). ``--phase rig`` counts a
whole round trip (SEND -> DELIVER -> ANSWER -> REPLY, with the rig's own Python encoding the
answers, which is the same in both trees); ``--phase send`` counts SEND -> DELIVER alone
(consumers that never answer, a fresh rig every 8 rounds). Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile

_DRIVER = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench/micro"]
import test_micro_dispatch as m
phase, rounds = sys.argv[2], int(sys.argv[3])
if phase == "send":
    m.PREFETCH = 8000
for i in range(rounds):
    if phase == "send":
        if i % 8 == 0:
            rig = m.Rig()
        m.feed(rig.producer, m.SENDS)
        for c in rig.consumers:
            c.transport.take()
    else:
        if i == 0:
            rig = m.Rig()
        rig.answer_all()
        m.feed(rig.producer, m.SENDS)
"""


def _count(tree: str, phase: str, rounds: int, workdir: str) -> collections.Counter[str]:
    driver = os.path.join(workdir, "driver.py")
    with open(driver, "w") as f:
        f.write(_DRIVER)
    out = os.path.join(workdir, "cg.out")
    env = dict(os.environ, PYTHONPATH=tree)
    subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", f"--cachegrind-out-file={out}",
                    sys.executable, driver, tree, phase, str(rounds)], env=env, capture_output=True, check=True)
    per: collections.Counter[str] = collections.Counter()
    fl = fn = ""
    with open(out) as f:
        for line in f:
            if line.startswith("fl="):
                fl = line[3:].strip()
            elif line.startswith("fn="):
                fn = line[3:].strip()
            elif line[:1].isdigit() and ("teomq" in fl or "crc32c" in fl or "wire.h" in fl):
                parts = line.split()
                if len(parts) >= 2:
                    per[fn] += int(parts[1])
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="+", help="source trees, each built in place")
    ap.add_argument("--phase", choices=["rig", "send"], default="rig")
    ap.add_argument("--rounds", type=int, default=120, help="rounds of 1,000 messages (a multiple of 24)")
    args = ap.parse_args()
    small = args.rounds // 3
    per_tree = {}
    with tempfile.TemporaryDirectory() as work:
        for tree in args.trees:
            big = _count(tree, args.phase, args.rounds, work)
            base = _count(tree, args.phase, small, work)
            n = (args.rounds - small) * 1000
            per_tree[tree] = {k: (big[k] - base.get(k, 0)) / n for k in big}
            print(f"{tree}: {sum(per_tree[tree].values()):.0f} core instructions per message ({args.phase})")
    if len(per_tree) > 1:
        first, *rest = per_tree.values()
        for tree, counts in zip(args.trees[1:], rest):
            names = set(first) | set(counts)
            rows = sorted(((counts.get(k, 0) - first.get(k, 0), k) for k in names), key=lambda r: -abs(r[0]))
            print(f"largest differences, {tree} - {args.trees[0]}:")
            for d, k in rows[:12]:
                if abs(d) >= 1:
                    print(f"  {d:+7.1f}  {k.replace('__pyx_f_5teomq_5_core_', '')}")


if __name__ == "__main__":
    main()
