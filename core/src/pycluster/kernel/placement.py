"""Placement: which nodes may run an app (filters) and which one should lead it (scores).

The kernel asks the placement hooks; the default plugin ``placement`` implements the hard
constraints (`OnNodes`, `OnLabel`, `AvoidLabel`) as a filter and a node's ``priority`` for the
app as its score. Other plugins add filters (any False excludes a node) and scores (summed).

A standby defers its campaign for a vacant lease by its *rank*: the number of distinct higher
scores among the live standbys of the app (capped at `Placement.MAX_RANK`; the election also
caps the whole deferral below half a lease, since membership records can be forged). With only
the default scorer this is the priority deferral: the highest-priority standby takes over first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .types import NodeInfo, Role

if TYPE_CHECKING:
    from .app import App
    from .platform import Platform


@dataclass(frozen=True)
class PlacementView:
    """What this node knows of the platform's nodes when it scores them (a snapshot).

    :ivar node_id: this node's id.
    """

    node_id: str
    _records: Mapping[str, dict[str, Any]]
    _alive: Callable[[str], bool]

    def nodes(self) -> Iterator[str]:
        """Every node with a membership record (this one included)."""
        return iter(self._records)

    def record(self, node: str) -> dict[str, Any] | None:
        """The validated membership record of ``node`` (labels, version, plugins, apps)."""
        return self._records.get(node)

    def app_record(self, node: str, app: str) -> dict[str, Any] | None:
        """What ``node``'s record says of ``app`` (role, eligible, priority, no_failover,
        epoch, leader), if it runs it."""
        rec = self._records.get(node)
        apps = rec.get("apps") if rec is not None else None
        entry = apps.get(app) if isinstance(apps, Mapping) else None
        return entry if isinstance(entry, dict) else None

    def alive(self, node: str) -> bool:
        """Whether ``node``'s record was refreshed within its TTL (this node: always)."""
        return node == self.node_id or self._alive(node)

    def node_info(self, node: str) -> NodeInfo:
        """``node`` as the placement hooks see it (id and labels)."""
        rec = self._records.get(node) or {}
        labels = rec.get("labels")
        return NodeInfo(node, dict(labels) if isinstance(labels, Mapping) else {})


class PlacementStrategy(Protocol):
    """A named way of ordering scored candidates (``pycluster_placement_strategy``)."""

    def order(self, app: App, scores: Mapping[str, float], view: PlacementView) -> list[str]:
        """The candidate node ids of ``app``, most preferred first."""


class Placement:
    """The kernel's placement decisions for one platform (``platform.placement``)."""

    MAX_RANK = 3
    """At most this many distinct higher scores defer a campaign (records can be forged)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def eligible(self, app: App, node: NodeInfo | None = None) -> bool:
        """Whether every placement filter admits ``node`` (default: this node) for ``app``."""
        p = self.platform
        results = p.pm.hook.pycluster_placement_filter(app=app, node=node or p.node_info())
        return all(r is not False for r in results)

    def view(self) -> PlacementView:
        """A snapshot of the live membership, with this node's current record."""
        p = self.platform
        m = p.membership
        records: dict[str, dict[str, Any]] = dict(m.members) if m is not None else {}
        records[p.node_id] = p.membership_record()
        return PlacementView(p.node_id, records,
                             m.alive if m is not None else (lambda _node: False))

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """The sum of every placement score of ``node`` for ``app`` (abstentions count 0)."""
        total = 0.0
        for s in self.platform.pm.hook.pycluster_placement_score(app=app, node=node, view=view):
            if isinstance(s, int | float) and not isinstance(s, bool):
                total += s
        return total

    def standbys(self, app: App, view: PlacementView) -> list[str]:
        """Live nodes other than this one whose record says they run ``app`` as a standby
        that may lead it."""
        out = []
        for node in view.nodes():
            if node == view.node_id or not view.alive(node):
                continue
            a = view.app_record(node, app.name)
            if (a is not None and a.get("eligible") is True and a.get("no_failover") is False
                    and a.get("role") == Role.PASSIVE.value):
                out.append(node)
        return out

    def candidates(self, app: App, view: PlacementView | None = None) -> list[tuple[str, float]]:
        """This node and the live standbys of ``app`` with their scores, best first (ties by
        node id)."""
        view = view or self.view()
        nodes: Sequence[str] = [view.node_id, *self.standbys(app, view)]
        scored = [(n, self.score(app, view.node_info(n), view)) for n in nodes]
        return sorted(scored, key=lambda ns: (-ns[1], ns[0]))

    def rank(self, app: App) -> int:
        """How many distinct higher scores live standbys of ``app`` have than this node (at
        most `MAX_RANK`): the election defers a campaign by it."""
        view = self.view()
        mine = self.score(app, view.node_info(view.node_id), view)
        higher = set()
        for node in self.standbys(app, view):
            s = self.score(app, view.node_info(node), view)
            if s > mine:
                higher.add(s)
        return min(len(higher), self.MAX_RANK)
