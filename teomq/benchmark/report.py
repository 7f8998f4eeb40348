"""The result document of a run (what ``--json`` writes), and the table printed at the end.

A "message" is a round trip for rpc, a message consumed for publish and drain. Per-message CPU
figures divide CPU time over the measured window by messages in it: the server's from
/proc/<pid>/stat (10 ms clock ticks: use windows of seconds), the clients' from getrusage.
Producers' CPU is per request (rpc) or per message published (publish, drain).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import sys
from typing import Any

from teomq.benchmark.proc_stats import clock_tick_us, summed
from teomq.benchmark.stats import QUANTILES, summarize
from teomq.benchmark.workers import Config

SCHEMA = "teomq-bench/1"
CPU_KEYS = ("cpu_us", "user_us", "sys_us", "reads", "writes", "sleeps")


def machine_info(loop: str) -> dict[str, Any]:
    """nproc, CPU model, Python and kernel of this machine, and the event loop used."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    loop_version = ""
    if loop == "uvloop":
        try:
            import uvloop

            loop_version = uvloop.__version__
        except ImportError:
            pass
    return {"nproc": os.cpu_count(), "usable_cpus": usable, "cpu_model": model or platform.processor(),
            "python": platform.python_version(), "python_implementation": platform.python_implementation(),
            "platform": platform.platform(), "kernel": platform.release(),
            "loop": loop, "loop_version": loop_version}


def cpu_figures(spent: dict[str, int] | None, count: int, window_s: float) -> dict[str, Any]:
    """Per-message CPU µs (total, user, sys), system calls and sleeps, and % of one core."""
    out: dict[str, Any] = {f"{k}_per_message": None for k in CPU_KEYS}
    out["cpu_percent_of_core"] = None
    if not spent:
        return out
    total_us = (spent["user_ns"] + spent["sys_ns"]) / 1e3
    if window_s > 0:
        out["cpu_percent_of_core"] = round(total_us / 1e6 / window_s * 100, 1)
    if not count:
        return out
    values = (total_us, spent["user_ns"] / 1e3, spent["sys_ns"] / 1e3,
              spent["reads"], spent["writes"], spent["sleeps"])
    for k, v in zip(CPU_KEYS, values, strict=True):
        out[f"{k}_per_message"] = round(v / count, 3 if k in CPU_KEYS[3:] else 2)
    for key in ("reads", "writes"):
        if spent[key] * 1000 < count:
            # /proc/<pid>/io counts read()/write() (uvloop, via libuv) but not recv()/send()
            # (asyncio's selector loop; teomq's broker send()s directly): a few counts are
            # then the control pipe's, not the traffic's
            out[f"{key}_per_message"] = None
    return out


