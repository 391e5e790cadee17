"""The health plugin's endpoints: readiness, the ``/status`` document, the HTTP server
(every route comes from ``pycluster_http_routes``: this plugin's ``/health``, ``/ready`` and
``/status``, the metrics plugin's ``/metrics``, other plugins' routes) and the same document
over NATS (``{platform}._.node.{node}.status``, a control request), so ``pycluster status``
and ``pycluster health`` work without ``health_addr``.

Under connection loss the endpoints keep answering from in-process state: ``/ready`` turns 503
at once, and 200 again as soon as the connection and JetStream are back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from ...httpserver import HttpServer, Request, Response, Route
from ...kernel.backends import supervisors
from ...kernel.control import decode_object, error_reply
from ...kernel.names import platform_subject, validate_ident
from ...kernel.replication import replication_summary
from ...kernel.types import Role
from ...plugins import DEFAULT_PLUGINS
from .checks import CheckStatus, HealthCheck

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from ...kernel.app import App
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.health")


def node_status_subject(platform: str, node: str) -> str:
    """Subject on which node ``node`` answers with its ``/status`` document (a control
    request: the node's middleware sees it; not audited, it changes nothing)."""
    validate_ident("platform", platform)
    validate_ident("node", node)
    return platform_subject(platform, "node", node, "status")


def _app_local(platform: Platform, app: App) -> dict[str, Any]:
    """What only this node knows of ``app``: its backends' and VIPs' state."""
    out: dict[str, Any] = {}
    backends = []
    for kind, _opt, sup in supervisors(platform, app):
        last = sup.last_health
        backends.append({"kind": kind.kind, "stage": sup.stage, "state": sup.state.value,
                         "healthy": last.healthy if last is not None else None,
                         "detail": last.detail if last is not None else None})
    if backends:
        out["backends"] = backends
    rt = platform.runtimes.get(app.name)
    vips = [{"address": av.manager.address, "held": bool(av.manager.held),
             "plugin": av.plugin} for av in (rt.vips if rt is not None else [])]
    if vips:
        out["vips"] = vips
    return out


class HealthEndpoints:
    """The endpoint half of `pycluster.builtin.health.service.PlatformHealth`."""

    platform: Platform
    checks: dict[str, HealthCheck]
    _server: HttpServer | None
    _probe_at: float
    _status_sub: Subscription | None = None

    def status(self, history: bool = False) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    @property
    def healthy(self) -> bool:
        raise NotImplementedError

    async def run_check(self, chk: HealthCheck) -> Any:
        raise NotImplementedError

    async def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: NATS connected, JetStream reachable, apps settled, critical
        checks passing. Probes JetStream at once (at most once a second) when its last result
        is not a recent success, so readiness returns promptly after a reconnect."""
        p = self.platform
        reasons: list[str] = []
        if not p.running:
            reasons.append("the platform is not running")
        if p.nc is None or not p.nc.is_connected:
            reasons.append("not connected to NATS")
        else:
            js = self.checks.get("jetstream")
            if js is not None:
                last = js.last
                fresh = last is not None and last.ok and time.time() - last.at < 2 * js.interval
                if not fresh and time.monotonic() - self._probe_at >= 1.0:
                    self._probe_at = time.monotonic()
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(js.timeout + 0.5):
                            await self.run_check(js)
                    last = js.last
                    fresh = last is not None and last.ok
                if not fresh:
                    err = last.error if last is not None else "not checked yet"
                    reasons.append(f"JetStream not reachable ({err})")
        for name in p.apps:
            rt = p.runtimes.get(name)
            if rt is None:
                continue  # not placed on this node: nothing to settle
            if rt.role not in (Role.ACTIVE, Role.PASSIVE):
                reasons.append(f"app {name} is {rt.role.value}")
            elif rt.role is Role.ACTIVE and not rt.is_active:
                reasons.append(f"app {name} is active without a valid lease")
        for n, c in sorted(self.checks.items()):
            if c.spec.critical and c.status is CheckStatus.UNHEALTHY:
                reasons.append(f"critical check {n} is unhealthy")
            elif c.spec.builtin and c.app is not None and c.status is CheckStatus.UNHEALTHY:
                err = c.last.error if c.last is not None else None
                reasons.append(f"check {n} is unhealthy ({err})")
        return not reasons, reasons

    def node_status(self, history: bool = False) -> dict[str, Any]:
        """The ``/status`` document (without readiness)."""
        p = self.platform
        base = p.status()
        now = time.monotonic()
        for name, info in base.get("apps", {}).items():
            rt = p.runtimes.get(name)
            info["lease_age"] = None
            info["lease_remaining"] = None
            info["active_since"] = None
            if rt is None:
                info["placed"] = False
                continue
            info["placed"] = True
            el = rt.election
            deadline = el.lease_deadline() if el is not None else None
            if el is not None and deadline is not None and el.is_leader:
                ttl, margin = el.lease_ttl, el.fence_margin
                info["lease_remaining"] = round(max(0.0, deadline - now), 3)
                info["lease_age"] = round(max(0.0, ttl - margin - (deadline - now)), 3)
            elif el is not None and rt.leader is not None:
                # A standby: how long ago the leader's lease was last seen renewed.
                info["lease_age"] = round(max(0.0, now - el.leader_seen), 3)
            if rt.role is Role.ACTIVE:
                for at, role, _epoch, _why in reversed(rt.history):
                    if role != Role.ACTIVE.value:
                        break
                    info["active_since"] = at
            info["last_transition"] = rt.last_transition
            if rt.replicators:  # the app's data: state, lag, position of each replicator
                info["replication"] = replication_summary(rt.replicators)
            app = p.apps.get(name)
            if app is not None:
                info.update(_app_local(p, app))
        base["uptime"] = round(time.time() - p.started_at, 3) if p.started_at else None
        base["health_url"] = self.url  # None without health_addr
        base["checks"] = self.status(history)
        base["healthy"] = self.healthy
        audit = p.services.get("audit")  # the audit plugin's public counters, when enabled
        if audit is not None:
            base["audit"] = audit.stats()
        base["plugins_status"] = self._plugin_status()
        return base

    def _plugin_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for impl in self.platform.pm.hook.pycluster_status.get_hookimpls():
            try:
                value = impl.function(platform=self.platform)
            except Exception as exc:
                value = {"error": f"{type(exc).__name__}: {exc}"}
            if value is not None:
                out[impl.plugin_name] = value
        return out

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_health(self, request: Request) -> Response:
        """``GET /health``: liveness."""
        p = self.platform
        failing = sorted(n for n, c in self.checks.items() if c.status is CheckStatus.UNHEALTHY)
        body = {"status": "ok" if p.running else "stopping", "node": p.node_id,
                "platform": p.name, "failing_checks": failing}
        return Response.json(body, 200 if p.running else 503)

    async def handle_ready(self, request: Request) -> Response:
        """``GET /ready``: readiness."""
        ready, reasons = await self.readiness()
        return Response.json({"ready": ready, "node": self.platform.node_id,
                              "reasons": reasons}, 200 if ready else 503)

    async def handle_status(self, request: Request) -> Response:
        """``GET /status`` (``?history=1`` adds each check's recent results)."""
        history = (request.param("history") or "") not in ("", "0", "false", "no")
        return Response.json(await self.status_document(history))

    async def status_document(self, history: bool = False) -> dict[str, Any]:
        """The full ``/status`` document: `node_status` with readiness."""
        doc = self.node_status(history)
        doc["ready"], doc["not_ready"] = await self.readiness()
        return doc

    # -- over NATS -----------------------------------------------------------------------------

    async def _on_status_request(self, msg: Msg) -> None:
        """Answer a status request (``{"history": bool}``, optional) with the ``/status``
        document; a refusal (middleware) is ``{"node", "error"}``."""
        p = self.platform

        async def handler(req: Any) -> dict[str, Any]:
            body = decode_object(req.data) if req.data else {}
            return await self.status_document(bool(body.get("history")))

        try:
            doc, error = await p.control.serve(msg, app="_", name="status", handler=handler,
                                               audit=False)
            reply = {"node": p.node_id, "error": error_reply(error)} if error else doc
            if msg.reply:
                await msg.respond(json.dumps(reply, default=str).encode())
        except Exception:  # never into nats-py's delivery loop
            log.exception("node %s: status request failed", p.node_id)

    async def _serve_nats(self) -> None:
        p = self.platform
        nc = p.nc_control or p.nc
        if nc is None or self._status_sub is not None:
            return
        self._status_sub = await nc.subscribe(node_status_subject(p.name, p.node_id),
                                              cb=self._on_status_request)

    async def _stop_nats(self) -> None:
        sub, self._status_sub = self._status_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the health server while it runs."""
        return self._server.url if self._server is not None else None


    async def _serve_http(self) -> None:
        """Start the HTTP server on ``health_addr`` with the routes of
        ``pycluster_http_routes`` (this plugin's ``/health``, ``/ready`` and ``/status`` among
        them; ``/metrics`` is the metrics plugin's)."""
        s = self.platform.settings
        if not s.health_addr:
            return
        server = HttpServer(s.health_addr, name="health")
        self._plugin_routes(server)
        await server.start()
        self._server = server

    def _plugin_routes(self, server: HttpServer) -> None:
        """Add the routes of ``pycluster_http_routes``, the default plugins' first (in their
        list's order), then the others' in hook call order: a path already taken is skipped,
        a plugin whose hook raises adds none."""
        taken = {(p, False) for p in server.paths}
        impls = list(reversed(self.platform.pm.hook.pycluster_http_routes.get_hookimpls()))
        order = list(DEFAULT_PLUGINS)
        impls.sort(key=lambda i: (order.index(i.plugin_name) if i.plugin_name in order
                                  else len(order)))  # stable: the others keep their order
        for impl in impls:
            try:
                result: Any = impl.function(platform=self.platform)
                routes = list(result or ())
                if not all(isinstance(r, Route) for r in routes):
                    raise TypeError("pycluster_http_routes must return Route objects")
            except Exception:
                log.exception("plugin %s: pycluster_http_routes failed; its routes are not "
                              "served", impl.plugin_name)
                continue
            for route in routes:
                key = (route.path, route.prefix)
                if key in taken:
                    log.warning("plugin %s: HTTP path %s%s is already served; skipped",
                                impl.plugin_name, route.path, "*" if route.prefix else "")
                    continue
                taken.add(key)
                server.add(route)

    async def _stop_http(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None
