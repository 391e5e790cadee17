"""The election protocol: what the kernel needs from an election, and the callbacks it gets.

An election implementation is provided per app by the ``pycluster_election`` hook (the default
plugin ``election`` provides `pycluster.builtin.election.lease.LeaseElection`, a NATS KV lease).
The kernel's `pycluster.kernel.coordinator.AppRuntime` is its listener: it turns the callbacks
into transitions and notification hooks (``pycluster_role_changed``,
``pycluster_lease_renewed``, ``pycluster_leader_observed``, ``pycluster_leader_alive``).

Contract (what the coordinator relies on):

* ``is_leader`` is True only while this node holds a valid lease, checked against the local
  monotonic clock on every call; the lease ends locally (``lease_deadline()``) at least
  ``fence_margin`` seconds before any other node can win it.
* ``epoch`` is the fencing token: strictly increasing across leader changes.
* Callbacks are synchronous, cheap and never raise into the election.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class LeaseState:
    """What an election knows right now (a snapshot, safe to hand out)."""

    key: str | None
    leader: str | None
    epoch: int | None
    is_leader: bool


class ElectionListener(Protocol):
    """Callbacks an election makes; all are synchronous and must not block."""

    def elected(self, key: str, epoch: int) -> None:
        """This node won ``key`` with ``epoch``."""

    def lost(self, key: str, epoch: int, reason: str) -> None:
        """This node no longer holds ``key`` (stepped down, taken over, or fenced)."""

    def observed(self, leader: str | None, epoch: int | None) -> None:
        """The holder seen by this node changed (may be None: vacant)."""

    def renewed(self, deadline: float) -> None:
        """This node's lease was won or renewed; ``deadline`` is its new local end
        (monotonic). Feeds fence guards and the systemd watchdog."""

    def leader_alive(self, leader: str, epoch: int | None) -> None:
        """A sign of life of another node holding the lease was seen here (a renewal, or its
        graceful release): failover times are measured from the last one."""


class Election(Protocol):
    """What the kernel needs from an election implementation (provided through
    `pycluster.hookspecs.pycluster_election`).

    :ivar lease_ttl: seconds a lease lives without renewal.
    :ivar fence_margin: seconds between the local lease deadline and the earliest instant
        another node can win the lease (stages are undone against it).
    :ivar stale_margin: seconds a holder's record may stay unchanged beyond its TTL before it
        is taken over (health: "no live leader seen for more than a lease").
    :ivar leader_seen: monotonic time a live holder was last seen (a new revision of a valid
        record, or this node's own win or renewal).
    """

    lease_ttl: float
    fence_margin: float
    stale_margin: float
    leader_seen: float

    @property
    def is_leader(self) -> bool:
        """True only while this node holds a valid lease (checked against the local clock)."""

    @property
    def leader(self) -> str | None:
        """Node id of the current holder, as last observed (None when vacant or unknown)."""

    @property
    def epoch(self) -> int | None:
        """The fencing token: this node's when leader, else the last observed holder's."""

    @property
    def key(self) -> str | None:
        """The lease key held (or last observed)."""

    @property
    def stopped(self) -> bool:
        """True once the campaign loop ended (`stop`, or it died): no renewal, no takeover
        from then on. False before `start` and while it runs."""

    @property
    def max_cooldown(self) -> float:
        """The longest step-down cooldown accepted, in seconds."""

    def set_listener(self, listener: ElectionListener) -> None:
        """Receive the `ElectionListener` callbacks."""

    async def start(self) -> None:
        """Start campaigning (returns at once; the work runs in a task)."""

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; release the lease if held (hand over at once)."""

    async def step_down(self, successor: str | None = None, cooldown: float | None = None) -> None:
        """Give up the lease now; do not campaign again for ``cooldown`` seconds."""

    def pause_campaign(self, until: float) -> None:
        """Do not campaign before monotonic time ``until`` (back-off after a failed activation)."""

    def cool_down(self, until: float) -> None:
        """Prefer other nodes until monotonic time ``until`` (after a step-down) without ever
        leaving the app leaderless for longer than a lease."""

    def lease_deadline(self) -> float | None:
        """Monotonic time after which this node no longer holds the lease (None if not leader)."""

    def worst_case_failover(self) -> float:
        """Seconds from a holder's crash until a standby holds the lease, at worst (no NATS
        fault)."""

    async def reconnected(self) -> None:
        """The control connection reconnected: re-create watches (they can silently die)."""

    def state(self) -> LeaseState:
        """A snapshot of what the election knows."""
