"""The context of what runs: the `Context` of app hooks and failover stages, and the ids that
tie records of one operation together (the correlation id, the current trace id)."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

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


CORRELATION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pycluster_correlation_id", default=None
)
"""The correlation id of the current task (RPC and API handlers run with the request id)."""


def correlation_id() -> str | None:
    """The correlation id of the current task (set with `correlation`)."""
    return CORRELATION.get()


@contextlib.contextmanager
def correlation(cid: str | None) -> Iterator[str | None]:
    """Tag every audit entry written inside the block with ``cid`` (None: no id)."""
    token = CORRELATION.set(cid)
    try:
        yield cid
    finally:
        CORRELATION.reset(token)


def current_trace_id() -> str | None:
    """Hex trace id of the current OpenTelemetry span, or None when there is no valid trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")
