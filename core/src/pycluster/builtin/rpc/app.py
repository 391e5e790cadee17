"""``app.rpc``: RPC between the nodes that run one app (the ``rpc`` plugin's app handle)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...kernel.names import app_subject, validate_ident
from .client import AnyInstance, FixedNode, NodeResult, RetryPolicy
from .wire import CACHE_MAX, LEADER_TARGET, check_method, check_timeout

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.platform import Platform
    from .service import RpcService


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
        return _rpc_of(self.app.platform)

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
            if len(self._node_targets) >= CACHE_MAX:
                self._node_targets.clear()
            subject = app_subject(p.name, self.app.name, "rpc", f"{node}.{method}")
            target = self._node_targets[(node, method)] = FixedNode(subject, node)
        return target

    def _leader_target(self, p: Platform, method: str) -> AnyInstance:
        target = self._leader_targets.get(method)
        if target is None:
            check_method(method)
            if len(self._leader_targets) >= CACHE_MAX:
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
        svc = _rpc_of(p)
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
        svc = _rpc_of(p)
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


def _rpc_of(platform: Platform) -> RpcService:
    """The platform's rpc service (`PluginError` when the plugin is disabled)."""
    return platform.service("rpc")  # type: ignore[no-any-return]
