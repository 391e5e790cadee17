"""Small asyncio helpers shared by the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("pycluster.tasks")


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


FatalHandler = Callable[[str, BaseException], None]


def supervise(
    name: str,
    factory: Callable[[], Awaitable[Any]],
    *,
    restart: bool = True,
    backoff: float = 0.1,
    max_backoff: float = 10.0,
    on_fatal: FatalHandler | None = None,
    logger: logging.Logger | None = None,
) -> asyncio.Task[None]:
    """Run the long-running coroutine ``factory()`` in a task that survives its bugs.

    A run that raises is logged at once (ERROR, with the traceback), then, with ``restart``,
    started again after a back-off that doubles from ``backoff`` up to ``max_backoff`` (and
    starts over once a run has lasted longer than ``max_backoff``). Without ``restart`` (a loop
    whose state cannot be trusted after a crash) ``on_fatal(name, exc)`` is called instead, so
    the owner can fail loudly. A run that returns ends the task; cancelling the task stops it.

    Example::

        self._task = supervise("membership:poll", self._poll)
        ...
        await cancel_and_wait(self._task)
    """
    lg = logger or log

    async def run() -> None:
        delay = backoff
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not restart:
                    lg.critical("task %s died and cannot be restarted", name, exc_info=exc)
                    if on_fatal is not None:
                        try:
                            on_fatal(name, exc)
                        except Exception:
                            lg.exception("task %s: the fatal-error handler failed", name)
                    return
                if time.monotonic() - started > max_backoff:
                    delay = backoff  # it ran well for a while: not a crash loop
                lg.error("task %s died; restarting in %.1fs", name, delay, exc_info=exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff)

    return asyncio.create_task(run(), name=name)
