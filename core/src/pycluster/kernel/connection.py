"""The NATS connections of a platform: URLs, credentials, TLS, reconnects, JetStream check.

A platform opens two connections with the same settings (`open_connections`): the *data*
connection (``platform.nc``: RPC, API bus, events, app data) and the *control* connection
(``platform.nc_control``: election, membership, step-down requests). A flood on the data plane
(a hostile or buggy client) then cannot delay lease renewals behind it on the wire, nor take
them down with it when the server cuts a slow consumer.

The control connection watches its JetStream writes (`WatchedJetStream`: lease renewals and
membership records, every heartbeat, all to buckets that exist). A server cut off from the rest
of its cluster (a partition) keeps its clients connected while every write fails; when no write
has been acknowledged for longer than a lease while writes were failing, and other servers are
configured, the `ConnectionWatchdog` moves the control connection to another server (nats-py's
``force_reconnect``, the cut-off server avoided for a while by `ServerSelector`), and the data
connection with it when it is on the same server. Only the control plane's writes are the
evidence: a data-plane write can fail the same way for reasons of its own (no stream bound to
its subject).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Server
from nats.js import JetStreamContext
from nats.js.api import PubAck

from .aio import sleep_aligned
from .errors import ConfigError, NatsUnavailableError
from .replies import ReplyMux
from .settings import (
    DEFAULT_INBOX_PREFIX,
    PlatformSettings,
    redact_text,
    redact_url,
    secret_value,
    server_address,
)
from .types import ConnectionState

log = logging.getLogger("pycluster.nats")


def connect_options(s: PlatformSettings, role: str = "") -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for these settings (``role``: a suffix of the
    connection's name, e.g. ``control``)."""
    opts: dict[str, Any] = {
        "servers": s.nats_url or [],
        "name": f"pycluster:{s.name}:{s.node_id}" + (f":{role}" if role else ""),
        "connect_timeout": s.connect_timeout,
        "reconnect_time_wait": s.reconnect_wait,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if s.nats_user:
        opts["user"] = s.nats_user
        opts["password"] = secret_value(s.nats_password) or ""
    if s.nats_token:
        opts["token"] = secret_value(s.nats_token)
    if s.inbox_prefix != DEFAULT_INBOX_PREFIX:
        # Replies (and JetStream deliveries) come to subjects under this prefix only, so NATS
        # permissions can keep other users from subscribing to them (pycluster nats-config).
        opts["inbox_prefix"] = s.inbox_prefix
    if s.nats_nkey_seed:
        opts["nkeys_seed"] = s.nats_nkey_seed
    if s.nats_creds:
        opts["user_credentials"] = s.nats_creds
    if s.tls_ca or s.tls_cert:
        try:
            ctx = ssl.create_default_context(cafile=s.tls_ca)
            if s.tls_cert:
                ctx.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls", s.tls_cert or s.tls_ca, str(exc)) from None
        opts["tls"] = ctx
    return opts


async def connect(
    s: PlatformSettings,
    *,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
    on_slow_consumer: Callable[[nats.errors.SlowConsumerError], None] | None = None,
    selector: ServerSelector | None = None,
    role: str = "",
) -> NATS:
    """Connect and check JetStream; `NatsUnavailableError` with the reason otherwise.

    :param on_slow_consumer: called (synchronously, keep it cheap) for every message nats-py
        drops because a subscription's pending queue is full.
    :param selector: picks the server of each reconnect (default: nats-py's round robin).
    :param role: a suffix of the connection's name as the server shows it.
    """
    opts = connect_options(s, role)
    if selector is not None:
        opts["reconnect_to_server_handler"] = selector
    servers = [redact_url(u) for u in opts["servers"]]  # for messages: no passwords

    last_error: list[BaseException] = []

    auth_error: list[BaseException] = []
    connecting: list[asyncio.Task[None]] = []

    secrets = (secret_value(s.nats_password), secret_value(s.nats_token))

    async def error_cb(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):  # one per dropped message: cheap
            if on_slow_consumer is not None:
                on_slow_consumer(exc)
            return
        last_error[:] = [exc]
        text = str(exc).lower()
        if "authorization" in text or "authentication" in text:
            auth_error[:] = [exc]
            if connecting and not nc.is_connected:
                connecting[0].cancel()  # bad credentials do not get better with retries
        if "permissions violation" in text:
            # The server refused a publish or subscription: a request would only time out,
            # so say which subject the NATS user may not use (see docs/security.md).
            log.error("nats: %s", redact_text(str(exc), secrets))
        else:
            log.debug("nats: %s", redact_text(str(exc), secrets))

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s", server_address(nc.connected_url) or "?")
        if on_reconnect is not None:
            await on_reconnect()

    async def disconnected_cb() -> None:
        if nc.is_closed or nc.is_draining:
            return  # our own close, not a fault
        log.warning("nats: disconnected")
        if on_disconnect is not None:
            await on_disconnect()

    nc = NATS()
    # nats-py retries an unreachable server forever when reconnects are unlimited, so the
    # first connection is bounded here: every server gets a couple of attempts.
    budget = (s.connect_timeout + s.reconnect_wait) * 2 * max(1, len(servers))
    task = asyncio.ensure_future(
        nc.connect(**opts, error_cb=error_cb, reconnected_cb=reconnected_cb,
                   disconnected_cb=disconnected_cb)
    )
    connecting.append(task)
    try:
        async with asyncio.timeout(budget):  # cancels the connect task when the budget is spent
            await task
    except (OSError, TimeoutError, asyncio.CancelledError, nats.errors.Error) as exc:
        current = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and current and current.cancelling():
            raise  # our caller cancelled us
        with contextlib.suppress(Exception):
            await nc.close()
        cause = auth_error[0] if auth_error else (last_error[0] if last_error else exc)
        reason = redact_text(f"{type(cause).__name__}: {cause}".rstrip(": "), secrets)
        if auth_error:
            reason = f"authorization failed ({redact_text(str(cause), secrets)})"
        elif isinstance(exc, TimeoutError):
            reason = f"not reachable within {budget:.1f}s (last error: {reason})"
        raise NatsUnavailableError(servers, reason) from None
    try:
        await nc.jetstream(timeout=s.connect_timeout).account_info()
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError,
            nats.errors.TimeoutError, TimeoutError) as exc:
        await nc.close()
        raise NatsUnavailableError(
            servers, f"JetStream is not enabled or not reachable ({type(exc).__name__})"
        ) from None
    return nc


