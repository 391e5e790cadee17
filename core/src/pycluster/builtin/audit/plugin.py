"""Default plugin "audit": the audit trail (stream ``{platform}_audit``, ``platform.audit``).

Registers the `pycluster.builtin.audit.log.AuditLog` of each platform and writes the core's
entries from what the kernel reports through hooks: transitions and leaders (``election``,
``lifecycle``), members (``membership``), locks, failed hooks and stages, control requests,
health changes. Other plugins write theirs with ``platform.audit.log(...)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...plugins import hookimpl
from .log import AuditLog

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices
    from ...kernel.stages import StageEvent
    from ...middleware import Request

PLUGIN = "audit"


def _service(platform: Platform | None) -> AuditLog | None:
    svc = platform.services.get(PLUGIN) if platform is not None else None
    return svc if isinstance(svc, AuditLog) else None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The audit service (after metrics: entries are counted there)."""
    registry.add(PLUGIN, lambda: AuditLog(platform), after=("metrics",))


@hookimpl
def pycluster_role_changed(app: App, role: str, epoch: int | None, reason: str) -> None:
    """``election`` (elected apps) and ``lifecycle`` (Spread) entries of a transition."""
    a = _service(app.platform)
    if a is not None:
        a.role_changed(app, role, epoch, reason)


@hookimpl
def pycluster_activation_failed(app: App, epoch: int | None, error: str) -> None:
    """``lifecycle``/``activation_failed``."""
    a = _service(app.platform)
    if a is not None:
        a.activation_failed(app, epoch, error)


@hookimpl
def pycluster_stage_event(app: App, event: StageEvent) -> None:
    """Failed or timed-out stages (``hook``), stages that failed while active
    (``lifecycle``/``stage_failed``)."""
    a = _service(app.platform)
    if a is not None:
        a.stage_event(app, event)


@hookimpl
def pycluster_app_hook_call(app: App, hook: str, function: str
                            ) -> contextlib.AbstractContextManager[Any] | None:
    """A ``hook`` entry for a failed or timed-out app hook."""
    a = _service(app.platform)
    return a.hook_recorder(app, hook, function) if a is not None else None


@hookimpl
def pycluster_leader_observed(app: App, leader: str | None, epoch: int | None) -> None:
    """``leader_lost`` / ``leader_changed`` as this node observes them."""
    a = _service(app.platform)
    if a is not None:
        a.leader_observed(app, leader, epoch)


@hookimpl
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Forget the app's observed leader."""
    a = _service(runtime.platform)
    return a.app_stopped(runtime) if a is not None else None


@hookimpl
def pycluster_member_joined(platform: Platform, record: dict[str, Any]) -> None:
    """``membership``/``joined`` (every node reports it; one entry is kept)."""
    a = _service(platform)
    if a is not None:
        a.member_joined(record)


@hookimpl
def pycluster_member_left(platform: Platform, record: dict[str, Any]) -> None:
    """``membership``/``left``."""
    a = _service(platform)
    if a is not None:
        a.member_left(record)


@hookimpl
def pycluster_membership_event(platform: Platform, event: str, data: dict[str, Any]) -> Any:
    """``duplicate_refused`` (stored before the start fails), ``replaced``,
    ``record_restored``."""
    a = _service(platform)
    return a.membership_event(event, data) if a is not None else None


@hookimpl
def pycluster_placement_event(platform: Platform, app: App | None, event: str,
                              data: dict[str, Any]) -> None:
    """``placement``/``<event>`` (migrations, labels, cordons, maintenance)."""
    a = _service(platform)
    if a is not None:
        a.placement_event(app, event, data)


@hookimpl
def pycluster_lock_observers(platform: Platform, scope: str
                             ) -> dict[str, Callable[[Any, dict[str, Any]], None]] | None:
    """``lock``/``held``, ``acquired``, ``released``, ``expired`` (no ``wait`` events)."""
    a = _service(platform)
    if a is None:
        return None
    return {event: functools.partial(a.lock_event, scope, event)
            for event in ("acquired", "released", "expired")}


@hookimpl
def pycluster_control_request(platform: Platform, request: Request, subject: str,
                              reply: str | None, error: BaseException | None) -> None:
    """``control``/``<name>`` with the request's source and outcome."""
    a = _service(platform)
    if a is not None:
        a.control_request(request, subject, reply, error)


@hookimpl
def pycluster_health_changed(platform: Platform, check: str, status: str, previous: str,
                             app: App | None, error: str | None) -> None:
    """``health``/``changed``."""
    a = _service(platform)
    if a is not None:
        a.health_changed(check, status, previous, app, error)
