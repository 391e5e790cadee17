"""Exports of the registry over HTTP, and the file-SD exporter.

The endpoints are served on the node's health address (``health_addr``, through the
``pycluster_http_routes`` hook) and, with ``discovery.http_addr``, on an address of their own:

- ``GET /v1/sd/prometheus``: Prometheus HTTP service discovery (``http_sd_configs``): a list
  of target groups ``{"targets": ["host:port"], "labels": {...}}``, one per healthy instance,
  with ``__meta_pycluster_*`` labels for relabelling.
- A Consul-compatible read subset: ``GET /v1/catalog/services`` (service name -> tags),
  ``GET /v1/catalog/service/<name>`` (catalog entries, ``?tag=``) and
  ``GET /v1/health/service/<name>`` (node, service and checks; ``?passing`` keeps passing
  instances, ``?tag=``), with an ``X-Consul-Index`` header and blocking queries (``?index=``,
  ``?wait=``, at most 60 s). The datacenter is the platform's
  name, a service's ID is ``<app>.<service>.<node>``, its app is ``ServiceMeta["app"]``; a
  standby's check is ``warning``. A service name never seen answers 404 (Consul answers
  ``[]``).
- JSON: ``GET /v1/services`` (every instance) and ``GET /v1/services/<name>`` (``?app=``,
  ``?tag=``, ``?passing``).

The ``file_sd`` exporter writes the Prometheus target groups to a file (``file_sd_configs``)
whenever they change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycluster.httpserver import Handler, HttpServer, Request, Response, Route
from pycluster.kernel.discovery import ServiceInstance

from .registry import PASSING, STANDBY, as_dict

if TYPE_CHECKING:
    from pycluster.kernel.platform import Platform

    from .service import Discovery

log = logging.getLogger("pycluster.discovery")

_LABEL = re.compile(r"[^a-zA-Z0-9_]")

CATALOG, HEALTH, SERVICES = "/v1/catalog/service/", "/v1/health/service/", "/v1/services/"
#: Seconds a request waits for discovery to start on a node that had not started it.
START_TIMEOUT = 5.0


def prometheus_groups(instances: list[ServiceInstance], platform: str) -> list[dict[str, Any]]:
    """Prometheus SD target groups of the passing instances (the ``http_sd_configs`` and
    ``file_sd_configs`` format)."""
    out = []
    for i in instances:
        if i.status != PASSING:
            continue
        labels = {
            "__meta_pycluster_platform": platform, "__meta_pycluster_app": i.app,
            "__meta_pycluster_service": i.service, "__meta_pycluster_node": i.node,
            "__meta_pycluster_role": i.role, "__meta_pycluster_protocol": i.protocol,
            "__meta_pycluster_tags": "," + ",".join(i.tags) + "," if i.tags else "",
        }
        for k, v in i.metadata.items():
            labels["__meta_pycluster_metadata_" + _LABEL.sub("_", k)] = str(v)
        out.append({"targets": [f"{_host(i.address)}:{i.port}"], "labels": labels})
    return out


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def consul_status(inst: ServiceInstance) -> str:
    """Consul's check status of an instance: passing, warning (a standby) or critical."""
    return {PASSING: "passing", STANDBY: "warning"}.get(inst.status, "critical")


def consul_catalog_services(instances: list[ServiceInstance]) -> dict[str, list[str]]:
    """``/v1/catalog/services``: every service name with the union of its tags."""
    out: dict[str, set[str]] = {}
    for i in instances:
        out.setdefault(i.service, set()).update(i.tags)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _service_meta(i: ServiceInstance) -> dict[str, str]:
    return {**{k: str(v) for k, v in i.metadata.items()}, "app": i.app, "role": i.role}


def consul_catalog_service(instances: list[ServiceInstance], dc: str,
                           index: int) -> list[dict[str, Any]]:
    """``/v1/catalog/service/<name>``: Consul catalog entries."""
    return [{
        "ID": "", "Node": i.node, "Address": i.address, "Datacenter": dc,
        "TaggedAddresses": {}, "NodeMeta": {}, "ServiceKind": "", "ServiceID": i.key,
        "ServiceName": i.service, "ServiceTags": list(i.tags), "ServiceAddress": i.address,
        "ServiceTaggedAddresses": {}, "ServiceWeights": {"Passing": 1, "Warning": 1},
        "ServiceMeta": _service_meta(i), "ServicePort": i.port,
        "ServiceEnableTagOverride": False, "ServiceProxy": {}, "ServiceConnect": {},
        "CreateIndex": index, "ModifyIndex": index,
    } for i in instances]


