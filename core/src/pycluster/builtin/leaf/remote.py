"""Another platform, in another zone: its API and its events over the leaf link.

``platform.remote("prod")`` is a `RemotePlatform`. Its API calls go to the same subjects a
client on ``prod`` would use (``prod._.api.<app>.<method>``): plain subjects cross leaf links,
so the call reaches ``prod``'s instances wherever they run. Events are published into
``prod``'s own streams (which stay in ``prod``'s JetStream domain: the stream stores them and
acknowledges across the link) and received live.

A cut leaf link shows as `ZoneUnreachableError` (no node of the platform answers at all) at
once, not at the deadline; the app not answering while its zone does is retried until the
deadline, like a failover at home.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors

from ...kernel.errors import NoInstanceError
from ...kernel.names import app_subject, bucket, platform_subject, validate_ident
from ..api.bus import ApiClient, ForKey, Route, ToAny, ToLeader, ToNode, api_subject
from ..events.bus import Event, EventBus, Subscription
from ..rpc.client import AnyInstance, FixedNode, RetryPolicy, RpcClient, Target
from .service import ping_zone

if TYPE_CHECKING:
    from ..api.breaker import BreakerPolicy
    from ..api.bus import ApiService
    from ..events.bus import EventsService
    from .service import ZoneService

H_SOURCE_PLATFORM = "Pycluster-Source-Platform"
H_SOURCE_ZONE = "Pycluster-Source-Zone"


class ZoneUnreachableError(NoInstanceError):
    """No node of another platform answers at all: its zone is cut off (the leaf link is
    down) or nothing of that platform runs.

    :ivar platform: the remote platform.
    """

    def __init__(self, platform: str, app: str, route: str, reason: str) -> None:
        self.platform = platform
        super().__init__(app, route, reason)


@dataclass(frozen=True)
class RemoteReply:
    """A cross-platform call's answer and where it came from.

    :ivar value: the decoded answer.
    :ivar platform: the platform that answered.
    :ivar zone: its zone (as last reported by it; None if unknown).
    :ivar node: the node that answered.
    :ivar seconds: the call's duration.
    """

    value: Any
    platform: str
    zone: str | None
    node: str | None
    seconds: float


class _RemoteTarget(Target):
    """A route on another platform: nobody listening means either the zone is unreachable
    (fail at once, clearly) or the app has no instance there right now (retry)."""

    def __init__(self, inner: Target, remote: RemotePlatform) -> None:
        self.inner = inner
        self.remote = remote
        self.route = inner.route

    def subject(self) -> str:
        """The inner route's subject (on the remote platform)."""
        return self.inner.subject()

    async def unanswered(self, svc: RpcClient, app: str) -> str:
        """Ask the remote platform's zone responder which nodes run ``app``."""
        r = self.remote
        try:
            doc = await r.ping(timeout=1.0, app=app)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise ZoneUnreachableError(
                r.name, app, self.route,
                f"platform {r.name!r}{r.zone_label()} does not answer: its zone is "
                "unreachable (leaf link down?) or none of its nodes runs") from None
        nodes = doc.get("instances") or []
        if not nodes:
            raise NoInstanceError(app, self.route,
                                  f"no node of platform {r.name!r} runs it")
        if isinstance(self.inner, FixedNode):
            raise NoInstanceError(app, self.route, f"node {self.inner.node!r} of platform "
                                  f"{r.name!r} does not answer for it")
        return (f"no instance on platform {r.name!r} answered (running on "
                f"{', '.join(nodes)}; failover in progress?)")


