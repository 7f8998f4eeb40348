"""Glue between the harness's synchronous calls and the peers' asyncio clients.

The harness calls ``request(payload, done)`` and ``publish(payload)`` synchronously, often from
inside an answer callback; every peer client's send is a coroutine (``await nc.publish``,
``await redis.lpush``, ``await exchange.publish``). Rather than one Task per message, each
producer keeps one :class:`Outbox`: ``put`` appends to a list and wakes one long-lived sender
task, which hands everything queued since its last turn to the client in one go. Under load a
turn carries many messages, which is also how these clients are used for throughput (a pipeline,
one multi-value LPUSH, a burst of publishes before the flusher runs).

:class:`Pending` maps correlation ids to ``done`` callbacks and times requests out without a
timer per request: every ``timeout`` seconds the previous generation fails with TimeoutError and
the current one becomes the previous (so a lost request fails after ``timeout`` to ``2 * timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from teomq.benchmark.driver import Done


class Outbox:
    """A list of items and one task that sends them in batches with ``send_batch(items)``."""

    def __init__(self, send_batch: Callable[[list[Any]], Awaitable[None]], name: str = "outbox") -> None:
        self._send_batch = send_batch
        self._items: list[Any] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.error: BaseException | None = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self._items.append(item)
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._items:
                    items, self._items = self._items, []
                    await self._send_batch(items)
                self._idle.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept for put() and flushed() to raise
            self.error = exc
            self._idle.set()

    async def flushed(self) -> None:
        """Wait until every item put so far was handed to the client (or the sender failed)."""
        await self._idle.wait()
        if self.error is not None:
            raise self.error

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Pending:
    """Outstanding requests: correlation id -> done callback, with generation-based timeouts."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._current: dict[Hashable, Done] = {}
        self._previous: dict[Hashable, Done] = {}
        self._task = asyncio.get_running_loop().create_task(self._sweep(), name="pending-sweep")

    def add(self, key: Hashable, done: Done) -> None:
        self._current[key] = done

    def complete(self, key: Hashable, err: BaseException | None = None) -> None:
        done = self._current.pop(key, None) or self._previous.pop(key, None)
        if done is not None:  # unknown: already timed out
            done(err)

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)

    def fail_all(self, err: BaseException) -> None:
        for table in (self._previous, self._current):
            while table:
                table.popitem()[1](err)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.timeout)
            expired, self._previous, self._current = self._previous, self._current, {}
            for done in expired.values():
                done(TimeoutError("no answer"))

    async def close(self) -> None:
        """Stop the sweep; every request still outstanding fails with ConnectionError."""
        self.fail_all(ConnectionError("producer closed"))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
