"""Core default plugin "placement": the hard constraints OnNodes, OnLabel, AvoidLabel."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import hookimpl

if TYPE_CHECKING:
    from ..kernel.app import App
    from ..kernel.types import NodeInfo


@hookimpl(trylast=True)
def pycluster_placement_filter(app: App, node: NodeInfo) -> bool | None:
    """Admit ``node`` when every hard constraint of ``app`` allows it."""
    return app.allows(node)
