"""The pure pieces of teomq.benchmark: percentiles, the result document, options, driver specs.

No process is started here (tests/test_bench_smoke.py runs ``teomq bench`` end to end).
"""

from __future__ import annotations

import argparse
import array
import importlib.util
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from teomq.benchmark import command, loader, proc_stats, report, stats
from teomq.benchmark.driver import Driver, Server
from teomq.benchmark.progress import NoProgress, ProgressBar, make_progress
from teomq.benchmark.workers import Config, shares

ROOT = Path(__file__).resolve().parent.parent
np = pytest.importorskip("numpy")


def _chunks(values: list[int], parts: int = 3) -> list[bytes]:
    return [array.array("q", values[i::parts]).tobytes() for i in range(parts)]


# -- percentiles ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 10, 999, 1000, 1001, 12345])
@pytest.mark.parametrize("q", [0.1, 1.0, 50.0, 90.0, 99.0, 99.9, 100.0])
def test_nearest_rank_matches_numpy_inverted_cdf(n: int, q: float) -> None:
    rng = random.Random(n * 1000 + int(q * 10))
    values = sorted(rng.randrange(1, 10**7) for _ in range(n))
    assert stats.nearest_rank(values, q) == np.percentile(np.array(values), q, method="inverted_cdf")


def test_nearest_rank_of_nothing_is_nan() -> None:
    assert stats.nearest_rank([], 50.0) != stats.nearest_rank([], 50.0)


def test_summarize_numpy_and_pure_agree() -> None:
    rng = random.Random(7)
    values = [int(rng.lognormvariate(11, 1.2)) for _ in range(20_000)] + [1000, 2000, 5_000_000_000_000]
    chunks = _chunks(values)
    with_numpy = stats.summarize(chunks)
    pure = stats._summarize_py(chunks, stats.QUANTILES)
    assert with_numpy == pure
    arr = np.array(values) / 1e3
    for q in stats.QUANTILES:
        assert with_numpy[f"p{q:g}"] == round(float(np.percentile(arr, q, method="inverted_cdf")), 1)
    assert with_numpy["samples"] == len(values)
    assert with_numpy["max"] == round(max(values) / 1e3, 1)
    assert sum(c for _, c in with_numpy["histogram"]) == len(values)
    assert with_numpy["histogram"][-1][0] is None  # 5e12 ns is above the last bound


def test_histogram_bounds_are_inclusive_upper() -> None:
    # 1000 ns = 1 µs falls in the "<= 1" bucket, 1001 ns in "<= 2"
    doc = stats.summarize([array.array("q", [1000, 1001, 2000, 2001]).tobytes()])
    assert doc["histogram"] == [[1, 1], [2, 2], [5, 1]]
    assert stats._summarize_py([array.array("q", [1000, 1001, 2000, 2001]).tobytes()],
                               stats.QUANTILES)["histogram"] == doc["histogram"]


def test_summarize_empty() -> None:
    doc = stats.summarize([b"", b""])
    assert doc["samples"] == 0 and doc["p50"] is None and doc["histogram"] == []


def test_shares_split_evenly() -> None:
    assert shares(10, 3) == [4, 3, 3]
    assert shares(2, 4) == [1, 1, 0, 0]
    assert sum(shares(200_001, 7)) == 200_001


# -- CPU figures and the result document ------------------------------------------------------


def test_cpu_figures() -> None:
    spent = {"user_ns": 2_000_000, "sys_ns": 6_000_000, "reads": 500, "writes": 400, "sleeps": 100}
    f = report.cpu_figures(spent, 1000, 2.0)
    assert f["cpu_us_per_message"] == 8.0 and f["user_us_per_message"] == 2.0 and f["sys_us_per_message"] == 6.0
    assert f["reads_per_message"] == 0.5 and f["writes_per_message"] == 0.4 and f["sleeps_per_message"] == 0.1
    assert f["cpu_percent_of_core"] == 0.4
    # too few read()/write() calls to be the traffic's (asyncio's loop uses recv/send): unknown
    few = report.cpu_figures({**spent, "reads": 0, "writes": 1}, 10_000, 2.0)
    assert few["reads_per_message"] is None and few["writes_per_message"] is None
    assert report.cpu_figures(None, 10, 1.0)["cpu_us_per_message"] is None


