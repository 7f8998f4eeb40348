"""Durable queues (docs/storage.md), tested by causing the faults: SIGKILL of the real broker,
torn and damaged segment files, a second broker on the same data directory.

Every broker is the real CLI (``teomq broker``, disk storage: its default) over real sockets;
the clients are teomq's, in the test's process. Each test asserts on every message. Waits are
hang guards; nothing here times anything.
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from procs import ProcGroup, parse_stat
from teomq._py import seglog as pylog
from teomq.client import Client, Consumer, Producer

pytestmark = pytest.mark.integration

HANG = 60.0


def segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "queues").glob("*.seg"))


async def publish_confirmed_by_ping(spec: str, prefix: str, count: int, burst: int,
                                    accepted: list[bytes]) -> None:
    """Publish ``count`` messages in bursts; after each burst a PING: once its PONG is back the
    broker has handled (and written to the OS) every message before it, so they go to ``accepted``."""
    async with Producer(spec, timeout=HANG, reconnect=False) as p:
        sent: list[bytes] = []
        for i in range(count):
            m = f"{prefix}-{i}".encode()
            p.publish(m)
            sent.append(m)
            if len(sent) == burst:
                await p.ping()
                accepted.extend(sent)
                sent.clear()
        await p.ping()
        accepted.extend(sent)


async def drain(spec: str, expect: int, *, settle: float = 1.0) -> list[bytes]:
    """Consume until ``expect`` messages came and then ``settle`` seconds passed with none new."""
    got: list[bytes] = []
    seen = asyncio.Event()

    def handler(data: bytes) -> bytes:
        got.append(bytes(data))
        seen.set()
        return b"ok"

    async with Consumer(spec, handler, timeout=HANG, reconnect=False):
        deadline = asyncio.get_running_loop().time() + HANG
        while len(got) < expect and asyncio.get_running_loop().time() < deadline:
            seen.clear()
            try:
                await asyncio.wait_for(seen.wait(), 1.0)
            except TimeoutError:
                pass
        last = -1
        while last != len(got):               # nothing more comes: whatever else was there came too
            last = len(got)
            await asyncio.sleep(settle)
    return got


def report_duplicates(got: list[bytes]) -> int:
    dupes = sum(v - 1 for v in collections.Counter(got).values() if v > 1)
    print(f"duplicates after the restart: {dupes}")
    return dupes


def test_second_broker_on_the_same_data_directory_refuses_to_start(procs: ProcGroup, tmp_path: Path) -> None:
    d = tmp_path / "data"
    first = procs.broker("-nomsg", "-noweb", data_dir=d)
    second = procs.start("broker", "-listen", ":0", "-noweb", "-data-dir", str(d), label="second")
    assert second.wait() == 1, second.describe()
    err = "\n".join(second.err_lines)
    assert "is in use by another broker" in err and f"pid {first.proc.pid}" in err, second.describe()
    assert first.proc.alive
    # the first one still serves, and once it is gone the directory is free again
    assert first.proc.terminate() == 0, first.proc.describe()
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    assert again.proc.terminate() == 0, again.proc.describe()


def test_queued_messages_survive_sigkill_at_random_moments(procs: ProcGroup, tmp_path: Path) -> None:
    """Producers publish while the broker is killed with SIGKILL at a random moment, five times;
    after each restart on the same data directory, everything the broker had acknowledged (a PONG
    after it) is still queued; a consumer at the end gets every one of them."""
    d = tmp_path / "data"
    rng = random.Random(1313)
    accepted: list[bytes] = []

    async def round_(spec: str, broker: Any, k: int) -> None:
        batch: list[bytes] = []
        tasks = [asyncio.create_task(publish_confirmed_by_ping(spec, f"r{k}p{j}", 4000, rng.choice((1, 7, 50)), batch))
                 for j in range(2)]
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        assert broker.proc.kill9() == -signal.SIGKILL
        await asyncio.gather(*tasks, return_exceptions=True)   # their connections are gone
        accepted.extend(batch)

    for k in range(5):
        broker = procs.broker("-nomsg", "-noweb", data_dir=d)
        asyncio.run(round_(broker.endpoint, broker, k))
    broker = procs.broker("-nomsg", "-noweb", "-stat", "-stat-interval", "0.2", data_dir=d)
    restored = broker.proc.wait_for_line(r"storage: .* (\d+) messages restored", stderr=True)
    assert int(restored.group(1)) >= len(accepted)
    got = asyncio.run(drain(broker.endpoint, len(set(accepted))))
    missing = set(accepted) - set(got)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    report_duplicates(got)
    assert len(accepted) > 0
    assert broker.proc.terminate() == 0, broker.proc.describe()


def test_requests_received_and_not_answered_are_delivered_again_after_sigkill(procs: ProcGroup,
                                                                               tmp_path: Path) -> None:
    """A request workload: consumers answer some deliveries and sit on others; the broker is
    killed; after the restart every request a consumer received and did not answer comes again,
    flagged as redelivered (the consumer sees it again)."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)
    received: set[bytes] = set()
    answered: set[bytes] = set()

    async def phase1() -> None:
        hold = asyncio.Event()

        async def handler(data: bytes) -> bytes:
            m = bytes(data)
            received.add(m)
            if int(m.split(b"-")[1]) % 3 == 0:
                await hold.wait()          # never answered before the kill
            answered.add(m)
            return b"answer " + m

        consumers = [Consumer(broker.endpoint, handler, prefetch=16, timeout=HANG, reconnect=False) for _ in range(2)]
        for c in consumers:
            await c.connect()
        p = Producer(broker.endpoint, timeout=HANG, reconnect=False)
        await p.connect()
        futures = [asyncio.ensure_future(p.request(f"q-{i}".encode())) for i in range(300)]
        while len(received) < 32:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert broker.proc.kill9() == -signal.SIGKILL
        await asyncio.gather(*futures, return_exceptions=True)
        for c in consumers:
            await c.close()
        await p.close()

    asyncio.run(phase1())
    unanswered = received - answered
    assert unanswered, "the workload should leave deliveries unanswered"
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = asyncio.run(drain(again.endpoint, len(unanswered)))
    missing = unanswered - set(got)
    assert not missing, f"{len(missing)} received and unanswered requests not delivered again: {sorted(missing)[:5]}"
    report_duplicates(got)
    assert again.proc.terminate() == 0, again.proc.describe()


