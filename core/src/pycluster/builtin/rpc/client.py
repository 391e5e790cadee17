"""The client side of RPC: call targets, retries, and sending a call through the middleware
chain (see `pycluster.builtin.rpc.service` for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors

from ... import codec as codecs
from ...kernel.errors import (
    CallTimeoutError,
    ConfigError,
    NoInstanceError,
    PayloadTooLargeError,
    RemoteError,
)
from ...middleware import Call, Kind, MiddlewareChain
from .wire import (
    BAD_REPLY,
    H_ERROR,
    H_LEADER,
    H_NODE,
    NO_APP,
    NOT_LEADER,
    check_method,
    check_timeout,
    remote_error,
    running_nodes,
    unframe_reply,
)

if TYPE_CHECKING:
    from ...kernel.platform import Platform
    from ...kernel.replies import ReplyMux
    from .cancel import Cancellations


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

# Headers are counted against max_payload only for bodies within this many bytes of it.
_HEADER_ROOM = 16 * 1024

# Cancel tokens are cut from a buffer of OS randomness (one system call per 512 calls).
_TOKEN_BYTES = 8
_token_buf = b""
_token_pos = 0


def _cancel_token() -> str:
    """64 unguessable bits, hex-encoded."""
    global _token_buf, _token_pos
    if _token_pos >= len(_token_buf):
        _token_buf, _token_pos = os.urandom(_TOKEN_BYTES * 512), 0
    pos = _token_pos
    _token_pos = pos + _TOKEN_BYTES
    return _token_buf[pos:pos + _TOKEN_BYTES].hex()


class Target:
    """Where a call goes and what to do when nobody takes it (one strategy per route)."""

    route = ""

    def subject(self) -> str:
        """The subject of the next attempt (may change between attempts, e.g. a key's owner)."""
        raise NotImplementedError

    async def unanswered(self, svc: RpcClient, app: str) -> str:
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

    async def unanswered(self, svc: RpcClient, app: str) -> str:
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

    async def unanswered(self, svc: RpcClient, app: str) -> str:
        """Retry while some live node runs the app (failover); else no instance."""
        nodes = await svc.instances(app, refresh_if_empty=True)
        if not nodes:
            raise NoInstanceError(app, self.route, "no live node runs it")
        return f"no instance answered (running on {', '.join(nodes)}; failover in progress?)"


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


class RpcClient:
    """The calling half of `pycluster.builtin.rpc.service.RpcService`."""

    platform: Platform
    cancellations: Cancellations
    _rid_prefix: str
    _rid_counter: itertools.count[int]
    _chains_of: MiddlewareChain | None
    _chains_version: int
    _call_chain: Callable[[Call], Awaitable[Any]]
    _send_fn: Callable[[Call], Awaitable[Any]]
    _replies: ReplyMux

    @property
    def middleware(self) -> MiddlewareChain:
        """The platform's middleware chain (``platform.middleware``)."""
        return self.platform.middleware

    def _compose(self) -> None:
        raise NotImplementedError

    def _nc(self) -> Any:
        nc = self.platform.nc
        if nc is None or not self.platform.running:
            raise RuntimeError("the platform is not started (await platform.start() first)")
        return nc

    async def instances(self, app: str, refresh_if_empty: bool = False) -> list[str]:
        """Live nodes whose membership record says they run ``app`` (sorted)."""
        m = self.platform.membership
        if m is None:
            return []
        nodes = running_nodes(m.members, app)
        if not nodes and refresh_if_empty:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await m.refresh_view()
            nodes = running_nodes(m.members, app)
        return nodes

    def new_call(
        self, *, kind: Kind, app: str, method: str, target: Target, payload: Any,
        timeout: float, idempotent: bool, codec: str, response_model: Any,
        retry: RetryPolicy | None, source_app: str | None,
    ) -> Call:
        """Build the `Call` middleware will see (validating the method name)."""
        check_method(method)
        if codec not in codecs.CODECS:
            codecs.check_codec(codec)  # raises
        return Call(kind=kind, app=app, method=method, route=target.route, payload=payload,
                    headers={}, timeout=check_timeout(timeout), idempotent=idempotent,
                    source_node=self.platform.node_id, source_app=source_app,
                    request_id=self._rid_prefix + format(next(self._rid_counter), "x"),
                    codec=codec, response_model=response_model, target=target,
                    retry=retry or DEFAULT_RETRY)

    async def call(self, call: Call) -> Any:
        """Run a call through the middleware chain and the transport."""
        p = self.platform
        if p.nc is None or not p._running:
            self._nc()  # raises
        mw = p.middleware
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
        # Headers are small: counted only for a body that comes near the limit.
        if len(body) + _HEADER_ROOM > limit:
            hsize = sum(len(k) + len(v) + 4 for k, v in headers.items()) + 64
            if len(body) + hsize > limit:
                raise PayloadTooLargeError(
                    len(body) + hsize, limit,
                    f"request {call.app}.{call.method} (body and headers; the NATS server's "
                    f"max_payload is {limit} bytes)",
                )
        failures = 0
        last = ""
        replies = self._replies
        if replies.nc is not nc:
            await replies.attach(nc)
        # The cancel token: unguessable, per call, known only to readers of the request. The
        # call's metadata travels in the reply subject (see wire.REPLY_MARK).
        token = _cancel_token()
        cancel_key = f"{call.request_id}/{token}"
        reply_head = f"{replies.prefix}{call.request_id}.{token}."
        reply_tail = f".{call.source_node}.{call.source_app or NO_APP}"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeoutError(call.app, call.method, call.timeout, call.route, last)
            subject = target.subject()
            if call.before_send is not None:  # e.g. a signature over this subject and body
                call.before_send(subject, body, headers)
            wait = min(remaining, retry.attempt_timeout) if call.idempotent else remaining
            call.attempts += 1
            try:
                msg = await replies.request(
                    subject, f"{reply_head}{int(remaining * 1000)}{reply_tail}", body,
                    headers or None, wait)
            except nats.errors.NoRespondersError:
                last = await target.unanswered(self, call.app)
            except nats.errors.TimeoutError:
                last = f"no answer to attempt {call.attempts} within {wait:.2f}s"
                if not call.idempotent:
                    raise CallTimeoutError(call.app, call.method, call.timeout, call.route,
                                           "sent, but no answer") from None
            except asyncio.CancelledError:
                self.cancellations.send(cancel_key)
                raise
            else:
                rh = msg.headers
                if rh:
                    call.reply_headers = rh
                    call.node = rh.get(H_NODE)
                    code = rh.get(H_ERROR)
                    data, ct = msg.data, rh.get(codecs.CONTENT_TYPE)
                else:  # a framed success reply (answering node and content type in the body)
                    try:
                        call.node, ct, data = unframe_reply(msg.data)
                    except ValueError as exc:
                        raise RemoteError(call.app, call.method, "RemoteError",
                                          f"malformed reply ({exc})", BAD_REPLY) from None
                    call.reply_headers = ({H_NODE: call.node} if ct is None else
                                          {H_NODE: call.node, codecs.CONTENT_TYPE: ct})
                    code = None
                if code is None:
                    value = codecs.decode(data, ct)
                    if call.response_model is not None:
                        value = codecs.validate(call.response_model, value)
                    return value
                if code == NOT_LEADER and target.retry_not_leader:
                    last = (f"{call.node} is no longer active (leader: "
                            f"{call.reply_headers.get(H_LEADER)})")
                else:
                    raise remote_error(call, code, msg.data)
            failures += 1
            pause = min(retry.backoff(failures), deadline - time.monotonic())
            if pause > 0:
                await asyncio.sleep(pause)