def jetstream_servers(nc: NATS) -> int | None:
    """How many servers the connected NATS cluster has, from the server's INFO: 1 for a
    server that is not part of a cluster, the number of its cluster's client URLs otherwise,
    None when it cannot tell (a cluster whose servers do not advertise their URLs)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}  # nats-py: no public accessor
    if not info.get("cluster"):
        return 1
    urls = info.get("connect_urls") or []
    return len(set(urls)) or None


def check_stream_replicas(nc: NATS, replicas: int) -> None:
    """Refuse ``stream_replicas`` that the connected NATS cannot hold, before any bucket exists.

    A single server (no cluster) holds one replica only: a clear `ConfigError` instead of the
    server's "replicas > 1 not supported in non-clustered mode" from deep inside the start.
    A cluster is not checked here: its connected-server count drops during an outage, when
    existing R3 buckets still work (see `replicas_error` for a placement that fails).
    """
    if replicas > 1 and jetstream_servers(nc) == 1:
        url = nc.connected_url.geturl() if nc.connected_url else "the NATS server"
        raise ConfigError(
            "stream_replicas", replicas,
            f"the NATS server at {redact_url(url)} is a single server (not part of a cluster: "
            f"cluster size 1), which cannot keep {replicas} replicas of a bucket; use "
            f"stream_replicas=1, or a NATS cluster of at least {replicas} servers")


# JetStream API errors of a stream that cannot get the replicas it asks for.
_PLACEMENT_ERRORS = {10074: "replicas > 1 not supported in non-clustered mode",
                     10005: "no suitable peers for placement",
                     10023: "insufficient resources"}


def replicas_error(exc: BaseException, replicas: int, nc: NATS) -> ConfigError | None:
    """A `ConfigError` naming ``stream_replicas`` when ``exc`` is JetStream refusing to place a
    bucket's replicas (None for any other error)."""
    code = getattr(exc, "err_code", None)
    if replicas <= 1 or code not in _PLACEMENT_ERRORS:
        return None
    size = jetstream_servers(nc)
    seen = f"{size} server(s) connected in its cluster" if size else "cluster size unknown"
    description = getattr(exc, "description", None) or _PLACEMENT_ERRORS[code]
    return ConfigError(
        "stream_replicas", replicas,
        f"NATS cannot place {replicas} replicas of a bucket ({description}; {seen}): the "
        f"cluster needs at least {replicas} JetStream servers up; use a smaller "
        "stream_replicas or add servers")