@pytest.mark.parametrize("tear", ["truncated", "zeroed"])
def test_torn_tail_and_damaged_batch_are_reported_and_every_intact_message_served(procs: ProcGroup, tmp_path: Path,
                                                                                   tear: str) -> None:
    """The last batch torn (the file truncated in its middle, or its second half zeros: a write
    the crash cut short) and a flipped byte in a batch in the middle: the broker starts, reports
    both, and serves every message of the other batches."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)
    accepted: list[bytes] = []
    # one batch per burst: a PING after each makes the next burst another loop pass
    asyncio.run(publish_confirmed_by_ping(broker.endpoint, "t", 600, 100, accepted))
    assert broker.proc.kill9() == -signal.SIGKILL
    (seg,) = segments(d)
    parsed = pylog.read_segment(seg)
    batches = [b for b in parsed.batches if b.ok and any(r.type == pylog.REC_MSG for r in b.records())]
    assert len(batches) >= 4, parsed
    flipped, torn = batches[len(batches) // 2], batches[-1]
    assert torn.end - 8 < parsed.data_end <= torn.end    # the last batch is the tail (then zeros)
    lost = {r.payload for b in (flipped, torn) for r in b.records() if r.type == pylog.REC_MSG}
    with open(seg, "r+b") as f:
        f.seek(flipped.offset + 40 + flipped.length // 2)      # a payload byte in the middle
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
        if tear == "truncated":
            f.truncate(torn.offset + 40 + torn.length // 2)     # the file ends in the last batch
        else:
            f.seek(torn.offset + 40 + torn.length // 2)         # the last batch half written
            f.write(b"\0" * (torn.length - torn.length // 2))
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    cut = again.proc.wait_for_line(r"storage: (\S+): torn tail cut at offset (\d+) \((\d+) bytes\)", stderr=True)
    assert (cut.group(1), int(cut.group(2))) == (seg.name, torn.offset)
    skipped = again.proc.wait_for_line(r"storage: (\S+): a damaged batch at offset (\d+) skipped", stderr=True)
    assert (skipped.group(1), int(skipped.group(2))) == (seg.name, flipped.offset)
    intact = set(accepted) - lost
    got = asyncio.run(drain(again.endpoint, len(intact)))
    assert set(got) == intact, (f"missing {len(intact - set(got))}, unexpected {len(set(got) - intact)}")
    assert again.proc.terminate() == 0, again.proc.describe()
    # the cut is for good: a third start reads the log clean
    third = procs.broker("-nomsg", "-noweb", data_dir=d)
    third.proc.wait_for_line(r"storage: .* messages restored", stderr=True)
    assert third.proc.terminate() == 0
    assert not [line for line in third.proc.err_lines if "torn tail" in line or "damaged batch" in line]


def test_unknown_format_version_stops_the_broker_with_a_clear_error(procs: ProcGroup, tmp_path: Path) -> None:
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)
    asyncio.run(publish_confirmed_by_ping(broker.endpoint, "v", 10, 10, []))
    assert broker.proc.terminate() == 0
    (seg,) = segments(d)
    from teomq._py.crc32c import crc32c
    with open(seg, "r+b") as f:          # a segment a later teomq wrote: version 7, its CRC right
        head = bytearray(f.read(64))
        head[8:10] = (7).to_bytes(2, "little")
        head[60:64] = crc32c(bytes(head[:60])).to_bytes(4, "little")
        f.seek(0)
        f.write(head)
    again = procs.start("broker", "-listen", ":0", "-noweb", "-data-dir", str(d), label="again")
    assert again.wait() == 1, again.describe()
    assert re.search(r"log format version 7; this teomq reads version 1", "\n".join(again.err_lines)), again.describe()


def test_memory_storage_keeps_nothing(procs: ProcGroup, tmp_path: Path) -> None:
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-storage", "memory", data_dir=d)
    asyncio.run(publish_confirmed_by_ping(broker.endpoint, "m", 50, 50, []))
    assert broker.proc.kill9() == -signal.SIGKILL
    assert not (d / "queues").exists()
    again = procs.broker("-nomsg", "-noweb", "-storage", "memory", "-stat", "-stat-interval", "0.2", data_dir=d)
    stat = again.proc.wait_until(lambda out, err: next((s for s in map(parse_stat, out) if s), None), "a stat line")
    assert stat["queue"] == 0  # type: ignore[index]
    assert again.proc.terminate() == 0


# -- confirmed publishes: what each fsync policy survives ------------------------------------------


async def publish_confirmed(spec: str, prefix: str, count: int, window: int, confirmed: list[bytes],
                            progress: dict[str, int] | None = None) -> None:
    """Publish ``count`` messages keeping at most ``window`` unconfirmed; every message whose
    confirmation came goes to ``confirmed`` (also when the connection dies half way), and as
    they come ``progress[prefix]`` counts them, if given."""
    sent: list[tuple[bytes, Any]] = []
    try:
        async with Producer(spec, timeout=HANG, reconnect=False) as p:
            for i in range(count):
                m = f"{prefix}-{i}".encode()
                sent.append((m, p.publish(m)))
                if p.unconfirmed >= window:
                    await p.confirmed(window // 2)
                    if progress is not None:
                        progress[prefix] = len(sent) - p.unconfirmed
            await p.confirmed(0)
    finally:
        confirmed.extend(m for m, c in sent if c.confirmed)


def test_every_confirmed_message_survives_sigkill_at_20_random_moments(procs: ProcGroup, tmp_path: Path) -> None:
    """-fsync always: two producers publish 20,000 messages with confirmations; the broker is
    killed with SIGKILL at a random moment and restarted on the same data directory; every
    confirmed message is delivered after the restart. Twenty moments (bench/storage_soak.py: 200)."""
    rng = random.Random(20)
    dupes = lost = mid_flow = 0
    for k in range(20):
        d = tmp_path / f"data{k}"
        broker = procs.broker("-nomsg", "-noweb", "-fsync", "always", data_dir=d)
        confirmed: list[bytes] = []

        async def run() -> None:
            # the random moment: once a random number of the 20,000 are confirmed (any machine's speed)
            moment = rng.randrange(0, 19_000)
            progress: dict[str, int] = {}
            tasks = [asyncio.create_task(publish_confirmed(broker.endpoint, f"k{k}p{j}", 10_000, 1024, confirmed,
                                                           progress=progress)) for j in range(2)]
            while sum(progress.values()) < moment and not all(t.done() for t in tasks):
                await asyncio.sleep(0.001)
            await asyncio.sleep(rng.uniform(0.0, 0.01))   # and then at any point of a window
            assert broker.proc.kill9() == -signal.SIGKILL
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(run())
        again = procs.broker("-nomsg", "-noweb", data_dir=d)
        got = asyncio.run(drain(again.endpoint, len(confirmed), settle=0.5))
        missing = set(confirmed) - set(got)
        lost += len(missing)
        assert not missing, f"moment {k}: {len(missing)} of {len(confirmed)} confirmed messages lost"
        dupes += report_duplicates(got)
        mid_flow += len(confirmed) < 20_000
        assert again.proc.terminate() == 0, again.proc.describe()
    print(f"20 kills ({mid_flow} before every message was confirmed): 0 confirmed messages lost, {dupes} duplicates")
    assert mid_flow >= 10     # the moments fell while the producers were publishing


def power_cut_env(procs: ProcGroup) -> None:
    from teomq.storage import SYNCED_RECORD_ENV
    procs.env[SYNCED_RECORD_ENV] = "1"


def test_power_cut_always_loses_no_confirmed_message(procs: ProcGroup, tmp_path: Path) -> None:
    from teomq.storage import power_cut
    power_cut_env(procs)
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-fsync", "always", data_dir=d)
    confirmed: list[bytes] = []

    async def run() -> None:
        progress: dict[str, int] = {}   # confirmed so far per producer (``confirmed`` fills at the end)
        tasks = [asyncio.create_task(publish_confirmed(broker.endpoint, f"p{j}", 200_000, 1024, confirmed,
                                                       progress=progress)) for j in range(2)]
        while sum(progress.values()) < 10_000 and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        assert broker.proc.kill9() == -signal.SIGKILL   # mid-flow: records written and not yet synced
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    assert len(confirmed) < 400_000
    cut = power_cut(d)
    print(f"power cut: {cut} bytes cut per segment")
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = asyncio.run(drain(again.endpoint, len(confirmed), settle=0.5))
    missing = set(confirmed) - set(got)
    assert not missing, f"{len(missing)} of {len(confirmed)} confirmed messages lost to the power cut"
    assert confirmed
    report_duplicates(got)
    assert again.proc.terminate() == 0


def test_power_cut_interval_loses_at_most_the_last_interval(procs: ProcGroup, tmp_path: Path) -> None:
    """-fsync interval:100: a message is confirmed once written to the OS; a power cut loses at
    most what came after the last sync. Messages confirmed well over an interval before the cut
    (a second: ten intervals) all survive; of the last burst some may be lost (reported)."""
    from teomq.storage import power_cut
    power_cut_env(procs)
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-fsync", "interval:100", data_dir=d)
    early: list[bytes] = []
    late: list[bytes] = []

    async def run() -> None:
        await publish_confirmed(broker.endpoint, "early", 5_000, 1024, early)
        await asyncio.sleep(1.0)                       # ten intervals: a sync covered them
        await publish_confirmed(broker.endpoint, "late", 5_000, 1024, late)
        assert broker.proc.kill9() == -signal.SIGKILL

    asyncio.run(run())
    power_cut(d)
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = set(asyncio.run(drain(again.endpoint, len(early), settle=0.5)))
    assert set(early) <= got, f"{len(set(early) - got)} messages confirmed a second before the cut lost"
    print(f"interval:100: of the last {len(late)} confirmed just before the cut, {len(set(late) - got)} lost")
    assert got <= set(early) | set(late)
    assert again.proc.terminate() == 0


def test_power_cut_never_is_what_the_os_wrote(procs: ProcGroup, tmp_path: Path) -> None:
    """-fsync never: confirmed once written to the OS, never synced by the broker; a power cut
    (nothing synced since the start) loses them: the broker starts and serves what is left, no
    message that was not sent."""
    from teomq.storage import power_cut
    power_cut_env(procs)
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-fsync", "never", data_dir=d)
    confirmed: list[bytes] = []
    asyncio.run(publish_confirmed(broker.endpoint, "n", 5_000, 1024, confirmed))
    assert broker.proc.kill9() == -signal.SIGKILL
    power_cut(d)
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = set(asyncio.run(drain(again.endpoint, 0, settle=0.5)))
    assert len(confirmed) == 5_000 and got <= set(confirmed)
    print(f"never: {len(set(confirmed) - got)} of {len(confirmed)} confirmed messages lost to the power cut")
    assert again.proc.terminate() == 0


def test_waiting_messages_of_queue_and_fanout_commands_survive_a_restart(procs: ProcGroup, tmp_path: Path) -> None:
    """Command scheme: a queue command's waiting messages are in the log and come back, and so
    do a fanout command's that had no subscriber (docs/storage.md); a restart without the queue
    command keeps its messages on disk (logged), and a restart with it again delivers them."""
    d = tmp_path / "data"
    cmds = ("-command", "jobs:queue", "-command", "news:fanout")
    broker = procs.broker("-nomsg", "-noweb", *cmds, data_dir=d)

    async def publish_both() -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            for i in range(100):
                await p.publish(f"jobs/{i}".encode())
                p.publish(f"news/{i}".encode())
            await p.ping()

    asyncio.run(publish_both())
    assert broker.proc.kill9() == -signal.SIGKILL

    async def take(spec: str, name: str, expect: int) -> list[bytes]:
        got: list[bytes] = []
        async with Client(spec, role="consumer", handler=lambda d: got.append(bytes(d)), timeout=HANG) as c:
            await c.subscribe(name)
            deadline = asyncio.get_running_loop().time() + HANG
            while len(got) < expect and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
        return got

    without = procs.broker("-nomsg", "-noweb", "-command", "news:fanout", data_dir=d)
    without.proc.wait_for_line(r"storage: 100 recovered messages are for commands this broker does not have", stderr=True)
    assert asyncio.run(take(without.endpoint, "news", 100)) == [f"news/{i}".encode() for i in range(100)]
    assert without.proc.terminate() == 0
    again = procs.broker("-nomsg", "-noweb", *cmds, data_dir=d)
    got = asyncio.run(take(again.endpoint, "jobs", 100))
    assert sorted(got) == sorted(f"jobs/{i}".encode() for i in range(100))
    assert again.proc.terminate() == 0


# -- what a review found: each fault caused ---------------------------------------------------------


def test_a_damaged_segment_header_is_not_believed(procs: ProcGroup, tmp_path: Path) -> None:
    """A flipped bit in a segment header's base sequence number must not make the broker count
    that segment's messages against another one and delete a segment that still holds one."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-segment-size", "4096", data_dir=d)

    async def publish_each(names: list[bytes]) -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            for m in names:
                await p.publish(m + b"." * 3000)    # about one message per 4 KiB segment

    msgs = [b"m1", b"m2", b"m3"]
    asyncio.run(publish_each(msgs))
    assert broker.proc.kill9() == -signal.SIGKILL
    segs = segments(d)
    assert len(segs) >= 3
    with open(segs[1], "r+b") as f:                   # the second segment's base seq: 1 -> 3
        f.seek(24)
        base = int.from_bytes(f.read(8), "little")
        f.seek(24)
        f.write((base ^ 2).to_bytes(8, "little"))
    again = procs.broker("-nomsg", "-noweb", "-segment-size", "4096", data_dir=d)
    again.proc.wait_for_line(r"its header is damaged", stderr=True)
    held: list[bytes] = []

    async def answer_all_but_m1() -> None:
        release = asyncio.Event()

        async def handler(data: bytes) -> bytes | None:
            if data.startswith(b"m1"):
                held.append(bytes(data[:2]))
                await release.wait()                   # m1 stays unanswered
            return None

        async with Consumer(again.endpoint, handler, timeout=1.0, reconnect=False):   # (closing waits 1 s for m1's handler)
            while not held:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)                   # m2, m3 answered; their segments may go
        assert again.proc.kill9() == -signal.SIGKILL

    asyncio.run(answer_all_but_m1())
    third = procs.broker("-nomsg", "-noweb", "-segment-size", "4096", data_dir=d)
    got = asyncio.run(drain(third.endpoint, 1))
    assert [g[:2] for g in got] == [b"m1"], got         # the unanswered one is still there
    assert third.proc.terminate() == 0


