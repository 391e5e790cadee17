"""Default plugin "api": the API bus (``@app.handle``, ``platform.api(app).call(...)``).

Registers the `pycluster.builtin.api.bus.ApiService` of each platform; it needs the ``rpc``
plugin (its transport): without it the service is not built and ``platform.api(...)`` fails
with a `PluginError` naming both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plugins import hookimpl
from .bus import ApiService

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices


def _service(platform: Platform) -> ApiService | None:
    svc = platform.services.get("api")
    return svc if isinstance(svc, ApiService) else None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The API bus service, on top of the rpc service."""
    registry.add("api", lambda: ApiService(platform), requires=("rpc",))


@hookimpl
def pycluster_app_started(app: App, runtime: AppRuntime) -> Any:
    """Serve the app's API methods on this node."""
    svc = _service(runtime.platform)
    return svc.app_started(runtime) if svc is not None else None


@hookimpl
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Stop serving the app's API."""
    svc = _service(runtime.platform)
    return svc.app_stopped(runtime) if svc is not None else None
