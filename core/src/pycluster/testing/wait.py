"""Wait for a condition with a deadline: the only way tests wait (never a bare sleep).

Both helpers poll ``predicate`` every ``interval`` seconds and return its first truthy value.
On timeout they raise :class:`WaitTimeoutError` (a :class:`TimeoutError`) carrying the message,
the last value and the last ignored exception.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

__all__ = ["WaitTimeoutError", "wait_for", "wait_for_sync"]

_T = TypeVar("_T")


class WaitTimeoutError(TimeoutError):
    """A waited-for condition did not hold before the deadline."""

    def __init__(
        self, message: str, timeout: float, last_value: object, last_error: BaseException | None
    ) -> None:
        self.message = message
        self.timeout = timeout
        self.last_value = last_value
        self.last_error = last_error
        detail = f"last value: {last_value!r}"
        if last_error is not None:
            detail += f"; last error: {last_error!r}"
        super().__init__(f"{message} (after {timeout:.2f}s; {detail})")


async def wait_for(
    predicate: Callable[[], _T | Awaitable[_T]],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition not met",
    ignore: tuple[type[BaseException], ...] = (),
) -> _T:
    """Poll ``predicate`` (sync or async) until it returns a truthy value; return that value.

    An async predicate's call is bounded by the time left, so a hanging call cannot overrun
    the deadline. Exceptions of the types in ``ignore`` count as "not yet" (the last one is
    reported on timeout); any other exception propagates at once.

    Example::

        await wait_for(lambda: app.is_leader, timeout=5, message="app never led")
        await wait_for(lambda: kv.put("k", b"v"), 15, ignore=(Exception,))

    Raises:
        WaitTimeoutError: the predicate stayed falsy until ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await _bounded(result, deadline)
            if result:
                return result  # type: ignore[return-value]
            last_value = result
        except _CallOverran as exc:
            raise WaitTimeoutError(message, timeout, last_value, exc) from None
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(message, timeout, last_value, last_error)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


class _CallOverran(TimeoutError):
    """The predicate's own call was still running at the deadline (it was cancelled)."""


async def _bounded(awaitable: Awaitable[_T], deadline: float) -> _T:
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.001))
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _CallOverran("the predicate's call was still running at the deadline")
    return task.result()  # re-raises the predicate's own exception


def wait_for_sync(
    predicate: Callable[[], _T],
    timeout: float,
    interval: float = 0.02,
    message: str = "condition not met",
    ignore: tuple[type[BaseException], ...] = (),
) -> _T:
    """Blocking :func:`wait_for` for synchronous predicates (same semantics, same errors)."""
    deadline = time.monotonic() + timeout
    last_value: Any = None
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last_value = result
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(message, timeout, last_value, last_error)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
