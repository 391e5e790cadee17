"""The ring on one node: its ownership lease, the fenced partition hand-offs, the coordinator.

State in the KV bucket ``{platform}_{app}_ring`` (history 1, expiry markers on):

* ``lease.{node}``: the node's ownership lease, ``{"node", "inc", "weight", "eligible",
  "draining"}``, written by compare-and-set with a ``Nats-TTL`` every heartbeat. ``inc`` names
  the lease's incarnation: a node that lost its lease (paused, cut off) comes back with a new
  one, so ownership entries of the old incarnation are recognisably stale.
* ``owners``: one JSON document ``{"partitions": {"<p>": {"node", "inc", "epoch"}}}`` changed
  only by compare-and-set on its revision. A claim's ``epoch`` is one above the revision it was
  based on, so every move of a partition gets a higher epoch than the one before (fencing).
* ``assignment``: the desired owner of every partition, published by the coordinator:
  ``{"nodes": [node|null, ...], "members": {node: weight}, "moves": total}``; its revision is
  the assignment epoch.
* ``coordinator``: the coordinator's lease (CAS + TTL). Only its holder computes assignments.
  Safety never depends on it: two coordinators at once could only disagree on the *desired*
  owners; who *owns* is decided by the ``owners`` compare-and-set rules below.

Rules (never two owners):

* A node acts as owner of a partition only while it is listed in ``owners`` with its current
  incarnation *and* its local lease deadline has not passed (send time of its last successful
  renewal + ttl - fence margin, on this process's monotonic clock).
* It claims a partition only when ``owners`` lists nobody for it, or lists an incarnation whose
  lease this node has seen absent for a full ``lease_ttl + stale margin`` (by then that holder's
  deadline has passed for sure: its last renewal was sent before the absence was seen).
* Giving a partition up: run ``on_release`` (bounded), stop acting, then remove the entry by
  compare-and-set. Only then can the next owner claim it and run ``on_own``.

Size: `RingMember` is one state machine (lease, owners compare-and-set, hand-offs,
coordinator) whose safety rules read and change the same state; kept together so the rules
above can be checked in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.js.errors

from pycluster.kernel import natsutil as nu
from pycluster.kernel.context import Context
from pycluster.kernel.coordinator import run_hooks
from pycluster.kernel.names import bucket

from .assignment import key_partition, moves, rebalance
from .options import Ring

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

log = logging.getLogger("pycluster.ring")

PLUGIN = "ring"
OWNERS = "owners"
ASSIGNMENT = "assignment"
COORDINATOR = "coordinator"
LEASE_PREFIX = "lease."
LEASE_HEADER = "Pycluster-Ring-Lease"
_ERRORS: tuple[type[BaseException], ...] = (*nu.TRANSIENT_ERRORS, nats.js.errors.APIError,
                                            nu.StreamGoneError)
_ERRORS_OR_CAS: tuple[type[BaseException], ...] = (*_ERRORS, nu.CASConflict)
_ERRORS_OR_FAILED: tuple[type[BaseException], ...] = (*_ERRORS, RuntimeError)


def ring_bucket(platform: str, app: str) -> str:
    """The KV bucket of an app's ring: ``{platform}_{app}_ring``."""
    return bucket(platform, app, "ring")


@dataclass
class RingContext(Context):
    """The context of ``on_own`` / ``on_release`` hooks.

    :ivar partitions: the partitions this node just gained (``on_own``) or is giving up
        (``on_release``).
    :ivar epochs: partition -> its ownership epoch (the fencing token of that ownership).
    :ivar lost: for ``on_release``: True when the node already lost them (its lease ran out, or
        the release overran its timeout): do not act on them any more, only clean up.
    """

    partitions: frozenset[int] = frozenset()
    epochs: dict[int, int] = field(default_factory=dict)
    lost: bool = False


@dataclass
class _State:
    """One consistent-enough read of the bucket."""

    owners: dict[int, dict[str, Any]]
    owners_seq: int
    assignment: list[str | None]
    assignment_seq: int
    members: dict[str, float]
    moves_total: int
    leases: dict[str, dict[str, Any]]  # node -> live lease record
    coordinator: nu.LastMsg | None
    lease_seqs: dict[str, int] = field(default_factory=dict)  # node -> last seq of its key


