"""The server side of RPC: serving endpoints, the in-flight limit, and dispatch to handlers
(see `pycluster.builtin.rpc.service` for the behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pydantic
from nats.aio.msg import Msg

from ... import codec as codecs
from ...kernel import natsutil
from ...kernel.aio import TimerWheel, sleep_aligned
from ...kernel.context import CORRELATION
from ...middleware import Kind, MiddlewareChain, Request
from .wire import (
    BAD_REQUEST,
    DEADLINE_EXCEEDED,
    H_CALL,
    H_CALL_OLD,
    H_ERROR,
    H_LEADER,
    H_NODE,
    HANDLER_ERROR,
    HEADER_SLACK,
    INVALID_REQUEST,
    NOT_LEADER,
    OVERLOADED,
    PENDING_BYTES_MIN,
    PENDING_MSGS_MIN,
    PENDING_MSGS_PER_INFLIGHT,
    REPLY_TOO_LARGE,
    UNKNOWN_METHOD,
    WARN_EVERY,
    CallMeta,
    Reject,
    frame_reply,
    header_meta,
    reply_subject_meta,
)

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.platform import Platform
    from .cancel import Cancellations

log = logging.getLogger("pycluster.rpc")


if sys.version_info >= (3, 12):
    def _start_task(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task started eagerly: up to its first suspension it runs now, so
        a handler that completes without waiting answers in this step of the event loop (no
        extra loop iteration per request); it is still a task of its own (its own context,
        ``asyncio.current_task()``, cancellable)."""
        return asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)
