"""The producer and consumer processes of tests/test_schedule.py: the teomq library, writing
what they did to a file (one line per message) for the test to check afterwards.

``python schedule_peer.py produce ENDPOINT COUNT SEED OUT``: publishes COUNT messages (payload:
the index) with priorities 0-3, a tenth delayed by 1-3 s and another tenth with a 1 s time to
live, in batches of BATCH, each batch confirmed (stored) before the next. OUT gets one line per
message: ``index priority delay ttl sent confirmed`` (wall-clock times: ``sent`` before its
publish, ``confirmed`` once its batch's confirmation came). Prints ``published COUNT`` at the end.

``python schedule_peer.py consume ENDPOINT OUT WORK``: a consumer with prefetch 1 whose sync
handler takes WORK seconds (slower than the producer). OUT gets one line per delivery:
``index redelivered after received`` where ``received`` is when the handler began and ``after``
when its previous handler ended (its answer left after that; for the first delivery, before
the connection was made): the broker chose this message between the two. Prints ``ready``
once connected; exits when the broker goes away.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time

from teomq import Consumer, Producer
from teomq.client import DeliveryContext

BATCH = 500


def say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def produce(endpoint: str, count: int, seed: int, out: str) -> None:
    rng = random.Random(seed)
    async with Producer(endpoint, timeout=60.0, reconnect=False) as p:
        with open(out, "w", encoding="ascii") as f:
            for start in range(0, count, BATCH):
                rows = []
                for i in range(start, min(start + BATCH, count)):
                    prio = rng.randrange(4)
                    kind = rng.random()
                    delay = round(rng.uniform(1.0, 3.0), 3) if kind < 0.1 else 0.0
                    ttl = 1.0 if 0.1 <= kind < 0.2 else 0.0
                    sent = time.time()
                    p.publish(str(i).encode(), priority=prio, delay=delay or None, ttl=ttl or None)
                    rows.append((i, prio, delay, ttl, sent))
                await p.confirmed(0)
                confirmed = time.time()
                f.write("".join(f"{i} {prio} {delay} {ttl} {sent:.6f} {confirmed:.6f}\n"
                                for i, prio, delay, ttl, sent in rows))
    say(f"published {count}")


async def consume(endpoint: str, out: str, work: float) -> None:
    f = open(out, "w", encoding="ascii", buffering=1 << 16)
    last = time.time()

    def handler(data: bytes, ctx: DeliveryContext) -> None:
        nonlocal last
        received = time.time()
        if work:
            time.sleep(work)
        f.write(f"{data.decode()} {int(ctx.redelivered)} {last:.6f} {received:.6f}\n")
        last = time.time()   # (the answer leaves after this)
        return None

    try:
        async with Consumer(endpoint, handler, prefetch=1, timeout=60.0, reconnect=False) as c:
            say("ready")
            await c.wait_closed()
    finally:
        f.close()
        say("closed")


def main() -> None:
    mode, endpoint, *rest = sys.argv[1:]
    if mode == "produce":
        asyncio.run(produce(endpoint, int(rest[0]), int(rest[1]), rest[2]))
    else:
        asyncio.run(consume(endpoint, rest[0], float(rest[1])))


if __name__ == "__main__":
    main()
