"""Default plugin "events": ``app.events`` and ``platform.events`` (JetStream streams).

Registers the `pycluster.builtin.events.bus.EventsService` of each platform; the app's event
stream is created when the app starts on this node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plugins import hookimpl
from .bus import EventsService

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The events service (after metrics: events are counted there)."""
    registry.add("events", lambda: EventsService(platform), after=("metrics",))


@hookimpl
def pycluster_app_started(app: App, runtime: AppRuntime) -> Any:
    """Create the app's event stream."""
    svc = runtime.platform.services.get("events")
    return svc.app_started(runtime) if isinstance(svc, EventsService) else None