def consul_health_service(instances: list[ServiceInstance], dc: str,
                          index: int) -> list[dict[str, Any]]:
    """``/v1/health/service/<name>``: node, service and checks per instance."""
    out = []
    for i in instances:
        status = consul_status(i)
        out.append({
            "Node": {"ID": "", "Node": i.node, "Address": i.address, "Datacenter": dc,
                     "TaggedAddresses": {}, "Meta": {}, "CreateIndex": index,
                     "ModifyIndex": index},
            "Service": {"ID": i.key, "Service": i.service, "Tags": list(i.tags),
                        "Address": i.address, "Meta": _service_meta(i), "Port": i.port,
                        "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
                        "CreateIndex": index, "ModifyIndex": index},
            "Checks": [{"Node": i.node, "CheckID": f"service:{i.key}",
                        "Name": f"Service '{i.service}' check", "Status": status, "Notes": "",
                        "Output": f"pycluster status {i.status}, role {i.role}",
                        "ServiceID": i.key, "ServiceName": i.service,
                        "ServiceTags": list(i.tags), "Type": "pycluster", "Definition": {},
                        "CreateIndex": index, "ModifyIndex": index}],
        })
    return out


def _duration(value: str) -> float:
    """Seconds of a Consul duration (``"10s"``, ``"5m"``, ``"1.5s"``, ``"250ms"``)."""
    from pycluster.kernel.natsutil import parse_ttl_header

    return parse_ttl_header(value) or 300.0


def _flag(request: Request, name: str) -> bool:
    return name in request.query and (request.param(name) or "1") not in ("0", "false")


