"""Service discovery: the protocols behind ``pycluster_service_registry`` and
``pycluster_discovery_exporters``.

A service registry records where the instances of apps can be reached (an address, a port,
metadata) and lets clients look them up and watch them. An exporter publishes what the
registry knows elsewhere (DNS records, a file, another discovery system).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    from .platform import Platform


@dataclass(frozen=True)
class ServiceInstance:
    """One reachable instance of an app.

    :ivar app: the app's name.
    :ivar node: the node it runs on.
    :ivar address: ``host:port`` (or a URL) where it is reached.
    :ivar metadata: free-form details (role, epoch, version, ...).
    """

    app: str
    node: str
    address: str
    metadata: dict[str, Any] = field(default_factory=dict)


class ServiceRegistry(Protocol):
    """Where instances are announced and found."""

    async def register(self, instance: ServiceInstance) -> None:
        """Announce ``instance`` (refreshed until deregistered or the node dies)."""

    async def deregister(self, instance: ServiceInstance) -> None:
        """Withdraw ``instance``."""

    async def lookup(self, app: str) -> list[ServiceInstance]:
        """The live instances of ``app``."""

    def watch(self, app: str) -> AsyncIterator[list[ServiceInstance]]:
        """The live instances of ``app``, again after every change."""


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
