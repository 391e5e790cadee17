"""Middleware: a chain around calls (client side), handlers (server side) and events.

A middleware is an object with any of four async methods; each receives the message and
``call_next`` and must await ``call_next(...)`` to go on (or raise to stop the chain):

* ``on_call(call, call_next)`` — client side, once per logical call (around every retry);
  ``call.headers`` are the outgoing NATS headers, ``call.reply_headers`` the reply's headers
  once ``call_next`` returned.
* ``on_request(request, call_next)`` — server side, around the handler;
  ``request.headers`` are the incoming NATS headers, ``request.reply_headers`` the outgoing
  reply's (mutable).
* ``on_publish(event, call_next)`` / ``on_event(event, call_next)`` — around publishing and
  delivering an event; ``event.headers`` are the NATS headers in both directions.

So a tracing middleware can inject a W3C ``traceparent`` into ``call.headers`` and read it back
from ``request.headers`` on the other side (and the same for events). Middleware run in the order
they were added, the first outermost; those contributed by plugins
(`pycluster.hookspecs.pycluster_middleware`) come before those added with `use`.

`AuthMiddleware` is the worked example: a shared token, or per-app credentials with an optional
per-method allow list, carried in headers.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError, UnauthorizedError
from .names import validate_ident

if TYPE_CHECKING:
    from .events import Event
    from .platform import Platform

log = logging.getLogger("pycluster.middleware")

Kind = Literal["rpc", "api"]


@dataclass(eq=False)
class Call:
    """One outgoing call, as client-side middleware sees it.

    :ivar kind: ``"rpc"`` (inside an app) or ``"api"`` (the API bus).
    :ivar app: the target app.
    :ivar method: the method.
    :ivar route: ``"leader"``, ``"any"``, ``"node:<id>"`` or ``"key:<key>"``.
    :ivar payload: the value being sent (before encoding).
    :ivar headers: the outgoing NATS headers (mutable: add ``traceparent``, credentials, ...).
    :ivar timeout: the call's deadline in seconds.
    :ivar idempotent: whether it may be retried after it was sent.
    :ivar source_node: this node.
    :ivar source_app: the calling app, when known.
    :ivar request_id: the id the server sees as ``request.request_id``.
    :ivar reply_headers: the reply's NATS headers (filled when ``call_next`` returns or raises
        a `pycluster.RemoteError`).
    :ivar node: the node that answered, when known.
    :ivar attempts: how many requests were sent.
    :ivar codec: ``"json"`` or ``"msgpack"`` (how a non-bytes payload is encoded).
    :ivar response_model: the type the answer is validated into, if any.
    :ivar extra: free room for middleware (e.g. a span).
    """

    kind: Kind
    app: str
    method: str
    route: str
    payload: Any
    headers: dict[str, str]
    timeout: float
    idempotent: bool
    source_node: str
    source_app: str | None = None
    request_id: str = ""
    reply_headers: dict[str, str] = field(default_factory=dict)
    node: str | None = None
    attempts: int = 0
    codec: str = "json"
    response_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    target: Any = field(default=None, repr=False)  # the transport's routing strategy
    retry: Any = field(default=None, repr=False)  # the transport's RetryPolicy


@dataclass(eq=False)
class Request:
    """One incoming request, as server-side middleware (and handlers that ask for it) see it.

    A handler whose parameter is annotated ``Request`` receives this object instead of the
    decoded payload.

    :ivar kind: ``"rpc"`` or ``"api"``.
    :ivar app: the app that serves it.
    :ivar method: the method.
    :ivar route: how it was routed here (``"leader"``, ``"any"``, ``"node"``).
    :ivar node: this node.
    :ivar subject: the NATS subject it arrived on.
    :ivar headers: the incoming NATS headers.
    :ivar data: the raw body.
    :ivar content_type: the body's content type (``application/octet-stream`` for raw bytes,
        which travel without the header; None for an empty body).
    :ivar payload: the decoded body (validated into the handler's pydantic model later).
    :ivar request_id: the caller's request id.
    :ivar source_node: the calling node, when given.
    :ivar source_app: the calling app, when given.
    :ivar deadline: monotonic instant after which the caller no longer waits (None: unknown).
    :ivar reply_headers: headers to send with the reply (mutable).
    :ivar identity: the authenticated caller (set by `AuthMiddleware`), if any.
    :ivar extra: free room for middleware.
    :ivar handler: the function that will serve it (middleware may replace it).
    """

    kind: Kind
    app: str
    method: str
    route: str
    node: str
    subject: str
    headers: dict[str, str]
    data: bytes
    content_type: str | None
    payload: Any
    request_id: str
    source_node: str | None
    source_app: str | None
    deadline: float | None
    reply_headers: dict[str, str] = field(default_factory=dict)
    identity: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    handler: Callable[..., Any] | None = field(default=None, repr=False)

    def remaining(self) -> float | None:
        """Seconds until the caller's deadline (None when unknown), never negative."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


Next = Callable[[Any], Awaitable[Any]]
HOOKS = ("on_call", "on_request", "on_publish", "on_event")


class Middleware:
    """Base class; override any of the four methods (the defaults pass through).

    Example::

        class Timing(Middleware):
            async def on_request(self, request, call_next):
                t0 = time.perf_counter()
                try:
                    return await call_next(request)
                finally:
                    metrics.observe(request.method, time.perf_counter() - t0)
    """

    async def on_call(self, call: Call, call_next: Next) -> Any:
        """Around an outgoing call; returns the call's result."""
        return await call_next(call)

    async def on_request(self, request: Request, call_next: Next) -> Any:
        """Around a handler; returns the handler's result."""
        return await call_next(request)

    async def on_publish(self, event: Event, call_next: Next) -> Any:
        """Around publishing an event."""
        return await call_next(event)

    async def on_event(self, event: Event, call_next: Next) -> Any:
        """Around delivering an event to a subscriber's callback."""
        return await call_next(event)


def _overrides(mw: object, hook: str) -> bool:
    fn = getattr(type(mw), hook, None)
    if fn is None:
        return False
    return fn is not getattr(Middleware, hook)


class MiddlewareChain:
    """An ordered list of middleware, composed once per hook and cached."""

    def __init__(self) -> None:
        self._items: list[object] = []
        self._cache: dict[tuple[str, int], tuple[Next, Next]] = {}
        #: Bumped whenever the chain changes, so users may keep a composition until then.
        self.version = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
        return iter(list(self._items))

    def add(self, mw: object) -> None:
        """Append a middleware (it wraps everything added after it)."""
        if not any(callable(getattr(mw, h, None)) for h in HOOKS):
            raise ConfigError(
                "middleware", mw, f"must define at least one of {', '.join(HOOKS)}"
            )
        self._items.append(mw)
        self._cache.clear()
        self.version += 1

    def remove(self, mw: object) -> None:
        """Remove a middleware added before."""
        self._items.remove(mw)
        self._cache.clear()
        self.version += 1

    def wrap(self, hook: str, inner: Next, cache: bool = True) -> Next:
        """``inner`` wrapped by every middleware that implements ``hook``.

        With ``cache`` (for long-lived inner functions) the composition is kept until the chain
        changes; pass False for a per-call closure.
        """
        if not cache:
            return self._compose(hook, inner)
        key = (hook, id(inner))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is inner:  # the cache keeps ``inner`` alive: ids are stable
            return hit[1]
        fn = self._compose(hook, inner)
        self._cache[key] = (inner, fn)
        return fn

    def _compose(self, hook: str, inner: Next) -> Next:
        fn = inner
        for mw in reversed([m for m in self._items if _overrides(m, hook)]):
            fn = functools.partial(getattr(mw, hook), call_next=fn)
        return fn


def use(platform: Platform, *middleware: object) -> None:
    """Add middleware to ``platform``'s calls, handlers and events (in order, first outermost).

    Example::

        pycluster.middleware.use(platform, AuthMiddleware(token=os.environ["API_TOKEN"]))
    """
    from .rpc import rpc_service

    chain = rpc_service(platform).middleware
    for mw in middleware:
        chain.add(mw)


# -- the worked example: authentication ------------------------------------------------------


class AuthMiddleware(Middleware):
    """Authenticate calls with a shared token or per-app credentials, carried in headers.

    Shared token (every node and client is configured with the same secret)::

        use(platform, AuthMiddleware(token="s3cret"))

    Per-app credentials: this node calls as ``identity``; as a server it accepts the apps listed
    in ``credentials`` (name → secret), optionally only for some methods::

        use(platform, AuthMiddleware(
            identity=("web", web_secret),
            credentials={"web": web_secret, "ops": ops_secret},
            allow={"reset": ["ops"]},          # method → apps allowed; others: any known app
        ))

    A refused request never reaches the handler; the caller gets `pycluster.RemoteError` with
    ``code == "unauthorized"``. Secrets travel in NATS headers: use TLS to the NATS servers.
    Secrets are compared in constant time and never logged.

    :param token: the shared secret (header ``Pycluster-Auth``).
    :param identity: ``(app, secret)`` sent with this node's calls (headers
        ``Pycluster-Auth-App`` and ``Pycluster-Auth``).
    :param credentials: per-app secrets this node accepts.
    :param allow: method name → the apps allowed to call it.
    :param kinds: which requests to protect (``"api"``, ``"rpc"``; default both).
    """

    TOKEN_HEADER = "Pycluster-Auth"
    APP_HEADER = "Pycluster-Auth-App"

    def __init__(
        self,
        token: str | None = None,
        *,
        identity: tuple[str, str] | None = None,
        credentials: Mapping[str, str] | None = None,
        allow: Mapping[str, Iterable[str]] | None = None,
        kinds: Iterable[Kind] = ("api", "rpc"),
    ) -> None:
        if token is None and identity is None and not credentials:
            raise ConfigError("AuthMiddleware", None, "give a token, or identity/credentials")
        if token is not None and (not isinstance(token, str) or not token):
            raise ConfigError("AuthMiddleware.token", "***", "must be a non-empty string")
        self.token = token
        self.identity: tuple[str, str] | None = None
        if identity is not None:
            name, secret = identity
            validate_ident("AuthMiddleware.identity", name)
            if not secret:
                raise ConfigError("AuthMiddleware.identity", name, "the secret is empty")
            self.identity = (name, secret)
        self.credentials = dict(credentials or {})
        for name in self.credentials:
            validate_ident("AuthMiddleware.credentials", name)
        self.allow = {m: frozenset(apps) for m, apps in (allow or {}).items()}
        self.kinds = frozenset(kinds)

    async def on_call(self, call: Call, call_next: Next) -> Any:
        """Attach this node's credentials."""
        if call.kind in self.kinds:
            if self.identity is not None:
                call.headers[self.APP_HEADER] = self.identity[0]
                call.headers[self.TOKEN_HEADER] = self.identity[1]
            elif self.token is not None:
                call.headers[self.TOKEN_HEADER] = self.token
        return await call_next(call)

    async def on_request(self, request: Request, call_next: Next) -> Any:
        """Refuse requests without valid credentials (before the handler runs)."""
        if request.kind in self.kinds:
            request.identity = self._check(request)
            allowed = self.allow.get(request.method)
            if allowed is not None and request.identity not in allowed:
                raise UnauthorizedError(
                    f"caller {request.identity!r} may not call {request.app}.{request.method}"
                )
        return await call_next(request)

    def _check(self, request: Request) -> str | None:
        secret = request.headers.get(self.TOKEN_HEADER)
        if not secret:
            raise UnauthorizedError("missing credentials")
        app = request.headers.get(self.APP_HEADER)
        if app is not None and self.credentials:
            expected = self.credentials.get(app)
            if expected is not None and hmac.compare_digest(secret.encode(), expected.encode()):
                return app
            raise UnauthorizedError(f"bad credentials for {app!r}")
        if self.token is not None and hmac.compare_digest(secret.encode(), self.token.encode()):
            return app
        raise UnauthorizedError("bad credentials")


class LoggingMiddleware(Middleware):
    """Log every call and request with its duration and outcome (at ``level``)."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.log = logger or log
        self.level = level

    async def on_call(self, call: Call, call_next: Next) -> Any:
        """Log an outgoing call."""
        t0 = time.perf_counter()
        try:
            result = await call_next(call)
        except BaseException as exc:
            self.log.log(self.level, "call %s %s.%s via %s failed after %.1f ms: %s",
                         call.kind, call.app, call.method, call.route,
                         (time.perf_counter() - t0) * 1000, type(exc).__name__)
            raise
        self.log.log(self.level, "call %s %s.%s via %s -> %s in %.1f ms", call.kind, call.app,
                     call.method, call.route, call.node, (time.perf_counter() - t0) * 1000)
        return result

    async def on_request(self, request: Request, call_next: Next) -> Any:
        """Log a served request."""
        t0 = time.perf_counter()
        try:
            result = await call_next(request)
        except BaseException as exc:
            self.log.log(self.level, "served %s %s.%s from %s: %s after %.1f ms", request.kind,
                         request.app, request.method, request.source_node, type(exc).__name__,
                         (time.perf_counter() - t0) * 1000)
            raise
        self.log.log(self.level, "served %s %s.%s from %s in %.1f ms", request.kind,
                     request.app, request.method, request.source_node,
                     (time.perf_counter() - t0) * 1000)
        return result
