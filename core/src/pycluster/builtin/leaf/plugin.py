"""Default plugin "leaf": zones joined by NATS leaf nodes.

Registers the `pycluster.builtin.leaf.service.ZoneService` of each platform (its zone, its
hub link, the zones it heard from), ``platform.remote(name)`` (API calls and events of another
platform over the leaf link), the ``pycluster_leaf_*`` and ``pycluster_partition_*`` metrics,
the ``leaf`` part of ``/status`` and ``pycluster leaf list|status|ping|promote|demote``,
``pycluster partition status|conflicts`` and ``pycluster witness``. The options
`PromoteOnHubFailure` and `Partition` (promotion on hub loss, `pycluster.builtin.leaf.zones`)
give their apps the ``zone`` handle, the ``on_promoted``/``on_demoted`` events and the ``zone``
audit category. The leaf-node links themselves are the
embedded server's configuration (the ``hub`` / ``leaf`` settings, `pycluster.kernel.leaf`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...kernel.errors import ConfigError
from ...kernel.zones import Partition, PromoteOnHubFailure
from ...plugins import hookimpl
from .service import METRICS, PLUGIN, LeafMetrics, ZoneService
from .zones import AppZone

if TYPE_CHECKING:
    import click
    from prometheus_client import CollectorRegistry

    from ...builtin.audit.log import AuditCategoryRegistry
    from ...kernel.app import App
    from ...kernel.platform import Platform
    from ...kernel.registry import AppEventRegistry, ConfigRegistry, OptionRegistry
    from ...kernel.services import PlatformServices
    from ...kernel.types import ConnectionState

RTT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
CALL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0)


def zone_of(app: App) -> AppZone:
    """The zone handle of ``app`` (``app.zone``): ``check()``, ``writable``, ``epoch``,
    ``token``, ``status()``.

    :raises RuntimeError: the app has no `PromoteOnHubFailure` option or the platform has not
        started yet.
    """
    z = app.state(PLUGIN).get("zone")
    if not isinstance(z, AppZone):
        raise RuntimeError(f"app {app.name!r}: no zone state (PromoteOnHubFailure needs a "
                           "started platform)")
    return z


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """`PromoteOnHubFailure` (the ``zone`` handle) and `Partition`."""
    registry.add(PromoteOnHubFailure, plugin=PLUGIN, handle=("zone", zone_of))
    registry.add(Partition, plugin=PLUGIN)


@hookimpl
def pycluster_claim_option(app: App, option: Any) -> bool | None:
    """Claim `PromoteOnHubFailure` / `Partition` (at most one each; Partition needs the
    other)."""
    if not isinstance(option, PromoteOnHubFailure | Partition):
        return None
    kind = type(option)
    if sum(1 for o in app.options if isinstance(o, kind)) > 1:
        raise ConfigError(f"App({app.name!r}) {kind.__name__}", option, "give it at most once")
    if isinstance(option, Partition) and not any(isinstance(o, PromoteOnHubFailure)
                                                 for o in app.options):
        raise ConfigError(f"App({app.name!r}) Partition", option,
                          "a partition strategy needs PromoteOnHubFailure(...) too")
    return True


@hookimpl
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """``on_promoted`` and ``on_demoted``."""
    registry.add("promoted", PLUGIN)
    registry.add("demoted", PLUGIN)


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``promote_on_hub_failure:`` and ``partition:`` sections of an app."""
    registry.add("promote_on_hub_failure", PromoteOnHubFailure)
    registry.add("partition", Partition)


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``zone`` audit category (promotion on hub loss)."""
    registry.add("zone", {
        "started": "the zone vote started (data: role, term)",
        "fenced": "the primary lost its zone lease and stopped writing (data: term, acks, "
                  "quorum)",
        "autonomous": "the primary lost its zone lease and writes on for autonomous_for",
        "lease_regained": "the primary's zone lease holds again",
        "conflict": "an autonomous write window without the majority ended (data: epoch, "
                    "from, to, rival_term)",
        "campaign_lost": "a candidacy did not get a majority (data: term, voters, refusals)",
        "promotion_refused": "a won candidacy was not approved (coordinated)",
        "won": "this zone won a term and waits out the old primary's lease (data: term, "
               "voters, positions, wait)",
        "promoted": "this zone is the primary (data: term, voters, positions)",
        "renewed": "the primary renewed its term after votes that made no winner",
        "demoted": "a platform with a higher term is primary: this zone is a replica again "
                   "(data: term, old_term, primary)",
    }, plugin=PLUGIN)


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
        partition_state=Gauge("pycluster_partition_state",
                              "1 for this zone's state per app (replica, primary, fenced, "
                              "autonomous).", ["app", "state"], registry=registry),
        partition_writable=Gauge("pycluster_partition_writable",
                                 "1 while this node may write for the app.", ["app"],
                                 registry=registry),
        partition_term=Gauge("pycluster_partition_term",
                             "The highest primary term this zone knows for the app.",
                             ["app"], registry=registry),
        partition_conflicts=Gauge("pycluster_partition_conflicts",
                                  "Autonomous write windows recorded for reconciliation.",
                                  ["app"], registry=registry),
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
    """``pycluster leaf ...``, ``pycluster partition ...``, ``pycluster witness``."""
    from .cli import leaf_group, partition_group, witness_cmd

    cli.add_command(leaf_group)
    cli.add_command(partition_group)
    cli.add_command(witness_cmd)
