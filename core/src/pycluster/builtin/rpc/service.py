"""Request/reply over NATS: the transport of inter-node RPC (``app.rpc``) and of the API bus.

Subjects (DESIGN §6; ``_``-prefixed tokens cannot collide with node ids or method names):

* ``{platform}.{app}.rpc.{node}.{method}``      — one node's instance of the app
* ``{platform}.{app}.rpc._leader.{method}``     — the active instance (queue group ``rpc``)
* ``{platform}._.rpc.cancel``                   — cancellation of in-flight requests

A node subscribes once per route with a wildcard for the method, so handlers may be added at
any time and an unknown method gets a clear ``unknown_method`` error. The leader route is
subscribed only while the app is active on this node (following role changes), and every
message on it is checked against ``app.is_active`` again: a node that is no longer active
answers ``not_leader``, and the caller retries against the new leader.

Headers: requests carry ``Pc-Call: <request id>/<cancel token> <timeout> <source node>
[<source app>]`` (one compact header with a short name: nats-py builds and parses every header in
Python, on both sides, character by character; the timeout is the caller's remaining seconds,
and the server cancels the handler when the caller stops waiting; the former name
``Pycluster-Call`` is still accepted), ``Content-Type`` (omitted for non-empty raw bytes), plus
whatever middleware adds (``traceparent``, credentials). Replies carry ``Pc-Node`` (who
answered), and on failure ``Pycluster-Error: <code>`` with a JSON body ``{"type", "message",
"code", "details"}``.

Cancellation: a caller that stops waiting publishes ``<request id>/<cancel token>`` on the
cancel subject. The token is 64 random bits per call, carried only in the request itself, so
only those who can read the request (the caller and the serving node) can cancel it; the
request id alone (which appears in logs, audit entries and traces) cancels nothing. A request
without a token (an older caller) is not cancellable by message; its deadline still ends it.

Resource limits (a hostile or buggy client on the bus): each app has at most ``max_inflight``
(a setting, 256 by default) handlers running per kind (``rpc``, ``api``) on a node; a request
beyond that is answered at once with the error code ``overloaded`` (`RemoteError`) and counted
in ``pycluster_rpc_rejected_total``. Each serving subscription has bounded pending limits
(`pending_limits`): what the handlers cannot take is dropped on that subscription (counted in
``pycluster_slow_consumer_total``) instead of growing memory. A flood faster than nats-py can
read at all (some 30-60 k messages/s) makes the server cut this (data) connection as a slow
consumer; it reconnects at once. Election and membership use their own connection
(``platform.nc_control``), so a flood here can neither delay lease renewals on the wire nor
take them down with the data connection.

Retries (client side): a request nobody received (no responders, or ``not_leader``) is retried
with back-off while the membership shows an instance that could answer (a failover in
progress), until the call's deadline; with no instance at all it fails at once with
`NoInstanceError`. A request that was sent but got no answer is retried only when the call is
marked ``idempotent`` (each attempt then waits at most ``RetryPolicy.attempt_timeout``).

Connection loss: subscriptions are restored by nats-py after a reconnect; calls made while
disconnected are buffered by nats-py and time out (`CallTimeoutError`) if the connection does
not come back before their deadline. Handlers never crash the subscription loop: every failure
(malformed body, unknown method, handler exception, oversized reply) becomes an error reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import pydantic
from nats.aio.msg import Msg

from ... import codec as codecs
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.errors import (
    CallTimeoutError,
    ConfigError,
    NoInstanceError,
    PayloadTooLargeError,
    RemoteError,
)
from ...kernel.names import app_subject, platform_subject, validate_ident
from ...middleware import Call, Kind, MiddlewareChain, Request
from ...plugins import hookimpl

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.rpc")

# -- protocol constants ------------------------------------------------------------------------

# One compact request header, "<request id> <timeout s> <source node> [<source app>]": every
# header costs parsing time in nats-py on both sides (per character of its name, in Python), so
# the call's metadata travels together and the two per-message headers have short names.
H_CALL = "Pc-Call"
H_CALL_OLD = "Pycluster-Call"  # still accepted from older callers
H_NODE = "Pc-Node"
H_ERROR = "Pycluster-Error"
H_LEADER = "Pycluster-Leader"

LEADER_TARGET = "_leader"

HANDLER_ERROR = "handler_error"
UNKNOWN_METHOD = "unknown_method"
BAD_REQUEST = "bad_request"
INVALID_REQUEST = "invalid_request"
NOT_LEADER = "not_leader"
REPLY_TOO_LARGE = "reply_too_large"
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
OVERLOADED = "overloaded"

DEFAULT_MAX_INFLIGHT = 256
# Pending limits of a serving subscription: enough to absorb bursts of max_inflight-sized
# waves, small enough that a flood is dropped here (cheaply, counted) rather than queued.
_PENDING_MSGS_PER_INFLIGHT = 8
_PENDING_MSGS_MIN = 1024
_PENDING_BYTES_MIN = 64 * 1024 * 1024
# Pending limits of the cancel subscription (tiny messages).
_CANCEL_PENDING_MSGS = 4096
_CANCEL_PENDING_BYTES = 4 * 1024 * 1024
# At most one warning per this many seconds per app/kind about refused or dropped requests.
_WARN_EVERY = 10.0

# Header bytes reserved when checking a request against the server's max_payload.
_HEADER_SLACK = 512
# Bound of the per-name caches below (names come from callers).
_CACHE_MAX = 4096
_valid_methods: set[str] = set()


def check_method(method: str) -> str:
    """Validate a method name (`validate_ident`), remembering names already seen valid: the
    check runs once per distinct name, not on every call."""
    if method not in _valid_methods:
        validate_ident("method", method)
        if len(_valid_methods) >= _CACHE_MAX:
            _valid_methods.clear()
        _valid_methods.add(method)
    return method
_RUNNING_ROLES = frozenset({"passive", "active", "activating", "deactivating"})


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried while nobody can take them (failover) or, if idempotent, after a
    lost answer.

    :param initial_backoff: first pause in seconds.
    :param max_backoff: longest pause.
    :param multiplier: growth of the pause per attempt.
    :param jitter: random fraction added to each pause (spreads retrying clients).
    :param attempt_timeout: how long an idempotent call waits for one answer before it sends
        again (non-idempotent calls wait until their deadline).
    """

    initial_backoff: float = 0.02
    max_backoff: float = 0.5
    multiplier: float = 2.0
    jitter: float = 0.2
    attempt_timeout: float = 2.0

    def __post_init__(self) -> None:
        for name in ("initial_backoff", "max_backoff", "attempt_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RetryPolicy.{name}", getattr(self, name), "must be positive")
        if self.multiplier < 1:
            raise ConfigError("RetryPolicy.multiplier", self.multiplier, "must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("RetryPolicy.jitter", self.jitter, "must be between 0 and 1")

    def backoff(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return base * (1 + self.jitter * random.random())


DEFAULT_RETRY = RetryPolicy()


def check_timeout(timeout: float) -> float:
    """Validate a call timeout (seconds, positive and finite)."""
    if not isinstance(timeout, int | float) or not 0 < timeout < 86400 * 365:
        raise ConfigError("timeout", timeout, "must be a positive number of seconds")
    return float(timeout)


class _Reject(Exception):
    """A request refused by the server side before or instead of the handler."""

    def __init__(self, code: str, type_: str, message: str, details: Any = None) -> None:
        self.code = code
        self.type = type_
        self.message = message
        self.details = details
        super().__init__(message)


class Target:
    """Where a call goes and what to do when nobody takes it (one strategy per route)."""

    route = ""

    def subject(self) -> str:
        """The subject of the next attempt (may change between attempts, e.g. a key's owner)."""
        raise NotImplementedError

    async def unanswered(self, svc: RpcService, app: str) -> str:
        """Nobody received the request: return why it is worth retrying, or raise
        `NoInstanceError`."""
        raise NotImplementedError

    retry_not_leader = True


class FixedNode(Target):
    """One node: nobody listening there means no instance (no retry)."""

    def __init__(self, subject: str, node: str) -> None:
        self._subject = subject
        self.node = node
        self.route = f"node:{node}"

    def subject(self) -> str:
        """The node's subject."""
        return self._subject

    async def unanswered(self, svc: RpcService, app: str) -> str:
        """Fail at once: the node does not run the app (or is dead)."""
        raise NoInstanceError(app, self.route, f"node {self.node!r} does not answer for it")


class AnyInstance(Target):
    """A queue-group subject served by the active (or every running) instance(s)."""

    def __init__(self, subject: str, route: str) -> None:
        self._subject = subject
        self.route = route

    def subject(self) -> str:
        """The shared subject."""
        return self._subject

    async def unanswered(self, svc: RpcService, app: str) -> str:
        """Retry while some live node runs the app (failover); else no instance."""
        nodes = await svc.instances(app, refresh_if_empty=True)
        if not nodes:
            raise NoInstanceError(app, self.route, "no live node runs it")
        return f"no instance answered (running on {', '.join(nodes)}; failover in progress?)"


class Gate:
    """The in-flight limit of one app and kind on this node (a counter, not a semaphore: a
    request beyond the limit is refused at once rather than queued)."""

    __slots__ = (
        "_body",
        "_headers",
        "_metric",
        "_metrics_of",
        "_warned",
        "app",
        "busy",
        "dropped",
        "kind",
        "limit",
        "rejected",
    )

    def __init__(self, app: str, kind: str, limit: int, node: str) -> None:
        self.app = app
        self.kind = kind
        self.limit = limit
        self.busy = 0
        self.rejected = 0
        self.dropped = 0
        self._warned = -_WARN_EVERY
        # The refusal is the same every time: encoded once.
        self._body = json.dumps({
            "type": "OverloadedError", "code": OVERLOADED, "details": {"limit": limit},
            "message": f"{node} is at its limit of {limit} {kind} requests in flight for "
                       f"app {app!r}; retry later",
        }).encode()
        self._headers = {H_NODE: node, H_ERROR: OVERLOADED, codecs.CONTENT_TYPE: codecs.JSON}
        self._metrics_of: Any = None
        self._metric: Any = None

    def count_rejected(self, metrics: Any) -> None:
        """Count one refusal in ``pycluster_rpc_rejected_total`` (the labelled child is kept:
        this runs for every refused request of a flood)."""
        if metrics is not self._metrics_of:
            self._metrics_of = metrics
            self._metric = metrics.rpc_rejected.labels(self.app, OVERLOADED)
        self._metric.inc()

    def release(self, _task: Any = None) -> None:
        """One handler finished."""
        self.busy -= 1

    def should_warn(self) -> bool:
        """Rate limit of warnings about this gate."""
        now = time.monotonic()
        if now - self._warned >= _WARN_EVERY:
            self._warned = now
            return True
        return False


def pending_limits(max_inflight: int, max_payload: int) -> tuple[int, int]:
    """``(messages, bytes)`` pending limits of a serving subscription: a few waves of
    ``max_inflight`` requests, and room for several messages of the largest size."""
    return (max(_PENDING_MSGS_MIN, _PENDING_MSGS_PER_INFLIGHT * max_inflight),
            max(_PENDING_BYTES_MIN, 4 * max_payload))


@dataclass
class Endpoint:
    """One wildcard subscription serving the methods of one app on one route."""

    kind: Kind
    app: App
    route: str
    subject: str  # ends with ".*" (the method token)
    queue: str
    active_only: bool
    handlers: dict[str, Callable[..., Any]]
    sub: Any = None
    gate: Gate | None = None

    @property
    def prefix_len(self) -> int:
        """Length of the subject before the method token."""
        return len(self.subject) - 1


@dataclass
class NodeResult:
    """One node's answer to a broadcast: ``value`` or ``error`` (never both)."""

    node: str
    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        """True when the node answered without error."""
        return self.error is None


class _RoleWatcher:
    """A tiny plugin object: follows role changes to (un)subscribe leader-only endpoints."""

    def __init__(self, svc: RpcService) -> None:
        self.svc = svc

    @hookimpl
    def pycluster_role_changed(self, app: App, role: str, epoch: int | None,
                               leader: str | None) -> None:
        """Re-sync the app's subscriptions with its role."""
        svc = self.svc
        if app.platform is svc.platform and app.name in svc._endpoints and svc._running:
            svc.platform.spawn(svc.sync(app.name), f"rpc:sync:{app.name}")


class RpcService:
    """The core service behind ``app.rpc`` and the API bus: subscriptions, dispatch, calls.

    Reached as ``platform.services["rpc"]`` (or `rpc_service`). Its ``middleware`` chain wraps
    every call and handler (see `pycluster.middleware`).
    """

    name = "rpc"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.middleware = MiddlewareChain()
        for contributed in platform.pm.hook.pycluster_middleware(platform=platform):
            for mw in contributed if isinstance(contributed, list | tuple) else [contributed]:
                if mw is not None:
                    self.middleware.add(mw)
        self._endpoints: dict[str, list[Endpoint]] = {}
        self._sync_locks: dict[str, asyncio.Lock] = {}
        # In-flight requests by "<request id>/<cancel token>" (only tokened ones).
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self.max_inflight = int(getattr(platform.settings, "max_inflight", DEFAULT_MAX_INFLIGHT))
        self._gates: dict[tuple[str, str], Gate] = {}
        # Serving subscriptions, for counting what a slow consumer dropped: id -> (sub, gate).
        self._sub_gates: dict[int, tuple[Any, Gate]] = {}
        self._other_drops = 0
        self._other_warned = -_WARN_EVERY
        self._specs: dict[Callable[..., Any], codecs.HandlerSpec] = {}
        self._watcher = _RoleWatcher(self)
        self._watcher_name = f"pycluster-rpc-roles-{id(self):x}"
        self._cancel_sub: Any = None
        self._reconcile_task: asyncio.Task[None] | None = None
        self._running = False
        self._rid_prefix = os.urandom(4).hex() + "-"
        self._rid_counter = itertools.count(1)
        # Stable inner functions, so the middleware chain is composed once; the compositions
        # are kept until the chain changes (its version).
        self._invoke_fn: Callable[[Request], Awaitable[Any]] = self._invoke
        self._send_fn: Callable[[Call], Awaitable[Any]] = self._send
        self._chains_of: MiddlewareChain | None = None
        self._chains_version = -1
        self._call_chain: Callable[[Call], Awaitable[Any]] = self._send
        self._request_chain: Callable[[Request], Awaitable[Any]] = self._invoke
        self.reconcile_interval = 1.0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Follow role changes; listen for cancellations."""
        nc = self._nc()
        self._running = True
        if self.platform.pm.get_plugin(self._watcher_name) is None:
            self.platform.pm.register(self._watcher, name=self._watcher_name)
        self._cancel_sub = await nc.subscribe(
            platform_subject(self.platform.name, "rpc", "cancel"), cb=self._on_cancel,
            pending_msgs_limit=_CANCEL_PENDING_MSGS, pending_bytes_limit=_CANCEL_PENDING_BYTES,
        )
        self._reconcile_task = supervise("rpc:reconcile", self._reconcile)

    async def app_started(self, rt: AppRuntime) -> None:
        """Serve the app's RPC handlers on this node."""
        app = rt.app
        p, me = self.platform.name, self.platform.node_id
        handlers = app.rpc.handlers
        self.add_endpoints(app.name, [
            Endpoint("rpc", app, "node", app_subject(p, app.name, "rpc", f"{me}.*"), "", False,
                     handlers),
            Endpoint("rpc", app, "leader", app_subject(p, app.name, "rpc", f"{LEADER_TARGET}.*"),
                     "rpc", True, handlers),
        ])
        await self.sync(app.name)

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Stop serving the app (every kind of endpoint)."""
        await self.remove_endpoints(rt.app.name)

    async def stop(self) -> None:
        """Unsubscribe everything; cancel running handlers."""
        self._running = False
        if self._reconcile_task is not None:
            await cancel_and_wait(self._reconcile_task)
        for name in list(self._endpoints):
            await self.remove_endpoints(name)
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
            self._cancel_sub = None
        for task in list(self._inflight.values()):
            task.cancel()
        if self.platform.pm.get_plugin(self._watcher_name) is not None:
            self.platform.pm.unregister(name=self._watcher_name)

    # -- endpoints ---------------------------------------------------------------------------

    def add_endpoints(self, app_name: str, endpoints: list[Endpoint]) -> None:
        """Add endpoints of an app (subscribed by the next `sync`); endpoints of one app and
        kind share one in-flight limit (`gate`)."""
        for ep in endpoints:
            if ep.gate is None:
                ep.gate = self.gate(app_name, ep.kind)
        self._endpoints.setdefault(app_name, []).extend(endpoints)

    def gate(self, app_name: str, kind: str) -> Gate:
        """The in-flight limit of ``app_name``'s ``kind`` requests on this node."""
        g = self._gates.get((app_name, kind))
        if g is None:
            g = self._gates[(app_name, kind)] = Gate(app_name, kind, self.max_inflight,
                                                     self.platform.node_id)
        return g

    async def remove_endpoints(self, app_name: str, kind: Kind | None = None) -> None:
        """Unsubscribe and forget the app's endpoints (of one kind, or all)."""
        eps = self._endpoints.get(app_name, [])
        keep = [ep for ep in eps if kind is not None and ep.kind != kind]
        for ep in eps:
            if ep not in keep and ep.sub is not None:
                sub, ep.sub = ep.sub, None
                self._sub_gates.pop(id(sub), None)
                await _drain(sub)
        if keep:
            self._endpoints[app_name] = keep
        else:
            self._endpoints.pop(app_name, None)

    async def sync(self, app_name: str) -> None:
        """Make the app's subscriptions match its role (leader-only ones while active)."""
        lock = self._sync_locks.setdefault(app_name, asyncio.Lock())
        async with lock:
            nc = self.platform.nc
            eps = self._endpoints.get(app_name)
            if nc is None or not eps or not self._running:
                return
            active = eps[0].app.is_active
            changed = False
            for ep in eps:
                want = active or not ep.active_only
                if want and ep.sub is None:
                    msgs, size = pending_limits(self.max_inflight, self._max_payload())
                    ep.sub = await nc.subscribe(ep.subject, queue=ep.queue, cb=self._callback(ep),
                                                pending_msgs_limit=msgs, pending_bytes_limit=size)
                    assert ep.gate is not None
                    self._sub_gates[id(ep.sub)] = (ep.sub, ep.gate)
                    changed = True
                elif not want and ep.sub is not None:
                    sub, ep.sub = ep.sub, None
                    self._sub_gates.pop(id(sub), None)
                    await _drain(sub)
                    changed = True
            if changed:
                # Make the interest known to the server before callers are told we are ready.
                with contextlib.suppress(Exception):
                    await nc.flush(timeout=2)

    async def _reconcile(self) -> None:
        # Safety net for a missed role notification (e.g. a lease lost without a transition yet).
        while True:
            await asyncio.sleep(self.reconcile_interval)
            for name in list(self._endpoints):
                try:
                    await self.sync(name)
                except Exception as exc:
                    log.debug("rpc: reconcile of %s failed: %s", name, exc)

    def subscribed(self, app_name: str) -> dict[str, bool]:
        """Which routes of the app are subscribed on this node (``"rpc:leader"`` → True, ...)."""
        return {f"{ep.kind}:{ep.route}": ep.sub is not None
                for ep in self._endpoints.get(app_name, [])}

    # -- server side ---------------------------------------------------------------------------

    def _callback(self, ep: Endpoint) -> Callable[[Msg], Awaitable[None]]:
        gate = ep.gate
        assert gate is not None

        async def cb(msg: Msg) -> None:
            # Never let anything escape into nats-py's delivery loop; handlers run in their own
            # task so a slow one does not hold up the next message, at most gate.limit at once.
            try:
                if gate.busy >= gate.limit:
                    await self._overloaded(gate, msg)
                    return
                task = asyncio.create_task(self._serve(ep, msg))
                gate.busy += 1
                headers = msg.headers
                meta = (headers.get(H_CALL) or headers.get(H_CALL_OLD)) if headers else None
                key = meta.partition(" ")[0] if meta else ""
                if "/" in key:  # "<request id>/<cancel token>": cancellable
                    self._inflight[key] = task
                    task.add_done_callback(functools.partial(self._done, gate, key))
                else:
                    task.add_done_callback(gate.release)
            except Exception:
                log.exception("rpc: dropping a message on %s", msg.subject)

        return cb

    def _done(self, gate: Gate, key: str, task: asyncio.Task[None]) -> None:
        gate.busy -= 1
        if self._inflight.get(key) is task:  # an idempotent re-send reuses the request id
            del self._inflight[key]

    async def _overloaded(self, gate: Gate, msg: Msg) -> None:
        """Refuse a request beyond the in-flight limit: counted, answered at once."""
        gate.rejected += 1
        m = self.platform.services.get("metrics")
        if m is not None:
            gate.count_rejected(m)
        if gate.should_warn():
            log.warning("rpc: %s requests of app %s refused: %d handlers in flight (limit %d, "
                        "max_inflight); %d refused so far", gate.kind, gate.app, gate.busy,
                        gate.limit, gate.rejected)
        if msg.reply:
            await self._respond(msg, gate._body, gate._headers)

    def message_dropped(self, exc: Any) -> None:
        """A subscription's pending queue was full and nats-py dropped a message (called by
        the platform for every such drop: count it, warn now and then)."""
        entry = self._sub_gates.get(id(getattr(exc, "sub", None)))
        gate = entry[1] if entry is not None and entry[0] is exc.sub else None
        m = self.platform.services.get("metrics")
        if gate is not None:
            gate.dropped += 1
            app, kind, dropped, warn = gate.app, gate.kind, gate.dropped, gate.should_warn()
        else:
            self._other_drops += 1
            is_cancel = self._cancel_sub is not None and exc.sub is self._cancel_sub
            app, kind, dropped = "_platform", "cancel" if is_cancel else "other", self._other_drops
            now = time.monotonic()
            warn = now - self._other_warned >= _WARN_EVERY
            if warn:
                self._other_warned = now
        if m is not None:
            m.slow_consumer.labels(app, kind).inc()  # type: ignore[attr-defined]
        if warn:
            log.warning("rpc: slow consumer on %s (app %s, %s): messages dropped, %d so far",
                        getattr(exc, "subject", "?"), app, kind, dropped)

    async def _on_cancel(self, msg: Msg) -> None:
        # Only "<request id>/<cancel token>" as the caller sent it cancels: the token is in
        # the request alone, not in anything the request id appears in.
        try:
            task = self._inflight.get(msg.data.decode("ascii"))
        except Exception:
            return
        if task is not None:
            task.cancel()

    def _spec(self, fn: Callable[..., Any]) -> codecs.HandlerSpec:
        spec = self._specs.get(fn)
        if spec is None:
            spec = codecs.handler_spec(fn, Request)
            self._specs[fn] = spec
        return spec

    async def _serve(self, ep: Endpoint, msg: Msg) -> None:
        headers = msg.headers or {}
        loop = asyncio.get_running_loop()
        me = self.platform.node_id
        method = msg.subject[ep.prefix_len:]
        reply_headers: dict[str, str] = {H_NODE: me}
        content_type: str | None = None
        try:
            try:
                if ep.active_only and not ep.app.is_active:
                    if leader := ep.app.leader:
                        reply_headers[H_LEADER] = leader
                    raise _Reject(NOT_LEADER, "NotLeaderError",
                                  f"{me} is not active for {ep.app.name} (leader: {ep.app.leader})")
                fn = ep.handlers.get(method)  # None: refused after middleware (auth first)
                content_type = headers.get(codecs.CONTENT_TYPE)
                if content_type is None and msg.data:
                    content_type = codecs.OCTET_STREAM  # raw bytes travel without the header
                try:
                    payload = codecs.decode(msg.data, content_type)
                except codecs.CodecError as exc:
                    raise _Reject(BAD_REQUEST, "CodecError", str(exc)) from None
                deadline: float | None = None
                rid, source_node, source_app = "", None, None
                if meta := headers.get(H_CALL) or headers.get(H_CALL_OLD):
                    parts = meta.split(" ")
                    try:
                        # The loop's clock is time.monotonic(): Request.deadline compares to it.
                        rid = parts[0].partition("/")[0]  # the cancel token stays private
                        deadline = loop.time() + max(0.0, float(parts[1]))
                        source_node = parts[2]
                        source_app = parts[3] if len(parts) > 3 else None
                    except (IndexError, ValueError):
                        raise _Reject(BAD_REQUEST, "ValueError",
                                      f"bad {H_CALL} header {meta[:64]!r}") from None
                req = Request(
                    kind=ep.kind, app=ep.app.name, method=method, route=ep.route, node=me,
                    subject=msg.subject, headers=headers, data=msg.data,
                    content_type=content_type, payload=payload,
                    request_id=rid, source_node=source_node, source_app=source_app,
                    deadline=deadline, reply_headers=reply_headers, handler=fn,
                )
                mw = self.middleware
                if mw is not self._chains_of or self._chains_version != mw.version:
                    self._compose()
                chain = self._request_chain
                if deadline is None:
                    result = await chain(req)
                else:
                    # A bare timer (cheaper than asyncio.timeout on this hot path) cancels the
                    # handler when the caller stops waiting.
                    task = asyncio.current_task()
                    assert task is not None
                    expired: list[bool] = []
                    timer = loop.call_at(deadline, _expire, task, expired)
                    try:
                        result = await chain(req)
                    except asyncio.CancelledError:
                        if expired and task.uncancel() == 0:
                            raise _Reject(DEADLINE_EXCEEDED, "TimeoutError",
                                          "the caller's deadline passed") from None
                        raise
                    finally:
                        timer.cancel()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling() and not self._running:
                    raise  # the platform stops
                return  # cancelled by the caller: it no longer waits
            if not msg.reply:
                return
            codec_name = codecs.codec_of(content_type)
            body, ct = codecs.encode(result, codec_name)
            if codecs.needs_header(body, ct):
                reply_headers[codecs.CONTENT_TYPE] = ct  # type: ignore[assignment]
            limit = self._max_payload()
            if len(body) + _HEADER_SLACK > limit:
                raise _Reject(REPLY_TOO_LARGE, "PayloadTooLargeError",
                              f"reply of {len(body)} bytes exceeds the server limit of {limit} "
                              "bytes")
            await self._respond(msg, body, reply_headers)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # every failure becomes an error reply
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            await self._respond_error(ep, msg, method, exc, reply_headers)

    async def _invoke(self, req: Request) -> Any:
        fn = req.handler
        if fn is None:
            eps = self._endpoints.get(req.app, [])
            known = sorted({m for ep in eps if ep.kind == req.kind for m in ep.handlers})
            raise _Reject(UNKNOWN_METHOD, "UnknownMethod",
                          f"app {req.app!r} has no {req.kind} method {req.method!r} "
                          f"(it has: {', '.join(known) or 'none'})")
        spec = self._spec(fn)
        if spec.mode == "none":
            result = fn()
        elif spec.mode == "request":
            result = fn(req)
        else:
            arg = req.payload
            if spec.model is not None:
                try:
                    arg = codecs.validate(spec.model, arg)
                except pydantic.ValidationError as exc:
                    raise _Reject(INVALID_REQUEST, "ValidationError", str(exc),
                                  json.loads(exc.json(include_url=False))) from None
            result = fn(arg)
        if spec.is_async or asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        return result

    async def _respond(self, msg: Msg, body: bytes, headers: dict[str, str]) -> None:
        nc = self.platform.nc
        if nc is None or not msg.reply:
            return
        try:
            await nc.publish(msg.reply, body, headers=headers)
        except Exception as exc:
            log.debug("rpc: reply to %s not sent: %s", msg.subject, exc)

    async def _respond_error(self, ep: Endpoint, msg: Msg, method: str, exc: BaseException,
                             reply_headers: dict[str, str]) -> None:
        if isinstance(exc, _Reject):
            code, type_, message, details = exc.code, exc.type, exc.message, exc.details
        else:
            own = getattr(exc, "code", None)
            code = own if isinstance(own, str) and own else HANDLER_ERROR
            type_ = type(exc).__name__
            message = str(exc)
            details = getattr(exc, "details", None)
            log.info("%s %s.%s on %s raised %s: %s", ep.kind, ep.app.name, method,
                     self.platform.node_id, type_, message)
        if not msg.reply:
            return
        body_obj = {"type": type_, "message": message[:4000], "code": code, "details": details}
        try:
            body = json.dumps(body_obj, default=str).encode()
        except (TypeError, ValueError):
            body_obj["details"] = None
            body = json.dumps(body_obj, default=str).encode()
        headers = dict(reply_headers)
        headers[H_ERROR] = code
        headers[codecs.CONTENT_TYPE] = codecs.JSON
        await self._respond(msg, body, headers)

    # -- client side -------------------------------------------------------------------------

    def _compose(self) -> None:
        mw = self.middleware
        self._call_chain = mw.wrap("on_call", self._send_fn)
        self._request_chain = mw.wrap("on_request", self._invoke_fn)
        self._chains_of = mw
        self._chains_version = mw.version

    def _nc(self) -> Any:
        nc = self.platform.nc
        if nc is None or not self.platform._running:
            raise RuntimeError("the platform is not started (await platform.start() first)")
        return nc

    def _max_payload(self) -> int:
        nc = self.platform.nc
        return int(nc.max_payload) if nc is not None else 1024 * 1024

    async def instances(self, app: str, refresh_if_empty: bool = False) -> list[str]:
        """Live nodes whose membership record says they run ``app`` (sorted)."""
        m = self.platform.membership
        if m is None:
            return []
        nodes = _running(m.members, app)
        if not nodes and refresh_if_empty:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(m.refresh_view(), 2.0)
            nodes = _running(m.members, app)
        return nodes

    def new_call(
        self, *, kind: Kind, app: str, method: str, target: Target, payload: Any,
        timeout: float, idempotent: bool, codec: str, response_model: Any,
        retry: RetryPolicy | None, source_app: str | None,
    ) -> Call:
        """Build the `Call` middleware will see (validating the method name)."""
        check_method(method)
        call = Call(kind=kind, app=app, method=method, route=target.route, payload=payload,
                    headers={}, timeout=check_timeout(timeout), idempotent=idempotent,
                    source_node=self.platform.node_id, source_app=source_app,
                    request_id=self._rid_prefix + format(next(self._rid_counter), "x"))
        call.codec = codecs.check_codec(codec)
        call.response_model = response_model
        call.target = target
        call.retry = retry or DEFAULT_RETRY
        return call

    async def call(self, call: Call) -> Any:
        """Run a call through the middleware chain and the transport."""
        self._nc()
        mw = self.middleware
        if mw is not self._chains_of or self._chains_version != mw.version:
            self._compose()
        return await self._call_chain(call)

    async def _send(self, call: Call) -> Any:
        nc = self._nc()
        target: Target = call.target
        retry: RetryPolicy = call.retry
        started = time.monotonic()
        deadline = started + call.timeout
        body, ct = codecs.encode(call.payload, call.codec)
        headers = call.headers
        if codecs.needs_header(body, ct):
            headers[codecs.CONTENT_TYPE] = ct  # type: ignore[assignment]
        limit = int(nc.max_payload)
        hsize = sum(len(k) + len(v) + 4 for k, v in headers.items()) + 64
        if len(body) + hsize > limit:
            raise PayloadTooLargeError(
                len(body) + hsize, limit,
                f"request {call.app}.{call.method} (body and headers; the NATS server's "
                f"max_payload is {limit} bytes)",
            )
        failures = 0
        last = ""
        # The cancel token: unguessable, per call, known only to readers of the request.
        cancel_key = f"{call.request_id}/{os.urandom(8).hex()}"
        meta_tail = f" {call.source_node} {call.source_app}" if call.source_app else (
            f" {call.source_node}")
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeoutError(call.app, call.method, call.timeout, call.route, last)
            subject = target.subject()
            headers[H_CALL] = f"{cancel_key} {remaining:.3f}{meta_tail}"
            if call.before_send is not None:  # e.g. a signature over this subject and body
                call.before_send(subject, body, headers)
            wait = min(remaining, retry.attempt_timeout) if call.idempotent else remaining
            call.attempts += 1
            try:
                msg = await nc.request(subject, body, timeout=wait, headers=headers)
            except nats.errors.NoRespondersError:
                last = await target.unanswered(self, call.app)
            except nats.errors.TimeoutError:
                last = f"no answer to attempt {call.attempts} within {wait:.2f}s"
                if not call.idempotent:
                    raise CallTimeoutError(call.app, call.method, call.timeout, call.route,
                                           "sent, but no answer") from None
            except asyncio.CancelledError:
                self._send_cancel(cancel_key)
                raise
            else:
                rh = msg.headers or {}
                call.reply_headers = rh
                call.node = rh.get(H_NODE)
                code = rh.get(H_ERROR)
                if code is None:
                    value = codecs.decode(msg.data, rh.get(codecs.CONTENT_TYPE))
                    if call.response_model is not None:
                        value = codecs.validate(call.response_model, value)
                    return value
                if code == NOT_LEADER and target.retry_not_leader:
                    last = f"{call.node} is no longer active (leader: {rh.get(H_LEADER)})"
                else:
                    raise _remote_error(call, code, msg.data)
            failures += 1
            pause = min(retry.backoff(failures), deadline - time.monotonic())
            if pause > 0:
                await asyncio.sleep(pause)

    def _send_cancel(self, key: str | None) -> None:
        """Ask the serving node to cancel the call (``key``: ``<request id>/<cancel token>``)."""
        nc = self.platform.nc
        if not key or nc is None or not self._running:
            return
        subject = platform_subject(self.platform.name, "rpc", "cancel")
        with contextlib.suppress(Exception):
            self.platform.spawn(nc.publish(subject, key.encode()), "rpc:cancel")


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


async def _drain(sub: Any, timeout: float = 5.0) -> None:
    """Unsubscribe without losing requests already on their way to us: the server is told
    first, and what it had sent is still answered (``not_leader`` when we are no longer
    active, so the caller retries elsewhere). A plain unsubscribe would drop them and leave
    their callers waiting until their deadline."""
    try:
        await asyncio.wait_for(sub.drain(), timeout)
    except asyncio.CancelledError:
        raise
    except Exception:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _running(members: dict[str, dict[str, Any]], app: str) -> list[str]:
    out = []
    for node, rec in members.items():
        a = (rec.get("apps") or {}).get(app)
        if a and a.get("eligible") and a.get("role") in _RUNNING_ROLES:
            out.append(node)
    return sorted(out)


def _remote_error(call: Call, code: str, data: bytes) -> RemoteError:
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        body = {"type": "RemoteError", "message": data[:200].decode("utf-8", "replace")}
    return RemoteError(
        call.app, call.method, str(body.get("type") or "RemoteError"),
        str(body.get("message") or ""), code, call.node, body.get("details"),
    )


def rpc_service(platform: Platform) -> RpcService:
    """The platform's `RpcService` (a core service; always present)."""
    svc = platform.services.get("rpc")
    if not isinstance(svc, RpcService):
        raise RuntimeError("the rpc core service is not installed in this platform")
    return svc


# -- app.rpc ---------------------------------------------------------------------------------


class AppRpc:
    """RPC between the nodes that run one app (``app.rpc``).

    Example::

        @app.rpc.handler("whoami")
        async def whoami() -> dict:
            return {"node": platform.node_id}

        await app.rpc.call("node-2", "whoami")          # one node
        await app.rpc.call_leader("flush", {"all": True})   # the active instance, across failovers
        for r in await app.rpc.broadcast("stats", timeout=2):   # every live node of the app
            print(r.node, r.value if r.ok else r.error)

    A handler takes no argument, the decoded payload (validated when annotated with a pydantic
    model), or a `pycluster.Request` (payload plus headers and caller). It may be async or
    plain. Calls raise `RemoteError`, `NoInstanceError`, `CallTimeoutError` or
    `PayloadTooLargeError`.
    """

    def __init__(self, app: App) -> None:
        self.app = app
        self.handlers: dict[str, Callable[..., Any]] = {}
        # Call targets (subjects) per (node, method) and per leader method, built and validated
        # once; they belong to one platform (reset if the app is registered elsewhere).
        self._targets_of: Platform | None = None
        self._node_targets: dict[tuple[str, str], FixedNode] = {}
        self._leader_targets: dict[str, AnyInstance] = {}

    def handler(self, method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: serve ``method`` to the app's other nodes."""
        validate_ident("method", method)

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.handlers[method] = fn
            return fn

        return deco

    def register(self, method: str, fn: Callable[..., Any]) -> None:
        """Serve ``method`` with ``fn`` (same as the decorator)."""
        self.handler(method)(fn)

    def _svc(self) -> RpcService:
        if self.app.platform is None:
            raise RuntimeError(f"app {self.app.name!r} is not registered with a platform")
        return rpc_service(self.app.platform)

    def _platform(self) -> Platform:
        p = self.app.platform
        if p is None:
            raise RuntimeError(f"app {self.app.name!r} is not registered with a platform")
        if p is not self._targets_of:
            self._targets_of = p
            self._node_targets.clear()
            self._leader_targets.clear()
        return p

    def _node_target(self, p: Platform, node: str, method: str) -> FixedNode:
        target = self._node_targets.get((node, method))
        if target is None:
            validate_ident("node id", node)
            check_method(method)
            if len(self._node_targets) >= _CACHE_MAX:
                self._node_targets.clear()
            subject = app_subject(p.name, self.app.name, "rpc", f"{node}.{method}")
            target = self._node_targets[(node, method)] = FixedNode(subject, node)
        return target

    def _leader_target(self, p: Platform, method: str) -> AnyInstance:
        target = self._leader_targets.get(method)
        if target is None:
            check_method(method)
            if len(self._leader_targets) >= _CACHE_MAX:
                self._leader_targets.clear()
            subject = app_subject(p.name, self.app.name, "rpc", f"{LEADER_TARGET}.{method}")
            target = self._leader_targets[method] = AnyInstance(subject, "leader")
        return target

    async def call(
        self, node: str, method: str, data: Any = None, timeout: float = 5.0, *,
        idempotent: bool = False, codec: str = "json", response_model: Any = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Call ``method`` on the app's instance on ``node``.

        :param node: the node id.
        :param method: the method name.
        :param data: the payload (bytes, JSON-able values, pydantic models).
        :param timeout: seconds until `CallTimeoutError`.
        :param idempotent: allow re-sending after a lost answer.
        :param codec: ``"json"`` or ``"msgpack"`` for non-bytes payloads.
        :param response_model: validate the answer into this type (e.g. a pydantic model).
        :param retry: back-off settings.
        """
        p = self._platform()
        svc = rpc_service(p)
        target = self._node_target(p, node, method)
        call = svc.new_call(
            kind="rpc", app=self.app.name, method=method, target=target,
            payload=data, timeout=timeout, idempotent=idempotent, codec=codec,
            response_model=response_model, retry=retry, source_app=self.app.name,
        )
        return await svc.call(call)

    async def call_leader(
        self, method: str, data: Any = None, timeout: float = 5.0, *,
        idempotent: bool = False, codec: str = "json", response_model: Any = None,
        retry: RetryPolicy | None = None,
    ) -> Any:
        """Call ``method`` on the active instance, following leadership changes: while no
        instance is active (a failover), retry with back-off until ``timeout``."""
        p = self._platform()
        svc = rpc_service(p)
        target = self._leader_target(p, method)
        call = svc.new_call(
            kind="rpc", app=self.app.name, method=method, target=target,
            payload=data, timeout=timeout, idempotent=idempotent, codec=codec,
            response_model=response_model, retry=retry, source_app=self.app.name,
        )
        return await svc.call(call)

    async def broadcast(
        self, method: str, data: Any = None, timeout: float = 5.0, *, codec: str = "json",
        response_model: Any = None,
    ) -> list[NodeResult]:
        """Call ``method`` on every live node of the app at once; one `NodeResult` per node
        (sorted by node id). A slow node yields a `CallTimeoutError` entry after ``timeout``
        without holding the others back; a dead one a `NoInstanceError` entry at once."""
        check_method(method)
        check_timeout(timeout)
        nodes = await self.nodes()

        async def one(node: str) -> NodeResult:
            try:
                value = await self.call(node, method, data, timeout, codec=codec,
                                        response_model=response_model)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return NodeResult(node, error=exc)
            return NodeResult(node, value=value)

        return list(await asyncio.gather(*(one(n) for n in nodes)))

    async def nodes(self) -> list[str]:
        """Live nodes whose membership record says they run this app (sorted)."""
        return await self._svc().instances(self.app.name)


__all__ = [
    "AppRpc",
    "Gate",
    "NodeResult",
    "Request",
    "RetryPolicy",
    "RpcService",
    "rpc_service",
]
