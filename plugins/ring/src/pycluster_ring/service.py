"""The ring's platform service: metrics, and owner caches for key-routed calls from nodes that
do not run the app themselves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from pycluster.kernel import natsutil as nu

from .assignment import key_partition
from .runtime import _ERRORS, LEASE_PREFIX, OWNERS, RingMember, _loads, ring_bucket

if TYPE_CHECKING:
    from pycluster.kernel.platform import Platform

log = logging.getLogger("pycluster.ring")

# A follower of a remote ring refreshes its owner cache this often (a call that lands on a
# node that no longer owns the key is refused with not_leader and retried after a refresh).
_FOLLOW_INTERVAL = 0.25
# Followers unused for this long stop.
_FOLLOW_IDLE = 300.0


class RingFollower:
    """A read-only owner cache of another node's ring (partition -> live owner)."""

    def __init__(self, platform: Platform, app: str) -> None:
        self.platform = platform
        self.app = app
        self.bucket = ring_bucket(platform.name, app)
        self.partitions = 0
        self.owners: dict[int, str] = {}
        self.assigned: list[str | None] = []
        self.live: set[str] = set()
        self.used = time.monotonic()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def owner(self, key: str) -> str | None:
        """Where a call for ``key`` goes: its partition's owner; while the partition moves,
        the node it is assigned to (or any live member), which refuses with ``not_leader``
        until the new owner took it, so the caller retries. None: no live member at all."""
        self.used = time.monotonic()
        if not self.partitions:
            return None
        p = key_partition(key, self.partitions)
        owner = self.owners.get(p)
        if owner is not None:
            return owner
        assigned = self.assigned[p] if p < len(self.assigned) else None
        if assigned in self.live:
            return assigned
        return min(self.live) if self.live else None

    async def refresh(self) -> None:
        """Read the assignment, owners and live leases."""
        js = self.platform.js
        if js is None:
            return
        a = await nu.last_msg(js, self.bucket, "assignment")
        if a is not None and not a.tombstone:
            adoc = _loads(a.data)
            self.partitions = int(adoc.get("partitions") or 0)
            self.assigned = [n if isinstance(n, str) else None for n in adoc.get("nodes") or []]
        o = await nu.last_msg(js, self.bucket, OWNERS)
        doc = (_loads(o.data).get("partitions") or {}) if o is not None else {}
        leases = {k[len(LEASE_PREFIX):]: str(_loads(m.data).get("inc"))
                  for k, m in (await nu.live_msgs(js, self.bucket, LEASE_PREFIX)).items()}
        self.live = set(leases)
        self.owners = {int(p): str(e["node"]) for p, e in doc.items()
                       if isinstance(e, dict) and leases.get(str(e.get("node"))) == e.get("inc")}
        self.ready.set()

    async def run(self) -> None:
        """Refresh until idle for a long time."""
        while time.monotonic() - self.used < _FOLLOW_IDLE:
            with contextlib.suppress(*_ERRORS, ValueError, json.JSONDecodeError):
                await self.refresh()
            await asyncio.sleep(_FOLLOW_INTERVAL)


class RingService:
    """Per-platform state of the ring plugin (``platform.service("ring")``)."""

    name = "ring"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.followers: dict[str, RingFollower] = {}
        self.metrics: dict[str, Any] | None = None
        msvc = platform.services.get("metrics")
        if msvc is not None:
            from prometheus_client import Counter, Gauge, Histogram

            r = msvc.registry
            self.metrics = {
                "partitions": Gauge("pycluster_ring_partitions",
                                    "Partitions this node owns and may act on",
                                    ["app", "node"], registry=r),
                "moves": Counter("pycluster_ring_moves_total",
                                 "Partitions moved by assignments this node published as the "
                                 "ring's coordinator", ["app"], registry=r),
                "seconds": Histogram("pycluster_ring_rebalance_seconds",
                                     "From a membership change seen by the coordinator to a "
                                     "stable ring", ["app"], registry=r,
                                     buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60)),
            }

    async def start(self) -> None:
        """Nothing to start: followers start on first use."""

    async def stop(self) -> None:
        """Stop the followers."""
        for f in self.followers.values():
            if f.task is not None:
                f.task.cancel()
        for f in self.followers.values():
            if f.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await f.task
        self.followers.clear()

    def member(self, app_name: str) -> RingMember | None:
        """This node's ring member of ``app_name`` while it is an active instance."""
        app = self.platform.apps.get(app_name)
        if app is None:
            return None
        m = app.state("ring").get("member")
        return m if isinstance(m, RingMember) else None

    def route(self, app_name: str, key: str) -> str | None:
        """The owner of ``key`` in ring ``app_name`` (from memory)."""
        m = self.member(app_name)
        if m is not None and m.lease_valid():
            return m.route(key)
        f = self.followers.get(app_name)
        if f is None or f.task is None or f.task.done():
            f = self.followers[app_name] = RingFollower(self.platform, app_name)
            f.task = asyncio.get_running_loop().create_task(f.run(),
                                                            name=f"ring-follow-{app_name}")
        return f.owner(key)

    async def follow(self, app_name: str, timeout: float = 5.0) -> None:
        """Start following ``app_name``'s ring and wait for the first read (so that the first
        key-routed call from this node finds an owner)."""
        self.route(app_name, "")
        f = self.followers[app_name]
        await asyncio.wait_for(f.ready.wait(), timeout)


__all__ = ["RingFollower", "RingService"]
