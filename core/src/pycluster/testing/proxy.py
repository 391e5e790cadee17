"""A TCP proxy a test can cut and restore, and an event loop in a thread to run proxies on.

Partitions without root privileges: put a :class:`TcpProxy` on every connection between two
processes; :meth:`TcpProxy.cut` then resets live connections and refuses new ones (accepts and
resets at once, so the peer's reconnect loop keeps its normal pace) until :meth:`TcpProxy.restore`.

Proxies of a long-lived fixture should not depend on the test's event loop (a test may block it,
or be synchronous): :class:`BackgroundLoop` runs them in a daemon thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundLoop", "TcpProxy"]

_T = TypeVar("_T")
_CHUNK = 64 * 1024


class TcpProxy:
    """Forward every connection accepted on ``listen_host:listen_port`` to ``target``.

    ``listen_port=0`` lets the OS choose (read :attr:`port` after :meth:`start`). :meth:`cut`
    and :meth:`restore` are synchronous but must be called on the proxy's event loop thread
    (use :meth:`BackgroundLoop.call` from other threads).

    Example::

        proxy = TcpProxy("127.0.0.1", 4222)
        await proxy.start()          # clients connect to proxy.port
        proxy.cut()                  # every connection reset; new ones refused
        proxy.restore()
        await proxy.close()
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "",
        connect_timeout: float = 2.0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.name = name or f"proxy->{target_host}:{target_port}"
        self.connect_timeout = connect_timeout
        self._listen_port = listen_port
        self._server: asyncio.Server | None = None
        self._cut = False
        # Live connection pairs: (client side, target side) transports.
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepted = 0  # connections accepted (including refused ones while cut)
        self.forwarded_bytes = 0

    @property
    def port(self) -> int:
        """The listening port (valid after :meth:`start`)."""
        if self._server is None:
            return self._listen_port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def is_cut(self) -> bool:
        """True between :meth:`cut` and :meth:`restore`."""
        return self._cut

    @property
    def active_connections(self) -> int:
        """Connections currently forwarded."""
        return len(self._links)

    async def start(self) -> None:
        """Start listening."""
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self._listen_port, reuse_address=True
        )
        self._listen_port = self.port

    def cut(self) -> None:
        """Reset every live connection and refuse new ones until :meth:`restore`."""
        self._cut = True
        for client, upstream in list(self._links):
            # abort() = RST now; close() would wait to flush buffers to a peer we cut off.
            client.transport.abort()
            upstream.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        """Forward new connections again (cut connections stay closed; peers reconnect)."""
        self._cut = False

    async def close(self) -> None:
        """Stop listening and reset all connections."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._cut:
            writer.transport.abort()
            return
        try:
            async with asyncio.timeout(self.connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(self.target_host,
                                                                     self.target_port)
        except (OSError, TimeoutError):
            writer.transport.abort()  # target down: the peer sees a refused/reset connection
            return
        if self._cut:  # cut while we were connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            # Only close() cancels (the loop is going away); asyncio.Server would log the
            # cancelled handler as an error, so end quietly: the transports are aborted below.
            pass
        finally:
            self._links.discard(link)
            writer.transport.abort()
            up_writer.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                self.forwarded_bytes += len(data)
                await writer.drain()
            # EOF: flush what is buffered, then close; either side closing ends both
            # directions, as the other pipe then reads EOF (no half-open links).
            writer.close()
        except OSError:
            writer.transport.abort()  # a reset on either side resets the other
        finally:
            if task is not None:
                self._tasks.discard(task)

    def __repr__(self) -> str:
        state = "cut" if self._cut else "open"
        return (
            f"<TcpProxy {self.name} {self.listen_host}:{self.port}"
            f"->{self.target_host}:{self.target_port} {state} links={len(self._links)}>"
        )


class BackgroundLoop:
    """An asyncio event loop running in a daemon thread.

    Example::

        loop = BackgroundLoop()
        proxy = loop.run(make_proxy())          # run a coroutine there, wait for its result
        loop.call(proxy.cut)                    # run a function there, wait for its result
        loop.close()
    """

    def __init__(self, name: str = "pycluster-proxies") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop (use it only through thread-safe calls)."""
        return self._loop

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        """Run ``coro`` on the loop and block until it finishes (or ``timeout`` expires)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Call ``fn()`` on the loop thread and return its result."""

        async def invoke() -> _T:
            return fn()

        return self.run(invoke(), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop and join its thread (cancels what still runs there)."""
        if self._loop.is_closed():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
