"""Default plugin "placement": the hard constraints (`OnNodes`, `OnLabel`, `AvoidLabel`) as a
placement filter, and a node's ``priority`` for an app as its placement score (the kernel ranks
standbys by score: the highest-priority live standby takes over first). It declares the
``placement_invalid`` app event, which the kernel's placement re-evaluation fires."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import hookimpl

if TYPE_CHECKING:
    from ..kernel.app import App
    from ..kernel.placement import PlacementView
    from ..kernel.registry import AppEventRegistry
    from ..kernel.types import NodeInfo


@hookimpl(trylast=True)
def pycluster_placement_filter(app: App, node: NodeInfo) -> bool | None:
    """Admit ``node`` when every hard constraint of ``app`` allows it."""
    return app.allows(node)


@hookimpl(trylast=True)
def pycluster_placement_score(app: App, node: NodeInfo, view: PlacementView) -> float | None:
    """The node's ``priority`` for ``app``, as its membership record publishes it."""
    entry = view.app_record(node.node_id, app.name)
    priority = entry.get("priority") if entry is not None else None
    if isinstance(priority, int) and not isinstance(priority, bool):
        return priority
    return None


@hookimpl
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """``on_placement_invalid`` hooks run when this node's placement of an app it runs
    becomes invalid (fired by the kernel's placement re-evaluation)."""
    registry.add("placement_invalid", "placement")
