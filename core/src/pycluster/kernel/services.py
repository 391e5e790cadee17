"""Platform services: the objects whose lifecycle follows a platform's (RPC, audit, health, ...).

A plugin registers its service for a platform in ``pycluster_platform_services(platform,
registry)``, as a factory with ordering constraints, only when its feature is enabled::

    @hookimpl
    def pycluster_platform_services(platform, registry):
        registry.add("audit", lambda: AuditLog(platform), after=("metrics",))

The kernel then builds the services in dependency order (``after`` names services that must
exist and start first, when they are registered at all; ``requires`` names services without
which this one is not built), starts them in that order once NATS is connected and the node
joined, and stops them in reverse order when the platform leaves. Nothing depends on the order
in which plugins were registered.

A service is reached as ``platform.services.get(name)`` (None when absent) or
``platform.service(name)``, which raises `PluginError` naming the plugin and why it is missing
(disabled, not installed, or unavailable because a plugin it requires is missing). Plugins use
each other's services only through their public methods (e.g. ``platform.audit.log(...)``),
never their private state; the kernel never depends on a service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError, PluginError
from .names import validate_ident
from .types import PluginStatus

if TYPE_CHECKING:
    from ..plugins import PluginManager

log = logging.getLogger("pycluster.services")


class Service(Protocol):
    """The lifecycle a platform service implements (apps are followed through the
    ``pycluster_app_started`` / ``pycluster_app_stopped`` hooks)."""

    async def start(self) -> None:
        """NATS is connected and the node joined: subscribe, open ports, ..."""

    async def stop(self) -> None:
        """The platform leaves: release everything (bounded by the hook timeout)."""


@dataclass(frozen=True)
class ServiceEntry:
    """One registered service: its name, factory and ordering constraints."""

    name: str
    factory: Callable[[], Any]
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    plugin: str = ""


class PlatformServices(Mapping[str, Any]):
    """The services of one platform: filled by ``pycluster_platform_services``, then built.

    As a mapping it holds the built services by name, in start order.
    """

    def __init__(self, pm: PluginManager | None = None) -> None:
        self._pm = pm
        self._entries: dict[str, ServiceEntry] = {}
        self._built: dict[str, Any] = {}
        #: Services that were registered but not built, with the reason.
        self.unavailable: dict[str, str] = {}
        self._frozen = False

    # -- registration (the hook) ------------------------------------------------------------

    def add(self, name: str, factory: Callable[[], Any], *, after: Iterable[str] = (),
            requires: Iterable[str] = (), plugin: str = "") -> None:
        """Register service ``name`` built by ``factory()``.

        :param name: the service name (by convention the plugin's name).
        :param factory: builds the service object (cheap: no I/O; NATS is not connected yet).
        :param after: services built and started before this one when they exist.
        :param requires: services without which this one is not built (and is reported
            unavailable, naming them); implies ``after``.
        :param plugin: the registering plugin (default: ``name``).
        """
        if self._frozen:
            raise ConfigError("service", name, "services are registered when the platform is "
                              "created (pycluster_platform_services)")
        validate_ident("service", name)
        if name in self._entries:
            raise ConfigError("service", name, "a service of this name is already registered "
                              f"(by plugin {self._entries[name].plugin!r})")
        req = tuple(requires)
        self._entries[name] = ServiceEntry(name, factory, tuple(after) + req, req,
                                           plugin or name)

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        """Build every service in dependency order (a cycle is a `ConfigError`)."""
        self._frozen = True
        state: dict[str, str] = {}  # name -> "visiting" | "done"

        def visit(name: str, path: tuple[str, ...]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                raise ConfigError("service", name, "ordering cycle: " + " -> ".join(path))
            state[name] = "visiting"
            entry = self._entries[name]
            for dep in entry.after:
                if dep in self._entries:
                    visit(dep, (*path, dep))
            missing = [d for d in entry.requires if d not in self._built]
            if missing:
                why = "; ".join(self.why_missing(d) for d in missing)
                self.unavailable[name] = f"needs {', '.join(map(repr, missing))} ({why})"
                log.warning("service %s is not built: it needs %s (%s)", name,
                            ", ".join(missing), why)
            else:
                self._built[name] = entry.factory()
            state[name] = "done"

        for name in sorted(self._entries):
            visit(name, (name,))

    # -- lookup -----------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Any:
        """The service ``name``; `PluginError` naming the plugin when it is missing."""
        try:
            return self._built[name]
        except KeyError:
            raise self.error(name) from None

    def get(self, name: str, default: Any = None) -> Any:
        """The service ``name``, or ``default`` when it is missing."""
        return self._built.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._built

    def __iter__(self) -> Iterator[str]:
        return iter(self._built)

    def __len__(self) -> int:
        return len(self._built)

    def plugin_of(self, name: str) -> str:
        """The plugin that registered service ``name``."""
        entry = self._entries.get(name)
        return entry.plugin if entry is not None else name

    def why_missing(self, name: str) -> str:
        """Why service ``name`` is not there, in words."""
        if name in self.unavailable:
            return f"plugin {self.plugin_of(name)!r} is unavailable: it {self.unavailable[name]}"
        info = self._pm.infos.get(name) if self._pm is not None else None
        if info is None:
            return f"plugin {name!r} is not installed"
        if info.status is PluginStatus.DISABLED:
            return f"plugin {name!r} is disabled (PYCLUSTER_DISABLE_PLUGINS)"
        if info.status in (PluginStatus.FAILED, PluginStatus.UNUSABLE):
            return f"plugin {name!r} is {info.status}: {info.reason}"
        return f"plugin {name!r} provides no service {name!r} on this platform"

    def error(self, name: str) -> PluginError:
        """The `PluginError` for a missing service ``name``."""
        info = self._pm.infos.get(name) if self._pm is not None else None
        off = info is not None and info.status is PluginStatus.DISABLED
        reason = "disabled" if off else "missing"
        return PluginError(name, info.distribution if info else None,
                           info.version if info else None, reason,
                           message=self.why_missing(name))

    # -- service discovery (the discovery hook group) ---------------------------------------
    # ``platform.services.lookup(...)`` etc. reach the service of the plugin named
    # ``discovery`` (the one that serves ``pycluster_service_registry``); without it they
    # raise the `PluginError` naming it.

    async def lookup(self, name: str, app: str | None = None, **kw: Any) -> Any:
        """The instances of service ``name`` (see the discovery plugin's ``lookup``)."""
        return await self[DISCOVERY].lookup(name, app, **kw)

    def watch(self, name: str, app: str | None = None) -> Any:
        """An async iterator of changes of service ``name`` (the discovery plugin's)."""
        return self[DISCOVERY].watch(name, app)

    async def register(self, name: str, port: int, **kw: Any) -> Any:
        """Register a service pycluster does not run (the discovery plugin's ``register``)."""
        return await self[DISCOVERY].register(name, port, **kw)

    async def deregister(self, name: str, **kw: Any) -> None:
        """Withdraw a registration made with `register`."""
        await self[DISCOVERY].deregister(name, **kw)


DISCOVERY = "discovery"
"""The name of the plugin whose service answers ``platform.services.lookup/watch/...``."""
