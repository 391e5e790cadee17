"""Leader election on a NATS KV lease, with fencing.

One `LeaseElection` campaigns for one of a set of lease keys in the app's election bucket
``{platform}_{app}_election`` (``["leader"]`` for a Singleton, ``slot-0..n-1`` for
``Replicas(n)``) and holds at most one of them.

Behaviour, and why (see docs/concepts.md, "Election"):

* A lease is a KV message written with ``Nats-Expected-Last-Subject-Sequence`` (compare-and-set)
  and ``Nats-TTL``; renewals are the same write against the holder's last revision. (``kv.update``
  would silently drop the TTL.) The bucket has history 1 and expiry markers, so an expired
  lease becomes a marker that watchers see within milliseconds and a takeover is a CAS against
  the marker's sequence.
* The epoch (fencing token) is the stream revision of the write that won the lease: strictly
  increasing across leader changes, with no extra round trip.
* Leadership is decided locally from successful renewals: a lease is valid until
  ``send_time_of_last_successful_renewal + lease_ttl - fence_margin`` on this process's
  monotonic clock. The server cannot expire it before ``send_time + ceil(lease_ttl)``, so the
  holder stops acting as leader (self-fences) before anyone else can win. KV reads are never
  trusted for leadership (a partitioned server serves stale reads).
* Under connection loss the holder keeps retrying renewals until its local deadline, then
  fences. A paused (SIGSTOP) holder that resumes past its deadline is not leader
  (`is_leader` checks the clock on every call) and must win again, with a new epoch.
* Standbys watch the lease keys (an ordered consumer) and also poll, because a watcher can go
  silent when its server dies; watches are re-created after a reconnect.
* A graceful step-down deletes the lease (one CAS), optionally naming a successor in a header;
  the others take over at once, deferring briefly to a named successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from . import natsutil as nu
from .aio import cancel_and_wait

log = logging.getLogger("pycluster.election")

SUCCESSOR_HEADER = "Pycluster-Successor"


@dataclass
class LeaseState:
    """What an election knows right now (a snapshot, safe to hand out)."""

    key: str | None
    leader: str | None
    epoch: int | None
    is_leader: bool


class Election(Protocol):
    """What the core needs from an election implementation (provided through
    `pycluster.hookspecs.pycluster_election`)."""

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

    def set_listener(self, listener: ElectionListener) -> None:
        """Receive elected/lost/observed callbacks."""

    async def start(self) -> None:
        """Start campaigning (returns at once; the work runs in a task)."""

    async def stop(self, release: bool = True) -> None:
        """Stop campaigning; release the lease if held (hand over at once)."""

    async def step_down(self, successor: str | None = None, cooldown: float | None = None) -> None:
        """Give up the lease now; do not campaign again for ``cooldown`` seconds."""

    def pause_campaign(self, until: float) -> None:
        """Do not campaign before monotonic time ``until`` (back-off after a failed activation)."""

    def lease_deadline(self) -> float | None:
        """Monotonic time after which this node no longer holds the lease (None if not leader)."""


class ElectionListener(Protocol):
    """Callbacks an election makes; all are synchronous and must not block."""

    def elected(self, key: str, epoch: int) -> None:
        """This node won ``key`` with ``epoch``."""

    def lost(self, key: str, epoch: int, reason: str) -> None:
        """This node no longer holds ``key`` (stepped down, taken over, or fenced)."""

    def observed(self, leader: str | None, epoch: int | None) -> None:
        """The holder seen by this node changed (may be None: vacant)."""

    # Optional: ``renewed(deadline: float)`` — called when the lease was won or renewed, with
    # the new local lease deadline (monotonic); used to feed fence guards and the watchdog.


class LeaseElection:
    """The NATS KV lease election (the core default of the election hook).

    Example::

        election = LeaseElection(nc, js, "prod_convex_election", node_id="n1",
                                 lease_ttl=10, heartbeat_interval=3)
        election.set_listener(listener)
        await election.start()
    """

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        bucket: str,
        node_id: str,
        *,
        keys: list[str] | None = None,
        lease_ttl: float = 10.0,
        heartbeat_interval: float = 3.0,
        fence_margin: float | None = None,
        poll_interval: float | None = None,
        no_failover: bool = False,
        rank: Callable[[], int] | None = None,
        defer_step: float | None = None,
        successor_grace: float | None = None,
        cooldown: float | None = None,
        replicas: int = 1,
    ) -> None:
        self._nc = nc
        self._js = js
        self.bucket = bucket
        self.node_id = node_id
        self.keys = keys or ["leader"]
        self.lease_ttl = lease_ttl
        self.heartbeat_interval = heartbeat_interval
        self.fence_margin = fence_margin if fence_margin is not None else max(0.1 * lease_ttl, 0.05)
        self.poll_interval = poll_interval or min(0.5, heartbeat_interval)
        self.no_failover = no_failover
        self._rank = rank or (lambda: 0)
        self.defer_step = defer_step if defer_step is not None else min(1.0, lease_ttl / 4)
        self.successor_grace = (
            successor_grace if successor_grace is not None else min(1.0, lease_ttl / 2)
        )
        self.default_cooldown = cooldown if cooldown is not None else heartbeat_interval
        self.replicas = replicas
        self.incarnation = os.urandom(6).hex()

        self._listener: ElectionListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch_sub: Any = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._step_down_req: tuple[str | None, float] | None = None
        self._step_done: asyncio.Future[None] | None = None
        self._campaign_after = 0.0
        self._write_no = 0
        self._pending: dict[int, float] = {}  # write number -> send time (adopt a lost ack)
        self._tomb_seen: dict[str, tuple[int, float]] = {}

        # Held lease.
        self._held_key: str | None = None
        self._lease_rev = 0
        self._epoch: int | None = None
        self._deadline = 0.0
        # Observed holder.
        self._obs_leader: str | None = None
        self._obs_epoch: int | None = None
        self._obs_key: str | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """True only while the local lease deadline has not passed."""
        return self._held_key is not None and time.monotonic() < self._deadline

    @property
    def leader(self) -> str | None:
        """This node when leader, else the last observed holder."""
        return self.node_id if self.is_leader else self._obs_leader

    @property
    def epoch(self) -> int | None:
        """The fencing token."""
        return self._epoch if self.is_leader else self._obs_epoch

    @property
    def key(self) -> str | None:
        """The key held, or last observed."""
        return self._held_key if self.is_leader else self._obs_key

    def lease_deadline(self) -> float | None:
        """Monotonic instant at which this node's lease ends locally."""
        return self._deadline if self._held_key is not None else None

    def state(self) -> LeaseState:
        """A snapshot."""
        return LeaseState(self.key, self.leader, self.epoch, self.is_leader)

    def set_listener(self, listener: ElectionListener) -> None:
        """Set the callback receiver."""
        self._listener = listener

    def worst_case_failover(self) -> float:
        """Seconds from a holder's crash until a standby holds the lease, at worst (no NATS
        fault): the server-side TTL since the last renewal, marker detection (poll fallback),
        and priority deferral."""
        return float(nu.ttl_header(self.lease_ttl)[:-1]) + self.poll_interval + self.defer_step * 2

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the bucket if needed, start watching and campaigning."""
        await nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1, replicas=self.replicas)
        await self._subscribe()
        self._task = asyncio.create_task(self._run(), name=f"election:{self.bucket}")

    async def stop(self, release: bool = True) -> None:
        """Stop; a held lease is deleted (handover at once) unless ``release`` is False."""
        self._stopping = True
        self._wake.set()
        await cancel_and_wait(self._task)
        if self._held_key is not None:
            key, epoch = self._held_key, self._epoch or 0
            if release:
                await self._release(None)
            self._drop_lease()
            self._notify_lost(key, epoch, "stopped")
        await self._unsubscribe()

    async def step_down(self, successor: str | None = None, cooldown: float | None = None) -> None:
        """Release the lease now (if held) and stay out of campaigns for ``cooldown`` s."""
        cd = self.default_cooldown if cooldown is None else cooldown
        self._campaign_after = max(self._campaign_after, time.monotonic() + cd)
        if self._held_key is None:
            return
        loop = asyncio.get_running_loop()
        self._step_done = loop.create_future()
        self._step_down_req = (successor, cd)
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._step_done), self.lease_ttl + 1)

    def pause_campaign(self, until: float) -> None:
        """Do not campaign before ``until`` (monotonic)."""
        self._campaign_after = max(self._campaign_after, until)

    async def reconnected(self) -> None:
        """Re-create the watch after a NATS reconnect (watchers can silently die)."""
        await self._unsubscribe()
        with contextlib.suppress(Exception):
            await self._subscribe()
        self._wake.set()

    # -- watching ------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        subject = nu.kv_subject(self.bucket, self.keys[0] if len(self.keys) == 1 else ">")

        async def on_msg(msg: Msg) -> None:
            self._wake.set()

        try:
            self._watch_sub = await self._js.subscribe(
                subject,
                cb=on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                headers_only=True,
                idle_heartbeat=2.0,
            )
        except Exception as exc:  # polling still works; the next reconnect retries
            log.warning("election %s: watch failed (%s); polling only", self.bucket, exc)
            self._watch_sub = None

    async def _unsubscribe(self) -> None:
        sub, self._watch_sub = self._watch_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early on a watch event or a step-down request.

        The event is cleared by the callers *before* they read the state they decide on, never
        here: an event that arrived while they were reading must cut this sleep short (clearing
        here lost a lease deletion seen mid-read, and a standby then slept a whole poll).
        """
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    # -- main loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self._held_key is not None:
                    await self._lead()
                else:
                    await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("election %s: unexpected error; retrying", self.bucket)
                await asyncio.sleep(self.poll_interval)

    def _encode(self, key: str) -> tuple[bytes, int]:
        self._write_no += 1
        body = {
            "node": self.node_id,
            "inc": self.incarnation,
            "w": self._write_no,
            "epoch": self._epoch if self._held_key == key else None,
            "ttl": self.lease_ttl,
        }
        return json.dumps(body, separators=(",", ":")).encode(), self._write_no

    async def _follow(self) -> None:
        """One round as a non-holder: read every key, adopt/observe, maybe campaign, wait."""
        self._wake.clear()  # before reading: a change during the reads wakes the sleep below
        vacant: list[tuple[str, nu.LastMsg | None]] = []
        observed: tuple[str | None, int | None, str | None] = (None, None, None)
        try:
            for key in self.keys:
                msg = await nu.last_msg(self._js, self.bucket, key)
                if msg is None or msg.tombstone:
                    vacant.append((key, msg))
                    continue
                try:
                    body = json.loads(msg.data)
                except ValueError:
                    body = {}
                if (
                    body.get("node") == self.node_id
                    and body.get("inc") == self.incarnation
                    and body.get("w") in self._pending
                ):
                    # Our write landed but its ack was lost: adopt it with its send time.
                    sent = self._pending[body["w"]]
                    epoch = body.get("epoch") or msg.seq
                    self._take(key, msg.seq, epoch, sent)
                    return
                if observed[0] is None or key == "leader":
                    observed = (body.get("node"), body.get("epoch") or msg.seq, key)
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("election %s: read failed: %s", self.bucket, exc)
            await self._sleep(self.poll_interval)
            return
        self._observe(*observed)

        if vacant and not self.no_failover and not self._stopping:
            key, msg = vacant[0]
            delay = self._campaign_delay(key, msg)
            if delay <= 0:
                if await self._acquire(key, msg.seq if msg else 0):
                    return
                return  # lost the race or failed: re-read at once
            await self._sleep(min(delay, self.poll_interval))
            return
        await self._sleep(self.poll_interval)

    def _campaign_delay(self, key: str, msg: nu.LastMsg | None) -> float:
        now = time.monotonic()
        delay = self._campaign_after - now
        if msg is not None and msg.headers.get(nu.KV_OP) == "DEL":
            successor = msg.headers.get(SUCCESSOR_HEADER)
            seen = self._tomb_seen.get(key)
            if seen is None or seen[0] != msg.seq:
                seen = (msg.seq, now)
                self._tomb_seen[key] = seen
            if successor and successor != self.node_id:
                delay = max(delay, seen[1] + self.successor_grace - now)
            if successor == self.node_id:
                return 0.0  # the named successor goes first, even in a cooldown
        rank = self._rank()
        if rank > 0:
            seen = self._tomb_seen.setdefault(key, (msg.seq if msg else 0, now))
            delay = max(delay, seen[1] + rank * self.defer_step - now)
        return delay

    async def _acquire(self, key: str, expected: int) -> bool:
        payload, wno = self._encode(key)
        sent = time.monotonic()
        self._pending[wno] = sent
        try:
            rev = await nu.cas_publish(
                self._js, self.bucket, key, payload, expected_seq=expected, ttl=self.lease_ttl,
                timeout=max(self.heartbeat_interval, 0.5),
            )
        except nu.CASConflict:
            self._pending.pop(wno, None)
            return False
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("election %s: campaign write failed: %s", self.bucket, exc)
            await self._sleep(self.poll_interval)
            return False
        self._pending.clear()
        self._take(key, rev, rev, sent)
        return True

    def _take(self, key: str, rev: int, epoch: int, sent: float) -> None:
        self._pending.clear()
        self._held_key = key
        self._lease_rev = rev
        self._epoch = epoch
        self._deadline = sent + self.lease_ttl - self.fence_margin
        self._obs_leader, self._obs_epoch, self._obs_key = self.node_id, epoch, key
        log.info("election %s: %s won %s (epoch %d)", self.bucket, self.node_id, key, epoch)
        if self._listener is not None:
            self._listener.elected(key, epoch)
        if self._listener is not None:
            self._listener.observed(self.node_id, epoch)
        self._notify_renewed()

    def _drop_lease(self) -> None:
        self._held_key = None
        self._deadline = 0.0

    def _notify_lost(self, key: str, epoch: int, reason: str) -> None:
        log.info("election %s: %s lost %s (epoch %d): %s", self.bucket, self.node_id, key,
                 epoch, reason)
        if self._listener is not None:
            self._listener.lost(key, epoch, reason)

    def _observe(self, leader: str | None, epoch: int | None, key: str | None) -> None:
        if (leader, epoch) != (self._obs_leader, self._obs_epoch):
            self._obs_leader, self._obs_epoch, self._obs_key = leader, epoch, key
            if self._listener is not None:
                self._listener.observed(leader, epoch)

    async def _lead(self) -> None:
        """Hold the lease: renew every heartbeat; fence at the local deadline."""
        key = self._held_key
        assert key is not None
        epoch = self._epoch or 0
        next_renew = self._deadline + self.fence_margin - self.lease_ttl + self.heartbeat_interval
        while not self._stopping:
            self._wake.clear()  # before the checks: a step-down request after them wakes us
            now = time.monotonic()
            if now >= self._deadline:
                self._drop_lease()
                self._notify_lost(key, epoch, "lease not renewed in time (self-fenced)")
                return
            if self._step_down_req is not None:
                successor, _ = self._step_down_req
                self._step_down_req = None
                await self._release(successor)
                self._drop_lease()
                self._notify_lost(key, epoch, "stepped down")
                if self._step_done is not None and not self._step_done.done():
                    self._step_done.set_result(None)
                return
            if now < next_renew:
                await self._sleep(min(next_renew, self._deadline) - now)
                continue
            payload, wno = self._encode(key)
            sent = time.monotonic()  # no await between the deadline check and this instant
            self._pending[wno] = sent
            try:
                rev = await nu.cas_publish(
                    self._js, self.bucket, key, payload, expected_seq=self._lease_rev,
                    ttl=self.lease_ttl,
                    timeout=max(0.05, min(self.heartbeat_interval, self._deadline - sent)),
                )
            except nu.CASConflict:
                adopted = await self._adopt_landed_renewal(key)
                if adopted is None:
                    self._drop_lease()
                    self._notify_lost(key, epoch, "lease taken over (renewal conflict)")
                    return
                rev, sent = adopted
            except nu.TRANSIENT_ERRORS as exc:
                log.warning("election %s: renewal failed (%s); %.2fs of lease left",
                            self.bucket, type(exc).__name__, self._deadline - time.monotonic())
                next_renew = time.monotonic() + min(self.heartbeat_interval / 3, 0.5)
                continue
            self._pending.clear()
            self._lease_rev = rev
            self._deadline = sent + self.lease_ttl - self.fence_margin
            next_renew = sent + self.heartbeat_interval
            self._notify_renewed()

    async def _adopt_landed_renewal(self, key: str) -> tuple[int, float] | None:
        """After a renewal conflict: if the last write is one of ours whose ack was lost (a
        timed-out renewal that did land), continue from it; its send time bounds the lease."""
        try:
            msg = await nu.last_msg(self._js, self.bucket, key)
        except nu.TRANSIENT_ERRORS:
            return None
        if msg is None or msg.tombstone:
            return None
        try:
            body = json.loads(msg.data)
        except ValueError:
            return None
        sent = self._pending.get(body.get("w")) if body.get("inc") == self.incarnation else None
        if sent is None or time.monotonic() >= sent + self.lease_ttl - self.fence_margin:
            return None
        log.info("election %s: adopted renewal %s whose ack was lost", self.bucket, body["w"])
        return msg.seq, sent

    def _notify_renewed(self) -> None:
        renewed = getattr(self._listener, "renewed", None)
        if renewed is not None:
            renewed(self._deadline)

    async def _release(self, successor: str | None) -> None:
        headers = {SUCCESSOR_HEADER: successor} if successor else None
        key = self._held_key
        if key is None:
            return
        try:
            await nu.cas_delete(
                self._js, self.bucket, key, expected_seq=self._lease_rev,
                timeout=max(0.2, min(2.0, self._deadline - time.monotonic())),
                extra_headers=headers,
            )
        except nu.CASConflict:
            pass  # already taken over or expired: nothing to release
        except nu.TRANSIENT_ERRORS as exc:
            log.warning("election %s: release failed (%s); the lease will expire",
                        self.bucket, exc)
