"""The `Service` App option, its health checks and its config-file section (``discovery:``)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from pycluster.kernel.errors import ConfigError

#: Service, app and node names become KV key tokens and DNS labels.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
PROTOCOLS = ("tcp", "udp", "http", "https", "grpc")


def check_name(what: str, value: object) -> str:
    """``value`` if it is a valid service/app/node name (a DNS label without dots)."""
    if not isinstance(value, str) or not NAME.match(value):
        raise ConfigError(what, value, "must be 1-63 letters, digits, '-' or '_' (not first)")
    return value


@dataclass(frozen=True)
class HttpCheck:
    """Passing when ``GET http://<host>:<port><path>`` answers ``status`` (and, with
    ``body``, the body contains it).

    :param path: the path (``"/healthz"``); a full ``http://`` URL is used as is.
    :param interval: seconds between checks.
    :param timeout: seconds one check may take.
    :param status: the expected status code (None: any 2xx).
    :param body: a substring the body must contain.
    """

    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    status: int | None = None
    body: str | None = None

    def __post_init__(self) -> None:
        _check_timing("HttpCheck", self.interval, self.timeout)


@dataclass(frozen=True)
class TcpCheck:
    """Passing when a TCP connection to the service's port (or ``port``) opens."""

    interval: float = 5.0
    timeout: float = 2.0
    port: int | None = None

    def __post_init__(self) -> None:
        _check_timing("TcpCheck", self.interval, self.timeout)


@dataclass(frozen=True)
class PyCheck:
    """Passing when ``fn()`` (sync or async) returns without raising and not False."""

    fn: Callable[[], Any | Awaitable[Any]]
    interval: float = 5.0
    timeout: float = 2.0

    def __post_init__(self) -> None:
        _check_timing("PyCheck", self.interval, self.timeout)


HealthSpec = HttpCheck | TcpCheck | PyCheck


def _check_timing(kind: str, interval: float, timeout: float) -> None:
    if interval <= 0:
        raise ConfigError(f"{kind}.interval", interval, "must be > 0")
    if timeout <= 0:
        raise ConfigError(f"{kind}.timeout", timeout, "must be > 0")


@dataclass(eq=False)
class Service:
    """A network service of an app, announced in the platform's service registry.

    A Singleton's service is registered by its active instance (and, with
    ``register_standby``, by standbys with status ``standby``); a Spread/Replicas service by
    every active instance. Records are leases: they vanish within the platform's lease TTL
    when the node dies, and move on failover before ``on_active`` hooks run.

    Example::

        App("orders", Singleton(),
            Service("http", port=8080, protocol="http", tags=["v2"],
                    health=HttpCheck("/healthz", interval=5)))

    :param name: the service name (a DNS label).
    :param port: the port clients connect to.
    :param protocol: ``tcp``, ``udp``, ``http``, ``https`` or ``grpc`` (the SRV ``_proto`` is
        ``udp`` for udp, else ``tcp``).
    :param host: the address clients use (default: the node's advertised address).
    :param tags: free-form tags to filter lookups on.
    :param metadata: free-form string details (shown in lookups, DNS TXT, exports).
    :param health: a `HttpCheck`, `TcpCheck` or `PyCheck` run on every node that registers
        the service; a failing instance is ``critical`` and left out of healthy lookups.
    :param register_standby: register standbys too, with status ``standby``.
    """

    name: str
    port: int
    protocol: Literal["tcp", "udp", "http", "https", "grpc"] = "tcp"
    host: str | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    health: HealthSpec | None = None
    register_standby: bool = False

    def __post_init__(self) -> None:
        check_name("Service.name", self.name)
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ConfigError("Service.port", self.port, "must be 1-65535")
        if self.protocol not in PROTOCOLS:
            raise ConfigError("Service.protocol", self.protocol, f"must be one of {PROTOCOLS}")
        if not all(isinstance(t, str) and t for t in self.tags):
            raise ConfigError("Service.tags", self.tags, "must be non-empty strings")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise ConfigError("Service.metadata", self.metadata, "must map strings to strings")
        if self.health is not None and not isinstance(self.health, HttpCheck | TcpCheck | PyCheck):
            raise ConfigError("Service.health", self.health,
                              "must be an HttpCheck, TcpCheck or PyCheck")


class CheckSection(BaseModel):
    """A health check in the ``discovery:`` section (``type: http|tcp``)."""

    model_config = {"extra": "forbid"}

    type: Literal["http", "tcp"] = "http"
    path: str = "/health"
    interval: float = 5.0
    timeout: float = 2.0
    status: int | None = None
    body: str | None = None
    port: int | None = None


class DiscoverySection(BaseModel):
    """The ``discovery:`` section of an app in a config file (one service; fields as for
    `Service`)."""

    model_config = {"extra": "forbid"}

    name: str
    port: int
    protocol: Literal["tcp", "udp", "http", "https", "grpc"] = "tcp"
    host: str | None = None
    tags: list[str] = []
    metadata: dict[str, str] = {}
    health: CheckSection | None = None
    register_standby: bool = False


def service_from_section(section: DiscoverySection) -> Service:
    """Build the `Service` option from a validated config section."""
    health: HealthSpec | None = None
    h = section.health
    if h is not None:
        health = (HttpCheck(h.path, h.interval, h.timeout, h.status, h.body) if h.type == "http"
                  else TcpCheck(h.interval, h.timeout, h.port))
    data = section.model_dump(exclude={"health"})
    return Service(**data, health=health)
