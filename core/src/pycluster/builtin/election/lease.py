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
* Standbys watch the lease keys (a light push consumer, `natsutil.light_watch`) and also poll,
  because a watcher can go silent when its server dies; watches are re-created after a
  reconnect.
* A graceful step-down deletes the lease (one CAS), optionally naming a successor in a header;
  the others take over at once, deferring briefly to a named successor.
* Records are not trusted blindly (any client that may write the bucket can forge one). A
  record is valid only with a ``Nats-TTL`` header and a body ``{node, epoch, ttl}`` of the
  right types (epoch ``None`` or ``1 <= epoch <= revision``, never below an epoch seen before
  on the key; a TTL at most ``max(60, 10 x lease_ttl)``). A record that stays unchanged on
  this node's monotonic clock for longer than its TTL (this election's ``lease_ttl`` for an
  invalid one) plus ``stale_margin`` is stale: no pycluster holder can still act on it (a
  holder renews before its TTL or self-fences), so it is taken over by compare-and-set
  against its revision. The same holds for a live record that vanished without a tombstone
  (the bucket was deleted and re-created).
* Every lease write carries ``Pycluster-Lease: <incarnation>:<write-no>``. The holder's
  headers-only watch sees every change of its key; a change that is not its own (a raw
  delete, purge or put by another client) fences it at once, before anyone can win the key.
  The renewal's compare-and-set stays the fallback when the watch is silent.
* A deleted bucket is re-created (starting its revisions above those seen, so epochs keep
  increasing) by whichever node notices first.

Standbys report each new revision of a holder's record, and its graceful release, to the
listener (``leader_alive``): failover times are measured from the last one.

