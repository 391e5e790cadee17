"""Small asyncio helpers shared by the core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from typing import Any, Generic, TypeVar

log = logging.getLogger("pycluster.tasks")


# This process's offset of the grid of `sleep_aligned` (other processes get other offsets, so
# they do not all wake at once).
_GRID_PHASE = random.random()


async def sleep_aligned(interval: float) -> None:
    """Sleep for about ``interval`` seconds, waking on a grid shared by the process's periodic
    tasks: for ``interval >= 1`` the wake-up is the whole second (plus this process's offset)
    nearest to ``now + interval``, so the sleep lasts ``interval`` ± 0.5 s; shorter intervals
    sleep exactly. Periodic checks of 1, 3 or 5 s then wake the process together, once a second
    at most, instead of each on its own: on an idle node every wake-up costs more CPU than
    the little work it does."""
    if interval < 1.0:
        await asyncio.sleep(interval)
        return
    loop = asyncio.get_running_loop()
    target = math.floor(loop.time() + interval - _GRID_PHASE + 0.5) + _GRID_PHASE
    await asyncio.sleep(max(0.0, target - loop.time()))


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TimerWheel(Generic[K, V]):
    """Many deadlines on few timers: deadlines (on the loop's clock) are rounded up to a slot
    of ``1/slots_per_s`` seconds and each slot has one loop timer, instead of one timer per
    entry (on a hot path a timer costs as much as the work it guards). When a slot's time
    comes, ``fire(key, value)`` runs for each entry still in it, at most one slot late."""

    def __init__(self, slots_per_s: int, fire: Callable[[K, V], None]) -> None:
        self.slots_per_s = slots_per_s
        self._fire_one = fire
        self._slots: dict[int, dict[K, V]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, deadline: float, key: K, value: V) -> dict[K, V]:
        """Fire ``key`` once ``deadline`` passed; returns its slot, from which the caller
        removes ``key`` when it no longer needs the timeout."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # timers of another (closed) loop never fire here
            self._loop = loop
            self._slots = {}
        n = int(deadline * self.slots_per_s) + 1
        slot = self._slots.get(n)
        if slot is None:
            slot = self._slots[n] = {}
            loop.call_at(n / self.slots_per_s, self._fire, n)
        slot[key] = value
        return slot

    def _fire(self, n: int) -> None:
        for key, value in self._slots.pop(n, {}).items():
            self._fire_one(key, value)


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
    (`TaskSet.spawn` runs the same supervision inside a task group.)

    Example::

        self._task = supervise("membership:poll", self._poll)
        ...
        await cancel_and_wait(self._task)
    """
    return asyncio.create_task(
        supervised(name, factory, restart=restart, backoff=backoff, max_backoff=max_backoff,
                   on_fatal=on_fatal, logger=logger), name=name)


async def supervised(
    name: str,
    factory: Callable[[], Awaitable[Any]],
    *,
    restart: bool = True,
    backoff: float = 0.1,
    max_backoff: float = 10.0,
    on_fatal: FatalHandler | None = None,
    logger: logging.Logger | None = None,
) -> None:
    """The body of a task that `supervise` starts: it never raises but a cancellation."""
    lg = logger or log
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


class TaskSet:
    """The long-running tasks of one owner (membership's loops, health checks, a backend's
    pumps), run in one `asyncio.TaskGroup` so that none is lost: each child is a `supervised`
    loop (a crash is logged at once, then restarted or handed to ``on_fatal``), and `close`
    cancels and awaits them all.

    The group lives in a runner task of its own (the owner's methods return while the tasks
    run); a crash of the runner itself is logged CRITICAL.

    Example::

        self._tasks = TaskSet("membership")
        await self._tasks.open()
        self._tasks.spawn("membership:poll", self._poll)
        ...
        await self._tasks.close()
    """

    def __init__(self, name: str, *, logger: logging.Logger | None = None) -> None:
        self.name = name
        self._log = logger or log
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> bool:
        """Whether the group is open (tasks can be spawned)."""
        return self._group is not None

    def __iter__(self) -> Iterator[asyncio.Task[None]]:
        """The children running now."""
        return iter(list(self._children))

    async def open(self) -> None:
        """Start the group (returns once `spawn` can be called)."""
        if self._runner is not None:
            return
        entered = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run(entered), name=f"{self.name}:tasks")
        self._runner.add_done_callback(self._runner_done)
        await entered

    async def _run(self, entered: asyncio.Future[None]) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            entered.set_result(None)
            await asyncio.get_running_loop().create_future()  # until closed (cancelled)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        self._group = None
        if not task.cancelled() and task.exception() is not None:
            self._log.critical("task group %s died", self.name, exc_info=task.exception())

    def spawn(self, name: str, factory: Callable[[], Awaitable[Any]], *,
              restart: bool = True, on_fatal: FatalHandler | None = None,
              backoff: float = 0.1, max_backoff: float = 10.0) -> asyncio.Task[None]:
        """Run ``factory()`` as a supervised child (see `supervise` for the parameters); the
        task may be cancelled on its own (`cancel_and_wait`) without touching its siblings.

        :raises RuntimeError: the group is not open.
        """
        if self._group is None:
            raise RuntimeError(f"task group {self.name} is not open")
        task = self._group.create_task(
            supervised(name, factory, restart=restart, backoff=backoff,
                       max_backoff=max_backoff, on_fatal=on_fatal, logger=self._log),
            name=name)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    def run(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        """Run the one-shot ``coro`` as a child: a failure is logged at once (ERROR, with the
        traceback), not restarted. Outside the group's life (before `open`, after `close`) it
        runs in a task of its own, still logged, and still cancelled by `close`."""

        async def once() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._log.error("task %s failed", name, exc_info=exc)

        if self._group is not None:
            task = self._group.create_task(once(), name=name)
        else:
            task = asyncio.create_task(once(), name=name)
        self._children.add(task)
        task.add_done_callback(self._children.discard)
        return task

    async def close(self, timeout: float = 5.0) -> None:
        """Cancel every child and wait for them, then end the group.

        Each child is cancelled with `cancel_and_wait` first (re-cancelled should it swallow a
        cancellation), so one stubborn child cannot hold the group's exit.
        """
        for task in list(self._children):
            await cancel_and_wait(task, timeout)
        runner, self._runner = self._runner, None
        await cancel_and_wait(runner, timeout)
        self._group = None