# -- two connections, watched --------------------------------------------------------------------

class WriteHealth:
    """When JetStream last acknowledged a write on one connection, and whether one failed
    since. (The control connection writes every heartbeat: this node's membership record, a
    compare-and-set that succeeds while the cluster works.)"""

    def __init__(self) -> None:
        self.last_ok = time.monotonic()
        self.failed = False

    def ok(self) -> None:
        """A write was acknowledged."""
        self.last_ok = time.monotonic()
        self.failed = False

    def fail(self) -> None:
        """A write failed (no answer, or refused)."""
        self.failed = True

    def failing_for(self, now: float | None = None) -> float:
        """Seconds since the last acknowledged write, if a write failed since; else 0."""
        if not self.failed:
            return 0.0
        return (time.monotonic() if now is None else now) - self.last_ok


_PUBACK_FIELDS = frozenset(f.name for f in dataclasses.fields(PubAck))


class LeanJetStream(JetStreamContext):
    """nats-py's JetStream context with a cheaper ``publish``: the acknowledgement comes back
    through a `ReplyMux` (no per-request token, timer and callback of nats-py's ``request()``)
    and is read without a pass over the dataclass fields. Every KV and stream write of nats-py
    goes through ``publish``: compare-and-set writes of locks, leases and membership records
    cost about a fifth less CPU. Publishes naming an expected ``stream`` or a ``msg_ttl`` take
    nats-py's own path."""

    def __init__(self, conn: NATS, **opts: Any) -> None:
        super().__init__(conn, **opts)
        self._conn = conn
        self._replies = ReplyMux("js")
        self._sent = itertools.count(1)
        self._default_timeout = float(opts.get("timeout", 5.0))

    async def publish(self, subject: str, payload: bytes = b"", timeout: float | None = None,
                      stream: str | None = None, headers: dict[str, Any] | None = None,
                      msg_ttl: float | None = None) -> PubAck:
        """``JetStreamContext.publish``: the stored message's acknowledgement, or the same
        errors (`nats.js.errors.APIError` and its kinds, `nats.errors.TimeoutError`,
        `nats.js.errors.NoStreamResponseError`)."""
        if stream is not None or msg_ttl is not None:
            return await super().publish(subject, payload, timeout, stream, headers, msg_ttl)
        replies = self._replies
        if replies.nc is not self._conn:
            await replies.attach(self._conn)
        try:
            msg = await replies.request(
                subject, f"{replies.prefix}{next(self._sent)}", payload, headers or None,
                self._default_timeout if timeout is None else timeout)
        except nats.errors.NoRespondersError:
            raise nats.js.errors.NoStreamResponseError from None
        resp = json.loads(msg.data)
        if "error" in resp:
            raise nats.js.errors.APIError.from_error(resp["error"])
        if len(resp) == 2 and "seq" in resp and "stream" in resp:  # the usual answer
            return PubAck(stream=resp["stream"], seq=resp["seq"])
        return PubAck(**{k: v for k, v in resp.items() if k in _PUBACK_FIELDS})


