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


class ConnectionState(enum.StrEnum):
    """A state change of one of the node's NATS connections (``pycluster_connection_state``)."""

    DISCONNECTED = "disconnected"
    """The connection dropped; nats-py reconnects by itself."""
    RECONNECTED = "reconnected"
    """It is back (to the same server or another one)."""
    MOVED = "moved"
    """It was moved away from a server whose JetStream writes kept failing (cut off from its
    cluster); a ``reconnected`` follows."""


@dataclass(frozen=True)
class NodeInfo:
    """What placement knows about a node: its id and labels."""

    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
