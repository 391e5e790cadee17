"""The backend protocol: what a controller of a service (process, unit, container) offers.

Third-party backends implement `Backend`, define an option class, and register both through
`pycluster.hookspecs.pycluster_register_backends`; the core then runs ``start`` in the BACKEND
stage of the failover sequence and ``stop`` in reverse, with the epoch as fencing token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .context import Context


@dataclass
class BackendHealth:
    """Result of a backend health probe."""

    healthy: bool
    detail: str = ""
    data: dict[str, object] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A controller that starts and stops one service instance on this node."""

    async def start(self, ctx: Context) -> None:
        """Start the service for ``ctx.epoch``; return once it is up (healthy if checked)."""

    async def stop(self, ctx: Context) -> None:
        """Stop the service; finish before ``ctx.deadline`` when one is set (fencing)."""

    async def health(self) -> BackendHealth:
        """Probe the service."""
