"""Cancellation of in-flight requests: a caller that stops waiting tells the serving node.

The caller publishes ``<request id>/<cancel token>`` on ``{platform}._.rpc.cancel``. The token
is 64 random bits per call, carried only in the request itself (its reply subject), so only
those who can read the request or its reply (the caller and the serving node) can cancel it;
the request id alone (which appears in logs, audit entries and traces) cancels nothing. A
request without a token (an older caller) is not cancellable by message; its deadline still
ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from ...kernel.names import platform_subject
from .wire import CANCEL_PENDING_BYTES, CANCEL_PENDING_MSGS

if TYPE_CHECKING:
    from ...kernel.platform import Platform


class Cancellations:
    """The cancellable requests this node serves, and the cancel messages it sends."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        #: In-flight requests by ``<request id>/<cancel token>`` (only tokened ones).
        self.inflight: dict[str, asyncio.Task[None]] = {}
        #: The cancel subscription (None while stopped).
        self.sub: Any = None
        self._running = False

    def subject(self) -> str:
        """The platform's cancel subject."""
        return platform_subject(self.platform.name, "rpc", "cancel")

    async def start(self, nc: Any) -> None:
        """Listen for cancellations."""
        self._running = True
        self.sub = await nc.subscribe(
            self.subject(), cb=self._on_msg, pending_msgs_limit=CANCEL_PENDING_MSGS,
            pending_bytes_limit=CANCEL_PENDING_BYTES,
        )

    async def stop(self) -> None:
        """Stop listening; cancel every request still served."""
        self._running = False
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None
        for task in list(self.inflight.values()):
            task.cancel()

    def track(self, key: str, task: asyncio.Task[None]) -> None:
        """Serve request ``key`` in ``task`` (cancelled by a matching message)."""
        self.inflight[key] = task

    def done(self, key: str, task: asyncio.Task[None]) -> None:
        """Request ``key`` ended."""
        if self.inflight.get(key) is task:  # an idempotent re-send reuses the request id
            del self.inflight[key]

    async def _on_msg(self, msg: Msg) -> None:
        # Only "<request id>/<cancel token>" as the caller sent it cancels: the token is in
        # the request alone, not in anything the request id appears in.
        try:
            task = self.inflight.get(msg.data.decode("ascii"))
        except Exception:
            return
        if task is not None:
            task.cancel()

    def send(self, key: str | None) -> None:
        """Ask the serving node to cancel the call (``key``: ``<request id>/<cancel token>``)."""
        nc = self.platform.nc
        if not key or nc is None or not self._running:
            return
        with contextlib.suppress(Exception):
            self.platform.spawn(nc.publish(self.subject(), key.encode()), "rpc:cancel")