def test_resync_after_a_damaged_batch_does_not_read_a_batch_inside_a_payload(procs: ProcGroup,
                                                                               tmp_path: Path) -> None:
    """A message whose payload is itself a well-formed batch (a DONE record of message 1) sits
    after a damaged batch header: recovery must take the next batch from the damaged one's own
    length, not from the forged bytes, and keep message 1."""
    import struct
    from teomq._py.crc32c import crc32c
    body = struct.pack("<BBHIQ", pylog.REC_DONE, 1, 0, 0, 1)       # 16 bytes: a whole body
    head = struct.pack("<4sHHIIQQI", b"TQLB", 1, 0, len(body), 1, 0, 1, 0)
    forged = head + struct.pack("<I", crc32c(body, crc32c(head))) + body
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)

    async def publish_two() -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            await p.publish(b"first")
            await p.publish(forged)
            await p.publish(b"third")

    asyncio.run(publish_two())
    assert broker.proc.kill9() == -signal.SIGKILL
    (seg,) = segments(d)
    parsed = pylog.read_segment(seg)
    carrier = next(b for b in parsed.batches if any(r.payload == forged for r in b.records()))
    with open(seg, "r+b") as f:                         # a bit of the carrier's header flipped
        f.seek(carrier.offset + 24)
        t = f.read(1)
        f.seek(carrier.offset + 24)
        f.write(bytes([t[0] ^ 1]))
    again = procs.broker("-nomsg", "-noweb", data_dir=d)
    again.proc.wait_for_line(r"a damaged batch at offset %d skipped \(%d bytes" % (carrier.offset, carrier.end - carrier.offset),
                             stderr=True)
    got = set(asyncio.run(drain(again.endpoint, 2)))
    assert got == {b"first", b"third"}, got
    assert again.proc.terminate() == 0