class RemoteApiClient(ApiClient):
    """A client of an app of another platform (``platform.remote("prod").api("convex")``).

    Same calls and routes as `ApiClient` (except `ForKey`, whose owners only the app's own
    platform knows); `call_detailed` also says which platform, zone and node answered.
    Its circuit breaker is its own (``prod/convex``), not the local app's of the same name.
    """

    def __init__(self, service: ApiService, remote: RemotePlatform, app: str, *,
                 timeout: float = 5.0, codec: str = "json", retry: RetryPolicy | None = None,
                 source_app: str | None = None) -> None:
        super().__init__(service, app, timeout=timeout, codec=codec, retry=retry,
                         source_app=source_app)
        self.remote = remote
        self.breaker_key = f"{remote.name}/{self.app}"

    def __repr__(self) -> str:
        return f"RemoteApiClient({self.remote.name!r}, {self.app!r})"

    def _fixed_target(self, method: str, route: Route | None) -> Target:
        name = self.remote.name
        inner: Target
        if route is None or isinstance(route, ToLeader | ToAny):
            label = "any" if isinstance(route, ToAny) else "leader"
            inner = AnyInstance(api_subject(name, self.app, method, route), label)
        elif isinstance(route, ToNode):
            inner = FixedNode(api_subject(name, self.app, method, route), route.node)
        else:
            raise TypeError(f"route must be ToLeader(), ToAny(), ToNode(id) or None for "
                            f"another platform's app; got {route!r}")
        return _RemoteTarget(inner, self.remote)

    def _target(self, method: str, route: Route | None) -> Target:
        if isinstance(route, ForKey):
            raise TypeError("ForKey routes only within the app's own platform (its ring "
                            "lives there): call an API of that platform that routes by key")
        return super()._target(method, route)

    async def call(self, method: str, payload: Any = None, *, route: Route | None = None,
                   timeout: float | None = None, idempotent: bool = False,
                   codec: str | None = None, response_model: Any = None) -> Any:
        """Call ``method`` of the remote app and return its (decoded) answer (see
        `ApiClient.call`)."""
        reply = await self.call_detailed(
            method, payload, route=route, timeout=timeout, idempotent=idempotent, codec=codec,
            response_model=response_model)
        return reply.value

    async def call_detailed(
        self, method: str, payload: Any = None, *, route: Route | None = None,
        timeout: float | None = None, idempotent: bool = False, codec: str | None = None,
        response_model: Any = None,
    ) -> RemoteReply:
        """Like `call`, returning a `RemoteReply` (value, platform, zone, node, seconds)."""
        svc = self.service.rpc
        target = self._target(method, route)
        call = svc.new_call(
            kind="api", app=self.app, method=method, target=target, payload=payload,
            timeout=self.timeout if timeout is None else timeout, idempotent=idempotent,
            codec=codec or self.codec, response_model=response_model, retry=self.retry,
            source_app=self.source_app,
        )
        zs = self.remote.service
        call.headers[H_SOURCE_PLATFORM] = zs.platform.name
        if zs.zone:
            call.headers[H_SOURCE_ZONE] = zs.zone
        breaker = self.service.breaker(self.breaker_key)
        probe = breaker.before_call()
        started = time.monotonic()
        outcome = "error"
        try:
            value = await svc.call(call)
            outcome = "ok"
        except BaseException as exc:
            if isinstance(exc, ZoneUnreachableError):
                outcome = "unreachable"
            if isinstance(exc, Exception):
                breaker.record(probe, exc)
            else:
                breaker.abandon(probe)
            raise
        finally:
            seconds = time.monotonic() - started
            m = zs.metrics
            if m is not None:
                m.call.labels(remote=self.remote.name, app=self.app,
                              outcome=outcome).observe(seconds)
        breaker.success(probe)
        zone = await self.remote.learn_zone()
        return RemoteReply(value, self.remote.name, zone, call.node, seconds)


class RemoteEventBus(EventBus):
    """Events of another platform: `publish` into its stream (it stores and acknowledges them
    across the leaf link), `subscribe` live to what is published there. Durable
    subscriptions are not offered: their consumers would live in the other zone's JetStream
    domain."""

    def __init__(self, service: EventsService, remote: RemotePlatform, app: str | None) -> None:
        super().__init__(service, app)
        self.remote = remote
        p = remote.name
        if app is None:
            self.stream = bucket(p, suffix="events")
            self.base = platform_subject(p, "events") + "."
        else:
            self.stream = bucket(p, app, "events")
            self.base = app_subject(p, app, "events", "")
        self._ensured = True  # the other platform owns its streams: never create one here

    async def ensure_stream(self) -> None:
        """Nothing: the remote platform creates its own streams."""

    async def publish(
        self, type: str, data: Any = None, *, source_app: str | None = None,
        headers: dict[str, str] | None = None, codec: str = "json", timeout: float = 5.0,
    ) -> Event:
        """Publish an event into the remote platform's stream (see `EventBus.publish`); it
        carries this platform and zone in ``Pycluster-Source-Platform``/``-Zone`` headers.

        Raises `ZoneUnreachableError` when no stream of that platform takes it (its zone is
        cut off, or the stream does not exist there).
        """
        zs = self.remote.service
        h = dict(headers or {})
        h[H_SOURCE_PLATFORM] = zs.platform.name
        if zs.zone:
            h[H_SOURCE_ZONE] = zs.zone
        if self.app is not None:
            # App events come from their app: the remote app's name, as seen there.
            source_app = self.app
        try:
            return await super().publish(type, data, source_app=source_app, headers=h,
                                         codec=codec, timeout=timeout)
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            r = self.remote
            raise ZoneUnreachableError(
                r.name, self.app or "_", "events",
                f"no stream {self.stream!r} of platform {r.name!r}{r.zone_label()} takes "
                "the event: its zone is unreachable (leaf link down?) or the stream does "
                "not exist there") from None

    async def subscribe_durable(self, *args: Any, **kwargs: Any) -> Subscription:
        """Not offered across platforms (the consumer would live in the other zone)."""
        raise NotImplementedError(
            "durable subscriptions to another platform's events are not supported: use "
            "subscribe() (live), or subscribe durably on a node of that platform")


