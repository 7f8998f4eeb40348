"""``until()``: wait for a condition inside a test's event loop, with a generous deadline.

The deadline is a hang guard for a loaded 2-core machine, not a timing assertion: tests
wait for what they need to have happened, never for a length of time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from procs import HANG_GUARD


async def until(pred: Callable[[], object], what: str = "condition", timeout: float = HANG_GUARD) -> None:
    """Poll ``pred`` every 5 ms until it is true; AssertionError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"gave up after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.005)
