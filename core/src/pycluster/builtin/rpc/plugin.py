"""Default plugin "rpc": request/reply between nodes (``app.rpc``) and the API bus's transport.

Registers the `pycluster.builtin.rpc.service.RpcService` of each platform and follows apps and
roles through hooks; disable it with ``PYCLUSTER_DISABLE_PLUGINS=rpc`` (then ``app.rpc`` and the
``api`` plugin fail with a `PluginError` naming it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plugins import hookimpl
from .service import RpcService

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices


def _service(platform: Platform | None) -> RpcService | None:
    svc = platform.services.get("rpc") if platform is not None else None
    return svc if isinstance(svc, RpcService) else None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The rpc service (after metrics: it counts refusals and drops there)."""
    registry.add("rpc", lambda: RpcService(platform), after=("metrics",))


@hookimpl
def pycluster_app_started(app: App, runtime: AppRuntime) -> Any:
    """Serve the app's RPC handlers on this node."""
    svc = _service(runtime.platform)
    return svc.app_started(runtime) if svc is not None else None


@hookimpl
def pycluster_app_stopped(app: App, runtime: AppRuntime) -> Any:
    """Stop serving the app."""
    svc = _service(runtime.platform)
    return svc.app_stopped(runtime) if svc is not None else None


@hookimpl
def pycluster_role_changed(app: App) -> None:
    """Leader-only endpoints follow the app's role."""
    svc = _service(app.platform)
    if svc is not None:
        svc.role_changed(app.name)


@hookimpl
def pycluster_message_dropped(platform: Platform, error: Any) -> None:
    """Count a message a serving subscription dropped (slow consumer)."""
    svc = _service(platform)
    if svc is not None:
        svc.message_dropped(error)
