"""The ``discovery`` platform service: registrations that follow app roles, health checks,
the public lookup/watch/register/deregister API and the DNS server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from pycluster.kernel.aio import cancel_and_wait, supervise
from pycluster.kernel.discovery import (
    LOOKUP_SUBJECT,
    DiscoveryExporter,
    DiscoveryExporterRegistry,
    ServiceChange,
    ServiceInstance,
    ServiceRegistry,
)
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.options import Singleton

from .checks import run_check
from .exports import Exports
from .federation import (
    DEFAULT_WAIT,
    GlobalInstances,
    answer_body,
    lookup_global,
    parse_request,
)
from .options import PROTOCOLS, Service, check_name
from .registry import (
    CRITICAL,
    PASSING,
    STANDBY,
    KvServiceRegistry,
    as_dict,
    stop_if_cancelled,
)

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

    from .dns import DnsServer
    from .exports import ExportServer

log = logging.getLogger("pycluster.discovery")

PLUGIN = "discovery"
DNS_ADDR_ENV = "PYCLUSTER_DISCOVERY_DNS_ADDR"
ADVERTISE_ENV = "PYCLUSTER_DISCOVERY_ADVERTISE"
HTTP_ADDR_ENV = "PYCLUSTER_DISCOVERY_HTTP_ADDR"
FILE_SD_ENV = "PYCLUSTER_DISCOVERY_FILE_SD"


def default_address() -> str:
    """The address other hosts reach this node on: the source address of the default route
    (no packet is sent), else 127.0.0.1."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the route
        return str(s.getsockname()[0])
    return "127.0.0.1"


class Registration:
    """One `Service` option of an app on this node: its role, health and registered record."""

    def __init__(self, discovery: Discovery, app: App, option: Service) -> None:
        self.discovery = discovery
        self.app = app
        self.option = option
        #: "primary", "active", "standby" or "" (not registered).
        self.role = ""
        #: The last health check: None before the first (or without a check).
        self.healthy: bool | None = None
        self.detail = ""
        self.instance: ServiceInstance | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def status(self) -> str:
        """The status announced for the current role and health."""
        if self.healthy is False:
            return CRITICAL
        return STANDBY if self.role == STANDBY else PASSING

    def build(self) -> ServiceInstance:
        """The record for the current role and health."""
        o, d = self.option, self.discovery
        return ServiceInstance(
            app=self.app.name, node=d.platform.node_id, address=o.host or d.advertise,
            metadata=dict(o.metadata), service=o.name, port=o.port, protocol=o.protocol,
            tags=tuple(o.tags), status=self.status, role=self.role)

    async def check_once(self) -> None:
        """Run the health check (if any) and record the result."""
        spec = self.option.health
        if spec is None:
            return
        ok, detail = await run_check(spec, self.option.host or "127.0.0.1", self.option.port)
        self.discovery.count_check(self.option.name, ok)
        changed = self.healthy is not ok
        self.healthy, self.detail = ok, detail
        if changed:
            self.discovery.audit("health", self.app, service=self.option.name, passing=ok,
                                 detail=detail)

    async def enter(self, role: str) -> None:
        """Register with ``role`` (after a first health check), and keep checking; a failed
        write is retried every interval by the same loop."""
        self.role = role
        if self._task is None:
            self._task = asyncio.create_task(self._loop(),
                                             name=f"discovery-check:{self.instance_key}")
        if self.option.health is not None and self.healthy is None:
            await self.check_once()
        await self.publish()

    @property
    def instance_key(self) -> str:
        """``<app>.<service>.<node>``."""
        return f"{self.app.name}.{self.option.name}.{self.discovery.platform.node_id}"

    async def publish(self) -> None:
        """Write the record if it differs from the one registered."""
        inst = self.build()
        if inst == self.instance:
            return
        await (await self.discovery.use()).register(inst)
        first = self.instance is None
        self.instance = inst
        self.discovery.audit("registered" if first else "updated", self.app,
                             service=inst.service, role=inst.role, status=inst.status,
                             address=inst.address, port=inst.port)

    async def leave(self) -> None:
        """Deregister and stop checking."""
        await cancel_and_wait(self._task)
        self._task = None
        self.role = ""
        self.healthy = None
        if self.instance is not None:
            inst, self.instance = self.instance, None
            await (await self.discovery.use()).deregister(inst)
            self.discovery.audit("deregistered", self.app, service=inst.service,
                                 role=inst.role)

    async def _loop(self) -> None:
        spec = self.option.health
        settings = self.discovery.platform.settings
        interval = spec.interval if spec is not None else settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_once()
                if self.role:
                    await self.publish()
            except Exception as exc:
                stop_if_cancelled()
                log.warning("discovery: publishing %s failed (retried): %s", self.instance_key,
                            exc)


