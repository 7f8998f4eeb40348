"""Client programs for tests/test_flow_control.py, run as their own processes (so that their
memory is theirs alone): ``python tests/flow_clients.py publish|both ENDPOINT N SIZE``.

Each prints ``key=value`` lines the test reads; ``done`` last.
"""

from __future__ import annotations

import asyncio
import resource
import sys

import teomq
from waiting import until


def rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def publish(endpoint: str, n: int, size: int) -> None:
    """A publish() loop with drain() every 1,000, and a consumer in the same process."""
    received = 0

    def handler(data: bytes) -> None:
        nonlocal received
        received += 1

    async with teomq.Consumer(endpoint, handler, name="flow-consumer", prefetch=256):
        async with teomq.Producer(endpoint, name="flow-producer") as producer:
            payload = b"x" * size
            await producer.ping()
            print(f"rss_before={rss_mib():.1f}", flush=True)
            for i in range(n):
                producer.publish(payload)
                if i % 1000 == 999:
                    await producer.drain()
            print(f"received_when_loop_ended={received}", flush=True)
            await producer.ping(timeout=120)
            print(f"pinged refused={producer.stats['refused']}", flush=True)
            await until(lambda: received == n, f"all {n} messages at the consumer ({received} so far)")
            print(f"received={received} rss_after={rss_mib():.1f}", flush=True)
    print("done", flush=True)


async def both(endpoint: str, n: int, size: int) -> None:
    """A role="both" client publishing faster than its own (slow) handler answers."""
    received = 0
    refused: list[int] = []

    async def handler(data: bytes) -> bytes:
        nonlocal received
        received += 1
        await asyncio.sleep(0.002)
        return b"ok"

    client = teomq.Client(endpoint, role="both", name="flow-both", prefetch=8, handler=handler,
                          on_refused=lambda mid, err: refused.append(mid))
    async with client:
        payload = b"y" * size
        for i in range(n):
            client.publish(payload)
            if i % 100 == 99:
                await client.drain()
        await client.ping(timeout=120)
        print(f"published={n} held_back={client.stats['held_back']} refused={client.stats['refused']} "
              f"callbacks={len(refused)}", flush=True)
        await until(lambda: received == n, f"all {n} messages handled ({received} so far)")
        print(f"received={received}", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    what, endpoint, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run({"publish": publish, "both": both}[what](endpoint, count, size))