class Exports:
    """The discovery HTTP endpoints (see the module) as routes: served on the node's health
    address (``pycluster_http_routes``) and, with ``discovery.http_addr``, on their own server
    (`ExportServer`). The first request starts discovery on a node that has not started it
    (no services of its own): answers come from the registry's view, loaded at its start."""

    def __init__(self, discovery: Discovery) -> None:
        self.discovery = discovery
        self._names: set[str] = set()
        #: Consul's ``X-Consul-Index``: raised on every change of the view.
        self.index = 1
        self._changed = asyncio.Event()
        self._view: list[ServiceInstance] | None = None
        self._starting: asyncio.Future[Any] | None = None

    def routes(self) -> list[Route]:
        """The endpoints; ``/v1/catalog/service/``, ``/v1/health/service/`` and
        ``/v1/services/`` take the service name from the rest of the path."""
        return [
            Route("/v1/sd/prometheus", self._ready(self.handle_prometheus)),
            Route("/v1/catalog/services", self._ready(self.handle_catalog_services)),
            Route(CATALOG, self._named(CATALOG, self.handle_catalog), prefix=True),
            Route(HEALTH, self._named(HEALTH, self.handle_health), prefix=True),
            Route("/v1/services", self._ready(self.handle_services)),
            Route(SERVICES, self._named(SERVICES, self.handle_service), prefix=True),
        ]

    def refresh(self) -> None:
        """If the view changed since last seen: remember new service names, raise the index,
        wake blocked queries (called by the export loop, and before each answer so that the
        index always describes the view answered)."""
        view = self.discovery.instances()
        if view == self._view:
            return
        self._view = view
        self._names.update(i.service for i in view)
        self.index += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def known(self, name: str) -> bool:
        """Whether service ``name`` has been seen (an unknown one answers 404)."""
        self.refresh()
        return name in self._names

    async def started(self) -> bool:
        """Start discovery if it is not running (once; a failure is retried by the next
        request); False when it does not start within `START_TIMEOUT`."""
        if self.discovery.running:
            return True
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self.discovery.use())
            self._starting.add_done_callback(_consume)
        try:
            await asyncio.wait_for(asyncio.shield(self._starting), START_TIMEOUT)
        except Exception as exc:
            log.debug("discovery exports: not started: %s", exc)
            return False
        return True

    async def stop(self) -> None:
        """Cancel a start that a request began and that has not finished (discovery stops)."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await starting

    def _ready(self, fn: Handler) -> Handler:
        async def handler(request: Request) -> Response:
            if not await self.started():
                return Response.text("discovery is not running\n", 503)
            return await fn(request)
        return handler

    def _named(self, prefix: str, fn: Any) -> Handler:
        async def handler(request: Request) -> Response:
            name = request.path[len(prefix):]
            if not await self.started():
                return Response.text("discovery is not running\n", 503)
            if not name or "/" in name or not self.known(name):
                return Response.text(f"unknown service {name!r}\n", 404)
            return await fn(request, name)  # type: ignore[no-any-return]
        return handler

    async def _block(self, request: Request) -> None:
        """Consul blocking query: with ``?index=N`` not older than the current index, wait
        until the view changes or ``?wait=`` (default 5m, at most 60 s here) passes."""
        self.refresh()
        try:
            index = int(request.param("index") or 0)
        except ValueError:
            return
        if index <= 0 or index < self.index:
            return
        wait = min(60.0, _duration(request.param("wait") or "5m"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), wait)
        self.refresh()

    def _consul(self, data: Any) -> Response:
        resp = Response.json(data)
        resp.headers["X-Consul-Index"] = str(self.index)
        resp.headers["X-Consul-KnownLeader"] = "true"
        resp.headers["X-Consul-LastContact"] = "0"
        return resp

    async def handle_prometheus(self, request: Request) -> Response:
        """Prometheus HTTP SD."""
        return Response.json(prometheus_groups(self.discovery.instances(),
                                               self.discovery.platform.name))

    async def handle_catalog_services(self, request: Request) -> Response:
        """Consul ``/v1/catalog/services``."""
        await self._block(request)
        return self._consul(consul_catalog_services(self.discovery.instances()))

    def _select(self, request: Request, name: str) -> list[ServiceInstance]:
        tags = request.query.get("tag", [])
        return [i for i in self.discovery.instances(name, request.param("app"))
                if set(tags) <= set(i.tags)]

    async def handle_catalog(self, request: Request, name: str) -> Response:
        """Consul ``/v1/catalog/service/<name>``."""
        await self._block(request)
        return self._consul(consul_catalog_service(self._select(request, name),
                                                   self.discovery.platform.name, self.index))

    async def handle_health(self, request: Request, name: str) -> Response:
        """Consul ``/v1/health/service/<name>``."""
        await self._block(request)
        insts = self._select(request, name)
        if _flag(request, "passing"):
            insts = [i for i in insts if i.status == PASSING]
        return self._consul(consul_health_service(insts, self.discovery.platform.name,
                                                  self.index))

    async def handle_services(self, request: Request) -> Response:
        """Every instance as JSON."""
        return Response.json({"platform": self.discovery.platform.name,
                              "services": [as_dict(i) for i in self.discovery.instances()]})

    async def handle_service(self, request: Request, name: str) -> Response:
        """One service's instances as JSON (``?passing`` for healthy ones)."""
        insts = self._select(request, name)
        if _flag(request, "passing"):
            insts = [i for i in insts if i.status == PASSING]
        return Response.json({"platform": self.discovery.platform.name, "service": name,
                              "instances": [as_dict(i) for i in insts]})


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a start's failure (the waiting request answered it; the next one retries)."""
    if not fut.cancelled():
        fut.exception()


class ExportServer:
    """The exports on their own address (``discovery.http_addr``), beside the health address.

    :param exports: the endpoints (`Exports`), shared with the health address's routes.
    :param addr: ``host:port`` to bind (port 0: any free port).
    """

    def __init__(self, exports: Exports, addr: str) -> None:
        self.exports = exports
        self.server = HttpServer(addr, name="discovery")
        for route in exports.routes():
            self.server.add(route)

    @property
    def url(self) -> str:
        """``http://host:port``."""
        return self.server.url

    async def start(self) -> None:
        """Listen."""
        await self.server.start()

    async def stop(self) -> None:
        """Close."""
        await self.server.stop()


class FileSdExporter:
    """Writes Prometheus ``file_sd_configs`` target groups to ``discovery.file_sd_path``
    (atomically, only when they change); does nothing while the path is unset."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self._last: bytes | None = None

    async def export(self, instances: list[ServiceInstance]) -> None:
        """Write the file if the target groups changed."""
        from .plugin import discovery_of

        disc = discovery_of(self.platform)
        path = disc.file_sd_path if disc is not None else None
        if not path:
            return
        data = json.dumps(prometheus_groups(instances, self.platform.name), indent=2).encode()
        if data == self._last:
            return
        await asyncio.to_thread(_write_atomic, Path(path), data)
        self._last = data


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