def _workers(groups: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    return sorted((w for g in groups for w in g["workers"] if w["role"] == role), key=lambda w: w["index"])


def _span(phase: dict[str, Any]) -> float:
    """Seconds over which a phase's CPU counters were read (start to the harness's end mark)."""
    return max(1, phase["end_ns"] - phase["start_ns"]) / 1e9


def build(cfg: Config, raw: dict[str, Any], date: datetime.datetime | None = None) -> dict[str, Any]:
    """The result document from the harness's raw figures (Harness.run())."""
    server, driver, groups, phases = raw["server"], raw["driver"], raw["groups"], raw["phases"]
    producers, consumers = _workers(groups, "producer"), _workers(groups, "consumer")
    wl = cfg.workload
    rpc = wl == "rpc"
    latency = summarize([w["latency_ns"] for w in (producers if rpc else consumers)])
    latency["kind"] = "round_trip" if rpc else ("one_way" if wl == "publish" and latency["samples"] else None)

    publish = drain = None
    if wl == "drain":
        fill, dr = phases["fill"], phases["drain"]
        fill_s = max((w["finished_ns"] for w in producers), default=fill["start_ns"]) - fill["start_ns"]
        # from the first consumer's connection (connecting is not draining) to the last message
        connected = min((w["connected_ns"] for w in consumers if w["connected_ns"]), default=dr["start_ns"])
        drain_s = max((w["last_ns"] for w in consumers), default=connected) - connected
        fill_s, drain_s = max(fill_s, 1) / 1e9, max(drain_s, 1) / 1e9
        published = sum(w["sent"] for w in producers)
        messages = sum(w["received"] for w in consumers)
        window_s = drain_s
        broker_spent = summed([fill["broker"], dr["broker"]])
        prod_spent = summed([g["windows"].get("fill") for g in groups])
        cons_spent = summed([g["windows"].get("drain") for g in groups])
        client_spent = summed([prod_spent, cons_spent])
        drain = {"count": cfg.count, "published": published, "fill_s": round(fill_s, 3),
                 "connect_s": round(max(0, connected - dr["start_ns"]) / 1e9, 3),
                 "fill_rate_per_s": round(published / fill_s, 1), "drain_s": round(drain_s, 3),
                 "drain_rate_per_s": round(messages / drain_s, 1),
                 "broker_fill": cpu_figures(fill["broker"], published, _span(fill)),
                 "broker_drain": cpu_figures(dr["broker"], messages, _span(dr)),
                 "rss_kib_full": fill["rss"][0] or None}
        rss = dr["rss"]
        fill_window, drain_window = _span(fill), _span(dr)
        cpu_window = fill_window + drain_window
    else:
        run = phases["run"]
        if cfg.count:  # counted: from start to the last answer / message
            end = max((w["finished_ns"] for w in producers), default=run["start_ns"]) if rpc else \
                max((w["last_ns"] for w in consumers), default=run["start_ns"])
            window_s = max(end - run["start_ns"], 1) / 1e9
            messages = sum(w["answered"] for w in producers) if rpc else sum(w["received"] for w in consumers)
            published = sum(w["sent"] for w in producers)
        else:
            window_s = run["window_s"]
            messages = latency["samples"] if rpc else sum(w["in_window"] for w in consumers)
            published = sum(w["in_window"] for w in producers)
        if not rpc:
            publish = {"published": published, "published_per_s": round(published / window_s, 1),
                       "backlog": max(0, published - messages),
                       "refused": sum(w.get("refused", 0) for w in producers),
                       "rate_target_per_s": cfg.rate or None}
        broker_spent = run["broker"]
        by_role = {r: summed([g["windows"].get("run") for g in groups if g["roles"] == [r]])
                   for r in ("producer", "consumer")}
        prod_spent, cons_spent = (by_role["producer"], by_role["consumer"]) if cfg.procs else (None, None)
        client_spent = summed([g["windows"].get("run") for g in groups])
        rss = run["rss"]
        cpu_window = fill_window = drain_window = window_s if not cfg.count else _span(run)
    prod_count = messages if rpc else published

    broker = {"pid": server.pid, **cpu_figures(broker_spent, messages, cpu_window),
              "rss_kib": rss[0] or None, "peak_rss_kib": rss[1] or None, "clock_tick_us": clock_tick_us()}
    prod = {**cpu_figures(prod_spent, prod_count, fill_window),
            "per_process": [w["answered"] if rpc else w["sent"] for w in producers]}
    cons = {"messages": sum(w["received"] for w in consumers),
            **cpu_figures(cons_spent, messages, drain_window),
            "per_process": [w["received"] for w in consumers]}
    clients = cpu_figures(client_spent, messages, cpu_window)
    parts = [x["cpu_percent_of_core"] for x in (broker, clients) if x["cpu_percent_of_core"] is not None]
    date = date or datetime.datetime.now(datetime.timezone.utc)
    return {
        "schema": SCHEMA,
        "date": date.isoformat(timespec="seconds"),
        "system": {"name": driver.name or cfg.driver, "version": server.version, "driver": cfg.driver,
                   "description": driver.description, "durability": driver.durability, "url": server.url,
                   "external": bool(cfg.broker)},
        "machine": machine_info(cfg.loop),
        "config": config_doc(cfg),
        "workload": wl,
        "window_s": round(window_s, 3),
        "messages": messages,
        "rate_per_s": round(messages / window_s, 1),
        "mb_per_s": round(messages * cfg.size / window_s / 1e6, 2),
        "round_trips": messages if rpc else None,
        "round_trips_per_s": round(messages / window_s, 1) if rpc else None,
        "latency_us": latency,
        "errors": sum(w["errors"] + w.get("refused", 0) for w in producers),
        "broker": broker,
        "producers": prod,
        "consumers": cons,
        "clients": clients,
        "cpu_percent_of_core_all": round(sum(parts), 1) if parts else None,
        "publish": publish,
        "drain": drain,
    }


def config_doc(cfg: Config) -> dict[str, Any]:
    return {"workload": cfg.workload, "producers": cfg.producers, "consumers": cfg.consumers,
            "inflight": cfg.inflight, "size": cfg.size, "duration_s": cfg.duration or None,
            "count": cfg.count or None, "warmup_s": cfg.warmup if not cfg.count else 0.0, "procs": cfg.procs,
            "loop": cfg.loop, "driver": cfg.driver, "options": dict(cfg.options), "broker": cfg.broker or None,
            "timeout_s": cfg.timeout, "rate": cfg.rate or None, "argv": sys.argv[1:]}


# -- the table --------------------------------------------------------------------------------


def _num(v: Any, fmt: str = ",.1f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def format_table(doc: dict[str, Any]) -> str:
    """Header lines, a one-row table of the headline figures, and the details under it."""
    c, s = doc["config"], doc["system"]
    lat, b, p, k, cl = doc["latency_us"], doc["broker"], doc["producers"], doc["consumers"], doc["clients"]
    wl = doc["workload"]
    rpc = wl == "rpc"
    how = f"{c['count']:,} messages" if c["count"] else f"{c['duration_s']:g} s (+{c['warmup_s']:g} s warmup)"
    procs = "each client in its own process" if c["procs"] else "all clients in one process"
    head = [
        f"{s['name']} {s['version']} bench {wl}: {c['producers']} producers x {c['consumers']} consumers, "
        f"{'inflight' if rpc else 'batch'} {c['inflight']}, {c['size']} B, {how}, loop {c['loop']}, {procs}",
        f"server {s['url']} (pid {_num(b['pid'], 'd')}{', external' if s['external'] else ''}), "
        f"durability {s['durability']}",
    ]
    rate_name = "rt/s" if rpc else "msgs/s"
    cols = ["workload", "PxCxW", "size", rate_name, "p50 us", "p90 us", "p99 us", "p99.9 us",
            "broker us/msg (usr+sys)", "producer us/msg", "consumer us/msg", "broker RSS MiB"]
    row = [wl, f"{c['producers']}x{c['consumers']}x{c['inflight']}", f"{c['size']} B",
           _num(doc["rate_per_s"], ",.0f"),
           *(_num(lat[f"p{q:g}"]) for q in QUANTILES),
           f"{_num(b['cpu_us_per_message'], '.2f')} ({_num(b['user_us_per_message'], '.2f')}+"
           f"{_num(b['sys_us_per_message'], '.2f')})",
           _num(p["cpu_us_per_message"], ".2f"), _num(k["cpu_us_per_message"], ".2f"),
           _num(b["rss_kib"] and b["rss_kib"] / 1024)]
    widths = [max(len(a), len(z)) for a, z in zip(cols, row, strict=True)]
    lines = [*head, "",
             "| " + " | ".join(a.ljust(w) for a, w in zip(cols, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|",
             "| " + " | ".join(z.ljust(w) for z, w in zip(row, widths, strict=True)) + " |", ""]
    unit = "round trips" if rpc else "messages"
    details = [(f"{unit}", f"{doc['messages']:,} in {doc['window_s']:g} s = {_num(doc['rate_per_s'], ',.0f')}/s, "
                           f"{_num(doc['mb_per_s'], ',.2f')} MB/s of payload; errors {doc['errors']:,}")]
    if lat["samples"]:
        kind = "round trip" if lat["kind"] == "round_trip" else "one way (send -> handler)"
        details.append(("latency", f"{kind}: mean {_num(lat['mean'])} us, max {_num(lat['max'])} us, "
                                   f"{lat['samples']:,} samples"))
    if doc["publish"]:
        pu = doc["publish"]
        target = f" (target {pu['rate_target_per_s']:,.0f}/s)" if pu["rate_target_per_s"] else ""
        details.append(("published", f"{pu['published']:,} = {_num(pu['published_per_s'], ',.0f')}/s{target}; "
                                     f"backlog at the end {pu['backlog']:,}; refused by the server "
                                     f"{pu['refused']:,}"))
    if doc["drain"]:
        d = doc["drain"]
        details.append(("fill", f"{d['published']:,} in {d['fill_s']:g} s = {_num(d['fill_rate_per_s'], ',.0f')}/s; "
                                f"broker {_num(d['broker_fill']['cpu_us_per_message'], '.2f')} us/msg; "
                                f"RSS full {_num(d['rss_kib_full'] and d['rss_kib_full'] / 1024)} MiB"))
        details.append(("drain", f"{doc['messages']:,} in {d['drain_s']:g} s after {d['connect_s']:g} s to connect = "
                                 f"{_num(d['drain_rate_per_s'], ',.0f')}/s; broker "
                                 f"{_num(d['broker_drain']['cpu_us_per_message'], '.2f')} us/msg"))
    details += [
        ("broker CPU", f"{_num(b['cpu_percent_of_core'])} % of a core; peak RSS "
                       f"{_num(b['peak_rss_kib'] and b['peak_rss_kib'] / 1024)} MiB"),
        ("clients CPU", f"{_num(cl['cpu_us_per_message'], '.2f')} us/msg, {_num(cl['cpu_percent_of_core'])} % "
                        f"of a core (producers {_num(p['cpu_percent_of_core'])} %, consumers "
                        f"{_num(k['cpu_percent_of_core'])} %)"),
        ("reads/writes/sleeps per msg", " ; ".join(
            f"{who} {_num(d['reads_per_message'], '.3f')}/{_num(d['writes_per_message'], '.3f')}/"
            f"{_num(d['sleeps_per_message'], '.3f')}" for who, d in (("broker", b), ("producers", p),
                                                                      ("consumers", k)))),
        ("all processes", f"{_num(doc['cpu_percent_of_core_all'])} % of a core "
                          f"({doc['machine']['usable_cpus']} CPUs: {doc['machine']['cpu_model']})"),
    ]
    width = max(len(n) for n, _ in details)
    lines += [f"  {n:<{width}}  {v}" for n, v in details]
    return "\n".join(lines)
