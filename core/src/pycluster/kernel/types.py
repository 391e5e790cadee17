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


class MembershipEvent(enum.StrEnum):
    """Something that happened to this node's own membership (``pycluster_membership_event``)."""

    DUPLICATE_REFUSED = "duplicate_refused"
    """Another live process runs this node id: this start is refused."""
    REPLACED = "replaced"
    """Another incarnation took this node's record: the node leaves."""
    RECORD_RESTORED = "record_restored"
    """A record nobody answers for was taken back by this node."""


class PluginStatus(enum.StrEnum):
    """What became of a plugin when the plugin manager was built (``pycluster plugins``)."""

    LOADED = "loaded"
    """Registered and usable."""
    FAILED = "failed"
    """Its entry point failed to load."""
    DISABLED = "disabled"
    """Left out by name (``PYCLUSTER_DISABLE_PLUGINS``)."""
    UNUSABLE = "unusable"
    """Loaded, but its ``pycluster_check`` says it cannot work on this machine."""


@dataclass(frozen=True)
class NodeInfo:
    """What placement knows about a node: its id and labels."""

    node_id: str
    labels: dict[str, str] = field(default_factory=dict)
