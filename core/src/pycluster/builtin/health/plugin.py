"""Default plugin "health": checks of the node and its apps, ``/health``, ``/ready``,
``/status`` (``platform.health``, ``app.health``).

Registers the `pycluster.builtin.health.service.PlatformHealth` of each platform (started last,
so its HTTP server comes up when everything else is ready), starts each app's checks when the
app starts here, and fires the apps' ``on_health_change`` hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...httpserver import Route
from ...plugins import hookimpl
from .service import PLUGIN, PlatformHealth

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.registry import AppEventRegistry
    from ...kernel.services import PlatformServices


def _service(platform: Platform) -> PlatformHealth | None:
    svc = platform.services.get(PLUGIN)
    return svc if isinstance(svc, PlatformHealth) else None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The health service, after the others (its HTTP server serves their state)."""
    registry.add(PLUGIN, lambda: PlatformHealth(platform),
                 after=("metrics", "audit", "rpc", "api", "events"))


@hookimpl
def pycluster_http_routes(platform: Platform) -> list[Route] | None:
    """``/health``, ``/ready`` and ``/status`` (the server itself is this plugin's too)."""
    svc = _service(platform)
    if svc is None:
        return None
    return [Route("/health", svc.handle_health), Route("/ready", svc.handle_ready),
            Route("/status", svc.handle_status)]


@hookimpl
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """``on_health_change`` hooks run on every status change of the app's checks."""
    registry.add("health_change", plugin=PLUGIN)


@hookimpl
def pycluster_app_started(app: App, runtime: AppRuntime) -> Any:
    """Start the app's checks (and its built-in election check)."""
    svc = _service(runtime.platform)
    return svc.app_started(runtime) if svc is not None else None


@hookimpl
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Stop the app's checks."""
    svc = _service(runtime.platform)
    return svc.app_stopped(runtime) if svc is not None else None
