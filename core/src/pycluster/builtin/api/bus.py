"""The API bus: apps call each other's declared API across the platform.

An app declares its API with ``@app.handle("method")``; any node of the platform calls it with
``await platform.api("convex").call("query", payload, route=...)``.

Subjects (platform-wide; ``_``-prefixed tokens never collide with names):

* ``{platform}._.api.{app}.{method}``              — the active instance(s), queue group ``api``
  (the default route: a Singleton's leader; any active instance of Spread/Replicas)
* ``{platform}._.api.{app}._any.{method}``         — any running instance (standbys too),
  queue group ``api``
* ``{platform}._.api.{app}._node.{node}.{method}`` — the instance on one node

Routes: None (the default, by the target's mode), `ToLeader` (the active instance; for
Spread/Replicas any active one), `ToAny`, `ToNode`, and `ForKey` (the instance that owns a key,
found through the ``pycluster_route_key`` hook that the ring plugin implements; without it the
call fails with a `PluginError` naming the ring plugin).

Failures: `RemoteError` (the handler raised; type, message, code), `NoInstanceError` at once when
no live node runs the app (or the target node does not answer), `CallTimeoutError` at the
deadline (a failover that did not finish in time is retried until then), `CircuitOpenError`
while the target's circuit breaker is open, `PayloadTooLargeError` before sending.

Behaviour under connection loss: as for `pycluster.builtin.rpc.service` (calls time out at their
deadline; the
server's subscriptions come back with the connection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...kernel.errors import NoInstanceError, PluginError
from ...kernel.names import platform_subject, validate_ident, validate_key
from ..rpc.client import AnyInstance, FixedNode, RetryPolicy, RpcClient, Target
from ..rpc.server import Endpoint
from ..rpc.wire import check_method, check_timeout
from .breaker import BreakerPolicy, CircuitBreaker

if TYPE_CHECKING:
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ..rpc.service import RpcService

ANY_TOKEN = "_any"
NODE_TOKEN = "_node"
RING_PLUGIN = "ring"
RING_DISTRIBUTION = "pycluster-ring"


@dataclass(frozen=True)
class ToLeader:
    """Route to the active instance (for Spread/Replicas: any active instance)."""


@dataclass(frozen=True)
class ToAny:
    """Route to any running instance, standbys included (load-balanced)."""


@dataclass(frozen=True)
class ToNode:
    """Route to the instance on one node."""

    node: str

    def __post_init__(self) -> None:
        validate_ident("node id", self.node)


@dataclass(frozen=True)
class ForKey:
    """Route to the instance that owns ``key`` (needs a key-routing plugin, e.g. the ring)."""

    key: str

    def __post_init__(self) -> None:
        validate_key(self.key)


Route = ToLeader | ToAny | ToNode | ForKey


def api_subject(platform: str, app: str, method: str, route: Route | None = None) -> str:
    """The subject a call of ``app.method`` by ``route`` is sent to (ForKey excluded)."""
    validate_ident("app", app)
    validate_ident("method", method)
    if route is None or isinstance(route, ToLeader):
        return platform_subject(platform, "api", app, method)
    if isinstance(route, ToAny):
        return platform_subject(platform, "api", app, ANY_TOKEN, method)
    if isinstance(route, ToNode):
        return platform_subject(platform, "api", app, NODE_TOKEN, route.node, method)
    raise TypeError(f"no fixed subject for route {route!r}")


class KeyOwner(Target):
    """The owner of a key, asked from the ``pycluster_route_key`` hook at every attempt (the
    owner may move during a rebalance)."""

    def __init__(self, platform: Platform, app: str, method: str, key: str) -> None:
        self.platform = platform
        self.app = app
        self.method = method
        self.key = key
        self.route = f"key:{key}"
        self.node: str | None = None
        hook = platform.pm.hook.pycluster_route_key
        if not hook.get_hookimpls():
            raise PluginError(
                RING_PLUGIN, RING_DISTRIBUTION, None,
                f"routing a call of {app}.{method} by key (ForKey) needs a key-routing plugin: "
                f"install {RING_DISTRIBUTION} (pip install 'pycluster[ring]') and give the app "
                "a Ring(...) option, or implement the pycluster_route_key hook",
            )

    def subject(self) -> str:
        """Ask the hook for the owner now."""
        node = self.platform.pm.hook.pycluster_route_key(
            app_name=self.app, key=self.key, platform=self.platform
        )
        if node is None:
            raise NoInstanceError(self.app, self.route, "no node owns the key right now")
        self.node = validate_ident("node id", node)
        return api_subject(self.platform.name, self.app, self.method, ToNode(node))

    async def unanswered(self, svc: RpcClient, app: str) -> str:
        """Retry (with back-off, until the call's deadline) while the hook names an owner: a
        crashed owner's keys move to another node once its ownership lease has ended, like a
        leader's failover. No owner at all: no instance."""
        assert self.node is not None
        node = self.platform.pm.hook.pycluster_route_key(
            app_name=self.app, key=self.key, platform=self.platform
        )
        if node is None:
            raise NoInstanceError(app, self.route, f"owner {self.node!r} does not answer")
        if node == self.node:
            return f"owner {node} does not answer (its keys move once its lease ends)"
        return f"owner moved from {self.node} to {node}"


class ApiClient:
    """Calls the API of one app (``platform.api("convex")``).

    Example::

        convex = platform.api("convex", timeout=2.0)
        rows = await convex.call("query", {"sql": "select 1"})
        user = await convex.call("get_user", GetUser(id=7), response_model=User)
        await convex.call("reindex", route=ToNode("node-2"))

    :param service: the `ApiService` of the calling platform.
    :param app: the target app.
    :param timeout: default seconds per call.
    :param codec: default codec for non-bytes payloads (``"json"`` or ``"msgpack"``).
    :param retry: back-off while no instance answers (failover) and after lost answers of
        idempotent calls.
    :param source_app: the calling app's name, sent along (for logs, auth and tracing).
    """

    def __init__(
        self, service: ApiService, app: str, *, timeout: float = 5.0, codec: str = "json",
        retry: RetryPolicy | None = None, source_app: str | None = None,
    ) -> None:
        self.service = service
        self.app = validate_ident("app", app)
        self.timeout = check_timeout(timeout)
        self.codec = codec
        self.retry = retry
        self.source_app = validate_ident("source app", source_app) if source_app else None
        self._targets: dict[tuple[str, Route | None], Target] = {}
        # Whose circuit breaker: the app's (a client of another platform's app keys its own).
        self.breaker_key = self.app

    def __repr__(self) -> str:
        return f"ApiClient({self.app!r})"

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker of the target app (shared by every client of this platform)."""
        return self.service.breaker(self.breaker_key)

    def _target(self, method: str, route: Route | None) -> Target:
        if isinstance(route, ForKey):
            return KeyOwner(self.service.platform, self.app, check_method(method), route.key)
        key = (method, route)
        target = self._targets.get(key)
        if target is None:  # fixed routes are stateless: build (and validate) each once
            if len(self._targets) > 1024:
                self._targets.clear()
            target = self._targets[key] = self._fixed_target(method, route)
        return target

    def _fixed_target(self, method: str, route: Route | None) -> Target:
        name = self.service.platform.name
        if route is None or isinstance(route, ToLeader | ToAny):
            label = "any" if isinstance(route, ToAny) else "leader"
            return AnyInstance(api_subject(name, self.app, method, route), label)
        if isinstance(route, ToNode):
            return FixedNode(api_subject(name, self.app, method, route), route.node)
        raise TypeError(f"route must be ToLeader(), ToAny(), ToNode(id), ForKey(key) or None; "
                        f"got {route!r}")

    async def call(
        self, method: str, payload: Any = None, *, route: Route | None = None,
        timeout: float | None = None, idempotent: bool = False, codec: str | None = None,
        response_model: Any = None,
    ) -> Any:
        """Call ``method`` of the app and return its (decoded) answer.

        :param method: the method declared with ``@app.handle``.
        :param payload: bytes (passed through), a pydantic model, or any JSON-able value.
        :param route: None (by the target's mode), `ToLeader`, `ToAny`, `ToNode`, `ForKey`.
        :param timeout: seconds (default: the client's).
        :param idempotent: allow re-sending after a lost answer (during a failover).
        :param codec: ``"json"`` or ``"msgpack"`` (default: the client's).
        :param response_model: validate the answer into this type.
        """
        svc = self.service.rpc
        target = self._target(method, route)  # validates the method name (once per target)
        call = svc.new_call(
            kind="api", app=self.app, method=method, target=target, payload=payload,
            timeout=self.timeout if timeout is None else timeout, idempotent=idempotent,
            codec=codec or self.codec, response_model=response_model, retry=self.retry,
            source_app=self.source_app,
        )
        breaker = self.service.breaker(self.breaker_key)
        probe = breaker.before_call()
        try:
            result = await svc.call(call)
        except BaseException as exc:
            if isinstance(exc, Exception):
                breaker.record(probe, exc)
            else:
                breaker.abandon(probe)
            raise
        breaker.success(probe)
        return result


class ApiService:
    """The core service of the API bus: serves ``@app.handle`` methods, holds the breakers.

    Reached as ``platform.services["api"]``; clients come from ``platform.api(name)``.
    """

    name = "api"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._breakers: dict[str, CircuitBreaker] = {}
        self._rpc: RpcService | None = None

    @property
    def rpc(self) -> RpcService:
        """The transport (the platform's services are built once: looked up once)."""
        svc = self._rpc
        if svc is None:
            svc = self._rpc = self.platform.service("rpc")
        return svc

    async def start(self) -> None:
        """Nothing to do before apps start."""

    async def app_started(self, rt: AppRuntime) -> None:
        """Serve the app's API on this node (the default route only while active)."""
        app = rt.app
        p, me = self.platform.name, self.platform.node_id
        handlers = app.handlers
        self.rpc.add_endpoints(app.name, [
            Endpoint("api", app, "leader", platform_subject(p, "api", app.name, "*"), "api",
                     True, handlers),
            Endpoint("api", app, "any", platform_subject(p, "api", app.name, ANY_TOKEN, "*"),
                     "api", False, handlers),
            Endpoint("api", app, "node",
                     platform_subject(p, "api", app.name, NODE_TOKEN, me, "*"), "", False,
                     handlers),
        ])
        await self.rpc.sync(app.name)

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Stop serving the app's API."""
        await self.rpc.remove_endpoints(rt.app.name, "api")

    async def stop(self) -> None:
        """Nothing to release (the rpc service unsubscribes)."""

    def breaker(self, app: str, policy: BreakerPolicy | None = None) -> CircuitBreaker:
        """The circuit breaker of target ``app`` (created on first use; ``policy`` replaces the
        current policy when given)."""
        b = self._breakers.get(app)
        if b is None:
            b = self._breakers[app] = CircuitBreaker(app, policy)
        elif policy is not None:
            b.policy = policy
        return b

    def client(
        self, app: str, *, timeout: float = 5.0, codec: str = "json",
        retry: RetryPolicy | None = None, breaker: BreakerPolicy | None = None,
        source_app: str | None = None,
    ) -> ApiClient:
        """A client of ``app`` (see `ApiClient`); ``breaker`` sets the app's breaker policy."""
        client = ApiClient(self, app, timeout=timeout, codec=codec, retry=retry,
                           source_app=source_app)
        self.breaker(client.app, breaker)
        return client


def api_service(platform: Platform) -> ApiService:
    """The platform's `ApiService` (`PluginError` naming the plugin when it is missing)."""
    return platform.service("api")  # type: ignore[no-any-return]


__all__ = [
    "ApiClient",
    "ApiService",
    "ForKey",
    "Route",
    "ToAny",
    "ToLeader",
    "ToNode",
    "api_service",
    "api_subject",
]
