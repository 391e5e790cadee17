"""Small value types shared by the core and plugins."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    """Role of an app instance on this node."""

    STOPPED = "stopped"
    PASSIVE = "passive"
    ACTIVATING = "activating"
    ACTIVE = "active"
    DEACTIVATING = "deactivating"


@dataclass(frozen=True)
class NodeInfo:
    """What placement knows about a node: its id and labels."""

    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