class RingMember:
    """The ring of one app on this node (`pycluster_ring.ring_of(app)` returns it).

    Created when the app's ``ring`` stage activates (this node is an active instance) and
    stopped when it deactivates; the read methods (`owner`, `owns`, ...) work on the last state
    read from NATS (refreshed every tick, about ``heartbeat_interval / 2``).
    """

    def __init__(self, app: App, platform: Platform, option: Ring) -> None:
        self.app = app
        self.platform = platform
        self.option = option
        kw = platform.election_kwargs(app)
        self.lease_ttl: float = float(kw["lease_ttl"])
        self.heartbeat: float = float(kw["heartbeat_interval"])
        self.fence_margin = max(0.1 * self.lease_ttl, 0.05)
        self.stale_margin = max(self.fence_margin, 0.1)
        self.hook_timeout = float(app.election_options.hook_timeout
                                  or platform.settings.hook_timeout)
        self.own_timeout = option.own_timeout or self.hook_timeout
        self.release_timeout = option.release_timeout or self.hook_timeout
        # Polling: fast while something moves, slower once stable (a watch on the owners and
        # assignment keys wakes the loop in between; watchers can be silent, polls cannot).
        self.tick = max(0.05, min(self.heartbeat / 2, 0.25))
        self.idle_tick = max(self.tick, min(self.lease_ttl, 2.0))
        self._subs: list[Any] = []
        self.bucket = ring_bucket(platform.name, app.name)
        self.node = platform.node_id
        self.inc = ""
        self._lease_seq = 0
        self._deadline = 0.0
        self._coord_seq = 0
        self._coord_deadline = 0.0
        self.owned: dict[int, int] = {}  # partition -> epoch, acted on by this node
        self._releasing: set[int] = set()
        self._state: _State | None = None
        self._absent_since: dict[tuple[str, str], float] = {}
        self._backoff_until: dict[int, float] = {}
        self._backoff = 1.0
        self._draining = False
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._wake = asyncio.Event()
        self._renew_lock = asyncio.Lock()
        self._unconfirmed_sent: float | None = None
        self._members_changed_at = 0.0
        self._members_seen: dict[str, float] | None = None
        self._last_publish = 0.0
        self.moves_here = 0  # partitions this node gained or gave up
        self.last_rebalance_seconds: float | None = None
        self._rebalance_started: float | None = None

    # -- read API ----------------------------------------------------------------------------

    @property
    def partitions_count(self) -> int:
        """The partition count."""
        return self.option.partitions

    def partition(self, key: str | bytes) -> int:
        """The partition of ``key`` (xxh3-64 modulo the partition count)."""
        return key_partition(key, self.option.partitions)

    def lease_valid(self) -> bool:
        """True while this node's ownership lease is valid (local deadline not passed)."""
        return bool(self.inc) and time.monotonic() < self._deadline

    def holds(self, partition: int, epoch: int | None = None) -> bool:
        """True while this node owns ``partition`` (with ``epoch``, when given) and may act on
        it: listed as owner, lease valid, not released. Check it before every side effect."""
        e = self.owned.get(partition)
        return e is not None and (epoch is None or e == epoch) and self.lease_valid()

    def owns(self, key: str | bytes) -> bool:
        """True while this node owns the partition of ``key`` (see `holds`)."""
        return self.holds(self.partition(key))

    def owner(self, key: str | bytes) -> str | None:
        """The node that owns ``key``'s partition now, as last read (None: being moved)."""
        return self.owner_of(self.partition(key))

    def route(self, key: str | bytes) -> str | None:
        """Where a key-routed call goes: the owner; while the partition moves, its assigned
        node (or any live member), which refuses with ``not_leader`` until the new owner took
        it, so that the caller retries."""
        p = self.partition(key)
        owner = self.owner_of(p)
        st = self._state
        if owner is not None or st is None:
            return owner
        assigned = st.assignment[p] if p < len(st.assignment) else None
        if assigned is not None and assigned in st.leases:
            return assigned
        return min(st.leases) if st.leases else None

    def owner_of(self, partition: int) -> str | None:
        """The owner of ``partition`` as last read (None while it is being moved)."""
        if partition in self.owned:
            return self.node if self.lease_valid() else None
        st = self._state
        if st is None:
            return None
        ent = st.owners.get(partition)
        if ent is None:
            return None
        lease = st.leases.get(ent["node"])
        return ent["node"] if lease is not None and lease.get("inc") == ent.get("inc") else None

    def partitions(self, node: str | None = None) -> set[int]:
        """The partitions ``node`` owns (default: this node, those it may act on now)."""
        if node is None or node == self.node:
            return set(self.owned) if self.lease_valid() else set()
        st = self._state
        if st is None:
            return set()
        return {p for p in range(self.option.partitions) if self.owner_of(p) == node}

    def assignment(self) -> dict[int, str]:
        """The coordinator's desired owner of every partition (as last read)."""
        st = self._state
        if st is None:
            return {}
        return {p: n for p, n in enumerate(st.assignment) if n is not None}

    @property
    def epoch(self) -> int:
        """The assignment epoch (the revision of the last assignment read; 0: none yet)."""
        return self._state.assignment_seq if self._state else 0

    def stable(self) -> bool:
        """True when every partition is owned by its assigned node and the assignment covers
        exactly the live members."""
        st = self._state
        if st is None or not st.assignment:
            return False
        live = {n for n, rec in st.leases.items() if _counts(rec)}
        if set(st.members) != live:
            return False
        for p, node in enumerate(st.assignment):
            ent = st.owners.get(p)
            if node is None or ent is None or ent["node"] != node:
                return False
            lease = st.leases.get(node)
            if lease is None or lease.get("inc") != ent.get("inc"):
                return False
        return True

    async def wait_stable(self, timeout: float) -> bool:
        """Wait until the ring is `stable`; False when ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stable():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(self.tick, max(0.01, deadline - time.monotonic())))

    def stats(self) -> dict[str, Any]:
        """Partitions per node (as last read), moves so far (all nodes, counted by the
        coordinators), this node's partitions and its lease state."""
        st = self._state
        per: dict[str, int] = {}
        if st is not None:
            for p in range(self.option.partitions):
                n = self.owner_of(p)
                if n is not None:
                    per[n] = per.get(n, 0) + 1
        return {
            "app": self.app.name,
            "partitions": self.option.partitions,
            "epoch": self.epoch,
            "per_node": per,
            "members": dict(st.members) if st else {},
            "moves_total": st.moves_total if st else 0,
            "mine": sorted(self.partitions()),
            "lease_valid": self.lease_valid(),
            "stable": self.stable(),
            "last_rebalance_seconds": self.last_rebalance_seconds,
        }

    def require_owner(self, key: str | bytes) -> int:
        """In a handler of a key-routed call: return the partition's epoch, or refuse the call
        with ``not_leader`` so that the caller retries against the new owner."""
        from pycluster.builtin.rpc.wire import NOT_LEADER, Reject

        p = self.partition(key)
        if not self.holds(p):
            raise Reject(NOT_LEADER, "NotOwnerError",
                         f"{self.node} does not own partition {p} of {self.app.name}")
        return self.owned[p]

    async def drain(self, timeout: float | None = None) -> bool:
        """Move this node's partitions to the other members and own none until `undrain`
        (the node stays an instance of the app). Returns once it owns nothing (True) or when
        ``timeout`` passes (False)."""
        self._draining = True
        self._audit("drain", {})
        with contextlib.suppress(*_ERRORS_OR_CAS):
            await self._renew()
        self._wake.set()
        end = None if timeout is None else time.monotonic() + timeout
        while self.owned:
            if end is not None and time.monotonic() >= end:
                return False
            await asyncio.sleep(self.tick)
        return True

    async def undrain(self) -> None:
        """Take partitions again (after `drain`)."""
        self._draining = False
        self._audit("undrain", {})
        with contextlib.suppress(*_ERRORS_OR_CAS):
            await self._renew()
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the bucket, take the ownership lease, start converging."""
        js = self._js()
        await nu.ensure_kv(js, self.bucket, history=1, marker_ttl=1,
                           replicas=self.platform.settings.stream_replicas)
        await self._acquire_lease()
        await self._watch()
        self._tasks = [
            asyncio.create_task(self._renew_loop(), name=f"ring-{self.app.name}-lease"),
            asyncio.create_task(self._loop(), name=f"ring-{self.app.name}-converge"),
        ]

    async def stop(self, deadline: float | None = None) -> None:
        """Leave the ring: mark the lease draining, wait (bounded) for the coordinator to move
        this node's partitions, release what is left, delete the lease. Cancelled midway, it
        still stops acting for everything and stops its tasks (what stays listed in
        ``owners`` is taken over once its lease has run out)."""
        self._draining = True
        limit = time.monotonic() + max(0.5, self.option.settle + 4 * self.tick + 1.0)
        if deadline is not None:
            limit = min(limit, deadline - self.release_timeout - 0.5)
        try:
            with contextlib.suppress(*_ERRORS_OR_CAS):
                await self._renew()
            while self.owned and time.monotonic() < limit and self.lease_valid():
                self._wake.set()
                await asyncio.sleep(self.tick)
            await self._stop_tasks()
            if self.owned:
                await self._release(set(self.owned), "leaving")
            with contextlib.suppress(*_ERRORS):
                await self._remove_mine(set())
            with contextlib.suppress(*_ERRORS_OR_CAS):
                if self._lease_seq:
                    await nu.cas_delete(self._js(), self.bucket, LEASE_PREFIX + self.node,
                                        expected_seq=self._lease_seq)
            with contextlib.suppress(*_ERRORS_OR_CAS):
                if self._coord_seq and time.monotonic() < self._coord_deadline:
                    await nu.cas_delete(self._js(), self.bucket, COORDINATOR,
                                        expected_seq=self._coord_seq)
        finally:
            self.owned.clear()
            self.inc = ""
            self._deadline = 0.0
            m = _metrics(self.platform)
            if m is not None:
                m["partitions"].labels(self.app.name, self.node).set(0)
            await asyncio.shield(self._stop_tasks())

    async def _stop_tasks(self) -> None:
        self._stopping = True
        subs, self._subs = self._subs, []
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def _watch(self) -> None:
        """Wake the loop when ``owners`` or ``assignment`` change, or a lease appears, ends or
        changes what it says (not on plain renewals). Headers only."""
        from nats.js.api import DeliverPolicy

        async def on_msg(msg: Any) -> None:
            self._wake.set()

        base = len(nu.kv_subject(self.bucket, LEASE_PREFIX))

        async def on_lease(msg: Any) -> None:
            h = msg.headers or {}
            st = self._state
            rec = st.leases.get(msg.subject[base:]) if st is not None else None
            if rec is None or h.get(LEASE_HEADER) != _lease_summary(rec):
                self._wake.set()  # new, ended (a delete or expiry marker) or changed

        for key, cb in ((OWNERS, on_msg), (ASSIGNMENT, on_msg), (LEASE_PREFIX + ">", on_lease)):
            try:
                self._subs.append(await self._js().subscribe(
                    nu.kv_subject(self.bucket, key), cb=cb, ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW, headers_only=True, idle_heartbeat=2.0))
            except Exception as exc:  # polling still works
                log.warning("ring %s: watch of %s failed (%s); polling only", self.app.name,
                            key, exc)

    # -- the lease ---------------------------------------------------------------------------

    def _js(self) -> Any:
        js = self.platform.js
        assert js is not None, "platform not connected"
        return js

    def _record(self) -> tuple[bytes, dict[str, str]]:
        """The lease record, and the header that summarises it for watchers (headers-only
        watches see membership changes without reading values)."""
        labels = self.platform.labels
        try:
            weight = float(labels.get(self.option.weight_label, "1"))
        except ValueError:
            weight = 1.0
        if not math.isfinite(weight) or weight < 0:
            weight = 0.0
        rec = {"node": self.node, "inc": self.inc, "weight": weight,
               "eligible": self.platform.eligible(self.app), "draining": self._draining}
        return json.dumps(rec).encode(), {LEASE_HEADER: _lease_summary(rec)}

    async def _acquire_lease(self) -> None:
        """Create a new incarnation of this node's lease (over an expiry marker or delete)."""
        self.inc = uuid.uuid4().hex[:12]
        self._unconfirmed_sent = None
        key = LEASE_PREFIX + self.node
        for _ in range(10):
            last = await nu.last_msg(self._js(), self.bucket, key, direct=False)
            expected = 0 if last is None else last.seq
            sent = time.monotonic()
            try:
                data, hdr = self._record()
                self._lease_seq = await nu.cas_publish(
                    self._js(), self.bucket, key, data, expected_seq=expected,
                    ttl=self.lease_ttl, extra_headers=hdr)
            except nu.CASConflict:
                continue
            self._deadline = sent + self.lease_ttl - self.fence_margin
            self._audit("lease_acquired", {"inc": self.inc})
            return
        raise RuntimeError(f"ring {self.app.name}: could not write lease {key}")

    async def _renew(self) -> None:
        # One renewal at a time: a drain's immediate renewal racing the loop's would make one
        # of them fail its compare-and-set and look like a lost lease.
        async with self._renew_lock:
            sent = time.monotonic()
            data, hdr = self._record()
            try:
                self._lease_seq = await nu.cas_publish(
                    self._js(), self.bucket, LEASE_PREFIX + self.node, data,
                    expected_seq=self._lease_seq, ttl=self.lease_ttl, timeout=self.heartbeat,
                    extra_headers=hdr)
            except nu.TRANSIENT_ERRORS:
                # It may have landed all the same: remember the earliest such send.
                if self._unconfirmed_sent is None:
                    self._unconfirmed_sent = sent
                raise
            except nu.CASConflict:
                if not await self._adopt_landed_renewal():
                    raise
                return
            self._unconfirmed_sent = None
            if sent + self.lease_ttl - self.fence_margin > self._deadline:
                self._deadline = sent + self.lease_ttl - self.fence_margin

    async def _adopt_landed_renewal(self) -> bool:
        """After a refused renewal: if an earlier renewal whose answer was lost did land (the
        key holds our live record of this incarnation), continue from it; its deadline counts
        from the earliest send that may have landed."""
        sent, self._unconfirmed_sent = self._unconfirmed_sent, None
        if sent is None:
            return False
        last = await nu.last_msg(self._js(), self.bucket, LEASE_PREFIX + self.node,
                                 direct=False)
        if last is None or last.tombstone or _loads(last.data).get("inc") != self.inc:
            return False
        self._lease_seq = last.seq
        self._deadline = max(self._deadline, sent + self.lease_ttl - self.fence_margin)
        return True

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            if not self.lease_valid():
                self._fenced("lease not renewed in time")
                try:
                    await self._acquire_lease()
                except _ERRORS_OR_FAILED as exc:
                    log.warning("ring %s: re-acquiring the lease failed: %s", self.app.name, exc)
                continue
            try:
                await self._renew()
            except nu.CASConflict:
                self._fenced("lease taken over or expired")
                self._deadline = 0.0
            except _ERRORS as exc:
                log.warning("ring %s: lease renewal failed: %s", self.app.name, exc)
            if self._coord_seq and time.monotonic() < self._coord_deadline:
                sent = time.monotonic()
                try:
                    self._coord_seq = await nu.cas_publish(
                        self._js(), self.bucket, COORDINATOR, self._coord_record(),
                        expected_seq=self._coord_seq, ttl=self.lease_ttl, timeout=self.heartbeat)
                    self._coord_deadline = sent + self.lease_ttl - self.fence_margin
                except nu.CASConflict:
                    self._coord_seq, self._coord_deadline = 0, 0.0
                except _ERRORS:
                    pass

    def _fenced(self, reason: str) -> None:
        """The lease is lost: stop acting as owner of anything at once; tell the app."""
        if not self.owned:
            return
        lost = dict(self.owned)
        self.owned.clear()
        log.warning("ring %s: %s; no longer acting for partitions %s", self.app.name, reason,
                    _ranges(lost))
        self._audit("fenced", {"reason": reason, "partitions": sorted(lost)})
        self._count_moves(len(lost))
        ctx = self._ctx(lost, f"lost: {reason}", lost=True)
        self.platform.spawn(
            run_hooks(self.app.hooks("release"), ctx, self.release_timeout, "on_release", False),
            f"ring-{self.app.name}-lost")

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> _State:
        js = self._js()
        owners_msg = await nu.last_msg(js, self.bucket, OWNERS, direct=False)
        owners: dict[int, dict[str, Any]] = {}
        owners_seq = 0
        if owners_msg is not None:
            owners_seq = owners_msg.seq
            if not owners_msg.tombstone:
                doc = _loads(owners_msg.data)
                for k, v in (doc.get("partitions") or {}).items():
                    if isinstance(v, dict) and isinstance(v.get("node"), str):
                        owners[int(k)] = v
        a_msg = await nu.last_msg(js, self.bucket, ASSIGNMENT, direct=False)
        assignment: list[str | None] = []
        members: dict[str, float] = {}
        a_seq, moves_total = 0, 0
        if a_msg is not None:
            a_seq = a_msg.seq
            if not a_msg.tombstone:
                doc = _loads(a_msg.data)
                nodes = doc.get("nodes") or []
                if len(nodes) == self.option.partitions:
                    assignment = [n if isinstance(n, str) else None for n in nodes]
                members = {str(k): float(v) for k, v in (doc.get("members") or {}).items()}
                moves_total = int(doc.get("moves") or 0)
        leases: dict[str, dict[str, Any]] = {}
        lease_seqs: dict[str, int] = {}
        info = await js.stream_info(nu.kv_stream(self.bucket),
                                    subjects_filter=nu.kv_subject(self.bucket, LEASE_PREFIX + ">"))
        base = len(nu.kv_subject(self.bucket, LEASE_PREFIX))
        for subject in (info.state.subjects or {}):
            node = subject[base:]
            msg = await nu.last_msg(js, self.bucket, LEASE_PREFIX + node, direct=False)
            if msg is not None:
                lease_seqs[node] = msg.seq
            if msg is not None and not msg.tombstone:
                rec = _loads(msg.data)
                if rec.get("node") == node:
                    leases[node] = rec
        coord = await nu.last_msg(js, self.bucket, COORDINATOR, direct=False)
        return _State(owners, owners_seq, assignment, a_seq, members, moves_total, leases, coord,
                      lease_seqs)

    # -- converging --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except _ERRORS as exc:
                log.debug("ring %s: step failed: %r", self.app.name, exc)
            except Exception:
                log.exception("ring %s: step failed", self.app.name)
            self._wake.clear()
            busy = (self._absent_since or self._releasing or not self.stable()
                    or not self.lease_valid())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick if busy else self.idle_tick):
                    await self._wake.wait()

    async def _step(self) -> None:
        st = await self._read()
        self._state = st
        await self._note_absences(st)
        now = time.monotonic()
        if not self.lease_valid():
            return
        await self._coordinate(st, now)
        # Partitions listed as ours that we do not act on (a failed on_own, a crash-restart
        # of this incarnation's bookkeeping) are removed so that the next owner can claim.
        await self._remove_mine(set(self.owned))
        # Give up what is assigned elsewhere.
        if st.assignment:
            give = {p for p in self.owned if st.assignment[p] != self.node}
            if give:
                await self._release(give, "assigned elsewhere" if not self._draining
                                    else "draining")
                st = await self._read()
                self._state = st
        if not self._draining and st.assignment:
            await self._claim(st, time.monotonic())
        self._done_moving()
        m = _metrics(self.platform)
        if m is not None:
            m["partitions"].labels(self.app.name, self.node).set(len(self.partitions()))

    async def _note_absences(self, st: _State) -> None:
        """Remember since when each owner incarnation listed in ``owners`` has had no live
        lease. A first sighting is confirmed by a guard write (`natsutil.confirm_read`) that
        the stream accepts only while the lease key is still as read: a stale read (a replica
        behind, a cut-off server) never starts the wait. The time is taken after the guard
        was accepted, so the holder's last renewal was sent before it."""
        live = {(n, str(rec.get("inc"))) for n, rec in st.leases.items()}
        seen = {(str(e["node"]), str(e.get("inc"))) for e in st.owners.values()}
        for k in list(self._absent_since):
            if k not in seen or k in live:
                del self._absent_since[k]
        for k in seen - live:
            if k in self._absent_since or k[0] == self.node:
                continue
            ok = await nu.confirm_read(self._js(), self.bucket, LEASE_PREFIX + k[0],
                                       st.lease_seqs.get(k[0], 0), timeout=self.heartbeat)
            if ok:
                self._absent_since[k] = time.monotonic()

    async def _claim(self, st: _State, now: float) -> None:
        mine = [p for p, n in enumerate(st.assignment) if n == self.node and p not in self.owned]
        if not mine:
            return
        wait = self.lease_ttl + self.stale_margin
        claim: list[int] = []
        for p in mine:
            if self._backoff_until.get(p, 0.0) > now:
                continue
            ent = st.owners.get(p)
            if ent is None:
                claim.append(p)
                continue
            k = (str(ent["node"]), str(ent.get("inc")))
            if k == (self.node, self.inc):
                claim.append(p)  # listed as ours but not acted on: claim it anew
                continue
            since = self._absent_since.get(k)
            if since is not None and now - since >= wait:
                claim.append(p)
        if not claim or not self.lease_valid():
            return
        epoch = st.owners_seq + 1
        doc = {str(p): e for p, e in st.owners.items()}
        for p in claim:
            doc[str(p)] = {"node": self.node, "inc": self.inc, "epoch": epoch}
        try:
            await nu.cas_publish(self._js(), self.bucket, OWNERS,
                                 json.dumps({"partitions": doc}).encode(),
                                 expected_seq=st.owners_seq, timeout=self.heartbeat)
        except nu.CASConflict:
            self._wake.set()
            return
        if not self.lease_valid():
            return  # the write landed, but we may not act: the entry is stale now
        gained = {p: epoch for p in claim}
        self.owned.update(gained)
        self._count_moves(len(gained))
        self._audit("own", {"partitions": sorted(gained), "epoch": epoch})
        log.info("ring %s: %s owns partitions %s (epoch %d)", self.app.name, self.node,
                 _ranges(gained), epoch)
        ctx = self._ctx(gained, "assigned to this node")
        try:
            await run_hooks(self.app.hooks("own"), ctx, self.own_timeout, "on_own", True)
        except Exception as exc:
            log.error("ring %s: on_own failed for %s: %s; giving them up, retry in %.1fs",
                      self.app.name, _ranges(gained), exc, self._backoff)
            self._audit("own_failed", {"partitions": sorted(gained), "error": str(exc),
                                       "backoff": self._backoff})
            for p in gained:
                self.owned.pop(p, None)
                self._backoff_until[p] = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 30.0)
            await self._remove_mine(set(self.owned))
            return
        self._backoff = 1.0

    async def _release(self, parts: Iterable[int], reason: str) -> None:
        give = {p: self.owned[p] for p in parts if p in self.owned}
        if not give:
            return
        self._releasing |= set(give)
        ctx = self._ctx(give, reason)
        ctx.deadline = time.monotonic() + self.release_timeout
        timed_out = False
        try:
            await run_hooks(self.app.hooks("release"), ctx, self.release_timeout, "on_release",
                            True)
        except Exception as exc:
            timed_out = "timed out" in str(exc)
            log.error("ring %s: on_release of %s %s; the node stops acting for them anyway",
                      self.app.name, _ranges(give), "timed out" if timed_out else f"failed: {exc}")
            self._audit("release_timeout" if timed_out else "release_failed",
                        {"partitions": sorted(give), "error": str(exc)})
        finally:
            # Stop acting before the entry goes: the next owner can claim only after it.
            for p in give:
                self.owned.pop(p, None)
            self._releasing -= set(give)
        self._count_moves(len(give))
        self._audit("release", {"partitions": sorted(give), "reason": reason})
        log.info("ring %s: %s released partitions %s (%s)", self.app.name, self.node,
                 _ranges(give), reason)
        await self._remove_mine(set(self.owned))

    async def _remove_mine(self, keep: set[int]) -> None:
        """Remove this node's entries from ``owners`` except ``keep`` (compare-and-set)."""
        for _ in range(20):
            st = self._state
            if st is None:
                return
            drop = [p for p, e in st.owners.items()
                    if e["node"] == self.node and p not in keep]
            if not drop:
                return
            doc = {str(p): e for p, e in st.owners.items() if p not in drop}
            try:
                await nu.cas_publish(self._js(), self.bucket, OWNERS,
                                     json.dumps({"partitions": doc}).encode(),
                                     expected_seq=st.owners_seq, timeout=self.heartbeat)
                self._state = await self._read()
                self._wake.set()
                return
            except nu.CASConflict:
                self._state = await self._read()

    # -- the coordinator ---------------------------------------------------------------------

    def _coord_record(self) -> bytes:
        return json.dumps({"node": self.node, "inc": self.inc}).encode()

    async def _coordinate(self, st: _State, now: float) -> None:
        if not (self._coord_seq and now < self._coord_deadline):
            c = st.coordinator
            if c is not None and not c.tombstone:
                return
            sent = time.monotonic()
            try:
                self._coord_seq = await nu.cas_publish(
                    self._js(), self.bucket, COORDINATOR, self._coord_record(),
                    expected_seq=0 if c is None else c.seq, ttl=self.lease_ttl,
                    timeout=self.heartbeat)
            except nu.CASConflict:
                return
            self._coord_deadline = sent + self.lease_ttl - self.fence_margin
            self._audit("coordinator", {"node": self.node})
            log.info("ring %s: %s coordinates the ring", self.app.name, self.node)
        members = {n: float(rec.get("weight", 1.0)) for n, rec in st.leases.items()
                   if _counts(rec)}
        if members != self._members_seen:
            self._members_seen = dict(members)
            self._members_changed_at = now
            if self._rebalance_started is None:
                self._rebalance_started = now
        if members == st.members and len(st.assignment) == self.option.partitions:
            return
        grows = any(n not in st.members or st.members[n] != w for n, w in members.items())
        if grows and now - self._members_changed_at < self.option.settle:
            return
        if now - self._last_publish < self.option.min_interval:
            return
        current = dict(enumerate(st.assignment))
        after = rebalance(current, members, self.option.partitions)
        moved = moves(current, after) if st.assignment else 0
        nodes = [after.get(p) for p in range(self.option.partitions)]
        doc = {"partitions": self.option.partitions, "nodes": nodes, "members": members,
               "moves": st.moves_total + moved, "by": self.node, "at": time.time()}
        try:
            await nu.cas_publish(self._js(), self.bucket, ASSIGNMENT, json.dumps(doc).encode(),
                                 expected_seq=st.assignment_seq, timeout=self.heartbeat)
        except nu.CASConflict:
            return
        self._last_publish = time.monotonic()
        self._audit("rebalance", {"members": sorted(members), "moved": moved})
        log.info("ring %s: new assignment for members %s (%d partitions move)",
                 self.app.name, sorted(members), moved)
        m = _metrics(self.platform)
        if m is not None and moved:
            m["moves"].labels(self.app.name).inc(moved)
        self._state = await self._read()

    # -- helpers -----------------------------------------------------------------------------

    def _done_moving(self) -> None:
        if self._rebalance_started is not None and self.stable():
            self.last_rebalance_seconds = time.monotonic() - self._rebalance_started
            m = _metrics(self.platform)
            if m is not None:
                m["seconds"].labels(self.app.name).observe(self.last_rebalance_seconds)
            self._rebalance_started = None

    def _count_moves(self, n: int) -> None:
        self.moves_here += n

    def _ctx(self, parts: dict[int, int], reason: str, lost: bool = False) -> RingContext:
        return RingContext(
            app=self.app, platform=self.platform, node_id=self.node,
            epoch=max(parts.values()) if parts else None, reason=reason,
            partitions=frozenset(parts), epochs=dict(parts), lost=lost,
        )

    def _audit(self, action: str, data: dict[str, Any]) -> None:
        audit = self.platform.services.get("audit")
        if audit is None:
            return
        with contextlib.suppress(Exception):
            audit.log(PLUGIN, action, {"node": self.node, **data}, app=self.app.name)