class RemotePlatform:
    """Another platform, reached over leaf links (``platform.remote("prod")``).

    Example::

        prod = platform.remote("prod")
        rows = await prod.api("convex").call("query", {"sql": "select 1"})
        reply = await prod.api("convex").call_detailed("query", {...})   # .zone, .node
        await prod.events.publish("order.created", {"id": 7}, source_app="shop")
        sub = await prod.events.subscribe("order.*", cb=handle)
        print(await prod.ping())    # its zone document, with the round trip in "rtt"
    """

    def __init__(self, service: ZoneService, name: str) -> None:
        self.service = service
        self.name = validate_ident("platform", name)
        self._zone: str | None = None
        self.domain: str | None = None
        self._asked = False
        self._events: dict[str | None, RemoteEventBus] = {}

    def __repr__(self) -> str:
        return f"RemotePlatform({self.name!r}, zone={self.zone!r})"

    @property
    def zone(self) -> str | None:
        """The platform's zone: as it last answered a ping, else as the hub link or the hub's
        view of its leaves knows it (None when unknown)."""
        if self._zone is None:
            svc = self.service
            if svc.hub.platform == self.name:
                return svc.hub.zone
            seen = svc.leaves.get(self.name)
            if seen is not None:
                return seen.doc.get("zone")
        return self._zone

    async def learn_zone(self) -> str | None:
        """The zone, asked once from the platform when not known yet (never raises)."""
        if self.zone is None and not self._asked:
            self._asked = True
            with contextlib.suppress(Exception):
                await self.ping(timeout=1.0)
        return self.zone

    def zone_label(self) -> str:
        """`` (zone z)`` when the zone is known, else ''."""
        return f" (zone {self.zone})" if self.zone else ""

    async def ping(self, timeout: float = 2.0, app: str | None = None) -> dict[str, Any]:
        """The remote platform's zone document, with the round trip in ``rtt`` (seconds);
        ``app``: also ``instances``, its nodes running that app. Raises
        ``nats.errors.NoRespondersError`` / ``TimeoutError`` when it is unreachable."""
        nc = self.service.platform.nc
        if nc is None:
            raise RuntimeError("the platform is not started")
        doc = await ping_zone(nc, self.name, timeout=timeout, app=app)
        self._zone = doc.get("zone") or self._zone
        self.domain = doc.get("domain") or self.domain
        m = self.service.metrics
        if m is not None:
            m.rtt.labels(remote=self.name).observe(doc["rtt"])
        return doc

    def api(self, app: str, *, timeout: float = 5.0, codec: str = "json",
            retry: RetryPolicy | None = None, breaker: BreakerPolicy | None = None,
            source_app: str | None = None) -> RemoteApiClient:
        """A client of ``app`` on this platform (see `RemoteApiClient`; needs the ``api``
        plugin)."""
        api: ApiService = self.service.platform.service("api")
        client = RemoteApiClient(api, self, app, timeout=timeout, codec=codec, retry=retry,
                                 source_app=source_app)
        api.breaker(client.breaker_key, breaker)
        return client

    @property
    def events(self) -> RemoteEventBus:
        """The platform's events (stream ``{platform}_events``; needs the ``events``
        plugin)."""
        return self.app_events(None)

    def app_events(self, app: str | None) -> RemoteEventBus:
        """The events of ``app`` on this platform (None: the platform's)."""
        bus = self._events.get(app)
        if bus is None:
            events: EventsService = self.service.platform.service("events")
            bus = self._events[app] = RemoteEventBus(events, self, app)
        return bus


__all__ = [
    "RemoteApiClient",
    "RemoteEventBus",
    "RemotePlatform",
    "RemoteReply",
    "ZoneUnreachableError",
]