class _FakeDriver(Driver):
    name = "fake"
    description = "no server"
    durability = "memory"

    def start_server(self, workdir: str) -> Server:
        raise NotImplementedError

    async def producer(self, url: str, index: int, workload: str, queue: str) -> Any:
        raise NotImplementedError

    async def consumer(self, url: str, index: int, workload: str, queue: str, handler: Any) -> Any:
        raise NotImplementedError


def _cfg(**kw: Any) -> Config:
    base: dict[str, Any] = {"workload": "rpc", "producers": 2, "consumers": 1, "inflight": 8, "size": 100,
                            "duration": 2.0, "count": 0, "warmup": 1.0, "procs": True, "loop": "asyncio",
                            "driver": "fake"}
    base.update(kw)
    return Config(**base)


def _spent(us: int) -> dict[str, int]:
    return {"user_ns": us * 250, "sys_ns": us * 750, "reads": us, "writes": us, "sleeps": us // 2}


def _raw_rpc(cfg: Config) -> dict[str, Any]:
    lat = [array.array("q", [100_000 + i for i in range(n)]).tobytes() for n in (300, 200)]
    producers = [{"pid": 10 + i, "roles": ["producer"], "windows": {"run": _spent(1000)},
                  "workers": [{"role": "producer", "index": i, "sent": 400, "answered": 350, "errors": 0,
                               "in_window": 300 - 100 * i, "latency_ns": lat[i], "finished_ns": 0}]}
                 for i in range(2)]
    consumer = {"pid": 20, "roles": ["consumer"], "windows": {"run": _spent(800)},
                "workers": [{"role": "consumer", "index": 0, "received": 700, "in_window": 500, "latency_ns": b"",
                             "first_ns": 1, "last_ns": 2, "connected_ns": 1}]}
    return {"server": Server(url="127.0.0.1:1", pid=99, version="9.9"), "driver": _FakeDriver(),
            "groups": [consumer, *producers],
            "phases": {"run": {"start_ns": 0, "ws": 1, "we": 2, "end_ns": 2, "window_s": cfg.duration,
                               "broker": _spent(2000), "rss": (40960, 51200)}}}


def test_build_rpc_document() -> None:
    cfg = _cfg()
    doc = report.build(cfg, _raw_rpc(cfg))
    json.loads(json.dumps(doc))  # plain JSON
    assert doc["schema"] == report.SCHEMA
    assert doc["system"] == {"name": "fake", "version": "9.9", "driver": "fake", "description": "no server",
                             "durability": "memory", "url": "127.0.0.1:1", "external": False}
    assert doc["round_trips"] == doc["messages"] == 500 and doc["round_trips_per_s"] == 250.0
    assert doc["rate_per_s"] == 250.0 and doc["mb_per_s"] == 0.03
    assert doc["latency_us"]["samples"] == 500 and doc["latency_us"]["kind"] == "round_trip"
    assert doc["broker"]["cpu_us_per_message"] == 4.0 and doc["broker"]["rss_kib"] == 40960
    assert doc["producers"]["cpu_us_per_message"] == 4.0  # 2 x 1000 µs / 500 round trips
    assert doc["consumers"]["cpu_us_per_message"] == 1.6
    assert doc["clients"]["cpu_us_per_message"] == 5.6
    assert doc["producers"]["per_process"] == [350, 350]
    assert doc["publish"] is None and doc["drain"] is None
    assert doc["config"]["warmup_s"] == 1.0 and doc["config"]["count"] is None
    table = report.format_table(doc)
    assert "| workload |" in table and "| rpc " in table and "250" in table


def test_build_without_procs_has_no_role_split() -> None:
    cfg = _cfg(procs=False)
    raw = _raw_rpc(cfg)
    workers = [w for g in raw["groups"] for w in g["workers"]]
    raw["groups"] = [{"pid": 10, "roles": ["consumer", "producer"], "windows": {"run": _spent(2800)},
                      "workers": workers}]
    doc = report.build(cfg, raw)
    assert doc["producers"]["cpu_us_per_message"] is None and doc["consumers"]["cpu_us_per_message"] is None
    assert doc["clients"]["cpu_us_per_message"] == 5.6
    assert "n/a" in report.format_table(doc)


def test_build_publish_document() -> None:
    cfg = _cfg(workload="publish", rate=500.0)
    raw = _raw_rpc(cfg)
    for g in raw["groups"]:
        for w in g["workers"]:
            if w["role"] == "producer":
                w.update(latency_ns=b"", refused=3)
            else:
                w["latency_ns"] = array.array("q", [5000] * 10).tobytes()
    doc = report.build(cfg, raw)
    assert doc["round_trips"] is None and doc["messages"] == 500 and doc["rate_per_s"] == 250.0
    assert doc["publish"] == {"published": 500, "published_per_s": 250.0, "backlog": 0, "refused": 6,
                              "rate_target_per_s": 500.0}
    assert doc["errors"] == 6
    assert doc["latency_us"]["kind"] == "one_way" and doc["latency_us"]["p50"] == 5.0
    assert doc["producers"]["cpu_us_per_message"] == 4.0  # per message published
    assert "refused by the server 6" in report.format_table(doc)


def test_build_drain_document() -> None:
    cfg = _cfg(workload="drain", count=1000, duration=0.0, warmup=0.0)
    s = 10**9
    raw = {"server": Server(url="u", pid=None), "driver": _FakeDriver(),
           "groups": [{"pid": 1, "roles": ["producer"], "windows": {"fill": _spent(500)},
                       "workers": [{"role": "producer", "index": i, "sent": 500, "answered": 0, "errors": 0,
                                    "in_window": 0, "latency_ns": b"", "finished_ns": s // 2} for i in range(2)]},
                      {"pid": 2, "roles": ["consumer"], "windows": {"drain": _spent(300)},
                       "workers": [{"role": "consumer", "index": 0, "received": 1000, "in_window": 1000,
                                    "latency_ns": b"", "first_ns": 3 * s, "last_ns": 4 * s,
                                    "connected_ns": 2 * s}]}],
           "phases": {"fill": {"start_ns": 0, "end_ns": s, "broker": None, "rss": (0, 0)},
                      "drain": {"start_ns": 2 * s - s // 10, "end_ns": 4 * s, "broker": None, "rss": (0, 0)}}}
    doc = report.build(cfg, raw)
    d = doc["drain"]
    assert d["fill_s"] == 0.5 and d["fill_rate_per_s"] == 2000.0
    assert d["drain_s"] == 2.0 and d["drain_rate_per_s"] == 500.0 and d["connect_s"] == 0.1
    assert doc["rate_per_s"] == 500.0 and doc["messages"] == 1000
    assert doc["broker"]["cpu_us_per_message"] is None and doc["broker"]["pid"] is None
    assert doc["producers"]["cpu_us_per_message"] == 0.5 and doc["consumers"]["cpu_us_per_message"] == 0.3
    assert doc["latency_us"]["kind"] is None
    report.format_table(doc)


def test_machine_info() -> None:
    info = report.machine_info("asyncio")
    assert info["nproc"] == os.cpu_count() and info["loop"] == "asyncio" and info["python"]


# -- command line ----------------------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return command.build_parser().parse_args(list(argv))


def test_config_defaults() -> None:
    cfg = command.config_from_args(_args("rpc", "--loop", "asyncio"))
    assert (cfg.producers, cfg.consumers, cfg.inflight, cfg.size) == (4, 4, 32, 100)
    assert cfg.duration == command.DEFAULT_DURATION and cfg.count == 0 and cfg.warmup == 2.0 and cfg.procs
    assert cfg.driver == "teomq.benchmark.teomq_driver:TeomqDriver"
    drain = command.config_from_args(_args("drain", "--loop", "asyncio"))
    assert drain.count == command.DEFAULT_DRAIN_COUNT and drain.duration == 0 and drain.warmup == 0
    counted = command.config_from_args(_args("publish", "-count", "500", "-no-procs", "-o", "prefetch=8",
                                             "--loop", "asyncio"))
    assert counted.count == 500 and counted.duration == 0 and not counted.procs
    assert counted.options == {"prefetch": "8"}


@pytest.mark.parametrize("argv", [["drain", "--duration", "3"], ["rpc", "--count", "5", "--duration", "3"],
                                  ["rpc", "--broker-pid", "7"], ["rpc", "--rate", "1000"]])
def test_config_refuses(argv: list[str]) -> None:
    with pytest.raises(ValueError):
        command.config_from_args(_args(*argv, "--loop", "asyncio"))


@pytest.mark.parametrize("argv", [["nope"], ["rpc", "--producers", "0"], ["rpc", "--duration", "0"],
                                  ["rpc", "-o", "novalue"]])
def test_parser_refuses(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)


def test_teomq_cli_has_bench() -> None:
    from teomq.cli import build_parser

    args = build_parser().parse_args(["bench", "publish", "-producers", "2", "--no-progress"])
    assert args.subcommand == "bench" and args.workload == "publish" and args.producers == 2 and not args.progress


def test_load_py_maps_its_flags() -> None:
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    assert spec is not None and spec.loader is not None
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    args = load.build_parser().parse_args(["--producers", "1", "--mode", "request", "--prefetch", "8",
                                           "--timeout", "3", "--broker", "h:1", "--broker-pid", "5"])
    bench = command.build_parser().parse_args(load.to_bench_argv(args))
    assert bench.workload == "rpc" and bench.producers == 1 and bench.broker == "h:1" and bench.broker_pid == 5
    assert dict(bench.options) == {"mode": "request", "prefetch": "8", "timeout": "3.0"}


# -- driver specs ----------------------------------------------------------------------------


def test_split_spec() -> None:
    assert loader.split_spec("a.b:C") == ("a.b", "C")
    assert loader.split_spec("a.b") == ("a.b", "")
    assert loader.split_spec("/x/y.py:Drv") == ("/x/y.py", "Drv")


def test_load_builtin_and_file_drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec, paths = loader.resolve("teomq")
    drv = loader.load_driver(spec, {"prefetch": "8"}, paths)
    assert drv.name == "teomq" and drv.durability == "memory" and drv.options == {"prefetch": "8"}
    (tmp_path / "my_peer.py").write_text(
        "from teomq.benchmark.driver import Driver\n"
        "class Peer(Driver):\n"
        "    name = 'peer'\n"
        "    def start_server(self, workdir): ...\n"
        "    async def producer(self, url, index, workload, queue): ...\n"
        "    async def consumer(self, url, index, workload, queue, handler): ...\n")
    monkeypatch.chdir(tmp_path)
    for text in ("my_peer.py", "my_peer.py:Peer", "my_peer:Peer", "my_peer"):
        spec, paths = loader.resolve(text)
        assert loader.load_driver(spec, None, paths).name == "peer"
    with pytest.raises(ValueError):
        loader.resolve("missing_dir/none.py")
    with pytest.raises(ValueError):
        loader.load_driver("my_peer:Nope", None, [str(tmp_path)])


# -- small helpers ---------------------------------------------------------------------------


def test_progress_bar_draws_and_clears() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    bar.phase("measure", 10.0, "s")
    bar.update(2.5, 1000)
    assert "2.5/10.0 s" in out.getvalue() and "measure" in out.getvalue()
    bar.finish()
    assert out.getvalue().endswith("\r")
    assert isinstance(make_progress(True, io.StringIO()), NoProgress)  # not a terminal: nothing drawn
    assert not isinstance(make_progress(True, io.StringIO()), ProgressBar)


def test_proc_stats_of_this_process() -> None:
    mine = proc_stats.self_counters()
    assert set(mine) == set(proc_stats.COUNTER_KEYS)
    theirs = proc_stats.proc_counters(os.getpid())
    assert theirs is not None and set(theirs) == set(proc_stats.COUNTER_KEYS)
    assert proc_stats.proc_rss_kib(os.getpid())[0] > 0
    assert proc_stats.delta({"a": 1}, {"a": 3}) == {"a": 2} and proc_stats.delta(None, {"a": 1}) is None
    assert proc_stats.summed([None, {k: 1 for k in proc_stats.COUNTER_KEYS}])["reads"] == 1


def test_socket_barrier_sees_unread_bytes() -> None:
    """The teomq driver's drain() barrier: bytes the peer has not read yet are visible (Linux)."""
    import socket
    import time

    from teomq.benchmark.teomq_driver import _unread_by_peer, _unsent

    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("no /proc/net/tcp")
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen()
        with socket.create_connection(ls.getsockname()) as c:
            s, _ = ls.accept()
            with s:
                c.sendall(b"x" * 5000)
                deadline = time.monotonic() + 5
                while _unread_by_peer(c.getsockname(), c.getpeername()) != 5000 and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert _unread_by_peer(c.getsockname(), c.getpeername()) == 5000
                got = 0
                while got < 5000:
                    got += len(s.recv(10000))
                assert _unread_by_peer(c.getsockname(), c.getpeername()) == 0
                assert _unsent(c) == 0
