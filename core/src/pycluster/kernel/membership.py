"""Membership: each node's record in ``{platform}_platform`` under ``nodes.{node_id}``.

The record (id, labels, address, version, plugin set, apps, started) is written like a lease:
compare-and-set plus ``Nats-TTL``, refreshed every half TTL (at once when it changes; a failed
refresh is retried after a heartbeat), so a crashed node's record expires one TTL after its
last refresh and a graceful leave deletes it. Other nodes watch ``nodes.>`` and raise
``on_member_join`` / ``on_member_leave`` (and tell the node of a member's changed record:
placement re-evaluates then). The watch is the steady state: an idle node reads no
records. It is checked every heartbeat by this node's own record (each refresh must come back
through the watch within a heartbeat; if not, the watch went silent: it is re-created and every
record read), and every record is read again after a reconnect and every
``reconcile_interval`` (15 s; two seconds per member on larger platforms) as a slow
reconciliation.

A second process starting with a node id whose record is alive asks that process over NATS
whether it is running (``{platform}._.node.{node_id}.ping``); if the process named by the
record (its incarnation) answers, the start is refused with `DuplicateNodeError`; if not (a
crashed process whose record has not expired yet, or a reply from someone else), the new
process takes the record over.

A process whose record was overwritten by another incarnation (it was paused or cut off too
long, or someone forged its record) confirms the takeover before it leaves: it pings its own
node id and requires a pong with the new record's incarnation, i.e. a real second process. If
nobody answers for it the record is taken back by compare-and-set and the node stays;
otherwise ``on_replaced`` is called (the platform leaves and ``pycluster run`` exits non-zero).

Records are validated (`validate_member`): a record that is not a JSON object of the
expected shape or has no ``Nats-TTL`` header is ignored (logged once), so a forged record
cannot steer priorities, placement or routing; one that has not changed for longer than its
TTL does not count for priorities (`alive`). A deleted bucket is re-created and this node's
record written again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from . import natsutil as nu
from .aio import TaskSet, sleep_aligned
from .control import no_responders
from .errors import DuplicateNodeError
from .names import platform_subject

if TYPE_CHECKING:
    from .control import ControlPlane

log = logging.getLogger("pycluster.membership")

NODE_PREFIX = "nodes."
PRIORITY_LIMIT = 1_000_000
"""Priorities are ints in ``-PRIORITY_LIMIT..PRIORITY_LIMIT`` (a record outside is invalid)."""
_RETRYABLE: tuple[type[BaseException], ...] = (nu.CASConflict, *nu.TRANSIENT_ERRORS)
_MAX_LABELS = 256
_MAX_APPS = 1024


def _ttl_of(headers: Mapping[str, str]) -> float | None:
    return nu.parse_ttl_header(headers.get(nu.TTL_HEADER))


def validate_member(node: str, rec: Any, headers: Mapping[str, str] | None,
                    max_ttl: float) -> str | None:
    """Why the record of ``node`` is not a valid membership record (None: valid).

    Valid: a JSON object with ``node_id`` = ``node``, a string ``incarnation``, ``labels`` a
    str -> str mapping, ``apps`` a mapping of app name -> ``{eligible: bool, no_failover:
    bool, priority: int in ±PRIORITY_LIMIT, role: str, mode: str, epoch: int|None, leader:
    str|None}``, and (``headers`` given) a ``Nats-TTL`` header of at most ``max_ttl``.
    """
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    if rec.get("node_id") != node:
        return f"node_id {str(rec.get('node_id'))[:70]!r} is not {node!r}"
    if not isinstance(rec.get("incarnation"), str) or not rec["incarnation"]:
        return "no incarnation"
    if headers is not None:
        ttl = _ttl_of(headers)
        if ttl is None:
            return "no valid Nats-TTL header"
        if ttl > max_ttl:
            return f"TTL {ttl:g}s exceeds the cap of {max_ttl:g}s"
    labels = rec.get("labels", {})
    if not isinstance(labels, dict) or len(labels) > _MAX_LABELS or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        return "labels are not a mapping of strings to strings"
    apps = rec.get("apps", {})
    if not isinstance(apps, dict) or len(apps) > _MAX_APPS:
        return "apps is not a mapping"
    for name, a in apps.items():
        if not isinstance(a, dict):
            return f"app {str(name)[:64]!r} is not a mapping"
        prio = a.get("priority", 0)
        if isinstance(prio, bool) or not isinstance(prio, int) or abs(prio) > PRIORITY_LIMIT:
            return f"app {str(name)[:64]!r}: priority {str(prio)[:32]!r} is not an int within " \
                   f"±{PRIORITY_LIMIT}"
        for field in ("eligible", "no_failover"):
            if not isinstance(a.get(field, False), bool):
                return f"app {str(name)[:64]!r}: {field} is not a boolean"
        for field in ("role", "mode"):
            if not isinstance(a.get(field, ""), str):
                return f"app {str(name)[:64]!r}: {field} is not a string"
        epoch = a.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            return f"app {str(name)[:64]!r}: epoch is not an int"
        if a.get("leader") is not None and not isinstance(a.get("leader"), str):
            return f"app {str(name)[:64]!r}: leader is not a string"
    if not isinstance(rec.get("plugins", {}), dict):
        return "plugins is not a mapping"
    return None


class Membership:
    """This node's record plus the view of every live member."""

    def __init__(
        self,
        nc: NATS,
        js: JetStreamContext,
        platform: str,
        node_id: str,
        *,
        ttl: float,
        heartbeat: float,
        record: Callable[[], dict[str, Any]],
        on_join: Callable[[dict[str, Any]], None],
        on_leave: Callable[[dict[str, Any]], None],
        on_replaced: Callable[[], None],
        poll_interval: float = 1.0,
        reconcile_interval: float = 15.0,
        replicas: int = 1,
        control: ControlPlane | None = None,
        on_restored: Callable[[dict[str, Any]], None] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self.platform = platform
        self.node_id = node_id
        self.bucket = f"{platform}_platform"
        self.ttl = ttl
        self.heartbeat = heartbeat
        self._record = record
        self._on_join = on_join
        self._on_leave = on_leave
        self._on_replaced = on_replaced
        self.poll_interval = poll_interval
        self.reconcile_interval = reconcile_interval
        self.replicas = replicas
        self.incarnation = os.urandom(6).hex()
        self._control = control
        self._on_restored = on_restored
        self._on_change = on_change
        #: Valid, live records by node id (invalid ones are never in here).
        self.members: dict[str, dict[str, Any]] = {}
        #: node -> (revision, first seen (monotonic), seconds it may stay unchanged)
        self._fresh: dict[str, tuple[int, float, float]] = {}
        self._warned: dict[tuple[str, int], str] = {}
        self.max_ttl = max(60.0, 10 * ttl)
        self.restored = 0  # records of ours taken back from an unconfirmed takeover
        self._max_seq = 0
        self._healer = nu.Healer(
            f"membership {self.bucket}",
            lambda: nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1,
                                 replicas=self.replicas, wait=2.0, first_seq=self._max_seq + 1),
            interval=max(0.5, min(poll_interval, heartbeat)),
        )
        self._rev = 0
        self._tasks = TaskSet("membership", logger=log)
        self._ping_sub: Any = None
        self._watch_sub: Any = None
        self._wake = asyncio.Event()
        # node -> (body, TTL header) of its last valid record, to skip re-validating a refresh
        # that changed nothing.
        self._raw: dict[str, tuple[bytes, str | None]] = {}
        self._own_seen = 0  # the newest revision of our own record the watch delivered
        self.watch_restarts = 0  # watches found silent and re-created
        self.full_reads = 0  # reads of every record (startup, reconciliation, recovery)
        self._stopped = False
        self.started = time.time()

    @property
    def key(self) -> str:
        """This node's record key."""
        return NODE_PREFIX + self.node_id

    def record(self) -> dict[str, Any]:
        """The record as published now."""
        rec = {
            "node_id": self.node_id,
            "incarnation": self.incarnation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self.started,
            "ttl": self.ttl,
        }
        rec.update(self._record())
        return rec

    async def join(self) -> None:
        """Publish the record (refusing a live duplicate), then heartbeat and watch."""
        await nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1, replicas=self.replicas)
        subject = platform_subject(self.platform, "node", self.node_id, "ping")
        existing = await nu.retry_transient(
            lambda: nu.last_msg(self._js, self.bucket, self.key))
        if existing is not None and not existing.tombstone:
            holder = _decode(existing.data)
            inc = holder.get("incarnation")
            if isinstance(inc, str) and await self._answers(inc):
                raise DuplicateNodeError(self.platform, self.node_id, holder)
            log.info("node %s: previous record (pid %s) is stale; taking it over",
                     self.node_id, holder.get("pid"))
        expected = existing.seq if existing is not None else 0
        for attempt in range(3):
            try:
                self._rev = await nu.retry_transient(functools.partial(
                    nu.cas_publish, self._js, self.bucket, self.key, self._encode(),
                    expected_seq=expected, ttl=self.ttl,
                ))
                break
            except nu.CASConflict:
                current = await nu.last_msg(self._js, self.bucket, self.key)
                if (current is None or current.tombstone) and attempt < 2:
                    # The stale record expired (or was deleted) meanwhile: try against that.
                    expected = current.seq if current is not None else 0
                    continue
                body = _decode(current.data) if current else {}
                if current is None or body.get("incarnation") != self.incarnation:
                    raise DuplicateNodeError(self.platform, self.node_id, body) from None
                self._rev = current.seq  # our own write landed before a retried timeout
                break

        self._max_seq = max(self._max_seq, self._rev)
        self._ping_sub = await self._nc.subscribe(subject, cb=self._pong)
        await self._subscribe()
        await self.refresh_view()
        await self._tasks.open()
        self._tasks.spawn("membership:heartbeat", self._heartbeat)
        self._tasks.spawn("membership:poll", self._poll)

    async def _pong(self, msg: Msg) -> None:
        """Answer a ping of our node id with our incarnation (behind the middleware chain)."""
        if not msg.reply:
            return
        body = json.dumps({"incarnation": self.incarnation}).encode()
        try:
            if self._control is not None:
                async def handler(req: Any) -> bytes:
                    return body

                reply, error = await self._control.serve(msg, app="_", name="ping",
                                                         handler=handler)
                if error is not None:
                    return  # refused (e.g. no credentials): the pinger sees no answer
                body = reply
            await msg.respond(body)
        except Exception as exc:
            log.debug("node %s: pong not sent: %s", self.node_id, exc)

    async def _answers(self, incarnation: str) -> bool:
        """Whether a process with ``incarnation`` answers pings of this node id (replies from
        anyone else, e.g. a spoofed pong, do not count)."""
        subject = platform_subject(self.platform, "node", self.node_id, "ping")
        window = min(1.0, self.ttl / 2)

        def matches(m: Msg) -> bool:
            try:
                body = json.loads(m.data)
            except (ValueError, UnicodeDecodeError):
                return False
            return isinstance(body, dict) and body.get("incarnation") == incarnation

        if self._control is not None:
            replies = await self._control.request(subject, b"", app="_", name="ping",
                                                  timeout=window, gather=window, enough=matches)
            return any(matches(m) for m in replies)
        try:
            inbox = self._nc.new_inbox()
            found = asyncio.Event()
            got: list[bool] = []

            async def cb(m: Msg) -> None:
                if matches(m) or no_responders(m):
                    got.append(matches(m))
                    found.set()

            sub = await self._nc.subscribe(inbox, cb=cb)
            try:
                await self._nc.publish(subject, b"", reply=inbox)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(window):
                        await found.wait()
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            return any(got)
        except (nats.errors.Error, OSError):
            return False

    def _encode(self) -> bytes:
        return json.dumps(self.record(), separators=(",", ":"), default=str).encode()

    async def publish_now(self) -> None:
        """Refresh the record at once (e.g. after an app changed role)."""
        self._wake.set()

    @property
    def refresh_interval(self) -> float:
        """Seconds between two refreshes of an unchanged record: half its TTL (at least the
        heartbeat). Every member receives every refresh, so this sets the idle cost of a
        large platform; a crashed node's record still expires one TTL after its last
        refresh, and a failed refresh is retried after a heartbeat, well within the TTL."""
        return max(self.heartbeat, self.ttl / 2)

    async def _heartbeat(self) -> None:
        wait = self.refresh_interval
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            if self._stopped:
                return
            self._wake.clear()  # before encoding: a change from now on triggers another refresh
            wait = self.heartbeat  # until this refresh is known to have landed
            try:
                self._rev = await nu.cas_publish(
                    self._js, self.bucket, self.key, self._encode(), expected_seq=self._rev,
                    ttl=self.ttl,
                )
                self._max_seq = max(self._max_seq, self._rev)
                wait = self.refresh_interval
            except nu.CASConflict:
                if await self._conflict():
                    return
            except nu.TRANSIENT_ERRORS as exc:
                log.warning("node %s: membership refresh failed: %s", self.node_id, exc)
                if nu.stream_gone(exc) and await self._healer.heal():
                    await self._resubscribe()
                    self._wake.set()  # write the record again at once (the CAS conflicts)

    async def _conflict(self) -> bool:
        """Our record is not at the revision we wrote last. Returns True when this node was
        really replaced (``on_replaced`` was called)."""
        current = await nu.last_msg(self._js, self.bucket, self.key)
        if current is None or current.tombstone:
            # Our record expired (we were cut off) or the bucket was re-created: write it again.
            with contextlib.suppress(nu.CASConflict, *nu.TRANSIENT_ERRORS):
                self._rev = await nu.cas_publish(
                    self._js, self.bucket, self.key, self._encode(),
                    expected_seq=current.seq if current else 0, ttl=self.ttl,
                )
            return False
        body = _decode(current.data)
        inc = body.get("incarnation")
        if inc == self.incarnation:
            self._rev = current.seq  # our own write landed before a retried timeout
            return False
        if isinstance(inc, str) and await self._answers(inc):
            log.error("node %s: another process (incarnation %s, pid %s on %s) took this node "
                      "id over; leaving", self.node_id, inc, body.get("pid"), body.get("host"))
            self._on_replaced()
            return True
        log.warning("node %s: our record was overwritten (incarnation %r, pid %s on %s) but no "
                    "process answers for it: forged or stale; taking the record back",
                    self.node_id, str(inc)[:32], str(body.get("pid"))[:16],
                    str(body.get("host"))[:64])
        try:
            self._rev = await nu.cas_publish(
                self._js, self.bucket, self.key, self._encode(), expected_seq=current.seq,
                ttl=self.ttl,
            )
        except _RETRYABLE as exc:
            log.warning("node %s: taking the record back failed (%s); retrying",
                        self.node_id, type(exc).__name__)
            self._wake.set()
            return False
        self.restored += 1
        if self._on_restored is not None:
            self._on_restored({k: str(v)[:64] for k, v in list(body.items())[:8]})
        return False

    async def _subscribe(self) -> None:
        prefix = len(nu.kv_subject(self.bucket, NODE_PREFIX))

        async def on_msg(msg: Msg) -> None:
            try:
                node = msg.subject[prefix:]
                headers = msg.headers or {}
                if headers.get(nu.KV_OP) in ("DEL", "PURGE") or headers.get(nu.MARKER_REASON):
                    self._fresh.pop(node, None)
                    self._left(node)
                else:
                    seq = _stream_seq(msg)
                    self._max_seq = max(self._max_seq, seq)
                    if node == self.node_id:
                        self._own_seen = max(self._own_seen, seq)
                    self._observe(node, seq, msg.data, headers)
            except Exception:  # never into nats-py's delivery loop
                log.exception("membership: watch callback failed")

        try:
            self._watch_sub = await nu.light_watch(
                self._js, nu.kv_subject(self.bucket, NODE_PREFIX + ">"), on_msg)
            # Delivers new writes only: ours so far count as seen (for the silence check).
            self._own_seen = max(self._own_seen, self._rev)
        except Exception as exc:
            log.warning("membership watch failed (%s); polling only", exc)

    async def reconnected(self) -> None:
        """Re-create the watch after a reconnect and read every record (what changed while
        disconnected)."""
        await self._resubscribe()
        await self.refresh_view()

    async def _resubscribe(self) -> None:
        sub, self._watch_sub = self._watch_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._subscribe()

    def _observe(self, node: str, seq: int, data: bytes, headers: Mapping[str, str]) -> None:
        """A live record of ``node`` at revision ``seq``: validate, track its freshness."""
        ttl_header = headers.get(nu.TTL_HEADER)
        if self._raw.get(node) == (data, ttl_header) and node in self.members:
            # A refresh that changed nothing but the revision (most heartbeats): the record
            # was validated already, only its freshness moves on.
            fresh = self._fresh.get(node)
            if fresh is None or fresh[0] != seq:
                self._fresh[node] = (seq, time.monotonic(),
                                     (_ttl_of(headers) or self.ttl) + max(0.5, self.poll_interval))
            return
        self._raw.pop(node, None)
        try:
            rec: Any = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            rec = None
        problem = validate_member(node, rec, headers, self.max_ttl)
        if problem is not None:
            if (node, seq) not in self._warned:
                if len(self._warned) > 256:
                    self._warned.clear()
                self._warned[(node, seq)] = problem
                log.warning("membership: ignoring the record of node %s at revision %d: %s",
                            node[:64], seq, problem)
            self._fresh.pop(node, None)
            self._left(node)
            return
        fresh = self._fresh.get(node)
        if fresh is None or fresh[0] != seq:
            ttl = _ttl_of(headers) or self.ttl
            self._fresh[node] = (seq, time.monotonic(), ttl + max(0.5, self.poll_interval))
        self._seen(node, rec)
        self._raw[node] = (data, ttl_header)

    def alive(self, node: str) -> bool:
        """Whether ``node``'s record is valid and changed within its TTL (plus a margin) on
        this node's clock. A record nobody refreshes stays in `members` until the server
        expires it (a write stall of the stream must not look like every node leaving), but
        does not count where a forged record could steer: priority ranking."""
        if node == self.node_id:
            return True
        fresh = self._fresh.get(node)
        return fresh is not None and time.monotonic() - fresh[1] <= fresh[2]

    def _seen(self, node: str, rec: dict[str, Any]) -> None:
        """A valid record that is new or differs from the last one seen (never a refresh that
        changed nothing): ``on_join`` for a new member, else ``on_change``."""
        previous = self.members.get(node)
        self.members[node] = rec
        if previous is None:
            self._on_join(rec)
        elif self._on_change is not None and previous != rec:
            self._on_change(rec)

    def _left(self, node: str) -> None:
        self._raw.pop(node, None)
        rec = self.members.pop(node, None)
        if rec is not None:
            self._on_leave(rec)

    async def refresh_view(self) -> None:
        """Read every record (the reconciliation of the watch's view)."""
        self.full_reads += 1
        try:
            live = {
                key[len(NODE_PREFIX):]: msg
                for key, msg in (await nu.live_msgs(self._js, self.bucket, NODE_PREFIX)).items()
            }
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("membership poll failed: %s", exc)
            if nu.stream_gone(exc) and await self._healer.heal():
                await self._resubscribe()
                self._wake.set()  # write our record again at once
            return
        for node in list(self.members):
            if node not in live:
                self._fresh.pop(node, None)
                self._left(node)
        for node, msg in live.items():
            self._max_seq = max(self._max_seq, msg.seq)
            self._observe(node, msg.seq, msg.data, msg.headers)

    async def _poll(self) -> None:
        """Check the watch every heartbeat (cheap: no read), read everything when it is
        silent and every ``reconcile_interval``."""
        check = max(0.5, self.heartbeat)
        last_full = time.monotonic()
        while not self._stopped:
            written = self._rev  # our newest write: the watch must deliver it within `check`
            await sleep_aligned(check)
            silent = self._watch_sub is None or self._own_seen < written
            if silent and not self._stopped:
                log.info("node %s: membership watch silent (revision %d not delivered); "
                         "re-creating it", self.node_id, written)
                self.watch_restarts += 1
                await self._resubscribe()
            # Each reconciliation reads every record: with many members, read them less often
            # (about one record per two seconds; the watch carries the changes meanwhile).
            every = max(self.reconcile_interval, 2.0 * len(self.members))
            if silent or time.monotonic() - last_full >= every:
                await self.refresh_view()
                last_full = time.monotonic()

    async def leave(self) -> None:
        """Delete the record (others see the leave at once) and stop."""
        self._stopped = True
        self._wake.set()
        await self._tasks.close()
        for sub in (self._ping_sub, self._watch_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nu.cas_delete(self._js, self.bucket, self.key, expected_seq=self._rev)


def _stream_seq(msg: Msg) -> int:
    """The stream sequence of a JetStream delivery, read straight from its reply subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...``; the domain form has two
    more tokens first): every member receives every refresh, so this runs often."""
    parts = (msg.reply or "").split(".")
    if len(parts) == 9:
        return int(parts[5])
    return int(msg.metadata.sequence.stream)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
