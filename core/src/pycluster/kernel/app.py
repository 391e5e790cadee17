"""`App`: an isolated component with its own data, mode, placement and lifecycle hooks.

Per-app plugin state lives in one place: ``app.state(plugin)``, a dict per plugin name kept by
the app (the runtime reaches the same dict as ``runtime.state(plugin)``). Plugins keep there
what they know of the app (declared handlers and checks, open spans, controllers, ...); they
never add attributes to the App, its options or the runtime.

An option object is also the handle to its feature (``db.wal.sync()``): a handle finds its app
through the kernel's one binding `app_of` (filled by ``App(...)`` from its options), then its
runtime state through ``app.state(plugin)``. Options themselves stay plain declarations.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError, NotLeaderError
from .names import validate_ident
from .options import (
    Budget,
    Constraint,
    Election,
    Mode,
    Preference,
    Rebalance,
    Singleton,
    Strategy,
)
from .types import NodeInfo, Role

if TYPE_CHECKING:
    from ..builtin.events.bus import EventBus
    from ..builtin.health.checks import AppHealth
    from ..builtin.rpc.app import AppRpc
    from .coordinator import AppRuntime
    from .kv import AppKV
    from .locks import Lock
    from .platform import Platform
    from .registry import AppEventRegistry

Hook = Callable[..., Awaitable[Any]]
H = TypeVar("H", bound=Hook)

HOOK_NAMES = (
    "active", "passive", "leader_change", "start", "stop", "own", "release", "member_join",
    "member_leave", "health_change", "migration_start", "migration_complete",
    "placement_invalid", "promoted", "demoted",
)

KERNEL_EVENTS = frozenset({"active", "passive", "leader_change", "start", "stop",
                           "member_join", "member_leave"})
"""App events the kernel fires itself; the others are fired by plugins that declare them
(``pycluster_app_events``)."""

EVENT_SOURCES = {
    "own": "a ring plugin (key ownership, e.g. pycluster-ring)",
    "release": "a ring plugin (key ownership, e.g. pycluster-ring)",
    "health_change": "the 'health' plugin",
    "migration_start": "a placement scheduler plugin",
    "migration_complete": "a placement scheduler plugin",
    "placement_invalid": "a placement scheduler plugin",
    "promoted": "the 'leaf' plugin (PromoteOnHubFailure)",
    "demoted": "the 'leaf' plugin (PromoteOnHubFailure)",
}
"""What fires each plugin event (for the error when nothing installed does)."""


_OWNERS: weakref.WeakValueDictionary[int, App] = weakref.WeakValueDictionary()
"""Option id -> the App it was given to (weak: the binding lives as long as the App)."""


def app_of(option: object) -> App | None:
    """The `App` that ``option`` (an object passed to ``App(...)``) belongs to, or None.

    The kernel's binding from an option to its app: how a handle on an option (``db.wal``,
    ``vip.held``) reaches its app and, through ``app.state(plugin)``, the plugin's runtime
    state for that app. An option belongs to the first live App it was given to.
    """
    app = _OWNERS.get(id(option))
    return app if app is not None and any(o is option for o in app.options) else None


class App:
    """An isolated component of a platform.

    Example::

        app = App("convex", Singleton(), OnLabel("tier", "storage"), Election(lease_ttl=5))

        @app.on_active
        async def start(ctx):
            print("active with fencing token", ctx.epoch)

        platform.register(app)

    :param name: the app name (letters, digits, ``-``, ``_``); it names the app's buckets.
    :param options: a mode (`Singleton` by default), placement constraints, `Election` timing,
        and option objects of plugins (``Process``, ``Docker``, ``VIP``, ...).
    """

    def __init__(self, name: str, *options: object) -> None:
        self.name = validate_ident("app name", name)
        self.mode: Mode = Singleton()
        self.constraints: list[Constraint] = []
        self.election_options = Election()
        #: How candidates are weighed (`Strategy`; default ``spread``).
        self.strategy = Strategy()
        #: The disruption budget of planned moves (`Budget`), if any.
        self.budget: Budget | None = None
        #: Automatic rebalancing and migration limits of this app (`Rebalance`).
        self.rebalance = Rebalance()
        self.options: list[object] = []  # plugin options, claimed at register()
        modes = 0
        for opt in options:
            if isinstance(opt, Mode):
                modes += 1
                self.mode = opt
            elif isinstance(opt, Constraint):
                self.constraints.append(opt)
            elif isinstance(opt, Election):
                self.election_options = opt
            elif isinstance(opt, Strategy):
                self.strategy = opt
            elif isinstance(opt, Budget):
                self.budget = opt
            elif isinstance(opt, Rebalance):
                self.rebalance = opt
            elif opt is None or isinstance(opt, str | int | float | bytes | dict | list | tuple):
                raise ConfigError(f"App({name!r}) option", opt, "not an option object")
            else:
                self.options.append(opt)
                if app_of(opt) is None:
                    _OWNERS[id(opt)] = self
        if modes > 1:
            raise ConfigError(f"App({name!r}) mode", options, "give at most one mode")
        self._hooks: dict[str, list[Hook]] = {h: [] for h in HOOK_NAMES}
        self.handlers: dict[str, Callable[..., Awaitable[Any]]] = {}
        self._runtime: AppRuntime | None = None
        self.platform: Platform | None = None
        self._state: dict[str, dict[str, Any]] = {}
        self._needs: set[str] = set()
        # ``app.rpc`` once the platform had the plugin: (platform, handle); read on every call.
        self._rpc_handle: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"App({self.name!r}, {self.mode!r})"

    if not TYPE_CHECKING:  # typed code uses the plugin's accessor (e.g. ``ring_of(app)``)

        def __getattr__(self, name: str) -> Any:
            """A handle that one of the app's plugin options gives it (``cache.ring`` for a
            `Ring` option), registered with ``OptionRegistry.add(..., handle=)``; available
            once the app is registered on a platform."""
            if name.startswith("_"):
                raise AttributeError(name)
            platform = self.__dict__.get("platform")
            if platform is None:
                raise AttributeError(f"App {self.__dict__.get('name')!r} has no attribute "
                                     f"{name!r} (plugin handles exist once it is registered)")
            return platform.options.handle(self, name)

    # -- hooks -------------------------------------------------------------------------------

    def _add(self, event: str, fn: H) -> H:
        if not asyncio.iscoroutinefunction(fn):
            raise ConfigError(f"on_{event}", getattr(fn, "__name__", fn), "must be an async def")
        self._hooks[event].append(fn)
        return fn  # type: ignore[return-value]  # iscoroutinefunction narrows H too far

    def on_active(self, fn: H) -> H:
        """Run when this node becomes active (last step of the failover sequence)."""
        return self._add("active", fn)

    def on_passive(self, fn: H) -> H:
        """Run when this node settles as a standby (at start and after stepping down)."""
        return self._add("passive", fn)

    def on_leader_change(self, fn: H) -> H:
        """Run when the observed leader changes (``ctx.leader`` may be None: vacant)."""
        return self._add("leader_change", fn)

    def on_start(self, fn: H) -> H:
        """Run when the app starts on this node, before it campaigns."""
        return self._add("start", fn)

    def on_stop(self, fn: H) -> H:
        """Run when the app stops on this node, after it stepped down."""
        return self._add("stop", fn)

    def on_own(self, fn: H) -> H:
        """Run when this node takes ownership of a partition (ring plugin)."""
        return self._add("own", fn)

    def on_release(self, fn: H) -> H:
        """Run when this node releases a partition (ring plugin)."""
        return self._add("release", fn)

    def on_promoted(self, fn: H) -> H:
        """Run when this zone was promoted primary for the app (``ctx.epoch``: the term;
        ``PromoteOnHubFailure``, leaf plugin)."""
        return self._add("promoted", fn)

    def on_demoted(self, fn: H) -> H:
        """Run when this zone stopped being primary for the app: another platform holds a
        higher term (``ctx.epoch``: that term, ``ctx.leader``: that platform; leaf plugin)."""
        return self._add("demoted", fn)

    def on_member_join(self, fn: H) -> H:
        """Run when a node joins the platform (``ctx.member`` is its record)."""
        return self._add("member_join", fn)

    def on_member_leave(self, fn: H) -> H:
        """Run when a node leaves or its record expires (``ctx.member``)."""
        return self._add("member_leave", fn)

    def on_health_change(self, fn: H) -> H:
        """Run when a health check of this app changes status."""
        return self._add("health_change", fn)

    def on_migration_start(self, fn: H) -> H:
        """Run when a migration of this app starts."""
        return self._add("migration_start", fn)

    def on_migration_complete(self, fn: H) -> H:
        """Run when a migration of this app completed."""
        return self._add("migration_complete", fn)

    def on_placement_invalid(self, fn: H) -> H:
        """Run when this node no longer satisfies the app's placement."""
        return self._add("placement_invalid", fn)

    def hooks(self, event: str) -> list[Hook]:
        """The registered hooks of ``event`` (e.g. "active")."""
        return list(self._hooks[event])

    def check_events(self, fired: AppEventRegistry) -> None:
        """Refuse hooks of an event nothing installed fires (at ``platform.register``).

        :raises ConfigError: naming the hooks and what would fire them.
        """
        for event in HOOK_NAMES:
            if event in KERNEL_EVENTS or not self._hooks[event] or fired.fired_by(event):
                continue
            names = ", ".join(getattr(fn, "__name__", "?") for fn in self._hooks[event])
            raise ConfigError(f"App({self.name!r}).on_{event}", names,
                              f"no installed plugin fires {event!r} events, so these hooks "
                              f"would never run; {EVENT_SOURCES.get(event, 'a plugin')} does "
                              "(install or enable it, or remove the hooks)")

    # -- per-app plugin state ------------------------------------------------------------------

    def state(self, plugin: str) -> dict[str, Any]:
        """The dict in which plugin ``plugin`` keeps what it knows of this app (created on
        first use; it lives as long as the app)."""
        st = self._state.get(plugin)
        if st is None:
            st = self._state[plugin] = {}
        return st

    def needs(self) -> set[str]:
        """The plugins whose features this app declared (``"rpc"`` for RPC handlers,
        ``"api"`` for API handlers): ``platform.register`` refuses the app without them."""
        return set(self._needs)

    def _feature(self, plugin: str) -> None:
        """This app uses plugin ``plugin``: once registered, a missing plugin is a
        `PluginError` now; before, at ``platform.register``."""
        self._needs.add(plugin)
        if self.platform is not None:
            self.platform.service(plugin)

    def handle(self, method: str) -> Callable[[H], H]:
        """Declare an API method of this app (served through the platform's API bus; plugin
        ``api``)."""
        validate_ident("method", method)
        self._feature("api")

        def deco(fn: H) -> H:
            self.handlers[method] = fn
            return fn

        return deco

    # -- placement ---------------------------------------------------------------------------

    def allows(self, node: NodeInfo) -> bool:
        """Whether the core's hard constraints admit ``node``."""
        return all(c.allows(node) for c in self.constraints)

    @property
    def preferences(self) -> list[Preference]:
        """The placement options that need the platform's view (preferences, affinities)."""
        return [c for c in self.constraints if isinstance(c, Preference)]

    # -- runtime state (valid once registered and started) -------------------------------------

    def _rt(self) -> AppRuntime:
        if self._runtime is None:
            raise RuntimeError(
                f"app {self.name!r} is not started (register it and start the platform)"
            )
        return self._runtime

    @property
    def role(self) -> Role:
        """This node's role for the app."""
        return self._runtime.role if self._runtime else Role.STOPPED

    @property
    def is_active(self) -> bool:
        """True while this node's instance is active (fully through the failover sequence)."""
        return self._runtime is not None and self._runtime.is_active

    @property
    def is_leader(self) -> bool:
        """True while this node holds a valid lease and is active (for Spread: active)."""
        return self.is_active

    @property
    def leader(self) -> str | None:
        """Node id of the current leader (Singleton), as observed; None when vacant."""
        return self._runtime.leader if self._runtime else None

    @property
    def epoch(self) -> int | None:
        """Monotonic leadership epoch, also the fencing token."""
        return self._runtime.epoch if self._runtime else None

    @property
    def kv(self) -> AppKV:
        """The app's own key-value store (bucket ``{platform}_{app}``)."""
        return self._rt().kv

    def lock(self, name: str, ttl: float = 10.0) -> Lock:
        """A fair distributed lock of this app (bucket ``{platform}_{app}_locks``)."""
        return self._rt().locks.lock(name, ttl=ttl)

    async def step_down(self, successor: str | None = None, cooldown: float | None = None) -> None:
        """Hand leadership over now: deactivate, release the lease, stay out for ``cooldown``.

        :param successor: node id that should take over first: a live node that runs this app
            and may lead it, not this node.
        :param cooldown: seconds this node stays out of the election (>= 0; default: the
            app's ``cooldown``).
        :raises ConfigError: the request could not do what it asks (a negative cooldown, a
            successor that is not a live eligible node, or this node itself); nothing changed.
        """
        await self._rt().step_down(successor=successor, cooldown=cooldown)

    async def wait_for_leadership(self, timeout: float | None = None) -> bool:
        """Wait until this node is active; False if ``timeout`` passes first."""
        return await self._rt().wait_active(timeout)

    # -- feature handles contributed by core services (RPC, events, health, ...) --------------

    # -- handles of the default plugins (RPC, events, health) ---------------------------------

    @property
    def rpc(self) -> AppRpc:
        """RPC between this app's nodes: ``handler(name)``, ``call(node, ...)``,
        ``call_leader(...)``, ``broadcast(...)`` (see `pycluster.builtin.rpc.app.AppRpc`;
        plugin ``rpc``)."""
        cached = self._rpc_handle
        if cached is not None and cached[0] is self.platform:
            return cached[1]  # type: ignore[no-any-return]
        self._feature("rpc")
        st = self.state("rpc")
        handle = st.get("handle")
        if handle is None:
            from ..builtin.rpc.app import AppRpc  # the default plugin's handle

            handle = st["handle"] = AppRpc(self)
        if self.platform is not None:
            self._rpc_handle = (self.platform, handle)
        return handle  # type: ignore[no-any-return]

    @property
    def events(self) -> EventBus:
        """This app's events (``{platform}.{app}.events.>``): ``publish``, ``subscribe``,
        ``subscribe_durable`` (see `pycluster.builtin.events.bus.EventBus`; plugin
        ``events``); needs a started platform."""
        if self.platform is None:
            raise RuntimeError(f"app {self.name!r} is not registered with a platform")
        return self.platform.service("events").bus(self.name)  # type: ignore[no-any-return]

    @property
    def health(self) -> AppHealth:
        """This app's health checks: ``app.health.register(name, check, interval=...,
        timeout=..., depends_on=[...])`` (see `pycluster.builtin.health.checks.AppHealth`;
        plugin ``health``). Checks may be declared before the app is registered (they run
        while the app runs on this node, when the plugin is enabled); once registered, the
        handle needs the plugin."""
        if self.platform is not None:
            self.platform.service("health")
        st = self.state("health")
        handle = st.get("handle")
        if handle is None:
            from ..builtin.health.checks import AppHealth  # the default plugin's handle

            handle = st["handle"] = AppHealth(self)
        return handle  # type: ignore[no-any-return]

    def require_leader(self) -> int:
        """Return the epoch, or raise `NotLeaderError` when this node is not active."""
        if not self.is_active:
            raise NotLeaderError(self.name, self.leader, self.epoch)
        return self.epoch or 0
