"""Request/reply with reply subjects the requester picks: one wildcard inbox subscription per
connection, a waiting future per request, and timeouts on a shared wheel.

nats-py's ``request()`` costs more than the message it sends: a random token made in Python
plus a system call for two more bytes, a timer and a done callback per request (measured: about
a fifth of the CPU of a JetStream publish, both ends included). Here the reply subject is
``<inbox>.<mark>.<anything the requester wants>``: a counter for JetStream publishes
(`pycluster.kernel.connection.LeanJetStream`), the call's metadata for RPC
(`pycluster.builtin.rpc.wire.reply_subject_meta`); timeouts share one timer per slot of
``1/SLOTS_PER_S`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from .aio import TimerWheel


def _time_out(fut: asyncio.Future[Msg], _: None) -> None:
    if not fut.done():
        fut.set_exception(nats.errors.TimeoutError())


# The NATS server's status of a request nobody received.
STATUS_NO_RESPONDERS = "503"


class ReplyMux:
    """Waits for the replies of one connection's requests (see the module docstring); reply
    subjects start with `prefix`, ``<a fresh inbox>.<mark>.``."""

    SLOTS_PER_S = 100  # a timeout fires at most 10 ms late (`TimerWheel`)

    def __init__(self, mark: str) -> None:
        self.mark = mark
        #: The connection the subscription is on (None until the first request).
        self.nc: Any = None
        #: Reply subjects start with this (``<inbox>.<mark>.``).
        self.prefix = ""
        self._sub: Any = None
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._timeouts: TimerWheel[asyncio.Future[Msg], None] = TimerWheel(self.SLOTS_PER_S,
                                                                            _time_out)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._setup: asyncio.Lock | None = None

    async def attach(self, nc: Any) -> None:
        """Subscribe to this connection's reply subjects (once per connection)."""
        loop = asyncio.get_running_loop()
        if self._setup is None or self._loop is not loop:
            # First use, or a new event loop. (On the same loop the timeouts stay: calls still
            # waiting keep them.)
            self._setup, self._loop = asyncio.Lock(), loop
        async with self._setup:
            if nc is self.nc:
                return
            old, self._sub = self._sub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            prefix = f"{nc.new_inbox()}.{self.mark}."
            self._sub = await nc.subscribe(prefix + ">", cb=self._on_reply)
            self.prefix, self.nc = prefix, nc

    async def close(self) -> None:
        """Unsubscribe (calls still waiting time out)."""
        sub, self._sub, self.nc = self._sub, None, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def request(self, subject: str, reply: str, body: bytes,
                      headers: dict[str, str] | None, timeout: float) -> Msg:
        """Publish a request with reply subject ``reply`` (which starts with `prefix`) and
        wait for its reply: `nats.errors.TimeoutError` after ``timeout`` seconds,
        `nats.errors.NoRespondersError` when the server says nobody listens."""
        loop, nc = self._loop, self.nc
        if loop is None or nc is None:
            raise nats.errors.ConnectionClosedError  # closed (its platform stops), never attached
        fut: asyncio.Future[Msg] = loop.create_future()
        slot = self._timeouts.add(loop.time() + timeout, fut, None)
        waiting = self._waiting
        waiting[reply] = fut
        try:
            await nc.publish(subject, body, reply=reply, headers=headers)
            return await fut
        finally:
            waiting.pop(reply, None)
            slot.pop(fut, None)

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.get(msg.subject)
        if fut is None or fut.done():
            return  # late (timed out or cancelled), or not ours
        if (msg.headers and not msg.data
                and msg.headers.get("Status") == STATUS_NO_RESPONDERS):
            fut.set_exception(nats.errors.NoRespondersError())
        else:
            fut.set_result(msg)