else:
    def _start_task(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` as a task (Python 3.11 has no eager start: it runs at the next
        iteration of the event loop)."""
        return asyncio.create_task(coro)


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
        self._warned = -WARN_EVERY
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
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            return True
        return False


class DeadlineWheel(TimerWheel[asyncio.Task[Any], list[bool]]):
    """Cancels handlers whose caller stopped waiting, on a shared `TimerWheel` of 50 ms slots
    (a timer per request would cost as much as a small handler). A handler is cancelled at most
    one slot after its deadline; the caller has given up by then in any case. ``add(deadline,
    task, expired)``: once ``deadline`` (a ``time.monotonic()`` instant) passed, True is
    appended to ``expired`` and ``task`` is cancelled; the caller removes ``task`` from the
    returned slot when it ends in time."""

    SLOTS_PER_S = 20

    def __init__(self) -> None:
        super().__init__(self.SLOTS_PER_S, _expire)


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def pending_limits(max_inflight: int, max_payload: int) -> tuple[int, int]:
    """``(messages, bytes)`` pending limits of a serving subscription: a few waves of
    ``max_inflight`` requests, and room for several messages of the largest size."""
    return (max(PENDING_MSGS_MIN, PENDING_MSGS_PER_INFLIGHT * max_inflight),
            max(PENDING_BYTES_MIN, 4 * max_payload))


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


class RpcServer:
    """The serving half of `pycluster.builtin.rpc.service.RpcService`."""

    platform: Platform
    cancellations: Cancellations
    max_inflight: int
    reconcile_interval: float
    _endpoints: dict[str, list[Endpoint]]
    _sync_locks: dict[str, asyncio.Lock]
    _gates: dict[tuple[str, str], Gate]
    _sub_gates: dict[int, tuple[Any, Gate]]
    _other_drops: int
    _other_warned: float
    _specs: dict[Callable[..., Any], codecs.HandlerSpec]
    _deadlines: DeadlineWheel
    _running: bool
    _chains_of: MiddlewareChain | None
    _chains_version: int
    _request_chain: Callable[[Request], Awaitable[Any]]
    _node_head: bytes  # `node_frame` of this node's id

    @property
    def middleware(self) -> MiddlewareChain:
        """The platform's middleware chain (``platform.middleware``)."""
        return self.platform.middleware

    def _compose(self) -> None:
        raise NotImplementedError

    def _max_payload(self) -> int:
        nc = self.platform.nc
        return int(nc.max_payload) if nc is not None else 1024 * 1024

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
                    await natsutil.flush(nc, timeout=2)

    async def _reconcile(self) -> None:
        # Safety net for a missed role notification (e.g. a lease lost without a transition yet).
        while True:
            await sleep_aligned(self.reconcile_interval)
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
        serve = self._serve

        async def cb(msg: Msg) -> None:
            # Never let anything escape into nats-py's delivery loop; handlers run in their own
            # task so a slow one does not hold up the next message, at most gate.limit at once.
            try:
                if gate.busy >= gate.limit:
                    await self._overloaded(gate, msg)
                    return
                gate.busy += 1  # released by _serve, which cannot be cancelled before it runs
                try:
                    _start_task(serve(ep, gate, msg))
                except BaseException:
                    gate.busy -= 1
                    raise
            except Exception:
                log.exception("rpc: dropping a message on %s", msg.subject)

        return cb

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
            sub = self.cancellations.sub
            is_cancel = sub is not None and exc.sub is sub
            app, kind, dropped = "_platform", "cancel" if is_cancel else "other", self._other_drops
            now = time.monotonic()
            warn = now - self._other_warned >= WARN_EVERY
            if warn:
                self._other_warned = now
        if m is not None:
            m.slow_consumer.labels(app, kind).inc()  # type: ignore[attr-defined]
        if warn:
            log.warning("rpc: slow consumer on %s (app %s, %s): messages dropped, %d so far",
                        getattr(exc, "subject", "?"), app, kind, dropped)

    def _spec(self, fn: Callable[..., Any]) -> codecs.HandlerSpec:
        spec = self._specs.get(fn)
        if spec is None:
            spec = codecs.handler_spec(fn, Request)
            self._specs[fn] = spec
        return spec

    async def _serve(self, ep: Endpoint, gate: Gate, msg: Msg) -> None:
        # Runs as its own task. It is made cancellable (tracked, given a deadline) only from
        # here, so it is never cancelled before its first step: the finally always runs.
        headers = msg.headers
        raw_meta = (headers.get(H_CALL) or headers.get(H_CALL_OLD)) if headers else None
        meta: CallMeta | None = None
        bad_meta: Reject | None = None
        if raw_meta:
            try:
                meta = header_meta(raw_meta)
            except Reject as exc:
                bad_meta = exc
        elif msg.reply:
            meta = reply_subject_meta(msg.reply)
        key = meta.key if meta is not None else ""
        task = asyncio.current_task()
        assert task is not None
        tracked = "/" in key  # "<request id>/<cancel token>": cancellable
        if tracked:
            self.cancellations.track(key, task)
        try:
            me = self.platform.node_id
            method = msg.subject[ep.prefix_len:]
            reply_headers: dict[str, str] = {H_NODE: me}
            content_type: str | None = None
            try:
                try:
                    app = ep.app
                    if ep.active_only and not app.is_active:
                        if leader := app.leader:
                            reply_headers[H_LEADER] = leader
                        raise Reject(NOT_LEADER, "NotLeaderError",
                                      f"{me} is not active for {app.name} (leader: {app.leader})")
                    data = msg.data
                    content_type = headers.get(codecs.CONTENT_TYPE) if headers else None
                    if content_type is None and data:
                        content_type = codecs.OCTET_STREAM  # raw bytes travel without the header
                    try:
                        payload = codecs.decode(data, content_type)
                    except codecs.CodecError as exc:
                        raise Reject(BAD_REQUEST, "CodecError", str(exc)) from None
                    if bad_meta is not None:
                        raise bad_meta
                    deadline: float | None = None
                    rid, source_node, source_app = "", None, None
                    if meta is not None:
                        rid = meta.request_id  # the cancel token stays private
                        source_node, source_app = meta.source_node, meta.source_app
                        if meta.timeout is not None:
                            # Request.deadline compares to time.monotonic() (the loop's clock).
                            deadline = time.monotonic() + meta.timeout
                    req = Request(
                        kind=ep.kind, app=app.name, method=method, route=ep.route, node=me,
                        subject=msg.subject, headers=headers or {}, data=data,
                        content_type=content_type, payload=payload, request_id=rid,
                        source_node=source_node, source_app=source_app, deadline=deadline,
                        reply_headers=reply_headers,
                        handler=ep.handlers.get(method),  # None: refused after middleware (auth)
                    )
                    mw = self.middleware
                    if mw is not self._chains_of or self._chains_version != mw.version:
                        self._compose()
                    # The request id is the correlation id of what the handler records (audit
                    # entries); this task's own context, so nothing to reset.
                    CORRELATION.set(rid or None)
                    if deadline is None:
                        result = await self._request_chain(req)
                    else:
                        # Cancel the handler when the caller stops waiting (a shared timer per
                        # slot of the deadline wheel: cheaper than a timer per request).
                        expired: list[bool] = []
                        slot = self._deadlines.add(deadline, task, expired)
                        try:
                            result = await self._request_chain(req)
                        except asyncio.CancelledError:
                            if expired and task.uncancel() == 0:
                                raise Reject(DEADLINE_EXCEEDED, "TimeoutError",
                                              "the caller's deadline passed") from None
                            raise
                        finally:
                            slot.pop(task, None)
                except asyncio.CancelledError:
                    if task.cancelling() and not self._running:
                        raise  # the platform stops
                    return  # cancelled by the caller: it no longer waits
                if not msg.reply:
                    return
                body, ct = codecs.encode(result, codecs.codec_of(content_type))
                send_ct = ct if codecs.needs_header(body, ct) else None
                if len(body) + HEADER_SLACK > self._max_payload():
                    raise Reject(REPLY_TOO_LARGE, "PayloadTooLargeError",
                                  f"reply of {len(body)} bytes exceeds the server limit of "
                                  f"{self._max_payload()} bytes")
                nc = self.platform.nc
                if nc is not None:
                    try:
                        if meta is not None and meta.framed and len(reply_headers) == 1:
                            # Nothing but our node id to say: a framed reply, no headers.
                            await nc.publish(msg.reply, frame_reply(self._node_head, send_ct,
                                                                    body))
                        else:
                            if send_ct is not None:
                                reply_headers[codecs.CONTENT_TYPE] = send_ct
                            await nc.publish(msg.reply, body, headers=reply_headers)
                    except Exception as exc:
                        log.debug("rpc: reply to %s not sent: %s", msg.subject, exc)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # every failure becomes an error reply
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                await self._respond_error(ep, msg, method, exc, reply_headers)
        finally:
            gate.busy -= 1
            if tracked:
                self.cancellations.done(key, task)

    async def _invoke(self, req: Request) -> Any:
        fn = req.handler
        if fn is None:
            eps = self._endpoints.get(req.app, [])
            known = sorted({m for ep in eps if ep.kind == req.kind for m in ep.handlers})
            raise Reject(UNKNOWN_METHOD, "UnknownMethod",
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
                    raise Reject(INVALID_REQUEST, "ValidationError", str(exc),
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
        if isinstance(exc, Reject):
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


async def _drain(sub: Any, timeout: float = 5.0) -> None:
    """Unsubscribe without losing requests already on their way to us: the server is told
    first, and what it had sent is still answered (``not_leader`` when we are no longer
    active, so the caller retries elsewhere). A plain unsubscribe would drop them and leave
    their callers waiting until their deadline."""
    try:
        async with asyncio.timeout(timeout):
            await sub.drain()
    except asyncio.CancelledError:
        raise
    except Exception:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