def _counts(rec: dict[str, Any]) -> bool:
    """Whether a lease record makes its node a ring member (eligible, not draining, weight>0)."""
    try:
        w = float(rec.get("weight", 1.0))
    except (TypeError, ValueError):
        return False
    return bool(rec.get("eligible", True)) and not rec.get("draining") and w > 0


def _lease_summary(rec: dict[str, Any]) -> str:
    """What a lease says that matters to the others (incarnation, weight, membership)."""
    return (f"{rec.get('inc')} {rec.get('weight')} {int(bool(rec.get('eligible', True)))} "
            f"{int(bool(rec.get('draining')))}")


def _loads(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _ranges(parts: Iterable[int]) -> str:
    """``0-3,7,9-10`` for log lines."""
    ps = sorted(parts)
    out: list[str] = []
    i = 0
    while i < len(ps):
        j = i
        while j + 1 < len(ps) and ps[j + 1] == ps[j] + 1:
            j += 1
        out.append(str(ps[i]) if i == j else f"{ps[i]}-{ps[j]}")
        i = j + 1
    return ",".join(out) or "-"


def _metrics(platform: Platform) -> dict[str, Any] | None:
    from .plugin import ring_metrics

    return ring_metrics(platform)


__all__ = ["RingContext", "RingMember", "ring_bucket"]
