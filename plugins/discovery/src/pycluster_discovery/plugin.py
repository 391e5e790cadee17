"""Plugin "discovery": a service registry that follows app roles, with health checks and DNS.

Hooks: the `Service` option and its claim, the ``discovery`` platform service
(``platform.service("discovery")``: lookup, watch, register, deregister), the default
``pycluster_service_registry`` (NATS KV leases in ``{platform}_services``), a discovery stage
per app with services (registered before ``on_active`` hooks run, withdrawn on stepping down),
standby registration on settling passive, the ``discovery:`` config section, the audit
category ``discovery``, metrics, ``/status``, the HTTP exports on the health address and the
``pycluster services`` commands.

Metrics: ``pycluster_services{service,status}`` (instances in the registry's view) and
``pycluster_service_checks_total{service,result}`` (health checks run on this node).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pycluster.kernel.context import Context
from pycluster.kernel.discovery import DiscoveryExporterRegistry
from pycluster.kernel.registry import ConfigRegistry, OptionRegistry
from pycluster.kernel.stages import FailurePolicy, Stage, StageOrder, StageRegistry
from pycluster.plugins import hookimpl

from .options import DiscoverySection, Service, service_from_section
from .registry import KvServiceRegistry
from .service import PLUGIN, Discovery

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.httpserver import Route
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform
    from pycluster.kernel.services import PlatformServices

#: Registration runs after the backend, replication and snapshots, before the app's hooks.
STAGE_ORDER = StageOrder.APP_HOOKS - 100


def discovery_of(platform: Platform | None) -> Discovery | None:
    """The platform's discovery service, if enabled."""
    if platform is None:
        return None
    svc = platform.services.get(PLUGIN)
    return svc if isinstance(svc, Discovery) else None


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `Service` option."""
    registry.add(Service, plugin=PLUGIN)


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `Service` options (service names are unique within an app)."""
    if not isinstance(option, Service):
        return None
    from pycluster.kernel.errors import ConfigError

    names = [o.name for o in app.options if isinstance(o, Service)]
    if names.count(option.name) > 1:
        raise ConfigError(f"App({app.name!r}) Service", option.name, "declared twice")
    return True


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``discovery:`` section of an app (one service)."""
    registry.add(PLUGIN, DiscoverySection, service_from_section)


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The ``discovery`` service."""
    registry.add(PLUGIN, lambda: Discovery(platform), after=("audit", "metrics"), plugin=PLUGIN)


@hookimpl(trylast=True)
def pycluster_service_registry(platform: Platform) -> Any:
    """The default registry: NATS KV leases (another plugin answering first replaces it)."""
    return KvServiceRegistry(platform)


@hookimpl
def pycluster_discovery_exporters(registry: DiscoveryExporterRegistry) -> None:
    """``file_sd``: Prometheus target groups in ``discovery.file_sd_path``."""
    from .exports import FileSdExporter

    registry.add("file_sd", FileSdExporter, plugin=PLUGIN)


@hookimpl
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """One discovery stage per app with `Service` options: register on becoming active,
    withdraw (or demote to standby) on stepping down. A failure does not stop the app."""
    disc = discovery_of(platform)
    if disc is None or not disc.options(app):
        return

    async def activate(ctx: Context) -> None:
        await disc.activate(app)

    async def deactivate(ctx: Context) -> None:
        await disc.deactivate(app)

    registry.add(Stage(name="discovery", order=STAGE_ORDER, activate=activate,
                       deactivate=deactivate, timeout=10.0, plugin=PLUGIN,
                       on_failure=FailurePolicy.CONTINUE))


@hookimpl
def pycluster_role_changed(app: App, role: str, epoch: int | None, leader: str | None,
                           reason: str) -> Any:
    """Settled passive: register standbys that want it; stopped: withdraw."""
    disc = discovery_of(app.platform)
    if disc is None or not disc.options(app):
        return None
    if role == "passive":
        return disc.passive(app)
    if role == "stopped":
        return disc.stopped(app)
    return None


@hookimpl
def pycluster_app_stopped(app: App, runtime: Any) -> Any:
    """The app stopped on this node: withdraw its services."""
    disc = discovery_of(app.platform)
    if disc is None or not disc.options(app):
        return None
    return disc.stopped(app)


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``discovery`` audit category."""
    registry.add(PLUGIN, {
        "registered": "this node registered a service instance (data: service, role, status, "
                      "address, port)",
        "updated": "a registered instance changed role or status (same data)",
        "deregistered": "this node withdrew an instance (data: service, role)",
        "health": "a service's health check changed result (data: service, passing, detail)",
    }, plugin=PLUGIN)


class _Collector:
    """Scrape-time metrics of the registry's view and this node's checks."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        services = GaugeMetricFamily("pycluster_services",
                                     "Service instances in the registry, by status",
                                     labels=["service", "status"])
        checks = CounterMetricFamily("pycluster_service_checks",
                                     "Health checks of services run on this node",
                                     labels=["service", "result"])
        disc = discovery_of(self.platform)
        if disc is not None:
            counts: dict[tuple[str, str], int] = {}
            for inst in disc.instances():
                k = (inst.service, inst.status)
                counts[k] = counts.get(k, 0) + 1
            for (svc, status), n in sorted(counts.items()):
                services.add_metric([svc, status], float(n))
            for (svc, result), n in sorted(disc.checks_total.items()):
                checks.add_metric([svc, result], float(n))
        yield services
        yield checks


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """``pycluster_services{service,status}``, ``pycluster_service_checks_total``."""
    registry.register(_Collector(platform))  # type: ignore[arg-type]


@hookimpl
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """This node's registrations and the DNS address."""
    disc = discovery_of(platform)
    if disc is None:
        return None
    return {"registrations": disc.registrations(),
            "dns": disc.dns.address if disc.dns is not None else None}


@hookimpl
def pycluster_http_routes(platform: Platform) -> list[Route] | None:
    """The exports (Prometheus SD, the Consul subset, JSON) on the node's health address."""
    disc = discovery_of(platform)
    return disc.exports.routes() if disc is not None else None


@hookimpl
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """``pycluster services list | show | watch | export``."""
    from .cli import services_group

    cli.add_command(services_group)
