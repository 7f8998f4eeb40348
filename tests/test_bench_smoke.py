"""The benchmarks still run: bench/load.py end to end, and bench/micro once without timing.

Behaviour only: no figure is compared with anything (STYLE.md: a benchmark is never a timed test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HANG_GUARD = 120.0  # a loaded 2-core machine spawning a broker and two clients; not a timing check


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TEOMQ_HOME"] = str(tmp_path / "teomq_home")  # load.py gives its broker its own; this is for anything else
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    return env


@pytest.mark.integration
def test_load_generator_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "--producers", "1", "--consumers", "1",
         "--inflight", "4", "--duration", "1", "--warmup", "0.5", "--json", str(out)],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "round trips/s" in proc.stdout
    result = json.loads(out.read_text())
    assert {"config", "window_s", "round_trips", "round_trips_per_s", "latency_us", "errors",
            "broker", "producers", "consumers"} <= result.keys()
    assert {"p50", "p90", "p99", "p99.9", "max", "mean", "samples"} <= result["latency_us"].keys()
    assert {"pid", "cpu_us_per_round_trip", "rss_kib", "peak_rss_kib"} <= result["broker"].keys()
    assert "cpu_us_per_request" in result["producers"]
    assert {"messages", "cpu_us_per_message"} <= result["consumers"].keys()
    assert result["config"]["producers"] == 1 and result["config"]["inflight"] == 4
    assert result["round_trips"] > 0
    assert result["latency_us"]["samples"] == result["round_trips"]
    assert result["errors"] == 0
    assert result["broker"]["rss_kib"] > 0
    # the broker it started is gone again (the pid may have been reused by now: check what it runs)
    try:
        cmdline = Path(f"/proc/{result['broker']['pid']}/cmdline").read_bytes()
    except OSError:
        cmdline = b""
    assert b"teomq-load-" not in cmdline


def test_micro_benchmarks_execute(tmp_path: Path) -> None:
    pytest.importorskip("pytest_benchmark")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "bench/micro", "--benchmark-disable", "-q"],
        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_GUARD,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout
