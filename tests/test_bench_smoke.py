"""The benchmarks still run: ``teomq bench`` end to end for each workload, and bench/micro once
without timing.

Behaviour only: no figure is compared with anything (STYLE.md: a benchmark is never a timed test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 120.0  # a loaded 2-core machine spawning a broker and two clients; not a timing check

TOP_KEYS = {"schema", "date", "system", "machine", "config", "workload", "window_s", "messages", "rate_per_s",
            "mb_per_s", "round_trips", "round_trips_per_s", "latency_us", "errors", "broker", "producers",
            "consumers", "clients", "cpu_percent_of_core_all", "publish", "drain"}
CPU_KEYS = {"cpu_us_per_message", "user_us_per_message", "sys_us_per_message", "reads_per_message",
            "writes_per_message", "sleeps_per_message", "cpu_percent_of_core"}


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TEOMQ_HOME"] = str(tmp_path / "teomq_home")  # the bench broker gets its own; this is for anything else
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return env


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "teomq", "bench", *args, "--producers", "1", "--consumers", "1",
         "--json", str(out), "--no-progress"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| workload |" in proc.stdout and "broker us/msg" in proc.stdout
    doc = json.loads(out.read_text())
    assert TOP_KEYS <= doc.keys()
    assert doc["schema"] == "teomq-bench/1"
    assert doc["system"]["name"] == "teomq" and doc["system"]["durability"] == "memory"
    assert {"nproc", "cpu_model", "python", "loop"} <= doc["machine"].keys()
    assert {"p50", "p90", "p99", "p99.9", "max", "mean", "samples", "histogram", "kind"} <= doc["latency_us"].keys()
    assert CPU_KEYS | {"pid", "rss_kib", "peak_rss_kib"} <= doc["broker"].keys()
    assert CPU_KEYS <= doc["producers"].keys() and CPU_KEYS <= doc["consumers"].keys()
    assert doc["config"]["producers"] == 1 and doc["config"]["consumers"] == 1
    assert doc["errors"] == 0
    assert doc["broker"]["rss_kib"] > 0
    # the broker it started is gone again (the pid may have been reused by now: check what it runs)
    try:
        cmdline = Path(f"/proc/{doc['broker']['pid']}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    assert b"teomq-bench-" not in cmdline
    return proc, doc


@pytest.mark.integration
def test_bench_rpc(tmp_path: Path) -> None:
    _, doc = _bench(tmp_path, "rpc", "--inflight", "4", "--duration", "1", "--warmup", "0.5")
    assert doc["workload"] == "rpc" and doc["config"]["inflight"] == 4
    assert doc["round_trips"] > 0 and doc["messages"] == doc["round_trips"]
    assert doc["latency_us"]["kind"] == "round_trip"
    assert doc["latency_us"]["samples"] == doc["round_trips"]
    assert doc["consumers"]["messages"] >= doc["round_trips"]


@pytest.mark.integration
def test_bench_publish(tmp_path: Path) -> None:
    _, doc = _bench(tmp_path, "publish", "--duration", "1", "--warmup", "0.5")
    assert doc["workload"] == "publish" and doc["round_trips"] is None
    assert doc["messages"] > 0
    assert doc["publish"]["published"] >= 0
    assert doc["latency_us"]["kind"] == "one_way" and doc["latency_us"]["samples"] > 0


@pytest.mark.integration
def test_bench_drain(tmp_path: Path) -> None:
    _, doc = _bench(tmp_path, "drain", "--count", "2000")
    assert doc["workload"] == "drain" and doc["config"]["count"] == 2000
    assert doc["messages"] == 2000
    drain = doc["drain"]
    assert drain["published"] == 2000 and drain["count"] == 2000
    assert drain["fill_rate_per_s"] > 0 and drain["drain_rate_per_s"] > 0


def test_micro_benchmarks_execute(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "bench/micro", "--benchmark-disable", "-q"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_ab_alternates_two_trees_and_prints_every_figure(tmp_path: Path) -> None:
    # one pair, the same tree on both sides, two driver options: the table has each figure once
    doc = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab.py"), "--base", str(ROOT), "--new", str(ROOT), "--pairs", "1",
         "--base-opt", "log=0", "--new-opt", "log=1", "--json", str(doc), "--",
         "rpc", "-producers", "1", "-consumers", "1", "-inflight", "2", "-duration", "0.5", "-warmup", "0"],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "median" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| round trips/s", "| messages/s", "| p50 us", "| p99 us",
                                                 "| broker CPU us/msg", "| producers CPU us/msg",
                                                 "| consumers CPU us/msg"]
    runs = json.loads(doc.read_text())
    assert len(runs["base"]) == len(runs["new"]) == 1 and runs["new"][0]["errors"] == 0
