"""The context object handed to app hooks and failover stages."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import App
    from .platform import Platform


@dataclass
class Context:
    """What a hook or stage knows about the transition it is part of.

    :ivar app: the app.
    :ivar platform: the platform (NATS connection, node id, settings).
    :ivar node_id: this node's id.
    :ivar epoch: the leadership epoch, also the fencing token (None for Spread apps).
    :ivar leader: the current leader's node id, when known.
    :ivar reason: why the transition happens ("elected", "stepped down", "self-fenced", ...).
    :ivar deadline: monotonic instant by which a deactivation must be complete (lease end),
        or None when there is no hurry.
    :ivar member: for member join/leave hooks, the member's record.
    """

    app: App
    platform: Platform
    node_id: str
    epoch: int | None = None
    leader: str | None = None
    reason: str = ""
    deadline: float | None = None
    member: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def remaining(self, default: float) -> float:
        """Seconds left before ``deadline`` (``default`` when there is none), never negative."""
        if self.deadline is None:
            return default
        return max(0.0, min(default, self.deadline - time.monotonic()))
