"""Default plugin "placement": the hard constraints (`OnNodes`, `OnLabel`, `AvoidLabel`, hard
`WithApp` / `AwayFromApp`) as a placement filter; a node's ``priority`` for an app and the
soft preferences (`PreferLabel`, `PreferNode`, `WithApp` / `AwayFromApp` with a weight) as its
placement score (the kernel ranks standbys by score: the best-scored live standby takes over
first); the strategies ``spread``, ``binpack`` and ``zone``. It declares the
``placement_invalid`` app event, which the kernel's placement re-evaluation fires."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import hookimpl

if TYPE_CHECKING:
    from ..kernel.app import App
    from ..kernel.placement import PlacementStrategy, PlacementView
    from ..kernel.registry import AppEventRegistry
    from ..kernel.types import NodeInfo


@hookimpl(trylast=True)
def pycluster_placement_filter(app: App, node: NodeInfo) -> bool | None:
    """Admit ``node`` when every hard constraint of ``app`` allows it (affinities: as the
    platform's membership view shows the other apps)."""
    if not app.allows(node):
        return False
    hard = [c for c in app.preferences if c.needs_view]
    if hard and app.platform is not None:
        view = app.platform.placement.view()
        return all(c.admits(node, view) for c in hard)
    return True


@hookimpl(trylast=True)
def pycluster_placement_score(app: App, node: NodeInfo, view: PlacementView) -> float | None:
    """The node's ``priority`` for ``app`` (as its membership record publishes it) plus the
    app's soft preferences."""
    total = 0.0
    entry = view.app_record(node.node_id, app.name)
    priority = entry.get("priority") if entry is not None else None
    if isinstance(priority, int) and not isinstance(priority, bool):
        total += priority
    for pref in app.preferences:
        total += pref.score(node, view)
    return total


def _own(view: PlacementView, node: str, app: str) -> int:
    """1 when ``node``'s record shows ``app`` active there."""
    rec = view.app_record(node, app)
    return 1 if rec is not None and rec.get("role") == "active" else 0


class Spread:
    """Prefer nodes with fewer active instances (of any app); this app's own instance on the
    node does not count against it."""

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """Minus the other active instances on ``node``."""
        return -float(view.active_count(node.node_id) - _own(view, node.node_id, app.name))


class Binpack:
    """Prefer nodes with more active instances (of other apps): fill nodes up."""

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """The other active instances on ``node``."""
        return float(view.active_count(node.node_id) - _own(view, node.node_id, app.name))


class Zone:
    """Prefer nodes whose zone (the app's `Strategy` label) has fewer active instances of
    this app (a node's own instance does not count against it)."""

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """Minus this app's active instances elsewhere in ``node``'s zone."""
        label = app.strategy.label
        zone = node.labels.get(label)
        return -float(sum(1 for other in view.active_on(app.name)
                          if other != node.node_id and view.alive(other)
                          and view.node_info(other).labels.get(label) == zone))


_STRATEGIES: dict[str, PlacementStrategy] = {"spread": Spread(), "binpack": Binpack(),
                                             "zone": Zone()}


@hookimpl(trylast=True)
def pycluster_placement_strategy(name: str) -> PlacementStrategy | None:
    """The built-in strategies: ``spread`` (the default), ``binpack``, ``zone``."""
    return _STRATEGIES.get(name)


@hookimpl
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """``on_placement_invalid`` hooks run when this node's placement of an app it runs
    becomes invalid (fired by the kernel's placement re-evaluation); ``on_migration_start``
    and ``on_migration_complete`` around a migration (``platform.move``)."""
    registry.add("placement_invalid", "placement")
    registry.add("migration_start", "placement")
    registry.add("migration_complete", "placement")