def test_rounds_over_more_than_64_segments_sync_them_all(procs: ProcGroup, tmp_path: Path) -> None:
    """-fsync interval with small segments: one sync round covers a hundred new segments; a power
    cut after it loses nothing published before it."""
    from teomq.storage import power_cut
    power_cut_env(procs)
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-segment-size", "4096", "-fsync", "interval:1000", data_dir=d)
    sent: list[bytes] = []

    async def publish() -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            for i in range(150):
                m = f"s{i}-".encode() + b"." * 2000
                p.publish(m)
                sent.append(m)
                await p.ping()                         # a pass (a batch) each
        await asyncio.sleep(3.0)                        # an interval passed: a sync covered them

    asyncio.run(publish())
    assert len(segments(d)) > 64
    assert broker.proc.kill9() == -signal.SIGKILL
    power_cut(d)
    again = procs.broker("-nomsg", "-noweb", "-segment-size", "4096", data_dir=d)
    got = set(asyncio.run(drain(again.endpoint, len(sent))))
    assert got == set(sent), f"{len(set(sent) - got)} lost"
    assert again.proc.terminate() == 0


def test_restarts_go_on_in_the_newest_segment(procs: ProcGroup, tmp_path: Path) -> None:
    """A queued message pins its segment; restarting the broker (cleanly, and with SIGKILL) goes
    on appending to that segment instead of preallocating a new file each time, and keeps every
    message."""
    d = tmp_path / "data"
    sent: list[bytes] = []
    for k in range(4):
        broker = procs.broker("-nomsg", "-noweb", data_dir=d)

        async def publish() -> None:
            async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
                for i in range(10):
                    m = f"r{k}-{i}".encode()
                    await p.publish(m)
                    sent.append(m)

        asyncio.run(publish())
        if k % 2:
            assert broker.proc.kill9() == -signal.SIGKILL
        else:
            assert broker.proc.terminate() == 0
        assert len(segments(d)) == 1, [p.name for p in segments(d)]
    last = procs.broker("-nomsg", "-noweb", data_dir=d)
    got = asyncio.run(drain(last.endpoint, len(sent)))
    assert sorted(got) == sorted(sent)
    assert last.proc.terminate() == 0


