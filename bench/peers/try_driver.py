#!/usr/bin/env python3
"""Smoke-test a peer driver in one process, without the harness.

    python bench/peers/try_driver.py nats [--workloads rpc,publish,drain] [--seconds 3] [--inflight 32]
    python bench/peers/try_driver.py peers.redis_driver:RedisDriver

Starts the driver's private server in a temporary directory, runs 1 producer and 1 consumer
on one event loop (uvloop if installed) for each workload, prints counts and rates, and stops
the server (also on errors and Ctrl-C). Figures from here are not benchmark figures: producer,
consumer and harness share one process.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shutil
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
for p in (ROOT, BENCH):
    if p not in sys.path:
        sys.path.insert(0, p)

from teomq.benchmark.driver import Driver

SHORT = {
    "nats": "peers.nats_driver:NatsDriver",
    "redis": "peers.redis_driver:RedisDriver",
    "rabbitmq": "peers.rabbitmq_driver:RabbitDriver",
}


def load_driver(spec: str, options: dict[str, str]) -> Driver:
    module, _, cls = SHORT.get(spec, spec).partition(":")
    return getattr(importlib.import_module(module), cls)(options)  # type: ignore[no-any-return]


def echo(data: bytes) -> bytes:
    return data


async def try_rpc(driver: Driver, url: str, queue: str, seconds: float, inflight: int, size: int) -> str:
    consumer = await driver.consumer(url, 0, "rpc", queue, echo)
    producer = await driver.producer(url, 0, "rpc", queue)
    loop = asyncio.get_running_loop()
    payload = os.urandom(size)
    state = {"answered": 0, "errors": 0, "outstanding": 0, "stop": False}
    finished = loop.create_future()
    first_error: list[BaseException] = []

    def done(err: BaseException | None) -> None:
        state["outstanding"] -= 1
        if err is None:
            state["answered"] += 1
        else:
            state["errors"] += 1
            if not first_error:
                first_error.append(err)
        if state["stop"]:
            if not state["outstanding"] and not finished.done():
                finished.set_result(None)
            return
        state["outstanding"] += 1
        producer.request(payload, done)

    t0 = time.perf_counter()
    for _ in range(inflight):
        state["outstanding"] += 1
        producer.request(payload, done)
    await asyncio.sleep(seconds)
    state["stop"] = True
    await asyncio.wait_for(finished, 30)
    elapsed = time.perf_counter() - t0
    await producer.close()
    await consumer.close()
    err = f", first error {first_error[0]!r}" if first_error else ""
    return (f"rpc: {state['answered']:,} answered, {state['errors']} errors, consumer saw {consumer.count:,}; "
            f"{state['answered'] / elapsed:,.0f}/s{err}")


async def try_publish(driver: Driver, url: str, queue: str, seconds: float, batch: int, size: int) -> str:
    consumer = await driver.consumer(url, 0, "publish", queue, echo)
    producer = await driver.producer(url, 0, "publish", queue)
    payload = os.urandom(size)
    sent = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            producer.publish(payload)
        sent += batch
        await producer.drain()
    deadline = time.perf_counter() + 10
    while consumer.count < sent and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - t0
    await producer.close()
    await consumer.close()
    return f"publish: sent {sent:,}, consumer counted {consumer.count:,}; {consumer.count / elapsed:,.0f}/s"


async def try_drain(driver: Driver, url: str, queue: str, n: int, size: int) -> str:
    await driver.purge(url, queue)
    producer = await driver.producer(url, 0, "drain", queue)
    payload = os.urandom(size)
    t0 = time.perf_counter()
    for i in range(n):
        producer.publish(payload)
        if i % 1000 == 999:
            await producer.drain()
    await producer.drain()
    t1 = time.perf_counter()
    await producer.close()
    consumer = await driver.consumer(url, 0, "drain", queue, echo)
    t2 = time.perf_counter()
    deadline = t2 + 60
    while consumer.count < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    t3 = time.perf_counter()
    count = consumer.count
    await consumer.close()
    await driver.purge(url, queue)
    return (f"drain: published {n:,} in {t1 - t0:.2f} s ({n / (t1 - t0):,.0f}/s, confirmed); "
            f"consumed {count:,} in {t3 - t2:.2f} s ({count / (t3 - t2):,.0f}/s)")


async def run(driver: Driver, url: str, args: argparse.Namespace) -> None:
    for w in args.workloads.split(","):
        queue = f"bench.try.{w}"
        if w == "rpc":
            print(await try_rpc(driver, url, queue, args.seconds, args.inflight, args.size), flush=True)
        elif w == "publish":
            print(await try_publish(driver, url, queue, args.seconds, args.inflight, args.size), flush=True)
        elif w == "drain":
            print(await try_drain(driver, url, queue, args.messages, args.size), flush=True)
        else:
            raise SystemExit(f"unknown workload {w!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("driver", help="nats | redis | rabbitmq | module:Class (bench/ is on sys.path)")
    ap.add_argument("--workloads", default="rpc,publish,drain")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--inflight", type=int, default=32)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--messages", type=int, default=20000, help="drain: messages to publish first")
    ap.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="driver option")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = ap.parse_args()
    driver = load_driver(args.driver, dict(o.split("=", 1) for o in args.option))
    workdir = tempfile.mkdtemp(prefix=f"teomq-try-{driver.name}-")
    server = None
    try:
        t = time.perf_counter()
        server = driver.start_server(workdir)
        print(f"{driver.name} {server.version} at {server.url}, pid {server.pid} "
              f"(started in {time.perf_counter() - t:.1f} s)", flush=True)
        factory: Any = None
        if args.loop == "uvloop":
            import uvloop

            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(run(driver, server.url, args))
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
