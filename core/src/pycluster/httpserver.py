"""A small asyncio HTTP/1.1 server for the health and metrics endpoints (no web framework).

It serves ``GET`` and ``HEAD`` on a fixed set of paths, answers everything else with a clear
4xx, keeps connections alive (Prometheus scrapers and probes reuse them) and bounds what a client
can make it do: request line and headers are limited to `MAX_HEADER_BYTES`, a request body is
refused, a connection waiting for a request is closed after `IDLE_TIMEOUT` seconds, a request
head must arrive within `HEADER_TIMEOUT` seconds of its first byte (slowloris), and a response
must be taken within `WRITE_TIMEOUT` seconds.

At most ``max_connections`` (`MAX_CONNECTIONS`) connections are open at once. A connection
beyond that makes room by closing the connection that has waited longest for a request (idle
keep-alive or a slow header: closing it loses nothing), so held-open idle connections cannot
lock real probes out; if every connection is busy inside a request, the new one gets a ``503``
and is closed at once. Either way the server's file descriptors stay bounded.

Handlers are ``async def handler(request) -> Response``, routed by exact path or, for a
`Route` with ``prefix=True``, by the longest matching path prefix (plugins add routes to the
health server this way: ``pycluster_http_routes``); an exception in a handler becomes a
``500`` with the error's type (logged), never a dropped connection. The server keeps running
while NATS is unreachable: it only reads in-process state.

Example::

    server = HttpServer("127.0.0.1:0")
    server.route("/health", health_handler)
    await server.start()
    print(server.url)           # http://127.0.0.1:43121
    ...
    await server.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .kernel.errors import ConfigError

log = logging.getLogger("pycluster.http")

MAX_HEADER_BYTES = 16 * 1024
IDLE_TIMEOUT = 15.0
HEADER_TIMEOUT = 5.0
WRITE_TIMEOUT = 10.0
MAX_REQUESTS_PER_CONNECTION = 1000
MAX_CONNECTIONS = 64
# Listen backlog, which is also how many connections asyncio accepts per wake-up: small, so a
# burst of connections is accepted in small batches, each trimmed to the cap before the next
# (a large batch would hold hundreds of descriptors before any is closed).
ACCEPT_BACKLOG = 16
_WARN_EVERY = 10.0
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
         b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many connections\n")

_REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


@dataclass
class Request:
    """One parsed request."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    version: str

    def param(self, name: str, default: str | None = None) -> str | None:
        """First value of query parameter ``name``."""
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Response:
    """What a handler returns."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        """A JSON response (``default=str`` so timestamps and enums serialise)."""
        body = json.dumps(data, indent=2, sort_keys=True, default=str).encode() + b"\n"
        return cls(status, body, "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        """A plain-text response."""
        return cls(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """A path and its handler, as plugins contribute them (``pycluster_http_routes``).

    :param path: the path served (``/v1/sd/prometheus``); with ``prefix`` every path that
        starts with it (``/v1/catalog/service/`` serves ``/v1/catalog/service/redis``).
    :param handler: ``async def handler(request) -> Response``; a prefix route reads the rest
        of the path from ``request.path``.
    :param prefix: match by prefix instead of exactly (an exact route wins, then the longest
        prefix).
    """

    path: str
    handler: Handler
    prefix: bool = False


class _Conn:
    """One open connection: idle (waiting for a request) since when, or busy (None)."""

    __slots__ = ("idle_since", "writer")

    def __init__(self, writer: asyncio.StreamWriter, now: float) -> None:
        self.writer = writer
        self.idle_since: float | None = now


def parse_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6; port 0 = any free port).

    Raises `ConfigError` naming the address and what is wrong with it.
    """
    if not isinstance(addr, str) or ":" not in addr:
        raise ConfigError("address", addr, "expected host:port, e.g. 127.0.0.1:8080")
    host, _, port_s = addr.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError("address", addr, "the host is missing (use 0.0.0.0 for every interface)")
    try:
        port = int(port_s)
    except ValueError:
        raise ConfigError("address", addr, f"port {port_s!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError("address", addr, "port must be 0-65535")
    return host, port


class HttpServer:
    """An HTTP/1.1 server bound to one address, routing exact paths to handlers."""

    def __init__(self, addr: str, *, name: str = "http",
                 max_connections: int = MAX_CONNECTIONS) -> None:
        if max_connections < 1:
            raise ConfigError("max_connections", max_connections, "must be at least 1")
        self.host, self.port = parse_addr(addr)
        self.name = name
        self.max_connections = max_connections
        self.evicted = 0
        """Idle connections closed to make room for a new one."""
        self.refused = 0
        """Connections refused (503) because every open one was busy."""
        self._routes: dict[str, Handler] = {}
        self._prefixes: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self._warned = -_WARN_EVERY

    def route(self, path: str, handler: Handler, *, prefix: bool = False) -> None:
        """Serve ``GET``/``HEAD`` ``path`` (exact match, or every path under it with ``prefix``;
        query string ignored) with ``handler``."""
        (self._prefixes if prefix else self._routes)[path] = handler

    def add(self, route: Route) -> None:
        """Serve a `Route`."""
        self.route(route.path, route.handler, prefix=route.prefix)

    def handler_of(self, path: str) -> Handler | None:
        """The handler serving ``path``: its exact route, else the longest matching prefix."""
        handler = self._routes.get(path)
        if handler is None:
            matching = [p for p in self._prefixes if path.startswith(p)]
            if matching:
                handler = self._prefixes[max(matching, key=len)]
        return handler

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    @property
    def paths(self) -> list[str]:
        """The routed paths (prefix routes end with ``*``)."""
        return sorted([*self._routes, *(p + "*" for p in self._prefixes)])

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)`` (the real port when 0 was asked for)."""
        if self._server is None or not self._server.sockets:
            return self.host, self.port
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound address."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        """Bind and serve; a busy or invalid address raises `ConfigError` naming it."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, reuse_address=True, backlog=ACCEPT_BACKLOG,
                family=socket.AF_INET6 if ":" in self.host else socket.AF_UNSPEC,
            )
        except OSError as exc:
            raise ConfigError(
                f"{self.name} address", f"{self.host}:{self.port}", exc.strerror or str(exc)
            ) from None
        log.info("%s endpoints on %s: %s", self.name, self.url, ", ".join(self.paths))

    async def stop(self) -> None:
        """Stop listening and close open connections."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await server.wait_closed()

    # -- connection handling ---------------------------------------------------------------

    def _make_room(self) -> bool:
        """At the connection cap: close the connection idle the longest; False if none is."""
        idle = [(c.idle_since, t) for t, c in self._conns.items() if c.idle_since is not None]
        if not idle:
            return False
        _, victim = min(idle, key=lambda item: item[0])
        conn = self._conns.pop(victim)
        with contextlib.suppress(Exception):
            conn.writer.transport.abort()  # the descriptor is released now
        victim.cancel()
        self.evicted += 1
        return True

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            log.warning("%s server on %s: %d connections open (the limit): closing idle ones "
                        "(%d so far), refusing when all are busy (%d so far)", self.name,
                        self.url, len(self._conns), self.evicted, self.refused)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections:
            self._warn_full()
            if not self._make_room():
                self.refused += 1
                with contextlib.suppress(Exception):
                    writer.write(_BUSY)
                    writer.close()
                return
        conn = self._conns[task] = _Conn(writer, time.monotonic())
        try:
            for _ in range(MAX_REQUESTS_PER_CONNECTION):
                keep = await self._one(reader, writer, conn)
                if not keep:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.pop(task, None)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   conn: _Conn) -> bool:
        """Handle one request; return whether to keep the connection open."""
        loop = asyncio.get_running_loop()
        conn.idle_since = time.monotonic()
        try:
            async with asyncio.timeout(IDLE_TIMEOUT) as limit:
                first = await reader.readexactly(1)  # a request starts ...
                limit.reschedule(loop.time() + HEADER_TIMEOUT)  # ... and must arrive in time
                head = first + await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return False
        except asyncio.LimitOverrunError:
            await self._send(writer, Response.text("request header too large\n", 431), False, False)
            return False
        except asyncio.IncompleteReadError:
            return False
        conn.idle_since = None  # busy: never closed to make room
        if len(head) > MAX_HEADER_BYTES:
            await self._send(writer, Response.text("request header too large\n", 431), False, False)
            return False
        try:
            req = _parse(head)
        except ValueError as exc:
            await self._send(writer, Response.text(f"bad request: {exc}\n", 400), False, False)
            return False
        keep = _keep_alive(req)
        head_only = req.method == "HEAD"
        has_body = req.headers.get("content-length", "0") not in ("", "0")
        if has_body or "transfer-encoding" in req.headers:
            await self._send(writer, Response.text("request bodies are not accepted\n", 413),
                             False, head_only)
            return False
        if req.method not in ("GET", "HEAD"):
            resp = Response.text(f"method {req.method} not allowed\n", 405)
            resp.headers["Allow"] = "GET, HEAD"
            await self._send(writer, resp, keep, head_only)
            return keep
        handler = self.handler_of(req.path)
        if handler is None:
            resp = Response.text(
                f"not found: {req.path}; endpoints: {', '.join(self.paths)}\n", 404)
        else:
            try:
                resp = await handler(req)
            except Exception as exc:
                log.exception("%s %s failed", req.method, req.path)
                resp = Response.text(f"internal error: {type(exc).__name__}\n", 500)
        await self._send(writer, resp, keep, head_only)
        return keep

    async def _send(self, writer: asyncio.StreamWriter, resp: Response, keep: bool,
                    head_only: bool) -> None:
        reason = _REASONS.get(resp.status, "Unknown")
        lines = [
            f"HTTP/1.1 {resp.status} {reason}",
            f"Content-Type: {resp.content_type}",
            f"Content-Length: {len(resp.body)}",
            "Cache-Control: no-store",
            f"Connection: {'keep-alive' if keep else 'close'}",
        ]
        lines += [f"{k}: {v}" for k, v in resp.headers.items()]
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if not head_only:
            data += resp.body
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):  # a client that does not read
            await writer.drain()


def _parse(head: bytes) -> Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise ValueError("undecodable header") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise ValueError(f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise ValueError(f"unsupported version {version[:20]!r}")
    if not method.isalpha() or not method.isupper():
        raise ValueError(f"malformed method {method[:20]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    split = urlsplit(target)
    # blank values kept: flags such as Consul's `?passing` carry none
    query = parse_qs(split.query, keep_blank_values=True)
    return Request(method, unquote(split.path) or "/", query, headers, version)


def _keep_alive(req: Request) -> bool:
    conn = req.headers.get("connection", "").lower()
    if req.version == "HTTP/1.0":
        return conn == "keep-alive"
    return conn != "close"
