"""The audit trail: structured entries in the JetStream stream ``{platform}_audit``.

Each entry records one thing that happened (time, platform, app, node, category, action, data,
trace id, correlation id) and is stored on ``{platform}._.audit.{category}.{app|_}.{node}``, so
queries by category, app and node are filtered by the server.

Recorded automatically (see docs/observability.md for every action and its data):

* ``election``: ``leader_acquired``, ``leader_lost``, ``leader_changed``, ``step_down``;
* ``lifecycle``: ``activated``/``deactivated`` (Spread apps), ``activation_failed``;
* ``membership``: ``joined``, ``left``, ``duplicate_refused``;
* ``lock``: ``acquired``, ``released``, ``expired``;
* ``hook``: ``failed``, ``timeout``;
* ``health``: ``changed``, ``step_down``;
* plugins declare theirs through `pycluster.hookspecs.pycluster_audit_categories` and write with
  ``platform.audit.log(...)``.

Events that several nodes observe (a crashed leader, a member leaving) are written by every
observer with the same ``Nats-Msg-Id``, so JetStream's duplicate window (2 min) keeps one.

Writing never blocks the caller: `AuditLog.log` queues the entry and one background task
publishes the queue in batches (up to 512 publishes in flight, sent in order, each acknowledged
by the stream; an entry without an ack is sent again with its ``Nats-Msg-Id``, so it is stored
once). Under connection loss entries wait in a bounded buffer (``audit_buffer`` entries, oldest
dropped beyond it) and are published after the reconnect; ``await audit.flush()`` waits until
everything queued so far is stored. A graceful stop flushes everything within the stop budget
(80 % of ``hook_timeout``). Entries that could not be stored (buffer full, refused by the
server, still queued when the stop budget ran out) are counted in ``dropped`` and in the metric
``pycluster_audit_dropped_total{reason}``.

Reading (`AuditReader`, also used by ``pycluster audit``) needs only a JetStream context::

    entries = await platform.audit.query(since=time.time() - 3600, category="election")
    async for entry in platform.audit.stream(AuditFilter(app="convex")):
        print(entry.action, entry.data)

Size: the writer (batched publishing with its ack bookkeeping, read back in one place) and the
core's automatic entries, which share the writer's per-app state (roles, observed leaders).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    StreamConfig,
)

from ...kernel import natsutil as nu
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.context import CORRELATION, current_trace_id
from ...kernel.names import validate_ident
from ...kernel.stages import StageAction, StageOutcome
from .query import (
    AuditEntry,
    AuditFilter,
    AuditReader,
    audit_stream,
    audit_stream_config,
    validate_token,
)

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.stages import StageEvent
    from ...middleware import Request

log = logging.getLogger("pycluster.audit")

_WINDOW = 512
"""Publishes in flight at a time (one batch)."""
_LINGER = 0.005
"""Shortest interval between two batches (unless a full window is waiting)."""
_ACK_TIMEOUT = 2.0
"""How long a batch waits for its acks before the unacknowledged entries are sent again."""
LOCK_COALESCE = 1.0
"""Lock holds released within this many seconds of their acquisition are recorded together:
one ``held`` entry per lock lists every hold that ended within this time of the first (longer
holds get ``acquired`` this long after the acquisition, then ``released``)."""
_HOLDS_MAX = 256
"""Most holds listed in one ``held`` entry (a full entry is queued at once)."""

CORE_CATEGORIES: dict[str, dict[str, str]] = {
    "election": {
        "leader_acquired": "this node became the active instance (data: epoch, reason, previous)",
        "leader_lost": "a leader lost its lease: stepped down, fenced, taken over or crashed "
                       "(data: leader, epoch, reason, observed_by)",
        "leader_changed": "the observed leader changed (data: previous, leader, epoch)",
        "step_down": "the leader stepped down on request (data: epoch)",
    },
    "lifecycle": {
        "activated": "a Spread instance became active on this node",
        "deactivated": "a Spread instance stopped being active on this node (data: reason)",
        "activation_failed": "a stage or on_active hook failed; the node stepped down "
                             "(data: epoch, error)",
        "stage_failed": "a stage's component failed while active; the node steps down "
                        "(data: epoch, error)",
    },
    "membership": {
        "joined": "a node joined the platform (data: labels, version, host, pid)",
        "left": "a node left or its record expired (data: host, pid)",
        "duplicate_refused": "a process with an already live node id was refused "
                             "(data: holder host and pid)",
    },
    "lock": {
        "acquired": "a lock was acquired (data: lock, token, waited)",
        "released": "a lock was released (data: lock, token, held)",
        "held": "holds of a lock, each acquired and released within a second, listed in one "
                "entry (data: lock, scope, holds: [{token, acquired, held, waited}, ...])",
        "expired": "a held lock's lease ran out before release (data: lock, token, held)",
    },
    "hook": {
        "failed": "an app hook or stage raised (data: hook, function, error)",
        "timeout": "an app hook or stage timed out (data: hook, function, error)",
    },
    "placement": {
        "migration_started": "a migration began on the leader (data: from, to, reason)",
        "migration_completed": "the target leads after a migration (data: from, to, reason, "
                               "seconds)",
        "migration_vetoed": "an on_migration_start hook refused a migration (data: from, to, "
                            "reason, error)",
        "migration_failed": "another node (or none) leads after a migration (data: from, to, "
                            "reason, seconds, error)",
        "labels_changed": "this node's labels changed at runtime (data: labels, previous)",
        "placement_invalid": "this node may no longer run an app it runs (data: labels)",
        "cordoned": "a node was cordoned through this node (data: node, by)",
        "uncordoned": "a node was uncordoned through this node (data: node)",
        "maintenance": "maintenance mode was turned on or off through this node (data: on, "
                       "app)",
        "rebalance_waiting": "an automatic move of this node's instance waits (data: reason: "
                             "cooldown, limits, budget, windows)",
    },
    "health": {
        "changed": "a health check changed status (data: check, status, previous, error)",
        "step_down": "an unhealthy active instance stepped down (data: check, epoch)",
    },
}



class AuditCategoryRegistry:
    """Audit categories and their actions (core and plugins), for docs and the CLI."""

    def __init__(self) -> None:
        self.categories: dict[str, dict[str, str]] = {}
        self.plugins: dict[str, str] = {}

    def add(self, category: str, actions: Mapping[str, str], plugin: str = "") -> None:
        """Declare ``category`` with ``{action: description}``."""
        validate_token("category", category)
        for a in actions:
            validate_token("action", a)
        self.categories.setdefault(category, {}).update(actions)
        if plugin:
            self.plugins[category] = plugin


class AuditLog:
    """The platform's audit service (``platform.audit``): writes entries and reads them back.

    :ivar categories: the declared categories (`AuditCategoryRegistry`).
    :ivar dropped: entries dropped because the buffer was full while NATS was unreachable.
    """

    name = "audit"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        s = platform.settings
        self.enabled: bool = s.audit
        self.retention: float = s.audit_retention
        self.max_bytes: int = s.audit_max_bytes
        self.max_msgs: int = s.audit_max_msgs
        self.buffer: int = s.audit_buffer
        self.stream_name = audit_stream(platform.name)
        self.categories = AuditCategoryRegistry()
        for cat, actions in CORE_CATEGORIES.items():
            self.categories.add(cat, actions, "core")
        platform.pm.hook.pycluster_audit_categories(registry=self.categories)
        for kind in platform.backends.all():  # written by the backends' shared supervisor
            if kind.audit is not None:
                self.categories.add(kind.kind, kind.audit, kind.plugin)
        self.dropped = 0
        self.written = 0
        self._queue: collections.deque[tuple[AuditEntry, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        # The batch in flight (entries, and the ack bookkeeping `_on_ack` fills in).
        self._inflight: list[tuple[AuditEntry, str]] = []
        self._batch: tuple[int, int, dict[int, str], asyncio.Event] | None = None
        self._next_token = 0
        self._inbox: str | None = None
        # Names already validated (a bounded set in practice: the declared categories and
        # actions, the platform's apps), so logging a known kind of entry is cheap.
        self._valid: set[tuple[str, str]] = set()
        self._valid_apps: set[str] = set()
        self._ack_sub: Subscription | None = None
        self._ack_nc: NATS | None = None
        self._roles: dict[str, str] = {}
        # Lock acquisitions not written yet (see `LOCK_COALESCE`), by id of the Lock object.
        # Lock acquisitions not written yet (see `LOCK_COALESCE`), by id of the Lock object:
        # (time, monotonic time, data, app, trace id, correlation id); the entry is built only
        # if the hold outlasts the window. One timer sweeps them.
        self._held: dict[int, tuple[float, float, dict[str, Any], str | None, str | None,
                                    str | None]] = {}
        self._held_sweep: asyncio.TimerHandle | None = None
        # Finished short holds per (app, scope, lock, trace id, correlation id), written as one
        # ``held`` entry when the first is `LOCK_COALESCE` old (or the list is full).
        self._holds: dict[tuple[str | None, str, str, str | None, str | None],
                          tuple[float, list[dict[str, Any]]]] = {}
        self._holds_timer: asyncio.TimerHandle | None = None
        self._observed: dict[str, tuple[str | None, int | None]] = {}
        self._last_leader: dict[str, tuple[str, int | None]] = {}

    # -- writing -------------------------------------------------------------------------------

    def log(
        self,
        category: str,
        action: str,
        data: Mapping[str, Any] | None = None,
        *,
        app: str | App | None = None,
        correlation_id: str | None = None,
        msg_id: str | None = None,
    ) -> AuditEntry:
        """Queue an entry (never blocks; returns it). Invalid names raise `InvalidNameError`.

        :param category: e.g. ``"election"`` or a plugin's category.
        :param action: e.g. ``"leader_acquired"``.
        :param data: JSON-serialisable details (other values are stored as ``str``).
        :param app: the app the entry is about (a name or the App).
        :param correlation_id: defaults to the current `correlation` id.
        :param msg_id: de-duplication id (entries with the same id within 2 min are stored once).
        """
        if (category, action) not in self._valid:
            validate_token("category", category)
            validate_token("action", action)
            self._valid.add((category, action))
        app_name = app.name if app is not None and not isinstance(app, str) else app
        if app_name is not None and app_name not in self._valid_apps:
            validate_ident("app", app_name)
            self._valid_apps.add(app_name)
        entry = AuditEntry(
            time=time.time(), platform=self.platform.name, node=self.platform.node_id,
            category=category, action=action, app=app_name, data=dict(data or {}),
            trace_id=current_trace_id(),
            correlation_id=correlation_id or CORRELATION.get() or None,
            id=os.urandom(8).hex(),
        )
        if not self.enabled:
            return entry
        self._enqueue(entry, msg_id or entry.id)
        return entry

    def _entry(self, category: str, action: str, data: dict[str, Any], app: str | None,
               when: float | None = None, trace_id: str | None = None,
               correlation_id: str | None = None) -> AuditEntry:
        """An entry of a core category (names known valid), not queued; the trace and
        correlation ids are the current ones unless given (with ``when``)."""
        if when is None:
            when = time.time()
            trace_id = current_trace_id()
            correlation_id = CORRELATION.get() or None
        return AuditEntry(
            time=when, platform=self.platform.name, node=self.platform.node_id,
            category=category, action=action, app=app, data=data,
            trace_id=trace_id, correlation_id=correlation_id, id=os.urandom(8).hex(),
        )

    def _enqueue(self, entry: AuditEntry, msg_id: str) -> None:
        if len(self._queue) >= self.buffer:
            self._queue.popleft()
            self._count_dropped(1, "buffer full")
        self._queue.append((entry, msg_id))
        self._idle.clear()
        self._wake.set()
        metrics = self.platform.services.get("metrics")
        if metrics is not None:
            metrics.audit_entry(entry.category)  # type: ignore[attr-defined]

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued entry is stored; False if ``timeout`` passed first.

        Lock acquisitions still waiting to be coalesced with their release are queued first,
        so after a flush the trail shows every lock held so far."""
        self._write_locks(everything=True)
        if not self._queue and not self._inflight:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def write(self, category: str, action: str, data: Mapping[str, Any] | None = None,
                    *, app: str | None = None, timeout: float = 2.0) -> bool:
        """Log and wait until stored, even before the service started (e.g. a refused start).

        Returns False when it could not be stored within ``timeout``.
        """
        entry = self.log(category, action, data, app=app)
        if not self.enabled:
            return False
        if self._started:
            return await self.flush(timeout)
        js = self.platform.js
        if js is None:
            return False
        try:
            await asyncio.wait_for(self._ensure_stream(js), timeout)
            await js.publish(entry.subject(), entry.encode(), timeout=timeout,
                             headers={"Nats-Msg-Id": entry.id})
        except Exception as exc:
            log.warning("audit entry %s/%s not stored: %s", category, action, exc)
            return False
        with contextlib.suppress(ValueError):
            self._queue.remove((entry, entry.id))
        if not self._queue:
            self._idle.set()
        return True

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        cfg = audit_stream_config(self.platform.name, retention=self.retention,
                                  max_bytes=self.max_bytes, max_msgs=self.max_msgs,
                                  replicas=self.platform.settings.stream_replicas)
        info = await nu.ensure_stream(js, self.stream_name, lambda: js.add_stream(cfg))
        if info is None:
            return  # created now, with this configuration
        have = info.config
        def limits(c: StreamConfig) -> tuple[float, int, int]:
            return (c.max_age or 0, max(c.max_bytes or -1, -1), max(c.max_msgs or -1, -1))

        if limits(have) != limits(cfg):
            log.info("audit stream %s: retention changed to max_age=%ss max_bytes=%s "
                     "max_msgs=%s", self.stream_name, cfg.max_age, cfg.max_bytes, cfg.max_msgs)
            have.max_age = cfg.max_age
            have.max_bytes = cfg.max_bytes if cfg.max_bytes else -1
            have.max_msgs = cfg.max_msgs if cfg.max_msgs else -1
            try:
                await js.update_stream(have)
            except (nats.errors.Error, TimeoutError) as exc:
                # A NATS user with generated permissions may not change streams (the
                # operator provisions them): keep the stream's own retention.
                log.warning("audit stream %s: retention not changed (%s: %s); the stream keeps "
                            "its own (pycluster provision sets it)", self.stream_name,
                            type(exc).__name__, exc)

    async def _publisher(self) -> None:
        """Publish queued entries in order, up to `_WINDOW` in flight at a time.

        Each batch is sent back to back on the connection (one flush), each publish with a
        reply subject on this service's ack inbox; the batch is done when every ack arrived or
        `_ACK_TIMEOUT` passed. Entries without a positive ack go back to the head of the queue
        and are sent again with the same ``Nats-Msg-Id``, so a publish that was stored but whose
        ack was lost is not stored twice (the server's duplicate window).
        """
        pause = 0.1
        loop = asyncio.get_running_loop()
        next_batch = 0.0
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                next_batch = max(next_batch, loop.time() + _LINGER)
            # At most one batch per `_LINGER` unless a full window is waiting: a steady trickle
            # (e.g. the entries of a run of lock operations) goes out as one write and one
            # batch of acks every few ms instead of one round of each per entry, which would
            # cost the event loop (and the operations being audited) far more.
            wait = next_batch - loop.time()
            if wait > 0 and len(self._queue) < _WINDOW:
                await asyncio.sleep(wait)
                continue
            next_batch = loop.time() + _LINGER
            nc = self.platform.nc
            if nc is None or not nc.is_connected:
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if self._ack_sub is None or self._ack_nc is not nc:
                try:  # a new connection object: its own ack inbox
                    await self._subscribe_acks(nc)
                except nu.TRANSIENT_ERRORS:
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
            n = min(len(self._queue), _WINDOW)
            batch = [self._queue.popleft() for _ in range(n)]
            self._inflight = batch
            try:
                retry, no_stream = await self._send_batch(nc, batch)
            finally:
                self._inflight = []
            if retry:
                # Back to the head, in order (within the buffer bound: what no longer fits is
                # the oldest and is dropped, as when queueing).
                self._queue.extendleft(reversed(retry))
                while len(self._queue) > self.buffer:
                    self._queue.popleft()
                    self._count_dropped(1, "buffer full")
                if no_stream:
                    js = self.platform.js
                    with contextlib.suppress(Exception):  # the stream was deleted: re-create
                        assert js is not None
                        await self._ensure_stream(js)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            pause = 0.1

    async def _send_batch(self, nc: NATS, batch: list[tuple[AuditEntry, str]]
                          ) -> tuple[list[tuple[AuditEntry, str]], bool]:
        """Publish ``batch``; return the entries to send again and whether the stream was
        missing."""
        assert self._inbox is not None
        base = self._next_token
        self._next_token += len(batch)
        results: dict[int, str] = {}
        done = asyncio.Event()
        self._batch = (base, len(batch), results, done)
        try:
            for i, (entry, msg_id) in enumerate(batch):
                await nc.publish(entry.subject(), entry.encode(),
                                 reply=f"{self._inbox}.{base + i}",
                                 headers={"Nats-Msg-Id": msg_id})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), _ACK_TIMEOUT)
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("audit publish failed (%s); retrying", exc)
        finally:
            self._batch = None
        retry: list[tuple[AuditEntry, str]] = []
        no_stream = False
        refused = 0
        for i, item in enumerate(batch):
            outcome = results.get(base + i)
            if outcome == "ok":
                self.written += 1
            elif outcome is None or outcome in ("retry", "no_stream"):
                no_stream = no_stream or outcome == "no_stream"
                retry.append(item)
            else:  # a permanent refusal: drop this entry, keep the rest
                refused += 1
                log.error("audit entry %s/%s refused: %s", item[0].category, item[0].action,
                          outcome)
        if refused:
            self._count_dropped(refused, "refused")
        return retry, no_stream

    async def _subscribe_acks(self, nc: NATS) -> None:
        old, self._ack_sub = self._ack_sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        self._inbox = nc.new_inbox()
        self._ack_sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_ack)
        self._ack_nc = nc

    async def _on_ack(self, msg: Msg) -> None:
        batch = self._batch
        if batch is None:
            return  # a late ack of a batch given up on: its entries are sent again
        base, count, results, done = batch
        try:
            token = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        if not base <= token < base + count:
            return
        results[token] = _ack_outcome(msg)
        if len(results) == count:
            done.set()

    def _count_dropped(self, n: int, why: str) -> None:
        self.dropped += n
        if self.dropped in (1, 10, 100) or self.dropped % 1000 < n:
            log.warning("audit: %d entries dropped so far (%s)", self.dropped, why)
        metrics = self.platform.services.get("metrics")
        if metrics is not None:
            metrics.audit_dropped(why, n)  # type: ignore[attr-defined]

    # -- reading -------------------------------------------------------------------------------

    def reader(self) -> AuditReader:
        """An `AuditReader` on this platform's connection."""
        if self.platform.js is None:
            raise RuntimeError("the platform is not started")
        return AuditReader(self.platform.js, self.platform.name)

    async def query(self, filter: AuditFilter | None = None, **kw: Any) -> list[AuditEntry]:
        """See `AuditReader.query` (``since=, until=, category=, app=, node=, limit=``)."""
        return await self.reader().query(filter, **kw)

    async def stream(
        self, filter: AuditFilter | None = None, **kw: Any
    ) -> AsyncIterator[AuditEntry]:
        """See `AuditReader.stream`."""
        async for e in self.reader().stream(filter, **kw):
            yield e

    # -- service lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create/update the stream and start publishing queued entries."""
        if not self.enabled:
            return
        assert self.platform.js is not None and self.platform.nc is not None
        await self._ensure_stream(self.platform.js)
        await self._subscribe_acks(self.platform.nc)
        self._started = True
        self._task = supervise("audit:publisher", self._publisher)

    def stats(self) -> dict[str, int]:
        """Entries queued (not stored yet), written and dropped by this node (``/status``)."""
        return {"queued": len(self._queue), "written": self.written, "dropped": self.dropped}

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Forget the app's observed leader."""
        self._observed.pop(rt.app.name, None)
        self._roles.pop(rt.app.name, None)

    async def stop(self) -> None:
        """Record this node's leave, flush (bounded) and stop publishing."""
        if self.enabled and self.platform.membership is not None:
            inc = self.platform.membership.incarnation
            self.log("membership", "left", {"node": self.platform.node_id,
                                            "host": os.uname().nodename, "pid": os.getpid(),
                                            "graceful": True},
                     msg_id=f"membership.{self.platform.node_id}.left.{inc}")
        if self._task is not None:
            # Everything queued is stored before leaving, within most of the stop budget
            # (the platform bounds each service's stop by ``hook_timeout``).
            budget = max(1.0, 0.8 * float(self.platform.settings.hook_timeout))
            nc = self.platform.nc
            if nc is None or nc.is_closed:
                budget = 0.0  # nothing can be stored any more: do not wait for it
            if not await self.flush(budget):
                lost = len(self._queue) + len(self._inflight)
                log.warning("audit: %d entries not stored before leaving (%.1fs)", lost, budget)
                self._count_dropped(lost, "not stored before leaving")
                self._queue.clear()
            await cancel_and_wait(self._task)
            self._task = None
        for timer in (self._held_sweep, self._holds_timer):
            if timer is not None:
                timer.cancel()
        self._held_sweep = self._holds_timer = None
        if self._ack_sub is not None:
            with contextlib.suppress(Exception):
                await self._ack_sub.unsubscribe()
            self._ack_sub = None
        self._started = False

    # -- automatic entries (from the plugin's hooks) -----------------------------------------

    def stage_event(self, app: App, ev: StageEvent) -> None:
        """A stage failed or timed out (``app-hooks`` failures are audited per hook); a stage
        that failed while active is also a ``lifecycle``/``stage_failed`` entry."""
        if ev.outcome not in (StageOutcome.FAILED, StageOutcome.TIMEOUT) \
                or ev.stage == "app-hooks":
            return
        self.log("hook", "timeout" if ev.outcome is StageOutcome.TIMEOUT else "failed",
                 {"hook": f"stage:{ev.stage}", "action": ev.action.value, "plugin": ev.plugin,
                  "error": ev.error, "policy": str(ev.policy), "attempt": ev.attempt,
                  "backoff": ev.backoff, "epoch": ev.epoch}, app=app)
        if ev.action is StageAction.RUNNING:
            self.log("lifecycle", "stage_failed",
                     {"epoch": ev.epoch, "error": f"{ev.stage}: {ev.error}"}, app=app)

    def activation_failed(self, app: App, epoch: int | None, error: str) -> None:
        """Becoming active failed."""
        self.log("lifecycle", "activation_failed", {"epoch": epoch, "error": error}, app=app)

    def role_changed(self, app: App, role: str, epoch: int | None, reason: str) -> None:
        """A role change of ``app`` on this node (active, passive, stopped)."""
        prev = self._roles.get(app.name)
        self._roles[app.name] = role
        elected = app.mode.slots() is not None
        single = app.mode.slots() == 1
        if not elected:
            if role == "active" and prev != "active":
                self.log("lifecycle", "activated", {"reason": reason}, app=app)
            elif role != "active" and prev == "active":
                self.log("lifecycle", "deactivated", {"reason": reason}, app=app)
            return
        node = self.platform.node_id
        if role == "active" and prev != "active":
            last = self._last_leader.get(app.name)
            previous = last[0] if last and last[0] != node else None
            self.log("election", "leader_acquired",
                     {"epoch": epoch, "reason": reason, "previous": previous}, app=app,
                     msg_id=_mid(app.name, "leader_acquired", epoch, None if single else node))
            if previous is not None and single:
                self._leader_changed(app, previous, node, epoch)
            self._last_leader[app.name] = (node, epoch)
        elif role != "active" and prev == "active":
            if reason.startswith("stepped down"):
                self.log("election", "step_down", {"epoch": epoch}, app=app)
            self.log("election", "leader_lost",
                     {"leader": node, "epoch": epoch, "reason": reason, "observed_by": node},
                     app=app, msg_id=_mid(app.name, "leader_lost", epoch, None if single else node))

    def leader_observed(self, app: App, leader: str | None, epoch: int | None) -> None:
        """The leader this node observes for ``app`` changed (Singleton apps only)."""
        if app.mode.slots() != 1:
            return
        node = self.platform.node_id
        before = self._observed.get(app.name)
        self._observed[app.name] = (leader, epoch)
        if before is not None and before[0] is not None and before[0] != node:
            old, old_epoch = before
            if (leader, epoch) != (old, old_epoch):
                why = "lease vacant (released or expired)" if leader is None \
                    else f"taken over by {leader}"
                self.log("election", "leader_lost",
                         {"leader": old, "epoch": old_epoch, "reason": why, "observed_by": node},
                         app=app, msg_id=_mid(app.name, "leader_lost", old_epoch, None))
        if leader is not None and leader != node:  # our own win: `role_changed`
            last = self._last_leader.get(app.name)
            if last is not None and last[0] != leader:
                self._leader_changed(app, last[0], leader, epoch)
            self._last_leader[app.name] = (leader, epoch)

    def _leader_changed(self, app: App, previous: str, leader: str, epoch: int | None) -> None:
        self.log("election", "leader_changed",
                 {"previous": previous, "leader": leader, "epoch": epoch}, app=app,
                 msg_id=_mid(app.name, "leader_changed", epoch, None))

    def member_joined(self, rec: Mapping[str, Any]) -> None:
        """A node joined (every node reports it; one entry is kept)."""
        node = str(rec.get("node_id"))
        self.log("membership", "joined",
                 {"node": node, "labels": rec.get("labels"), "version": rec.get("version"),
                  "host": rec.get("host"), "pid": rec.get("pid")},
                 msg_id=f"membership.{node}.joined.{rec.get('incarnation')}")

    def member_left(self, rec: Mapping[str, Any]) -> None:
        """A node left or its record expired."""
        node = str(rec.get("node_id"))
        self.log("membership", "left",
                 {"node": node, "host": rec.get("host"), "pid": rec.get("pid")},
                 msg_id=f"membership.{node}.left.{rec.get('incarnation')}")

    def placement_event(self, app: App | None, event: str, data: Mapping[str, Any]) -> None:
        """A placement operation of this node (category ``placement``)."""
        self.log("placement", event, dict(data), app=app.name if app is not None else None)

    def lock_event(self, scope: str, event: str, lock: Any, fields: Mapping[str, Any]) -> None:
        """A lock of this node was acquired, released or lost.

        Most holds are short: an acquisition waits up to `LOCK_COALESCE` seconds for its
        release, and the holds of a lock released within that time are written as one ``held``
        entry listing each (token, acquisition time, hold and wait durations). A run of lock
        operations then costs a few list appends per hold and one publish per lock and second,
        and the trail still shows who held which lock from when to when."""
        if not self.enabled or event not in ("acquired", "released", "expired"):
            return
        key = id(lock)
        name = str(getattr(lock, "name", "?"))
        app = None if scope == "_platform" else scope
        if event == "acquired":
            if key in self._held:
                self._write_acquired(key)
            now = time.monotonic()
            self._held[key] = (time.time(), now, {"lock": name, "scope": scope, **fields}, app,
                               current_trace_id(), CORRELATION.get() or None)
            if self._held_sweep is None:
                self._held_sweep = asyncio.get_running_loop().call_later(
                    LOCK_COALESCE, self._sweep_held)
            return
        pending = self._held.pop(key, None)
        if pending is not None:
            when, _, first, _, trace_id, correlation_id = pending
            if (event == "released" and fields.get("clean", True)
                    and first.get("token") == fields.get("token")):
                hold = {"token": first.get("token"), "acquired": when,
                        "held": fields.get("held"), "waited": first.get("waited")}
                self._add_hold((app, scope, name, trace_id, correlation_id), hold)
                return
            self._held[key] = pending
            self._write_acquired(key)
        data = {"lock": name, "scope": scope, **fields}
        self.log("lock", event, data, app=app)

    def _add_hold(self, key: tuple[str | None, str, str, str | None, str | None],
                  hold: dict[str, Any]) -> None:
        holds = self._holds.get(key)
        if holds is None:
            holds = self._holds[key] = (time.monotonic(), [])
            if self._holds_timer is None:
                self._holds_timer = asyncio.get_running_loop().call_later(
                    LOCK_COALESCE, self._write_locks)
        holds[1].append(hold)
        if len(holds[1]) >= _HOLDS_MAX:
            self._write_holds(key)

    def _write_holds(self, key: tuple[str | None, str, str, str | None, str | None]) -> None:
        _, holds = self._holds.pop(key)
        app, scope, name, trace_id, correlation_id = key
        entry = self._entry("lock", "held", {"lock": name, "scope": scope, "holds": holds}, app,
                            holds[0]["acquired"], trace_id, correlation_id)
        self._enqueue(entry, entry.id)

    def _write_locks(self, everything: bool = False) -> None:
        """Queue the ``held`` entries whose window has passed (all with ``everything``, and
        then the pending acquisitions too)."""
        if self._holds_timer is not None:  # called by a flush: one timer chain only
            self._holds_timer.cancel()
        self._holds_timer = None
        due = time.monotonic() - LOCK_COALESCE
        for key, (started, _) in list(self._holds.items()):
            if everything or started <= due + 0.001:
                self._write_holds(key)
        if self._holds:
            first = min(started for started, _ in self._holds.values())
            self._holds_timer = asyncio.get_running_loop().call_later(
                max(0.0, first - due), self._write_locks)
        if everything:
            for lock_key in list(self._held):
                self._write_acquired(lock_key)

    def _sweep_held(self) -> None:
        """Write the ``acquired`` entries of holds that outlasted `LOCK_COALESCE`."""
        self._held_sweep = None
        due = time.monotonic() - LOCK_COALESCE
        for key, pending in list(self._held.items()):
            if pending[1] <= due + 0.001:
                self._write_acquired(key)
        if self._held:
            first = min(p[1] for p in self._held.values())
            self._held_sweep = asyncio.get_running_loop().call_later(
                max(0.0, first - due), self._sweep_held)

    def _write_acquired(self, key: int) -> None:
        pending = self._held.pop(key, None)
        if pending is not None:
            when, _, data, app, trace_id, correlation_id = pending
            entry = self._entry("lock", "acquired", data, app, when, trace_id, correlation_id)
            self._enqueue(entry, entry.id)

    def hook_failed(self, app: App | None, hook: str, function: str, error: BaseException,
                    timed_out: bool) -> None:
        """An app hook or stage failed or timed out."""
        self.log("hook", "timeout" if timed_out else "failed",
                 {"hook": hook, "function": function,
                  "error": f"{type(error).__name__}: {error}"}, app=app)

    @contextlib.contextmanager
    def hook_recorder(self, app: App, hook: str, function: str) -> Iterator[None]:
        """Around one app hook run: a ``hook`` entry when it fails or times out (a
        cancellation is not a failure)."""
        try:
            yield
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            try:
                self.hook_failed(app, hook, function, exc, isinstance(exc, TimeoutError))
            except Exception:
                log.exception("hook failure of %s not recorded", hook)
            raise

    def control_request(self, request: Request, subject: str, reply: str | None,
                        error: BaseException | None) -> None:
        """A control request served or refused (category ``control``)."""
        data: dict[str, Any] = {
            "subject": subject, "reply": reply, "identity": request.identity,
            "source_app": request.source_app, "size": len(request.data),
            "outcome": "ok" if error is None else "refused",
        }
        if error is not None:
            data["error"] = f"{type(error).__name__}: {error}"[:300]
        preview = request.extra.get("request")
        if preview is not None:
            data["request"] = preview
        self.log("control", request.method.split(".", 1)[1], data,
                 app=request.app if request.app != "_" else None)

    def membership_event(self, event: str, data: dict[str, Any]) -> Any:
        """Something happened to this node's own membership: ``duplicate_refused`` is stored
        before the start fails (an awaitable), the others are queued."""
        if event == "duplicate_refused":
            return self.write("membership", event, data)
        self.log("membership", event, data)
        return None

    def health_changed(self, check: str, status: str, previous: str, app: App | None,
                       error: str | None) -> None:
        """A health check changed status (not its first success)."""
        if previous == "unknown" and status == "healthy":
            return
        self.log("health", "changed", {"check": check, "status": status, "previous": previous,
                                       "error": error}, app=app)


def _ack_outcome(msg: Msg) -> str:
    """``ok``, ``retry`` (send again), ``no_stream`` or the reason of a permanent refusal."""
    if msg.headers and msg.headers.get("Status") == "503":
        return "no_stream"  # no responders: the stream is gone
    try:
        body = json.loads(msg.data)
    except ValueError:
        return "retry"
    err = body.get("error") if isinstance(body, dict) else None
    if err is None:
        return "ok" if isinstance(body, dict) and "seq" in body else "retry"
    if not isinstance(err, dict) or err.get("code", 500) >= 500:
        return "retry"  # e.g. a stream without a leader yet
    if "duplicate message id is in process" in str(err.get("description", "")):
        # A re-send while the first publish of this id is still being stored (a missed ack
        # on a loaded cluster): not a refusal; the next re-send is acknowledged as a duplicate.
        return "retry"
    return str(err.get("description") or err)


def _mid(app: str, action: str, epoch: int | None, node: str | None) -> str:
    return f"election.{app}.{action}.{epoch}" + (f".{node}" if node else "")
