"""Default plugin "metrics": Prometheus metrics of the node (``platform.metrics``, ``/metrics``).

Registers the `pycluster.builtin.metrics.service.PlatformMetrics` of each platform and records
what the kernel reports through hooks: transitions and failover times, stage and hook
durations and failures, lock wait and hold times, NATS reconnects; RPC, API and event metrics
through its middleware. Other plugins record into its public metrics when it is enabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...httpserver import Route
from ...kernel.types import ConnectionState
from ...plugins import hookimpl
from .middleware import MetricsMiddleware
from .service import PlatformMetrics

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices
    from ...kernel.stages import StageEvent

PLUGIN = "metrics"

# pycluster_nats_reconnects_total{reason}: a connection that came back, or one moved away from
# a server whose JetStream writes kept failing.
_RECONNECT_REASONS = {ConnectionState.RECONNECTED: "lost",
                      ConnectionState.MOVED: "jetstream_unavailable"}


def _service(platform: Platform | None) -> PlatformMetrics | None:
    svc = platform.services.get(PLUGIN) if platform is not None else None
    return svc if isinstance(svc, PlatformMetrics) else None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The metrics service (its registry is filled by ``pycluster_register_metrics``)."""
    registry.add(PLUGIN, lambda: PlatformMetrics(platform))


@hookimpl
def pycluster_http_routes(platform: Platform) -> list[Route] | None:
    """``/metrics`` on the node's health address, unless metrics are off or served on a
    ``metrics_addr`` of their own."""
    m = _service(platform)
    s = platform.settings
    if m is None or not m.enabled or s.metrics_addr not in (None, s.health_addr):
        return None
    return [Route("/metrics", m.handle_metrics)]


@hookimpl(tryfirst=True)
def pycluster_middleware(platform: Platform) -> Any:
    """RPC, API and event metrics (just inside the tracing middleware)."""
    return MetricsMiddleware(platform)


@hookimpl
def pycluster_role_changed(app: App, role: str) -> None:
    """Count transitions; time a failover when this node became active."""
    m = _service(app.platform)
    if m is not None:
        m.role_changed(app, role)


@hookimpl
def pycluster_activation_failed(app: App) -> None:
    """Count failed activations."""
    m = _service(app.platform)
    if m is not None:
        m.activation_failed(app)


@hookimpl
def pycluster_placement_event(platform: Platform, app: App | None, event: str,
                              data: dict[str, Any]) -> None:
    """Migrations by outcome and their duration."""
    m = _service(platform)
    outcome = event.removeprefix("migration_")
    if m is None or app is None or outcome not in ("completed", "failed", "vetoed"):
        return
    m.migrations.labels(app.name, outcome).inc()
    seconds = data.get("seconds")
    if outcome == "completed" and isinstance(seconds, int | float):
        m.migration_seconds.labels(app.name).observe(seconds)


@hookimpl
def pycluster_stage_event(app: App, event: StageEvent) -> None:
    """Stage durations and failures."""
    m = _service(app.platform)
    if m is not None:
        m.stage_event(event)


@hookimpl
def pycluster_app_hook_call(app: App, hook: str) -> contextlib.AbstractContextManager[Any] | None:
    """Hook durations and failures."""
    m = _service(app.platform)
    return m.hook_timer(app, hook) if m is not None else None


@hookimpl
def pycluster_leader_observed(app: App, leader: str | None, epoch: int | None) -> None:
    """The last leader other than this node (a failover ends its loss)."""
    m = _service(app.platform)
    if m is not None:
        m.leader_observed(app, leader, epoch)


@hookimpl
def pycluster_leader_alive(app: App, leader: str, epoch: int | None) -> None:
    """A sign of life of the leader (failovers are timed from the last one)."""
    m = _service(app.platform)
    if m is not None:
        m.leader_alive(app, leader, epoch)


@hookimpl
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Forget the app's leaders."""
    m = _service(runtime.platform)
    return m.app_stopped(runtime) if m is not None else None


@hookimpl
def pycluster_connection_state(platform: Platform, connection: str,
                               state: ConnectionState) -> None:
    """Count reconnects of the data and control connections."""
    m = _service(platform)
    reason = _RECONNECT_REASONS.get(state)
    if m is not None and reason is not None:
        m.nats_reconnect(connection, reason)


@hookimpl
def pycluster_lock_observers(platform: Platform, scope: str
                             ) -> dict[str, Callable[[Any, dict[str, Any]], None]] | None:
    """Lock wait and hold times, lost locks (no ``wait`` or ``wait_failed`` events)."""
    m = _service(platform)
    if m is None:
        return None

    def observer(event: str) -> Callable[[Any, dict[str, Any]], None]:
        return lambda _lock, fields: m.lock_event(scope, event, fields)

    return {event: observer(event) for event in ("acquired", "released", "expired")}
