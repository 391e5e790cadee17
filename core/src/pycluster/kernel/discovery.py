"""Service discovery: the protocols behind ``pycluster_service_registry`` and
``pycluster_discovery_exporters``.

A service registry records where the instances of apps can be reached (an address, a port,
metadata) and lets clients look them up and watch them. An exporter publishes what the
registry knows elsewhere (DNS records, a file, another discovery system).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    from .platform import Platform

LOOKUP_SUBJECT = "_pycluster.services.lookup"
"""The plain subject (it crosses leaf links) on which each platform's discovery answers
lookups across platforms (``lookup(..., scope="global")``), one node per platform."""


@dataclass(frozen=True)
class ServiceInstance:
    """One reachable instance of a service of an app.

    :ivar app: the app's name (any name for services pycluster does not run).
    :ivar node: the node it runs on.
    :ivar address: the host (name or IP) where it is reached.
    :ivar metadata: free-form details (strings).
    :ivar service: the service's name (an app may offer several).
    :ivar port: the port.
    :ivar protocol: ``tcp``, ``udp``, ``http``, ...
    :ivar tags: free-form tags lookups can filter on.
    :ivar status: ``passing``, ``standby`` (a passive instance) or ``critical`` (failing its
        health check); healthy lookups return ``passing`` instances only.
    :ivar role: ``primary`` (a Singleton's active instance), ``active`` (Spread/Replicas),
        ``standby`` or ``external`` (registered by hand).
    :ivar platform: the platform whose registry holds it, and
    :ivar zone: that platform's zone: set in the results of a lookup across platforms
        (``scope="global"``), None in a platform's own registry.
    """

    app: str
    node: str
    address: str
    metadata: dict[str, Any] = field(default_factory=dict)
    service: str = ""
    port: int = 0
    protocol: str = "tcp"
    tags: tuple[str, ...] = ()
    status: str = "passing"
    role: str = "active"
    platform: str | None = None
    zone: str | None = None

    @property
    def key(self) -> str:
        """``<app>.<service>.<node>``: the instance's identity in the registry."""
        return f"{self.app}.{self.service}.{self.node}"


@dataclass(frozen=True)
class ServiceChange:
    """A change seen by `ServiceRegistry.watch`: ``kind`` is ``register`` (new instance),
    ``update`` (its record changed: status, role, address, ...) or ``deregister`` (withdrawn or
    expired; ``instance`` is the last record seen)."""

    kind: str
    instance: ServiceInstance


class ServiceRegistry(Protocol):
    """Where instances are announced and found.

    The discovery plugin starts the registry on first use and stops it with the node. A
    registry that subclasses this protocol inherits do-nothing `start`/`stop` and an empty
    `instances`/`owned` (a registry that keeps no local view); one that only matches it
    structurally must define all eight methods.
    """

    async def start(self) -> None:
        """Open what the registry needs (connections, watches); called once before use."""

    async def stop(self) -> None:
        """Stop renewing and watching; this node's registrations may be withdrawn."""

    def instances(self, service: str | None = None, *, app: str | None = None,
                  healthy_only: bool = False) -> list[ServiceInstance]:
        """The instances known now, without I/O (empty when the registry keeps no view)."""
        return []

    def owned(self) -> list[ServiceInstance]:
        """What this node registered and keeps renewed (empty when it keeps no such list)."""
        return []

    async def register(self, instance: ServiceInstance) -> None:
        """Announce ``instance`` (refreshed until deregistered or the node dies)."""

    async def deregister(self, instance: ServiceInstance) -> None:
        """Withdraw ``instance``."""

    async def lookup(self, service: str, *, app: str | None = None, tags: Iterable[str] = (),
                     healthy_only: bool = True) -> list[ServiceInstance]:
        """The live instances of ``service`` (of ``app``, carrying every tag in ``tags``;
        ``passing`` ones only unless ``healthy_only`` is False)."""

    def watch(self, service: str, *, app: str | None = None) -> AsyncIterator[ServiceChange]:
        """The changes of ``service``'s instances, in order, as they happen."""


class DiscoveryExporter(Protocol):
    """Publishes the registry's instances elsewhere."""

    async def export(self, instances: list[ServiceInstance]) -> None:
        """Publish the current instances (of every app)."""


DiscoveryExporterFactory = Callable[["Platform"], DiscoveryExporter]


class DiscoveryExporterRegistry:
    """Named exporter factories (``pycluster_discovery_exporters``)."""

    def __init__(self) -> None:
        self.exporters: dict[str, tuple[DiscoveryExporterFactory, str]] = {}

    def add(self, name: str, factory: DiscoveryExporterFactory, plugin: str = "") -> None:
        """Register exporter ``name``: ``factory(platform)`` builds it."""
        if name in self.exporters:
            raise ConfigError("discovery exporter", name, "already registered")
        self.exporters[name] = (factory, plugin or name)