class Discovery:
    """The service registry of a platform (``platform.service("discovery")``).

    ``lookup``/``watch``/``register``/``deregister`` work on the registry that
    ``pycluster_service_registry`` provides (this plugin's NATS KV registry unless another
    plugin answers first). Apps' `Service` options are registered following their role.

    :ivar dns_addr: ``host:port`` of the DNS server (None: no DNS); from
        ``PYCLUSTER_DISCOVERY_DNS_ADDR`` by default; set before the platform starts.
    :ivar advertise: the default address of this node's services (``PYCLUSTER_DISCOVERY_ADVERTISE``,
        else the source address of the default route).
    :ivar dns_ttl: TTL of DNS answers, seconds.
    :ivar http_addr: ``host:port`` of an address of their own for the HTTP exports
        (Prometheus SD, Consul subset, JSON), served on the health address anyway (None: only
        there); from ``PYCLUSTER_DISCOVERY_HTTP_ADDR`` by default.
    :ivar file_sd_path: a Prometheus ``file_sd_configs`` file kept up to date (None: none);
        from ``PYCLUSTER_DISCOVERY_FILE_SD`` by default.
    :ivar export_interval: seconds between checks of the view for the exporters.
    """

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.dns_addr: str | None = os.environ.get(DNS_ADDR_ENV) or None
        self.advertise: str = os.environ.get(ADVERTISE_ENV) or default_address()
        self.dns_ttl = 2
        self.http_addr: str | None = os.environ.get(HTTP_ADDR_ENV) or None
        self.file_sd_path: str | None = os.environ.get(FILE_SD_ENV) or None
        self.export_interval = 0.25
        #: The HTTP endpoints, served on the health address and on ``http_addr``.
        self.exports = Exports(self)
        #: The server on ``http_addr`` while it runs.
        self.http: ExportServer | None = None
        #: The exporters of ``pycluster_discovery_exporters``, by name.
        self.exporters: dict[str, DiscoveryExporter] = {}
        self._export_task: asyncio.Task[None] | None = None
        self._started = False
        self._lookup_sub: Any = None
        self._use_lock = asyncio.Lock()
        self._registry: ServiceRegistry | None = None
        self.dns: DnsServer | None = None
        self._regs: dict[tuple[str, str], Registration] = {}
        #: Health check results: (service, "passing"|"critical") -> count.
        self.checks_total: dict[tuple[str, str], int] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the registry is started (`use` was called and succeeded)."""
        return self._registry is not None

    @property
    def registry(self) -> ServiceRegistry:
        """The service registry, once started (see `use`)."""
        if self._registry is None:
            raise RuntimeError("discovery is used before the platform started")
        return self._registry

    async def start(self) -> None:
        """Start discovery now when this node needs it (an app with a `Service`, DNS, HTTP
        exports or file SD configured); otherwise on first use of the API."""
        self._started = True
        nc = self.platform.nc
        if nc is not None:  # lookups of other platforms (one node of this one answers)
            self._lookup_sub = await nc.subscribe(
                LOOKUP_SUBJECT, queue=f"discovery-{self.platform.name}", cb=self._on_lookup)
        needed = any(self.options(app) for app in self.platform.apps.values())
        if needed or self.dns_addr or self.http_addr or self.file_sd_path:
            await self.use()

    async def _on_lookup(self, msg: Any) -> None:
        """Answer another platform's lookup from this platform's registry."""
        try:
            req = parse_request(msg.data)
            reg = await self.use()
            if req["service"] is None:
                insts = [i for i in reg.instances(None, app=req["app"],
                                                  healthy_only=req["healthy_only"])
                         if set(req["tags"]) <= set(i.tags)]
            else:
                insts = await reg.lookup(req["service"], app=req["app"], tags=req["tags"],
                                         healthy_only=req["healthy_only"])
            if msg.reply:
                await msg.respond(answer_body(self.platform.name, self.platform.settings.zone,
                                              insts))
        except ValueError as exc:
            log.debug("discovery: malformed lookup request: %s", exc)
        except Exception:  # never into nats-py's delivery loop
            stop_if_cancelled()
            log.warning("discovery: answering a lookup failed", exc_info=True)

    async def use(self) -> ServiceRegistry:
        """The started registry: on first use, get it (``pycluster_service_registry``), start
        it, the DNS server, the HTTP exports and the exporters
        (``pycluster_discovery_exporters``)."""
        if self._registry is not None:
            return self._registry
        if not self._started:
            raise RuntimeError("discovery is used before the platform started")
        async with self._use_lock:
            if self._registry is not None:
                return self._registry
            reg = self.platform.pm.hook.pycluster_service_registry(platform=self.platform)
            reg = reg if reg is not None else KvServiceRegistry(self.platform)
            await reg.start()
            self._registry = reg
            if self.dns_addr:
                from .dns import DnsServer

                self.dns = DnsServer(self, self.dns_addr, ttl=self.dns_ttl)
                await self.dns.start()
            if self.http_addr:
                from .exports import ExportServer

                self.http = ExportServer(self.exports, self.http_addr)
                await self.http.start()
            reg_ex = DiscoveryExporterRegistry()
            self.platform.pm.hook.pycluster_discovery_exporters(registry=reg_ex)
            self.exporters = {name: factory(self.platform)
                              for name, (factory, _plugin) in reg_ex.exporters.items()}
            self._export_task = supervise("discovery-export", self._export_loop, logger=log)
            return reg

    async def _export_loop(self) -> None:
        last: list[ServiceInstance] | None = None
        while True:
            view = self.instances()
            if view != last:
                self.exports.refresh()
                for name, exporter in self.exporters.items():
                    try:
                        await exporter.export(view)
                    except Exception:
                        stop_if_cancelled()
                        log.warning("discovery exporter %s failed", name, exc_info=True)
                last = view
            await asyncio.sleep(self.export_interval)

    async def stop(self) -> None:
        """Withdraw this node's registrations, stop DNS and the registry."""
        self._started = False
        sub, self._lookup_sub = self._lookup_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.exports.stop()
        for reg in list(self._regs.values()):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await reg.leave()
        await cancel_and_wait(self._export_task)
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._registry is not None:
            await self._registry.stop()

    # -- public API -----------------------------------------------------------------------------

    async def lookup(self, name: str, app: str | None = None, *, tags: Iterable[str] = (),
                     healthy_only: bool = True, scope: str = "local",
                     wait: float = DEFAULT_WAIT) -> list[ServiceInstance]:
        """The instances of service ``name`` (of ``app``; with every tag in ``tags``;
        ``passing`` ones only unless ``healthy_only`` is False), sorted by app and node.

        ``scope="global"``: also those of the other platforms reachable over NATS (leaf
        links), asked for ``wait`` seconds; see `lookup_global`."""
        if scope == "global":
            return await self.lookup_global(name, app, tags=tags, healthy_only=healthy_only,
                                            wait=wait)
        if scope != "local":
            raise ConfigError("scope", scope, "expected 'local' or 'global'")
        reg = await self.use()
        return await reg.lookup(name, app=app, tags=tags, healthy_only=healthy_only)

    async def lookup_global(self, name: str | None, app: str | None = None, *,
                            tags: Iterable[str] = (), healthy_only: bool = True,
                            wait: float = DEFAULT_WAIT) -> GlobalInstances:
        """The instances of service ``name`` (None: every service) of this platform and of
        every other platform that answers within ``wait`` seconds, each with its
        ``platform`` and ``zone``. Known platforms that do not answer (a zone cut off from
        the hub) are left out and named in ``unreachable``; the call never waits longer."""
        nc = self.platform.nc
        if nc is None:
            raise RuntimeError("discovery is used before the platform started")
        tags = tuple(tags)
        reg = await self.use()

        async def local() -> list[ServiceInstance]:
            if name is None:
                return list(reg.instances(None, app=app, healthy_only=healthy_only))
            return await reg.lookup(name, app=app, tags=tags, healthy_only=healthy_only)

        return await lookup_global(nc, name, app=app, tags=tags, healthy_only=healthy_only,
                                   wait=wait, local=self.platform.name,
                                   local_zone=self.platform.settings.zone, local_lookup=local)

    async def watch(self, name: str, app: str | None = None) -> AsyncIterator[ServiceChange]:
        """An async iterator of the changes of service ``name``'s instances (``register``,
        ``update``, ``deregister``), in order; the current instances come first."""
        reg = await self.use()
        async for change in reg.watch(name, app=app):
            yield change

    async def register(self, name: str, port: int, *, app: str = "external",
                       host: str | None = None, node: str | None = None,
                       protocol: str = "tcp", tags: Iterable[str] = (),
                       metadata: dict[str, str] | None = None,
                       status: str = PASSING) -> ServiceInstance:
        """Register something pycluster does not run; renewed by this node until
        `deregister` or this node dies (then it expires within the lease)."""
        check_name("register(name)", name)
        check_name("register(app)", app)
        check_name("register(node)", node or self.platform.node_id)
        if protocol not in PROTOCOLS:
            raise ConfigError("register(protocol)", protocol, f"must be one of {PROTOCOLS}")
        if status not in (PASSING, STANDBY, CRITICAL):
            raise ConfigError("register(status)", status, "must be passing, standby or critical")
        inst = ServiceInstance(app=app, node=node or self.platform.node_id,
                               address=host or self.advertise, metadata=dict(metadata or {}),
                               service=name, port=port, protocol=protocol, tags=tuple(tags),
                               status=status, role="external")
        await (await self.use()).register(inst)
        self.audit("registered", app, service=name, role="external", status=status,
                   address=inst.address, port=port)
        return inst

    async def deregister(self, name: str, *, app: str = "external",
                         node: str | None = None) -> None:
        """Withdraw a registration made with `register`."""
        inst = ServiceInstance(app=app, node=node or self.platform.node_id, address="",
                               service=name)
        await (await self.use()).deregister(inst)
        self.audit("deregistered", app, service=name, role="external")

    def instances(self, name: str | None = None, app: str | None = None, *,
                  healthy_only: bool = False) -> list[ServiceInstance]:
        """The instances known now without I/O (the registry's view; empty when the registry
        keeps none)."""
        if self._registry is None:
            return []
        return list(self._registry.instances(name, app=app, healthy_only=healthy_only))

    def registrations(self) -> list[dict[str, Any]]:
        """This node's registrations (for ``/status``): its apps' services (with the last
        check's detail), then what it registered by hand (``register``), sorted by key."""
        out = []
        keys = set()
        for reg in self._regs.values():
            if reg.instance is not None:
                d = as_dict(reg.instance)
                d["check"] = reg.detail or None
                out.append(d)
                keys.add(reg.instance.key)
        for inst in self._registry.owned() if self._registry is not None else ():
            if inst.key not in keys:
                out.append({**as_dict(inst), "check": None})
        return sorted(out, key=lambda d: (d["app"], d["service"], d["node"]))

    # -- following apps ------------------------------------------------------------------------

    def _reg(self, app: App, option: Service) -> Registration:
        key = (app.name, option.name)
        reg = self._regs.get(key)
        if reg is None:
            reg = self._regs[key] = Registration(self, app, option)
        return reg

    def options(self, app: App) -> list[Service]:
        """The `Service` options of ``app``."""
        return [o for o in app.options if isinstance(o, Service)]

    async def activate(self, app: App) -> None:
        """The app became active here: register its services (role primary/active)."""
        role = "primary" if isinstance(app.mode, Singleton) else "active"
        for opt in self.options(app):
            await self._reg(app, opt).enter(role)

    async def deactivate(self, app: App) -> None:
        """The app is stepping down here: withdraw (or demote to standby) its services."""
        for opt in self.options(app):
            reg = self._reg(app, opt)
            if opt.register_standby:
                await reg.enter(STANDBY)
            else:
                await reg.leave()

    async def passive(self, app: App) -> None:
        """The app is a standby here: register the services that want standbys listed."""
        for opt in self.options(app):
            if opt.register_standby:
                await self._reg(app, opt).enter(STANDBY)

    async def stopped(self, app: App) -> None:
        """The app stopped here: withdraw everything."""
        for opt in self.options(app):
            await self._reg(app, opt).leave()

    # -- observability --------------------------------------------------------------------------

    def count_check(self, service: str, ok: bool) -> None:
        """Count one check result (``pycluster_service_checks_total``)."""
        k = (service, PASSING if ok else CRITICAL)
        self.checks_total[k] = self.checks_total.get(k, 0) + 1

    def audit(self, action: str, app: App | str, **data: Any) -> None:
        """An audit entry of category ``discovery`` (when the audit plugin is enabled)."""
        log.info("discovery %s %s %s", action, app if isinstance(app, str) else app.name, data)
        audit = self.platform.services.get("audit")
        if audit is None:
            return
        try:
            audit.log(PLUGIN, action, {**data, "t": time.time()},
                      app=app if not isinstance(app, str) or app in self.platform.apps else None)
        except Exception:
            log.debug("audit discovery/%s not written", action, exc_info=True)
