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

`SignedAuth` authenticates calls with NKey signatures (the caller's identity is bound to its
key; servers hold only public keys; stale and replayed requests are refused). `AuthMiddleware`
is the older, *weak* mode: a shared token or per-app secrets that travel in plain headers (see
docs/security.md for what each protects against).

Size: the public middleware API (chain, call, request and event objects) and the two
authentication middlewares users import from here; one module is the import surface.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .kernel.errors import ConfigError, UnauthorizedError
from .kernel.names import validate_ident
from .signing import SignatureError, SigningKey, VerifyingKey, load_seed

if TYPE_CHECKING:
    from .builtin.events.bus import Event
    from .kernel.platform import Platform

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
    :ivar before_send: called by the transport right before each attempt is sent, with
        ``(subject, body, headers)``; it may add headers that depend on the exact subject and
        bytes of that attempt (`SignedAuth` signs them there).
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
    before_send: Callable[[str, bytes, dict[str, str]], None] | None = field(
        default=None, repr=False)


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
    :ivar identity: the authenticated caller (verified by `SignedAuth`; the app of matching
        per-app secrets with `AuthMiddleware`), if any.
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
    for mw in middleware:
        platform.middleware.add(mw)


# -- the worked example: authentication ------------------------------------------------------


class AuthMiddleware(Middleware):
    """*Weak* authentication: a shared token or per-app secrets, carried in plain headers.

    Prefer `SignedAuth`. Here every server that checks a secret learns it (and can then call
    others with it), and any NATS user allowed to subscribe to the request subjects reads it.
    A shared token proves no identity: the ``Pycluster-Auth-App`` a token holder sends is not
    trusted (``request.identity`` stays None), so ``allow`` lists need per-app ``credentials``.

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
        if self.allow and not self.credentials:
            raise ConfigError("AuthMiddleware.allow", sorted(self.allow),
                              "a shared token proves no identity: allow lists need per-app "
                              "credentials (or SignedAuth)")
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
            return None  # the token holder's claimed app is not proven by the token
        raise UnauthorizedError("bad credentials")


# -- signed requests --------------------------------------------------------------------------

SIG_HEADER = "Pc-Sig"
SIG_VERSION = b"pycluster-sig-v1"


def key_id(public_key: str) -> str:
    """The short id of a public key sent with signatures (its last 6 characters)."""
    return public_key[-6:]


def signed_content(identity: str, subject: str, timestamp: str, nonce: str,
                   content_type: str, body: bytes) -> bytes:
    """What a `SignedAuth` signature covers: the identity, the exact subject, the time, the
    nonce, the content type and a SHA-256 of the body."""
    return b"\n".join((SIG_VERSION, identity.encode(), subject.encode(), timestamp.encode(),
                       nonce.encode(), content_type.encode(), hashlib.sha256(body).digest()))


class SignedAuth(Middleware):
    """Authenticate calls with NKey (Ed25519) signatures bound to caller identities.

    Each caller identity (an app, a service, an operator) has an NKey seed; servers are given
    the identities' *public* keys. A caller signs every attempt of a call: the identity, the
    exact subject, a timestamp, a random nonce, the content type and a hash of the body, sent
    in one header (``Pc-Sig: <identity> <key id> <ms> <nonce> <signature>``; the key id is the
    public key's last 6 characters). A server accepts a request only if the identity is trusted
    with a public key of that id whose signature matches, the timestamp is within ``max_skew``
    seconds of its clock, and the nonce was not seen before within that window (a replayed
    request is refused). ``allow`` lists refer to verified identities (``request.identity``).

    Example::

        seed, public = pycluster.signing.generate_keypair()   # once per identity
        use(platform, SignedAuth(
            identity="web", seed=os.environ["WEB_NKEY_SEED"],  # how this node calls
            trusted={"web": WEB_PUBLIC, "ops": OPS_PUBLIC},    # whom it accepts
            allow={"reset": ["ops"]},                          # method -> identities
        ))

    A refused request never reaches the handler; the caller gets `pycluster.RemoteError` with
    ``code == "unauthorized"``. Replies are not signed: NATS permissions keep other users off a
    caller's inbox (``pycluster nats-config``). Clocks must agree within ``max_skew``.

    :param identity: the name this node calls as (validated like an app name).
    :param seed: its NKey seed (``SU...``) or the path of a file holding it; without
        ``identity``/``seed`` this node only verifies.
    :param trusted: identity → public key (``U...``) or a list of them (key rotation); without
        it this node only signs.
    :param allow: method name → identities allowed (other methods: any trusted identity).
    :param max_skew: seconds a request's timestamp may differ from this node's clock.
    :param kinds: which requests to protect (``"api"``, ``"rpc"``; default both).
    :param max_nonces: bound of the replay cache (a request is refused while it is full).
    """

    def __init__(
        self,
        identity: str | None = None,
        seed: str | bytes | os.PathLike[str] | None = None,
        *,
        trusted: Mapping[str, str | Iterable[str]] | None = None,
        allow: Mapping[str, Iterable[str]] | None = None,
        max_skew: float = 30.0,
        kinds: Iterable[Kind] = ("api", "rpc"),
        max_nonces: int = 1_000_000,
    ) -> None:
        if (identity is None) != (seed is None):
            raise ConfigError("SignedAuth", identity, "give both identity and seed, or neither")
        if identity is None and not trusted:
            raise ConfigError("SignedAuth", None, "give identity and seed (to sign), trusted "
                              "keys (to verify), or both")
        self.identity = validate_ident("SignedAuth.identity", identity) if identity else None
        self._key = SigningKey(load_seed(seed)) if seed is not None else None
        self.public_key = self._key.public_key if self._key is not None else None
        self.trusted: dict[str, dict[str, VerifyingKey]] = {}
        for name, keys in (trusted or {}).items():
            validate_ident("SignedAuth.trusted", name)
            keys = [keys] if isinstance(keys, str) else list(keys)
            if not keys:
                raise ConfigError("SignedAuth.trusted", name, "no public key")
            self.trusted[name] = {k: VerifyingKey(k) for k in keys}
        # identity -> key id -> the keys with that id (nearly always one)
        self._by_id: dict[str, dict[str, list[VerifyingKey]]] = {}
        for name, by_key in self.trusted.items():
            for k, vk in by_key.items():
                self._by_id.setdefault(name, {}).setdefault(key_id(k), []).append(vk)
        self.allow = {m: frozenset(ids) for m, ids in (allow or {}).items()}
        unknown = sorted({i for ids in self.allow.values() for i in ids} - set(self.trusted))
        if unknown and self.trusted:
            raise ConfigError("SignedAuth.allow", unknown, "names identities that are not "
                              "trusted (no public key)")
        if not max_skew > 0:
            raise ConfigError("SignedAuth.max_skew", max_skew, "must be positive")
        self.max_skew = float(max_skew)
        self.kinds = frozenset(kinds)
        self.max_nonces = max_nonces
        # Nonces seen within the window: (identity, nonce) -> when they may be forgotten.
        self._seen: dict[tuple[str, str], float] = {}
        self._order: collections.deque[tuple[float, tuple[str, str]]] = collections.deque()
        # A short header: nats-py builds and parses headers in Python, per character.
        self._header_prefix = (f"{self.identity} {key_id(self.public_key)} "
                               if self.public_key else "")

    def __repr__(self) -> str:
        return (f"SignedAuth(identity={self.identity!r}, public_key={self.public_key!r}, "
                f"trusted={sorted(self.trusted)})")

    # -- client side --------------------------------------------------------------------------

    async def on_call(self, call: Call, call_next: Next) -> Any:
        """Sign each attempt of the call (right before it is sent)."""
        if self._key is not None and call.kind in self.kinds:
            # A placeholder of the signature's size, so the transport's size check (against
            # the server's max_payload, headers included) counts it; replaced at each attempt.
            call.headers[SIG_HEADER] = "x" * (len(self._header_prefix) + 13 + 1 + 16 + 1 + 86)
            inner = call.before_send
            if inner is None:
                call.before_send = self._sign
            else:
                def both(subject: str, body: bytes, headers: dict[str, str]) -> None:
                    inner(subject, body, headers)
                    self._sign(subject, body, headers)

                call.before_send = both
        return await call_next(call)

    def sign_request(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Add the signature header of a request sent outside a platform (e.g. by the CLI)."""
        if self._key is None:
            raise ConfigError("SignedAuth", None, "no identity and seed to sign with")
        self._sign(subject, body, headers)

    def _sign(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        assert self._key is not None and self.identity is not None
        ts = str(int(time.time() * 1000))
        nonce = base64.urlsafe_b64encode(os.urandom(12)).decode()
        content = signed_content(self.identity, subject, ts, nonce,
                                 headers.get("Content-Type", ""), body)
        sig = base64.urlsafe_b64encode(self._key.sign(content)).decode().rstrip("=")
        headers[SIG_HEADER] = f"{self._header_prefix}{ts} {nonce} {sig}"

    # -- server side --------------------------------------------------------------------------

    async def on_request(self, request: Request, call_next: Next) -> Any:
        """Refuse requests that are unsigned, forged, stale or replayed (before the handler)."""
        if request.kind in self.kinds:
            if not self.trusted:
                raise UnauthorizedError("this node trusts no signing keys")
            request.identity = self.verify(request.subject, request.data, request.headers)
            allowed = self.allow.get(request.method)
            if allowed is not None and request.identity not in allowed:
                raise UnauthorizedError(
                    f"caller {request.identity!r} may not call {request.app}.{request.method}")
        return await call_next(request)

    def verify(self, subject: str, body: bytes, headers: Mapping[str, str],
               now: float | None = None) -> str:
        """The verified identity of a request, or `UnauthorizedError` saying why not."""
        value = headers.get(SIG_HEADER)
        if not value:
            raise UnauthorizedError("missing signature")
        parts = value.split(" ")
        if len(parts) != 5:
            raise UnauthorizedError("malformed signature header")
        identity, kid, ts, nonce, sig = parts
        by_id = self._by_id.get(identity)
        keys = by_id.get(kid) if by_id is not None else None
        if not keys:
            raise UnauthorizedError(f"identity {identity[:64]!r} is not trusted with key id "
                                    f"{kid[:8]!r}")
        now = time.time() if now is None else now
        try:
            when = int(ts) / 1000.0
        except ValueError:
            raise UnauthorizedError("malformed signature timestamp") from None
        if abs(now - when) > self.max_skew:
            raise UnauthorizedError(f"stale request: signed {now - when:+.1f}s from this "
                                    f"node's clock (allowed: {self.max_skew:g}s)")
        token = (identity, nonce)
        if token in self._seen:
            raise UnauthorizedError("replayed request (nonce already seen)")
        try:
            raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        except (ValueError, TypeError):
            raise UnauthorizedError("malformed signature") from None
        content = signed_content(identity, subject, ts, nonce,
                                 headers.get("Content-Type", ""), body)
        for key in keys:
            try:
                key.verify(content, raw)
                break
            except SignatureError:
                continue
        else:
            raise UnauthorizedError(f"bad signature for {identity!r}")
        self._remember(token, when + self.max_skew, now)
        return identity

    def _remember(self, token: tuple[str, str], until: float, now: float) -> None:
        seen, order = self._seen, self._order
        while order and (order[0][0] < now or len(seen) >= self.max_nonces):
            if order[0][0] >= now:  # full of live nonces: refuse rather than forget one
                raise UnauthorizedError("replay cache full; retry later")
            _, old = order.popleft()
            seen.pop(old, None)
        seen[token] = until
        order.append((until, token))


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
