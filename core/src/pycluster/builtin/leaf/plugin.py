"""Default plugin "leaf": zones joined by NATS leaf nodes.

Registers the `pycluster.builtin.leaf.service.ZoneService` of each platform (its zone, its
hub link, the zones it heard from), ``platform.remote(name)`` (API calls and events of another
platform over the leaf link), the ``pycluster_leaf_*`` metrics, the ``leaf`` part of
``/status`` and ``pycluster leaf list|status|ping``. The leaf-node links themselves are the
embedded server's configuration (the ``hub`` / ``leaf`` settings, `pycluster.kernel.leaf`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...plugins import hookimpl
from .service import METRICS, PLUGIN, LeafMetrics, ZoneService

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry

    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices
    from ...kernel.types import ConnectionState

RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
CALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The zone service (after metrics, so its metrics exist when it starts)."""
    registry.add(PLUGIN, lambda: ZoneService(platform), after=("metrics",))


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """``pycluster_leaf_rtt_seconds``, ``pycluster_leaf_call_seconds``,
    ``pycluster_leaf_link_up``, ``pycluster_leaf_zones``."""
    from prometheus_client import Gauge, Histogram

    METRICS[platform] = LeafMetrics(
        rtt=Histogram("pycluster_leaf_rtt_seconds",
                      "Round trip to another platform's zone (the hub-link checks of a leaf, "
                      "pings).", ["remote"], buckets=RTT_BUCKETS, registry=registry),
        call=Histogram("pycluster_leaf_call_seconds",
                       "Duration of API calls to another platform's apps.",
                       ["remote", "app", "outcome"], buckets=CALL_BUCKETS, registry=registry),
        link_up=Gauge("pycluster_leaf_link_up",
                      "1 while this leaf platform's hub answers over the leaf link, else 0.",
                      registry=registry),
        zones=Gauge("pycluster_leaf_zones",
                    "Leaf platforms the hub heard from, by state (up: heard within three "
                    "check intervals).", ["state"], registry=registry),
    )


@hookimpl
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """``/status``: this platform's zone, role and domain, the hub link (a leaf) or the
    leaves seen (the hub); nothing for a platform without zone settings."""
    svc = platform.services.get(PLUGIN)
    return svc.status() if isinstance(svc, ZoneService) and svc.configured else None


@hookimpl
def pycluster_connection_state(platform: Platform, connection: str,
                               state: ConnectionState) -> None:
    """Re-check the hub link as soon as the data connection changes."""
    svc = platform.services.get(PLUGIN)
    if connection == "data" and isinstance(svc, ZoneService):
        svc.poke()


@hookimpl
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """``pycluster leaf list|status|ping``."""
    from .cli import leaf_group

    cli.add_command(leaf_group)
