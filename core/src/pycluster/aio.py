"""Small asyncio helpers shared by the core."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout: float = 5.0) -> None:
    """Cancel ``task`` and wait until it is done, re-cancelling if it swallowed a cancellation.

    On Python 3.11 ``asyncio.wait_for`` may drop a cancellation that races with the inner
    result, so a single ``cancel()`` is not always enough; after ``timeout`` we give up.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        with contextlib.suppress(BaseException):
            task.exception()  # mark retrieved