class WatchedJetStream(LeanJetStream):
    """A JetStream context that records in `health` whether its writes get answers (every KV
    and stream write of nats-py goes through ``publish``)."""

    def __init__(self, conn: NATS, health: WriteHealth, **opts: Any) -> None:
        super().__init__(conn, **opts)
        self.health = health

    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        """``JetStreamContext.publish``, watched."""
        try:
            ack = await super().publish(*args, **kwargs)
        except Exception:
            # No answer (timeout, no response from the stream) or a refusal: neither shows a
            # working stream. A server cut off from its cluster may still answer as a stale
            # stream leader, refusing every compare-and-set for many seconds.
            self.health.fail()
            raise
        self.health.ok()
        return ack


class ServerSelector:
    """nats-py's ``reconnect_to_server_handler``: servers marked bad (`avoid`) come last for a
    while; otherwise the server with the fewest failed attempts, in pool order (nats-py
    shuffles the pool before each reconnect). A server that failed before is tried after
    ``wait`` seconds (nats-py's ``reconnect_time_wait``)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._avoid: dict[str, float] = {}

    def avoid(self, netloc: str, seconds: float) -> None:
        """Prefer other servers than ``netloc`` (a parsed URL's netloc) for ``seconds``."""
        self._avoid[netloc] = time.monotonic() + seconds

    def avoided(self) -> list[str]:
        """Servers avoided now (``host:port``, never credentials)."""
        now = time.monotonic()
        return sorted(server_address(f"nats://{n}") or "?" for n, until in self._avoid.items()
                      if until > now)

    def __call__(self, servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
        """Choose the next server (nats-py calls this before each reconnect attempt)."""
        if not servers:
            return None, 0.0
        now = time.monotonic()

        def rank(item: tuple[int, Server]) -> tuple[bool, int, int]:
            i, srv = item
            return self._avoid.get(srv.uri.netloc, 0.0) > now, srv.reconnects, i

        best = min(enumerate(servers), key=rank)[1]
        return best, (self.wait if best.reconnects > 0 else 0.0)


class ConnectionWatchdog:
    """Moves a connection off a server whose JetStream stopped answering its writes.

    Every ``interval`` seconds: if the connection is up, some write failed, none was answered
    for ``threshold`` seconds, and the pool has another server, the current server is avoided
    for ``avoid_for`` seconds and the connection reconnects (subscriptions are restored by
    nats-py; its reconnect callback re-creates watches). After a reconnect the new server gets
    a full ``threshold`` again. ``followers`` (name, connection, selector) connected to the
    same server are moved along.
    """

    def __init__(
        self, nc: NATS, health: WriteHealth, selector: ServerSelector, *, threshold: float,
        name: str, on_move: Callable[[str, str], None] | None = None,
        interval: float | None = None, avoid_for: float | None = None,
        followers: list[tuple[str, NATS, ServerSelector]] | None = None,
    ) -> None:
        self.nc = nc
        self.health = health
        self.selector = selector
        self.threshold = threshold
        self.name = name
        self.on_move = on_move
        self.followers = followers or []
        self.interval = interval if interval is not None else min(1.0, threshold / 4)
        self.avoid_for = avoid_for if avoid_for is not None else max(60.0, 6 * threshold)
        self.moves = 0
        self._reconnects = -1

    async def run(self) -> None:
        """Check forever (cancel to stop)."""
        while True:
            await sleep_aligned(self.interval)
            try:
                await self.check()
            except Exception:  # never let the watchdog die of a surprise
                log.exception("nats %s connection: watchdog check failed", self.name)

    async def check(self) -> bool:
        """One check; True when it moved the connection."""
        nc = self.nc
        if not nc.is_connected:
            return False
        reconnects = nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:  # a new server (or the first check): a fresh start
            self._reconnects = reconnects
            self.health.ok()
            return False
        stalled = self.health.failing_for()
        if stalled < self.threshold or len(nc.server_pool) < 2:
            return False
        url = nc.connected_url
        where = server_address(url) or "?"  # host:port only: a URL may carry a password
        if url is not None:
            self.selector.avoid(url.netloc, self.avoid_for)
        log.warning("nats %s connection: no JetStream write acknowledged through %s for %.1fs "
                    "(cut off from its cluster?); reconnecting to another server", self.name,
                    where, stalled)
        self.health.ok()
        self.moves += 1
        await nc.force_reconnect()
        if self.on_move is not None:
            self.on_move(self.name, "jetstream_unavailable")
        for name, other, selector in self.followers:
            there = other.connected_url
            if url is None or there is None or there.netloc != url.netloc:
                continue
            selector.avoid(url.netloc, self.avoid_for)
            log.warning("nats %s connection: on the same server; reconnecting too", name)
            await other.force_reconnect()
            if self.on_move is not None:
                self.on_move(name, "jetstream_unavailable")
        return True


class Connections:
    """The data and control connections of a platform, their JetStream contexts and the
    control connection's watchdog (see the module docstring)."""

    def __init__(self) -> None:
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.nc_control: NATS | None = None
        self.js_control: WatchedJetStream | None = None
        self.watchdog: ConnectionWatchdog | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def open(
        self, s: PlatformSettings, *,
        on_control_reconnect: Callable[[], Awaitable[None]] | None = None,
        on_slow_consumer: Callable[[nats.errors.SlowConsumerError], None] | None = None,
        on_state: Callable[[str, ConnectionState], None] | None = None,
        js_timeout: float = 2.0,
    ) -> None:
        """Connect both (data first; `NatsUnavailableError` as `connect`) and start watching.

        :param on_control_reconnect: awaited after the control connection reconnected (re-create
            election and membership watches there).
        :param on_slow_consumer: see `connect` (data connection).
        :param on_state: ``(connection, state)`` for every change of either connection:
            ``data`` or ``control``; disconnected, reconnected, or moved by the watchdog.
        :param js_timeout: the JetStream API timeout of both contexts.
        """
        def event(conn: str, state: ConnectionState) -> None:
            if on_state is not None:
                try:
                    on_state(conn, state)
                except Exception:  # an observer never breaks a reconnect
                    log.exception("nats %s connection: state observer failed", conn)

        async def data_reconnected() -> None:
            event("data", ConnectionState.RECONNECTED)

        async def data_disconnected() -> None:
            event("data", ConnectionState.DISCONNECTED)

        async def control_reconnected() -> None:
            event("control", ConnectionState.RECONNECTED)
            if on_control_reconnect is not None:
                await on_control_reconnect()

        async def control_disconnected() -> None:
            event("control", ConnectionState.DISCONNECTED)

        def moved(conn: str, _reason: str) -> None:
            event(conn, ConnectionState.MOVED)

        data_selector = ServerSelector(s.reconnect_wait)
        self.nc = await connect(s, on_reconnect=data_reconnected, on_disconnect=data_disconnected,
                                on_slow_consumer=on_slow_consumer, selector=data_selector)
        self.js = LeanJetStream(self.nc, timeout=js_timeout)
        selector = ServerSelector(s.reconnect_wait)
        self.nc_control = nc = await connect(s, on_reconnect=control_reconnected,
                                             on_disconnect=control_disconnected,
                                             selector=selector, role="control")
        health = WriteHealth()
        self.js_control = WatchedJetStream(nc, health, timeout=js_timeout)
        self.watchdog = ConnectionWatchdog(
            nc, health, selector, threshold=s.lease_ttl, name="control", on_move=moved,
            followers=[("data", self.nc, data_selector)],
        )
        self._tasks.append(asyncio.create_task(self.watchdog.run(), name="nats:watchdog"))

    async def close(self, timeout: float) -> None:
        """Stop watching; drain and close both connections (control last: the membership
        record is deleted through it before)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for nc in (self.nc, self.nc_control):
            if nc is None:
                continue
            try:
                async with asyncio.timeout(timeout):
                    await nc.drain()
            except Exception as exc:  # also a timeout: close anyway
                log.debug("nats: drain failed: %s", exc)
            with contextlib.suppress(Exception):
                await nc.close()