def test_a_broker_with_little_queued_holds_little_disk(procs: ProcGroup, tmp_path: Path) -> None:
    """Segment files are preallocated a step (1 MiB) at a time ahead of their writes, not to the
    whole segment size: a hundred small queued messages hold about a megabyte of disk."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", data_dir=d)

    async def publish() -> None:
        async with Producer(broker.endpoint, timeout=HANG, reconnect=False) as p:
            for i in range(100):
                p.publish(b"small %d" % i)
            await p.confirmed(0)

    asyncio.run(publish())
    (seg,) = segments(d)
    assert seg.stat().st_blocks * 512 <= 2 << 20, seg.stat()
    assert broker.proc.terminate() == 0


def test_fanout_messages_with_no_subscriber_wait_durably(procs: ProcGroup, tmp_path: Path) -> None:
    """A fanout command's messages with no subscriber wait in its queue on disk: 100 confirmed,
    SIGKILL, restart, and the first subscriber gets all 100 in order. Handed to a subscriber they
    are done: after another SIGKILL none comes back. A copy a connected subscriber holds is its
    own (docs/storage.md): not kept across a restart."""
    d = tmp_path / "data"
    args = ("-nomsg", "-noweb", "-command", "news")
    broker = procs.broker(*args, data_dir=d)

    async def publish(spec: str, prefix: str, n: int) -> None:
        async with Producer(spec, timeout=HANG, reconnect=False) as p:
            for i in range(n):
                p.publish(f"news/{prefix}{i}".encode())
            await p.confirmed(0)

    asyncio.run(publish(broker.endpoint, "w", 100))
    assert broker.proc.kill9() == -signal.SIGKILL
    again = procs.broker(*args, data_dir=d)
    again.proc.wait_for_line(r"storage: .* 100 messages restored", stderr=True)
    got: list[bytes] = []

    async def subscribe_and_take(spec: str, n: int, then: Any = None) -> None:
        def handler(data: bytes) -> None:
            got.append(bytes(data))

        async with Consumer(spec, handler, timeout=HANG, reconnect=False) as c:
            await c.subscribe("news")
            while len(got) < n:
                await asyncio.sleep(0.02)
            if then is not None:
                await then()
            await asyncio.sleep(0.5)

    asyncio.run(subscribe_and_take(again.endpoint, 100, lambda: publish(again.endpoint, "live", 5)))
    assert got[:100] == [f"news/w{i}".encode() for i in range(100)]
    assert sorted(got[100:]) == sorted(f"news/live{i}".encode() for i in range(5))   # copies, delivered live
    assert again.proc.kill9() == -signal.SIGKILL
    third = procs.broker(*args, data_dir=d)
    third.proc.wait_for_line(r"storage: .* 0 messages restored", stderr=True)
    assert third.proc.terminate() == 0