Size: one state machine (follow, campaign, hold, release) whose invariants span the whole
class, so it stays in one module (the record format is in `records`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ...kernel import natsutil as nu
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.election import ElectionListener, LeaseState
from .records import LEASE_MARK_HEADER, SUCCESSOR_HEADER, LeaseRecord, Seen, parse_lease

log = logging.getLogger("pycluster.election")


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
        may_campaign: Callable[[], bool] | None = None,
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
        # Asked before every campaign (maintenance mode, cordons, placement): False withholds
        # the campaign; it never affects a lease this node holds.
        self._may_campaign = may_campaign or (lambda: True)
        self.defer_step = defer_step if defer_step is not None else min(1.0, lease_ttl / 4)
        self.successor_grace = (
            successor_grace if successor_grace is not None else min(1.0, lease_ttl / 2)
        )
        self.default_cooldown = cooldown if cooldown is not None else heartbeat_interval
        self.replicas = replicas
        self.incarnation = os.urandom(6).hex()
        #: A live record unchanged for longer than its TTL plus this is stale (taken over).
        self.stale_margin = max(self.fence_margin, 0.1)
        #: The longest TTL a record may claim (a forged "TTL: 10 days" would block the app).
        self.max_record_ttl = max(60.0, 10 * lease_ttl)
        self._seen: dict[str, Seen] = {}
        #: Monotonic time a live holder was last seen: a new revision of a valid record, or our
        #: own win or renewal (health: "no live leader for more than a lease").
        self.leader_seen = time.monotonic()
        self._key_seq: dict[str, int] = {}  # highest revision seen per key
        self._key_epoch: dict[str, int] = {}  # highest valid epoch seen per key
        self._max_seq = 0  # highest revision seen in the bucket (first_seq of a re-creation)
        self._warned: dict[tuple[str, int], str] = {}
        self._healer = nu.Healer(
            f"election {bucket}",
            lambda: nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1,
                                 replicas=self.replicas, wait=2.0, first_seq=self._max_seq + 1),
            interval=max(0.5, self.poll_interval),
        )

        self._listener: ElectionListener | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch_sub: Any = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._step_down_req: tuple[str | None, float] | None = None
        self._step_done: asyncio.Future[None] | None = None
        self._campaign_after = 0.0  # hard: pause_campaign (back-off, health, replaced)
        self._cooldown_until = 0.0  # soft: a step-down's cooldown (see _campaign_delay)
        self._vacant_since: dict[str, tuple[int, float]] = {}  # key -> (revision, since)
        # key -> (tombstone revision, monotonic time from which the key may be taken)
        self._safe_at: dict[str, tuple[int, float]] = {}
        # (key, expected revision) of the last refused campaign write, and how often in a row
        self._refused: tuple[tuple[str, int], int] = (("", -1), 0)
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

    @property
    def stopped(self) -> bool:
        """True once the campaign loop ended (`stop`, or it died)."""
        return self._task is not None and self._task.done()

    def set_listener(self, listener: ElectionListener) -> None:
        """Set the callback receiver."""
        self._listener = listener

    def worst_case_failover(self) -> float:
        """Seconds from a holder's crash until a standby holds the lease, at worst (no NATS
        fault): the server-side TTL since the last renewal, marker detection (poll fallback),
        and priority deferral."""
        return (float(nu.ttl_header(self.lease_ttl)[:-1]) + self.poll_interval
                + min(self.defer_step * 2, self.max_defer))

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the bucket if needed, start watching and campaigning."""
        await nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1, replicas=self.replicas)
        await self._subscribe()
        # Note the current holders before start() returns: a holder that releases right after
        # (a node reported ready, then the leader is stopped) is then known as the releaser
        # and its key taken at once, not only after its lease could have run out.
        for key in self.keys:
            with contextlib.suppress(*nu.TRANSIENT_ERRORS):
                msg = await nu.last_msg(self._js, self.bucket, key)
                if self._note(key, msg, time.monotonic()) is not None and msg is not None:
                    self._validate(key, msg)
        self._task = supervise(f"election:{self.bucket}", self._run, logger=log)

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
        """Release the lease now (if held) and stay out of campaigns for ``cooldown`` s.

        Raises `pycluster.ConfigError` for a cooldown that is negative, not finite, or above
        ``max(60, 10 x lease_ttl)`` (it would leave this node out of the election for good).
        """
        from ...kernel.coordinator import check_step_down

        check_step_down("", self.node_id, {}, None, cooldown, max_cooldown=self.max_cooldown)
        cd = self.default_cooldown if cooldown is None else cooldown
        self.cool_down(time.monotonic() + cd)
        if self._held_key is None:
            return
        loop = asyncio.get_running_loop()
        self._step_done = loop.create_future()
        self._step_down_req = (successor, cd)
        self._wake.set()
        # The release runs in the campaign task; a caller cancelled meanwhile is cancelled (the
        # release goes on), one that waited longer than the lease gets TimeoutError.
        async with asyncio.timeout(self.lease_ttl + 1):
            await asyncio.shield(self._step_done)

    @property
    def max_cooldown(self) -> float:
        """The longest step-down cooldown accepted: ``max(60, 10 x lease_ttl)`` seconds."""
        return max(60.0, 10 * self.lease_ttl)

    def cool_down(self, until: float) -> None:
        """Prefer others until ``until`` (monotonic), as after a step-down: this node still
        takes a key that stayed vacant for a whole lease, so cooldowns on every node (two
        step-down requests in a row) never leave the app leaderless for longer."""
        self._cooldown_until = max(self._cooldown_until, until)

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
                self._check_foreign(msg)
            except Exception:  # never into nats-py's delivery loop
                log.exception("election %s: watch callback failed", self.bucket)

        try:
            self._watch_sub = await nu.light_watch(self._js, subject, on_msg, headers_only=True)
        except Exception as exc:  # polling still works; the next reconnect retries
            log.warning("election %s: watch failed (%s); polling only", self.bucket, exc)
            self._watch_sub = None

    def _is_ours(self, headers: dict[str, str] | None) -> bool:
        mark = (headers or {}).get(LEASE_MARK_HEADER, "")
        inc, _, wno = mark.partition(":")
        return inc == self.incarnation and wno.isdigit() and int(wno) <= self._write_no

    def _check_foreign(self, msg: Msg) -> None:
        """Fence at once when the held key changes and the change is not ours (a raw delete,
        purge or put by another client): whoever wins the key next must not overlap us."""
        key = self._held_key
        if key is None or msg.subject != nu.kv_subject(self.bucket, key):
            return
        seq = msg.metadata.sequence.stream
        if seq <= self._lease_rev or self._is_ours(msg.headers):
            return
        headers = msg.headers or {}
        op = headers.get(nu.KV_OP) or ("MARKER" if headers.get(nu.MARKER_REASON) else "PUT")
        self._lose(key, f"lease changed by another client ({op} at revision {seq}); fenced")

    def _lose(self, key: str, reason: str) -> None:
        """Drop the held lease and tell the listener (once, whoever notices first)."""
        if self._held_key != key:
            return
        epoch = self._epoch or 0
        self._drop_lease()
        self._notify_lost(key, epoch, reason)
        self._wake.set()

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
        last_error, logged_at = "", -math.inf
        while not self._stopping:
            try:
                if self._held_key is not None:
                    await self._lead()
                else:
                    await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # One traceback per distinct error a minute, not one per poll.
                error = f"{type(exc).__name__}: {exc}"
                if error != last_error or time.monotonic() - logged_at > 60:
                    log.exception("election %s: unexpected error; retrying", self.bucket)
                    last_error, logged_at = error, time.monotonic()
                else:
                    log.debug("election %s: %s again", self.bucket, error)
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
        observed: tuple[str | None, int | None, str | None] | None = None
        # With a watch, a live holder's renewals wake us: no read is needed until a renewal is
        # overdue (a heartbeat plus a poll after the last new revision), from then on we poll
        # every `poll_interval` as without a watch. A crash is thus seen as soon as before
        # (its lease outlives the heartbeat), while an idle standby reads once per renewal
        # instead of every poll; a silent watch costs at most a heartbeat more for a release.
        watching = self._watch_sub is not None
        quiet = self.heartbeat_interval + self.poll_interval
        wait = self.lease_ttl if watching else self.poll_interval
        try:
            for key in self.keys:
                msg = await nu.last_msg(self._js, self.bucket, key)
                now = time.monotonic()
                seen = self._note(key, msg, now)
                if msg is None or msg.tombstone:
                    if msg is None and seen is not None and now - seen.since <= seen.limit:
                        # A live record vanished without a tombstone (the bucket was deleted
                        # and re-created): its holder may still act until its TTL is over.
                        wait = min(wait, seen.since + seen.limit - now, self.poll_interval)
                        if seen.leader is not None and (observed is None or key == "leader"):
                            observed = (seen.leader, seen.epoch, key)
                        continue
                    self._vacated(key, msg, seen, now)
                    self._seen.pop(key, None)
                    vacant.append((key, msg))
                    continue
                assert seen is not None
                self._vacant_since.pop(key, None)
                rec = self._validate(key, msg)
                if isinstance(rec, LeaseRecord) and rec.node == self.node_id \
                        and rec.inc == self.incarnation and rec.write_no in self._pending:
                    # Our write landed but its ack was lost: adopt it with its send time.
                    self._take(key, msg.seq, rec.epoch, self._pending[rec.write_no])
                    return
                if now - seen.since > seen.limit:
                    vacant.append((key, msg))  # stale: no holder can still act on it
                    continue
                wait = min(wait, seen.since + seen.limit - now)
                if not watching or not isinstance(rec, LeaseRecord):
                    wait = min(wait, self.poll_interval)
                else:
                    wait = min(wait, max(seen.since + quiet - now, self.poll_interval))
                if isinstance(rec, LeaseRecord):
                    self.leader_seen = max(self.leader_seen, seen.since)
                    if seen.since == now:  # a revision first seen now: its holder renewed
                        self._notify_alive(rec.node, rec.epoch)
                    if observed is None or key == "leader":
                        observed = (rec.node, rec.epoch, key)
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("election %s: read failed: %s", self.bucket, exc)
            if nu.stream_gone(exc):
                await self._heal()
            await self._sleep(self.poll_interval)
            return
        if vacant:
            wait = min(wait, self.poll_interval)
        if observed is not None:
            self._observe(*observed)
        elif vacant:
            self._observe(None, None, None)

        if vacant and not self.no_failover and not self._stopping and self._may_campaign():
            key, msg = vacant[0]
            delay = self._campaign_delay(key, msg)
            if delay <= 0:
                if await self._acquire(key, msg.seq if msg else 0):
                    return
                return  # lost the race or failed: re-read at once
            await self._sleep(min(delay, self.poll_interval))
            return
        await self._sleep(max(0.01, wait + 0.01))

    def _note(self, key: str, msg: nu.LastMsg | None, now: float) -> Seen | None:
        """Track revisions of ``key``: when a live message was first seen, a re-created
        bucket (revisions going backwards). Returns the key's entry (None: nothing live)."""
        if msg is not None:
            if msg.seq < self._key_seq.get(key, 0):
                log.warning("election %s: revisions of %s went back from %d to %d: the bucket "
                            "was re-created", self.bucket, key, self._key_seq[key], msg.seq)
                self._key_epoch.pop(key, None)
            self._key_seq[key] = msg.seq
            self._max_seq = max(self._max_seq, msg.seq)
        seen = self._seen.get(key)
        if msg is None or msg.tombstone:
            return seen
        if seen is None or seen.seq != msg.seq:
            seen = Seen(msg.seq, now, self.lease_ttl + self.stale_margin, None, None)
            self._seen[key] = seen
        return seen

    def _vacated(self, key: str, msg: nu.LastMsg | None, seen: Seen | None, now: float) -> None:
        """Decide from when a vacant key may be taken.

        At once after a server expiry (the holder's lease ended on its own clock first) or a
        release by the holder whose record we saw (its delete carries its incarnation). Any
        other tombstone — a delete or purge by another client, or one whose writer we never
        saw — may hide a holder that has not noticed yet (its watch can lag, e.g. under a
        flood): wait until that holder's lease would have run out, as after a crash.
        """
        seq = msg.seq if msg is not None else 0
        known = self._safe_at.get(key)
        if known is not None and known[0] == seq:
            return
        headers = msg.headers if msg is not None else {}
        inc = headers.get(LEASE_MARK_HEADER, "").partition(":")[0]
        if msg is None or headers.get(nu.MARKER_REASON) == "MaxAge":
            safe = now
        elif seen is not None and seen.inc is not None and inc == seen.inc:
            safe = now
            self._notify_alive(seen.leader, seen.epoch)  # released by its holder: alive
        elif seen is not None:
            safe = seen.since + seen.limit
            log.warning("election %s: %s was emptied by another client (revision %d); taking "
                        "it only after its holder's lease ran out (%.1fs)", self.bucket, key,
                        seq, max(0.0, safe - now))
        else:
            safe = now + self.lease_ttl + self.stale_margin
        self._safe_at[key] = (seq, safe)

    def _validate(self, key: str, msg: nu.LastMsg) -> LeaseRecord | str:
        """`parse_lease` plus: the epoch never goes below one seen before on this key.
        Sets the key's stale limit; a problem is logged once per record."""
        rec = parse_lease(msg, self.max_record_ttl)
        if isinstance(rec, LeaseRecord) and rec.epoch < self._key_epoch.get(key, 0):
            rec = (f"epoch {rec.epoch} is below epoch {self._key_epoch[key]} seen before on "
                   "this key")
        seen = self._seen[key]
        if isinstance(rec, str):
            seen.limit, seen.leader, seen.epoch = self.lease_ttl + self.stale_margin, None, None
            if (key, msg.seq) not in self._warned:
                if len(self._warned) > 64:
                    self._warned.clear()
                self._warned[(key, msg.seq)] = rec
                log.warning("election %s: ignoring the record of %s at revision %d (%s); taken "
                            "over if it stays unchanged for %.1fs", self.bucket, key, msg.seq,
                            rec, seen.limit)
            return rec
        self._key_epoch[key] = max(self._key_epoch.get(key, 0), rec.epoch)
        seen.limit, seen.leader, seen.epoch = rec.ttl + self.stale_margin, rec.node, rec.epoch
        seen.inc = rec.inc
        return rec

    async def _heal(self, timeout: float | None = None) -> None:
        """The bucket is gone: re-create it (revisions above those seen) and re-watch; the
        attempt is bounded by ``timeout`` when given."""
        if await self._healer.heal(timeout):
            await self._unsubscribe()
            await self._subscribe()

    def _campaign_delay(self, key: str, msg: nu.LastMsg | None) -> float:
        now = time.monotonic()
        seq = msg.seq if msg is not None else 0
        vacant = self._vacant_since.get(key)
        if vacant is None or (seq and vacant[0] != seq):  # a marker may expire to nothing
            vacant = self._vacant_since[key] = (seq, now)
        soft = min(self._cooldown_until, vacant[1] + self.lease_ttl) - now
        safe = self._safe_at.get(key)
        hard = max(self._campaign_after, safe[1] if safe is not None else 0.0) - now
        delay = max(hard, soft)
        if msg is not None and msg.headers.get(nu.KV_OP) == "DEL":
            successor = msg.headers.get(SUCCESSOR_HEADER)
            seen = self._tomb_seen.get(key)
            if seen is None or seen[0] != msg.seq:
                seen = (msg.seq, now)
                self._tomb_seen[key] = seen
            if successor and successor != self.node_id:
                delay = max(delay, seen[1] + self.successor_grace - now)
            if successor == self.node_id:
                # The named successor goes first, even in a cooldown (not in a hard pause).
                return hard
        rank = self._rank()
        if rank > 0:
            seen = self._tomb_seen.setdefault(key, (msg.seq if msg else 0, now))
            delay = max(delay, seen[1] + min(rank * self.defer_step, self.max_defer) - now)
        return delay

    @property
    def max_defer(self) -> float:
        """The longest priority deferral: below half a lease, however many higher-priority
        standbys the membership shows (records can be forged)."""
        return 0.45 * self.lease_ttl

    def _mark(self, wno: int) -> dict[str, str]:
        return {LEASE_MARK_HEADER: f"{self.incarnation}:{wno}"}

    async def _acquire(self, key: str, expected: int) -> bool:
        payload, wno = self._encode(key)
        sent = time.monotonic()
        self._pending[wno] = sent
        try:
            rev = await nu.cas_publish(
                self._js, self.bucket, key, payload, expected_seq=expected, ttl=self.lease_ttl,
                timeout=max(self.heartbeat_interval, 0.5), extra_headers=self._mark(wno),
            )
        except nu.CASConflict:
            self._pending.pop(wno, None)
            # A lost race is re-read at once; the same revision refused again and again means a
            # server that is behind or cut off (a stale stream leader): back off, doubling.
            again = self._refused if self._refused[0] == (key, expected) else ((key, expected), 0)
            self._refused = (again[0], again[1] + 1)
            if again[1] > 0:
                await self._sleep(min(self.poll_interval, 0.005 * 2 ** again[1]))
            return False
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("election %s: campaign write failed: %s", self.bucket, exc)
            if nu.stream_gone(exc):
                await self._heal()
            await self._sleep(self.poll_interval)
            return False
        self._pending.clear()
        self._take(key, rev, rev, sent)
        return True

    def _take(self, key: str, rev: int, epoch: int, sent: float) -> None:
        self._pending.clear()
        self._seen.pop(key, None)
        self._vacant_since.pop(key, None)
        self._safe_at.pop(key, None)
        self._key_seq[key] = rev
        self._key_epoch[key] = max(self._key_epoch.get(key, 0), epoch)
        self._max_seq = max(self._max_seq, rev)
        self._held_key = key
        self._lease_rev = rev
        self._epoch = epoch
        self.leader_seen = time.monotonic()
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
        """Hold the lease: renew every heartbeat; fence at the local deadline, or at once when
        the watch shows a foreign change of the key (`_check_foreign`)."""
        key = self._held_key
        assert key is not None
        next_renew = self._deadline + self.fence_margin - self.lease_ttl + self.heartbeat_interval
        while not self._stopping:
            self._wake.clear()  # before the checks: a step-down request after them wakes us
            if self._held_key != key:  # fenced by the watch
                self._finish_step_down()
                return
            now = time.monotonic()
            if now >= self._deadline:
                self._lose(key, "lease not renewed in time (self-fenced)")
                return
            if self._step_down_req is not None:
                successor, _ = self._step_down_req
                self._step_down_req = None
                await self._release(successor)
                self._lose(key, "stepped down")
                self._finish_step_down()
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
                    extra_headers=self._mark(wno),
                )
            except nu.CASConflict:
                adopted = await self._adopt_landed_renewal(key)
                if adopted is None:
                    self._lose(key, "lease taken over (renewal conflict)")
                    return
                rev, sent = adopted
            except nu.TRANSIENT_ERRORS as exc:
                log.warning("election %s: renewal failed (%s); %.2fs of lease left",
                            self.bucket, type(exc).__name__, self._deadline - time.monotonic())
                if nu.stream_gone(exc) and self._deadline > time.monotonic():
                    # The next renewal then conflicts and the lease is lost; a server cut off
                    # from the stream's leader says the same, so the attempt is bounded by the
                    # lease: it must never hold this loop past the self-fence deadline.
                    await self._heal(self._deadline - time.monotonic())
                next_renew = time.monotonic() + min(self.heartbeat_interval / 3, 0.5)
                continue
            if self._held_key != key:
                continue  # fenced while the renewal was in flight
            self._pending.clear()
            self._lease_rev = rev
            self._key_seq[key] = rev
            self._max_seq = max(self._max_seq, rev)
            self._deadline = sent + self.lease_ttl - self.fence_margin
            self.leader_seen = max(self.leader_seen, sent)
            next_renew = sent + self.heartbeat_interval
            self._notify_renewed()
        self._finish_step_down()

    def _finish_step_down(self) -> None:
        if self._step_done is not None and not self._step_done.done():
            self._step_done.set_result(None)

    async def _adopt_landed_renewal(self, key: str) -> tuple[int, float] | None:
        """After a renewal conflict: if the last write is one of ours whose ack was lost (a
        timed-out renewal that did land), continue from it; its send time bounds the lease."""
        try:
            msg = await nu.last_msg(self._js, self.bucket, key)
        except nu.TRANSIENT_ERRORS:
            return None
        if msg is None or msg.tombstone:
            return None
        rec = parse_lease(msg, self.max_record_ttl)
        if not isinstance(rec, LeaseRecord) or rec.inc != self.incarnation \
                or rec.node != self.node_id or rec.write_no is None:
            return None
        sent = self._pending.get(rec.write_no)
        if sent is None or time.monotonic() >= sent + self.lease_ttl - self.fence_margin:
            return None
        log.info("election %s: adopted renewal %s whose ack was lost", self.bucket, rec.write_no)
        return msg.seq, sent

    def _notify_renewed(self) -> None:
        if self._listener is not None:
            self._listener.renewed(self._deadline)

    def _notify_alive(self, leader: str | None, epoch: int | None) -> None:
        """A sign of life of another holder (a new revision of its record, its release)."""
        if self._listener is not None and leader is not None and leader != self.node_id:
            self._listener.leader_alive(leader, epoch)

    async def _release(self, successor: str | None) -> None:
        self._write_no += 1
        headers = self._mark(self._write_no)
        if successor:
            headers[SUCCESSOR_HEADER] = successor
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
