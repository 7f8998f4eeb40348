#!/usr/bin/env python3
"""Chart of a bench/run_all.py result: per workload, throughput bars and p50/p99 latency bars.

    python bench/chart.py bench/results/2026-11-27.json [out.png]

One row per workload: left, messages per second per system (drain: drain rate, and the fill
rate as a hatched bar); right, p50 (solid) and p99 (light) latency in µs on a log scale
(publish: one-way latency; drain: none). matplotlib with the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import sys
from typing import Any

COLORS = {"teomq": "#d62728", "nats": "#1f77b4", "redis": "#ff7f0e", "rabbitmq": "#2ca02c"}


def render(result: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = result["workloads"]
    systems = list(result["systems"])
    fig, axes = plt.subplots(len(workloads), 2, figsize=(12, 2.6 * len(workloads) + 0.8), squeeze=False)
    title = f"teomq vs peers, {result['date']}" + (" (quick run)" if result.get("quick") else "")
    fig.suptitle(f"{title}: {result['machine']['cpus']} CPUs, clients and servers on the same box", fontsize=12)
    x = list(range(len(systems)))
    for row, wl in enumerate(workloads):
        rows = result["table"].get(wl["key"], {})
        ax_t, ax_l = axes[row]
        rates = [(rows.get(s) or {}).get("rate") or 0 for s in systems]
        colors = [COLORS.get(s, "#7f7f7f") for s in systems]
        if wl["workload"] == "drain":
            w = 0.4
            fills = [(rows.get(s) or {}).get("fill_rate") or 0 for s in systems]
            ax_t.bar([i - w / 2 for i in x], rates, w, color=colors, label="drain")
            ax_t.bar([i + w / 2 for i in x], fills, w, color=colors, alpha=0.45, hatch="//", label="fill (accepted)")
            ax_t.legend(fontsize=7, loc="upper right")
        else:
            ax_t.bar(x, rates, color=colors)
        for i, v in enumerate(rates):
            ax_t.text(i - (0.2 if wl["workload"] == "drain" else 0), v, f"{v:,.0f}" if v else "failed",
                      ha="center", va="bottom", fontsize=7)
        ax_t.set_xticks(x, systems, fontsize=8)
        ax_t.set_ylabel("msgs/s", fontsize=8)
        ax_t.set_title(wl["title"], fontsize=9, loc="left")
        ax_t.tick_params(axis="y", labelsize=7)
        ax_t.margins(y=0.15)
        if wl["workload"] == "drain":
            ax_l.text(0.5, 0.5, "drain: no latency (time to empty the queue)", ha="center", va="center",
                      fontsize=8, transform=ax_l.transAxes)
            ax_l.set_axis_off()
            continue
        w = 0.38
        p50 = [(rows.get(s) or {}).get("p50") or 0 for s in systems]
        p99 = [(rows.get(s) or {}).get("p99") or 0 for s in systems]
        ax_l.bar([i - w / 2 for i in x], p50, w, color=colors, label="p50")
        ax_l.bar([i + w / 2 for i in x], p99, w, color=colors, alpha=0.4, label="p99")
        if any(p50) or any(p99):
            ax_l.set_yscale("log")
        ax_l.set_xticks(x, systems, fontsize=8)
        kind = "one-way" if wl["workload"] == "publish" else "round trip"
        ax_l.set_ylabel(f"µs ({kind})", fontsize=8)
        ax_l.set_title("latency p50 (solid) / p99 (light), log scale", fontsize=8, loc="left")
        ax_l.tick_params(axis="y", labelsize=7)
        for i, (a, b) in enumerate(zip(p50, p99, strict=True)):
            if a:
                ax_l.text(i - w / 2, a, f"{a:,.0f}", ha="center", va="bottom", fontsize=6)
            if b:
                ax_l.text(i + w / 2, b, f"{b:,.0f}", ha="center", va="bottom", fontsize=6)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else src.rsplit(".", 1)[0] + ".png"
    with open(src) as f:
        render(json.load(f), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
