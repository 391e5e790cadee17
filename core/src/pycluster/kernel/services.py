"""Core services: components whose lifecycle follows the platform's (RPC, API bus, events,
health, audit, metrics, ...).

A service is created with the platform (so apps can reach it before the start), started once
NATS is connected and the node has joined, told about each app that starts or stops on this
node, and stopped in reverse order when the platform leaves. Each is listed here once, as
``"module:Class"`` (imported on demand), and reached as ``platform.services[name]``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .coordinator import AppRuntime
    from .platform import Platform

# Order matters: started in this order, stopped in reverse.
CORE_SERVICES: list[str] = []

# Communication (issue 3): the rpc transport first (the api bus and events use its middleware).
CORE_SERVICES += ["pycluster.builtin.rpc.service:RpcService",
                  "pycluster.builtin.api.bus:ApiService",
                  "pycluster.builtin.events.bus:EventsService"]

# Observability (issue 4): metrics first (the others record into it), the audit trail, then
# health, whose HTTP server starts last and stops first.
CORE_SERVICES += ["pycluster.builtin.metrics.service:PlatformMetrics",
                  "pycluster.builtin.audit.log:AuditLog",
                  "pycluster.builtin.health.checks:PlatformHealth"]


class Service(Protocol):
    """The lifecycle a core service implements."""

    name: str

    async def start(self) -> None:
        """NATS is connected and the node joined: subscribe, open ports, ..."""

    async def app_started(self, rt: AppRuntime) -> None:
        """An app started on this node (it is passive; it may become active at any time)."""

    async def app_stopped(self, rt: AppRuntime) -> None:
        """An app stopped on this node (it already stepped down)."""

    async def stop(self) -> None:
        """The platform leaves: release everything."""


def create_services(platform: Platform) -> dict[str, Service]:
    """Instantiate the core services for ``platform`` (``Class(platform)``)."""
    out: dict[str, Service] = {}
    for spec in CORE_SERVICES:
        module, _, attr = spec.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        svc: Service = cls(platform)
        out[svc.name] = svc
    return out
