"""Request/reply over NATS: the transport of inter-node RPC (``app.rpc``) and of the API bus.

Subjects (``_``-prefixed tokens cannot collide with node ids or method names):

* ``{platform}.{app}.rpc.{node}.{method}``      — one node's instance of the app
* ``{platform}.{app}.rpc._leader.{method}``     — the active instance (queue group ``rpc``)
* ``{platform}._.rpc.cancel``                   — cancellation of in-flight requests

A node subscribes once per route with a wildcard for the method, so handlers may be added at
any time and an unknown method gets a clear ``unknown_method`` error. The leader route is
subscribed only while the app is active on this node (following role changes), and every
message on it is checked against ``app.is_active`` again: a node that is no longer active
answers ``not_leader``, and the caller retries against the new leader.

Metadata: a call's metadata travels in the request's reply subject, which the caller picks
(`pycluster.kernel.replies`): ``<inbox>.pcr1.<request id>.<cancel token>.<timeout ms>.
<source node>.<source app or ->``; the timeout is the caller's remaining time, and the server
cancels the handler when the caller stops waiting. A success reply to such a request carries no
headers either: its body is framed with the answering node and the content type
(`pycluster.builtin.rpc.wire.frame_reply`). So the hot path has no NATS headers at all, which
nats-py builds and parses in Python, character by character, on both sides: they cost about as
much as the rest of a call. Headers still travel when there is something else to say: the
``Content-Type`` of a non-default body (omitted for non-empty raw bytes), whatever middleware
adds (``traceparent``, credentials, reply headers), and error replies (``Pc-Node``,
``Pycluster-Error: <code>`` with a JSON body ``{"type", "message", "code", "details"}``).

Older callers and servers: a request with a ``Pc-Call: <request id>/<cancel token> <timeout s>
<source node> [<source app>]`` header (or the former ``Pycluster-Call``) is served by that header
and answered with a ``Pc-Node`` header and a bare body, as before; a caller reads either kind of
reply (a reply with headers is never framed). A request from any other NATS client (no header,
a reply subject of its own) is served without metadata.

Cancellation: a caller that stops waiting publishes ``<request id>/<cancel token>`` on the
cancel subject (`pycluster.builtin.rpc.cancel`). A handler still running when the caller's
deadline passes is cancelled within 1/20 s (one timer per 50 ms slot of deadlines,
`DeadlineWheel`, rather than one per request). Each request is served in a task of its own,
started eagerly on Python 3.12+ (a handler that does not wait answers at once).

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

Layout: `wire` (protocol constants, metadata, reply frames, error encoding), `client`
(targets, retries, sending; replies through `pycluster.kernel.replies`), `server` (endpoints,
the in-flight limit, dispatch), `cancel`, `app` (``app.rpc``), this module (the ``rpc`` service
composing them) and `plugin` (its hooks).

Connection loss: subscriptions are restored by nats-py after a reconnect; calls made while
disconnected are buffered by nats-py and time out (`CallTimeoutError`) if the connection does
not come back before their deadline. Handlers never crash the subscription loop: every failure
(malformed body, unknown method, handler exception, oversized reply) becomes an error reply.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ... import codec as codecs
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.names import app_subject
from ...kernel.replies import ReplyMux
from ...middleware import Call, MiddlewareChain, Request
from .app import AppRpc
from .cancel import Cancellations
from .client import AnyInstance, FixedNode, NodeResult, RetryPolicy, RpcClient, Target
from .server import DeadlineWheel, Endpoint, Gate, RpcServer
from .wire import LEADER_TARGET, REPLY_MARK, WARN_EVERY, node_frame

if TYPE_CHECKING:
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform


class RpcService(RpcServer, RpcClient):
    """The ``rpc`` plugin's service behind ``app.rpc`` and the API bus: subscriptions,
    dispatch, calls.

    Reached as ``platform.service("rpc")``. Every call and handler runs through the platform's
    middleware chain (``platform.middleware``, see `pycluster.middleware`).
    """

    name = "rpc"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.cancellations = Cancellations(platform)
        self._endpoints: dict[str, list[Endpoint]] = {}
        self._sync_locks: dict[str, asyncio.Lock] = {}
        self.max_inflight = platform.settings.max_inflight
        self._gates: dict[tuple[str, str], Gate] = {}
        # Serving subscriptions, for counting what a slow consumer dropped: id -> (sub, gate).
        self._sub_gates: dict[int, tuple[Any, Gate]] = {}
        self._other_drops = 0
        self._other_warned = -WARN_EVERY
        self._specs: dict[Callable[..., Any], codecs.HandlerSpec] = {}
        self._deadlines = DeadlineWheel()
        self._node_head = node_frame(platform.node_id)
        self._replies = ReplyMux(REPLY_MARK)
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

    @property
    def middleware(self) -> MiddlewareChain:
        """The platform's middleware chain (``platform.middleware``)."""
        return self.platform.middleware

    def _compose(self) -> None:
        mw = self.middleware
        self._call_chain = mw.wrap("on_call", self._send_fn)
        self._request_chain = mw.wrap("on_request", self._invoke_fn)
        self._chains_of = mw
        self._chains_version = mw.version

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen for cancellations; reconcile subscriptions with roles now and then."""
        nc = self._nc()
        self._running = True
        await self.cancellations.start(nc)
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

    def role_changed(self, app_name: str) -> None:
        """Re-sync the app's subscriptions with its role (leader-only ones while active)."""
        if app_name in self._endpoints and self._running:
            self.platform.spawn(self.sync(app_name), f"rpc:sync:{app_name}")

    async def stop(self) -> None:
        """Unsubscribe everything; cancel running handlers."""
        self._running = False
        if self._reconcile_task is not None:
            await cancel_and_wait(self._reconcile_task)
        for name in list(self._endpoints):
            await self.remove_endpoints(name)
        await self.cancellations.stop()
        await self._replies.close()


def rpc_service(platform: Platform) -> RpcService:
    """The platform's `RpcService` (`PluginError` naming the plugin when it is disabled)."""
    return platform.service("rpc")  # type: ignore[no-any-return]


__all__ = [
    "AnyInstance",
    "AppRpc",
    "FixedNode",
    "Gate",
    "NodeResult",
    "Request",
    "RetryPolicy",
    "RpcService",
    "Target",
    "rpc_service",
]
