"""Disk errors under a running broker (docs/storage.md, "Disk errors"), each caused for real:
a file size limit (RLIMIT_FSIZE set on the broker process), a full file system (a small
tmpfs) and a read-only data directory (a read-only bind mount over it).

In each, producers get StorageError for what the broker cannot store, nothing it confirmed is
lost, consumers keep getting (and answering) what it holds, and once the cause is gone the
broker accepts messages again by itself. Every broker is the real CLI over real sockets; the
tmpfs and bind mounts need root (the tests say so and skip where mounting is not allowed).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import BrokerProc, ProcGroup
from teomq.client import Consumer, Producer
from teomq.errors import StorageError

pytestmark = pytest.mark.integration

HANG = 60.0


def mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not allowed here: {r.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        umount(path)


class Tally:
    """What one producer saw: confirmed messages, refused ones (StorageError) by text."""

    def __init__(self) -> None:
        self.confirmed: list[bytes] = []
        self.refused: list[bytes] = []
        self.errors: list[StorageError] = []


async def publish_until_refused(p: Producer, prefix: str, size: int, tally: Tally, *,
                                refusals: int, most: int, window: int = 32) -> None:
    """Publish confirmed messages in windows until ``refusals`` were refused with StorageError
    (failing after ``most`` messages: the broker never refused)."""
    i = 0
    while len(tally.refused) < refusals:
        assert i < most, f"{most} messages published and only {len(tally.refused)} refused"
        batch = []
        for _ in range(window):
            m = f"{prefix}-{i}-".encode().ljust(size, b"x")
            batch.append((m, p.publish(m)))
            i += 1
        for m, c in batch:
            try:
                await asyncio.wait_for(c, HANG)
                tally.confirmed.append(m)
            except StorageError as e:
                tally.refused.append(m)
                tally.errors.append(e)


async def publish_all(p: Producer, prefix: str, size: int, count: int, tally: Tally) -> None:
    """Publish ``count`` confirmed messages, each sent again (a new message) while refused,
    until the hang guard."""
    deadline = asyncio.get_running_loop().time() + HANG
    for i in range(count):
        k = 0
        while True:
            m = f"{prefix}-{i}-{k}-".encode().ljust(size, b"x")
            try:
                await asyncio.wait_for(p.publish(m), HANG)
                tally.confirmed.append(m)
                break
            except StorageError as e:
                tally.refused.append(m)
                tally.errors.append(e)
                assert asyncio.get_running_loop().time() < deadline, f"still refused: {e}"
                await asyncio.sleep(0.05)
                k += 1


class Sink:
    """A consumer that answers everything and keeps what it got."""

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.more: asyncio.Event | None = None

    def __call__(self, data: bytes) -> bytes:
        self.got.append(bytes(data))
        if self.more is not None:
            self.more.set()
        return b"ok"

    async def until(self, pred, what: str) -> None:  # type: ignore[no-untyped-def]
        self.more = asyncio.Event()    # of this event loop (a test may run several)
        deadline = asyncio.get_running_loop().time() + HANG
        while not pred():
            assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}: {len(self.got)} got"
            self.more.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.more.wait(), 0.5)


def check_outcome(tally: Tally, sink: Sink) -> None:
    got = set(sink.got)
    missing = [m for m in tally.confirmed if m not in got]
    assert not missing, f"{len(missing)} confirmed messages never delivered, e.g. {missing[0][:40]!r}"
    assert not got & set(tally.refused), "a refused message was delivered"
    assert len(sink.got) == len(got), "a message was delivered twice"


def test_file_size_limit_refuses_new_messages_and_deliveries_go_on(procs: ProcGroup, tmp_path: Path) -> None:
    """RLIMIT_FSIZE below where the active segment must grow: publishes get StorageError
    (EFBIG, not a SIGXFSZ death), the consumer gets every confirmed message meanwhile and
    answers them, and raising the limit lets new messages in again."""
    broker = procs.broker("-nomsg", "-noweb", data_dir=tmp_path / "data")
    pid = broker.proc.pid
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (3 << 20, resource.RLIM_INFINITY))
    tally = Tally()
    sink = Sink()

    async def main() -> None:
        async with Consumer(broker.endpoint, sink, timeout=HANG), Producer(broker.endpoint, timeout=HANG) as p:
            await publish_until_refused(p, "a", 1000, tally, refusals=100, most=20_000)
            assert len(tally.confirmed) > 1000, len(tally.confirmed)
            # deliveries and answers go on while new messages are refused
            await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")
            still = len(tally.refused)
            await publish_until_refused(p, "b", 1000, tally, refusals=still + 10, most=1000)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            await publish_all(p, "c", 1000, 3000, tally)   # past the old limit
            await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")

    asyncio.run(main())
    e = tally.errors[0]
    assert e.errno == 27 and "File too large" in str(e) and "RLIMIT_FSIZE" in str(e), e
    check_outcome(tally, sink)
    assert broker.proc.alive
    broker.proc.wait_for_line(r"storage: new messages are refused: .*File too large", stderr=True)
    broker.proc.wait_for_line(r"storage: new messages are accepted again after .* \(\d+ refused meanwhile\)",
                              stderr=True)
    assert broker.proc.terminate() == 0, broker.proc.describe()
    print(f"confirmed {len(tally.confirmed)}, refused {len(tally.refused)}, delivered {len(sink.got)}")


def test_full_file_system_refuses_until_consumers_free_space(procs: ProcGroup, tmp_path: Path) -> None:
    """A data directory on a 16 MiB tmpfs with no consumer: publishes fill it and then get
    StorageError (ENOSPC). A consumer then drains every confirmed message; the segments it
    empties are deleted, the space returns, and the broker takes new messages by itself. The
    rest is still there after a restart."""
    with tmpfs(tmp_path / "small", "16m") as fs:
        d = fs / "data"
        broker = procs.broker("-nomsg", "-noweb", "-segment-size", str(1 << 20), data_dir=d)
        tally = Tally()
        sink = Sink()

        async def fill() -> None:
            async with Producer(broker.endpoint, timeout=HANG) as p:
                await publish_until_refused(p, "a", 10_000, tally, refusals=50, most=4000)

        async def drain_and_go_on() -> None:
            async with Consumer(broker.endpoint, sink, timeout=HANG), Producer(broker.endpoint, timeout=HANG) as p:
                await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")
                await publish_all(p, "b", 10_000, 300, tally)
                await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")
            # and some stay queued across a restart
            async with Producer(broker.endpoint, timeout=HANG) as p:
                await publish_all(p, "c", 10_000, 200, tally)

        asyncio.run(fill())
        assert len(tally.confirmed) > 500, len(tally.confirmed)
        e = tally.errors[0]
        assert e.errno == 28 and "No space left on device" in str(e), e
        asyncio.run(drain_and_go_on())
        broker.proc.wait_for_line(r"storage: new messages are accepted again", stderr=True)
        assert broker.proc.terminate() == 0, broker.proc.describe()
        broker.proc.wait_for_line(r"storage: closed: .* 200 messages stay queued on disk", stderr=True)
        again = procs.broker("-nomsg", "-noweb", "-segment-size", str(1 << 20), data_dir=d)
        again.proc.wait_for_line(r"storage: .* 200 messages restored", stderr=True)

        async def rest() -> None:
            async with Consumer(again.endpoint, sink, timeout=HANG):
                await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "the messages kept on disk")

        asyncio.run(rest())
        check_outcome(tally, sink)
        assert again.proc.terminate() == 0, again.proc.describe()


def test_read_only_data_directory(procs: ProcGroup, tmp_path: Path) -> None:
    """The queues directory becomes read-only under a running broker (a read-only bind mount):
    no new segment can be made, so once the active one is full publishes get StorageError
    (EROFS) while the consumer drains; writable again, the broker goes on by itself. A broker
    started on a read-only data directory exits with a clear error."""
    d = tmp_path / "data"
    broker = procs.broker("-nomsg", "-noweb", "-segment-size", "65536", data_dir=d)
    q = d / "queues"
    tally = Tally()
    sink = Sink()
    mount("--bind", str(q), str(q))
    try:
        mount("-o", "remount,bind,ro", str(q))

        async def main() -> None:
            async with Producer(broker.endpoint, timeout=HANG) as p:
                await publish_until_refused(p, "a", 1000, tally, refusals=20, most=2000)
                async with Consumer(broker.endpoint, sink, timeout=HANG):
                    await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")
                    umount(q)
                    await publish_all(p, "b", 1000, 500, tally)
                    await sink.until(lambda: len(sink.got) >= len(tally.confirmed), "every confirmed message")

        asyncio.run(main())
    finally:
        umount(q)
    e = tally.errors[0]
    assert e.errno == 30 and "Read-only file system" in str(e), e
    check_outcome(tally, sink)
    broker.proc.wait_for_line(r"storage: new messages are accepted again", stderr=True)
    assert broker.proc.terminate() == 0, broker.proc.describe()

    # a broker that cannot write its data directory at all does not start
    mount("--bind", str(d), str(d))
    try:
        mount("-o", "remount,bind,ro", str(d))
        ro = procs.start("broker", "-listen", ":0", "-noweb", "-data-dir", str(d), label="read-only")
        assert ro.wait() == 1, ro.describe()
        assert any("Read-only file system" in line for line in ro.err_lines), ro.describe()
    finally:
        umount(d)
    assert isinstance(broker, BrokerProc)
