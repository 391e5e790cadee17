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
publishes entries in order with acknowledgement. Under connection loss entries wait in a bounded
buffer (``audit_buffer`` entries, oldest dropped and counted beyond it) and are published after
the reconnect; ``await audit.flush()`` waits until everything queued so far is stored.

Reading (`AuditReader`, also used by ``pycluster audit``) needs only a JetStream context::

    entries = await platform.audit.query(since=time.time() - 3600, category="election")
    async for entry in platform.audit.stream(AuditFilter(app="convex")):
        print(entry.action, entry.data)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import datetime as dt
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    StorageType,
    StreamConfig,
)

from ...kernel import natsutil as nu
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.errors import ConfigError, InvalidNameError
from ...kernel.names import bucket, platform_subject, validate_ident
from ..tracing.spans import current_trace_id

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime, StageEvent
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.audit")

SCHEMA_VERSION = 1
MAX_ENTRY_BYTES = 64 * 1024
DUPLICATE_WINDOW = 120.0
_TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_correlation: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pycluster_correlation_id", default=None
)

# The categories and actions the core writes (plugins add theirs through a hook).
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
        "expired": "a held lock's lease ran out before release (data: lock, token, held)",
    },
    "hook": {
        "failed": "an app hook or stage raised (data: hook, function, error)",
        "timeout": "an app hook or stage timed out (data: hook, function, error)",
    },
    "health": {
        "changed": "a health check changed status (data: check, status, previous, error)",
        "step_down": "an unhealthy active instance stepped down (data: check, epoch)",
    },
}


def correlation_id() -> str | None:
    """The correlation id of the current task (set with `correlation`)."""
    return _correlation.get()


@contextlib.contextmanager
def correlation(cid: str | None) -> Iterator[str | None]:
    """Tag every audit entry written inside the block with ``cid`` (None: no id)."""
    token = _correlation.set(cid)
    try:
        yield cid
    finally:
        _correlation.reset(token)


def validate_token(kind: str, value: object) -> str:
    """A category or action: lower-case letters, digits and ``_``, starting with a letter."""
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise InvalidNameError(
            kind, value, "must be 1-64 characters of a-z, 0-9 and '_', starting with a letter"
        )
    return value


@dataclass
class AuditEntry:
    """One audit record (``seq`` is the stream sequence, set when read back)."""

    time: float
    platform: str
    node: str
    category: str
    action: str
    app: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    trace_id: str | None = None
    correlation_id: str | None = None
    id: str = ""
    seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (``time`` also as ISO 8601 in ``iso``)."""
        d = asdict(self)
        d["iso"] = dt.datetime.fromtimestamp(self.time, dt.UTC).isoformat(timespec="milliseconds")
        return d

    def encode(self) -> bytes:
        """The stored JSON document (without ``seq``)."""
        d = asdict(self)
        d.pop("seq")
        d["v"] = SCHEMA_VERSION
        raw = json.dumps(d, separators=(",", ":"), default=str).encode()
        if len(raw) > MAX_ENTRY_BYTES:
            d["data"] = {"truncated": True, "size": len(raw)}
            raw = json.dumps(d, separators=(",", ":"), default=str).encode()
        return raw

    @classmethod
    def decode(cls, raw: bytes, seq: int | None = None) -> AuditEntry | None:
        """Parse a stored entry; None for something unreadable (logged, skipped)."""
        try:
            d = json.loads(raw)
            return cls(
                time=float(d["time"]), platform=str(d["platform"]), node=str(d["node"]),
                category=str(d["category"]), action=str(d["action"]), app=d.get("app"),
                data=d.get("data") or {}, trace_id=d.get("trace_id"),
                correlation_id=d.get("correlation_id"), id=str(d.get("id", "")), seq=seq,
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping an unreadable audit entry (seq %s): %s", seq, exc)
            return None

    def subject(self) -> str:
        """The subject the entry is stored on."""
        return audit_subject(self.platform, self.category, self.app, self.node)


@dataclass
class AuditFilter:
    """What to read: every field is optional; ``category`` may list several.

    ``since``/``until`` are unix times (seconds); ``action`` is matched client-side.
    """

    since: float | None = None
    until: float | None = None
    category: str | list[str] | None = None
    app: str | None = None
    node: str | None = None
    action: str | None = None

    def categories(self) -> list[str]:
        """The categories asked for (empty: all)."""
        if self.category is None:
            return []
        cats = [self.category] if isinstance(self.category, str) else list(self.category)
        return [validate_token("category", c) for c in cats]

    def subjects(self, platform: str) -> list[str]:
        """Server-side filter subjects."""
        app = validate_ident("app", self.app) if self.app else "*"
        node = validate_ident("node", self.node) if self.node else "*"
        cats = self.categories() or ["*"]
        return [audit_subject(platform, c, app, node) for c in cats]

    def matches(self, e: AuditEntry) -> bool:
        """Client-side check (time bounds, action, and the subject filters again)."""
        if self.since is not None and e.time < self.since:
            return False
        if self.until is not None and e.time > self.until:
            return False
        if self.action is not None and e.action != self.action:
            return False
        cats = self.categories()
        if cats and e.category not in cats:
            return False
        if self.app is not None and e.app != self.app:
            return False
        return self.node is None or e.node == self.node


def audit_subject(platform: str, category: str, app: str | None, node: str) -> str:
    """``{platform}._.audit.{category}.{app or _}.{node}``."""
    return platform_subject(platform, "audit", category, app or "_", node)


def audit_stream(platform: str) -> str:
    """The stream name, ``{platform}_audit``."""
    return bucket(platform, suffix="audit")


def audit_stream_config(platform: str, *, retention: float = 30 * 86400.0, max_bytes: int = 0,
                        max_msgs: int = 1_000_000, replicas: int = 1) -> StreamConfig:
    """The configuration of ``{platform}_audit`` (what a node creates, or provisioning)."""
    return StreamConfig(
        name=audit_stream(platform),
        description=f"pycluster audit trail of platform {platform}",
        subjects=[platform_subject(platform, "audit", ">")],
        max_age=retention if retention > 0 else None,
        max_bytes=max_bytes if max_bytes > 0 else None,
        max_msgs=max_msgs if max_msgs > 0 else None,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
    )


class AuditReader:
    """Query and follow the audit stream of a platform with any JetStream context."""

    def __init__(self, js: JetStreamContext, platform: str) -> None:
        self._js = js
        self.platform = validate_ident("platform", platform)
        self.stream_name = audit_stream(platform)

    async def last_seq(self) -> int:
        """The stream's last sequence (0 when empty or absent)."""
        try:
            info = await self._js.stream_info(self.stream_name)
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.last_seq or 0)

    async def query(
        self,
        filter: AuditFilter | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        category: str | list[str] | None = None,
        app: str | None = None,
        node: str | None = None,
        action: str | None = None,
        limit: int | None = 100,
        timeout: float = 10.0,
    ) -> list[AuditEntry]:
        """Matching entries in stream order (oldest first); with ``limit``, the newest
        ``limit`` of them. An absent stream gives an empty list.

        Reads from ``since`` (or the stream's start) to the end of the stream as it was when
        the query began, in batches, with an ephemeral consumer deleted afterwards.
        """
        f = filter or AuditFilter(since, until, category, app, node, action)
        if limit is not None and limit < 1:
            raise ConfigError("limit", limit, "must be at least 1 (or None for no limit)")
        out: collections.deque[AuditEntry] = collections.deque(maxlen=limit)
        subjects = f.subjects(self.platform)
        cfg = ConsumerConfig(
            ack_policy=AckPolicy.NONE, inactive_threshold=60.0, mem_storage=True,
            num_replicas=1, max_ack_pending=-1,
        )
        if len(subjects) > 1:
            cfg.filter_subjects = subjects
        if f.since is not None:
            cfg.deliver_policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = dt.datetime.fromtimestamp(f.since, dt.UTC)  # type: ignore[assignment]
        try:
            psub = await self._js.pull_subscribe(subjects[0], stream=self.stream_name, config=cfg)
        except nats.js.errors.NotFoundError:
            return []
        try:
            info = await psub.consumer_info()
            remaining = int(info.num_pending or 0)
            deadline = time.monotonic() + timeout
            while remaining > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"audit query did not finish within {timeout}s")
                try:
                    msgs = await psub.fetch(min(remaining, 256), timeout=min(left, 2.0))
                except nats.errors.TimeoutError:
                    # Entries can vanish meanwhile (retention): stop when nothing is left.
                    if int((await psub.consumer_info()).num_pending or 0) == 0:
                        break
                    continue
                for msg in msgs:
                    remaining -= 1
                    e = _entry_of(msg)
                    if e is None:
                        continue
                    if f.until is not None and e.time > f.until:
                        remaining = 0
                        break
                    if f.matches(e):
                        out.append(e)
        finally:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(self.stream_name, info.name)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
        return list(out)

    async def stream(
        self, filter: AuditFilter | None = None, *, history: bool = False,
        after_seq: int | None = None, **kw: Any
    ) -> AsyncIterator[AuditEntry]:
        """Follow new entries as they are written (``async for e in reader.stream(...)``).

        With ``filter.since`` (or ``history=True``: from the start; ``after_seq``: from the
        entry after that stream sequence) stored entries come first. The consumer is ordered
        and re-created by nats-py after reconnects.
        """
        f = filter or AuditFilter(**kw)
        subjects = f.subjects(self.platform)
        cfg = ConsumerConfig(inactive_threshold=60.0)
        if len(subjects) > 1:
            cfg.filter_subjects = subjects
        policy = DeliverPolicy.ALL if history else DeliverPolicy.NEW
        if after_seq is not None:
            policy = DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = after_seq + 1
        elif f.since is not None:
            policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = dt.datetime.fromtimestamp(f.since, dt.UTC)  # type: ignore[assignment]
        sub = await self._js.subscribe(
            subjects[0], stream=self.stream_name, ordered_consumer=True, deliver_policy=policy,
            config=cfg, idle_heartbeat=2.0,
        )
        try:
            async for msg in sub.messages:
                e = _entry_of(msg)
                if e is None or not f.matches(e):
                    if e is not None and f.until is not None and e.time > f.until:
                        return
                    continue
                yield e
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _entry_of(msg: Msg) -> AuditEntry | None:
    seq = None
    with contextlib.suppress(Exception):
        seq = msg.metadata.sequence.stream
    return AuditEntry.decode(msg.data, seq)


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
        self.enabled: bool = bool(getattr(s, "audit", True))
        self.retention: float = float(getattr(s, "audit_retention", 30 * 86400.0))
        self.max_bytes: int = int(getattr(s, "audit_max_bytes", 0))
        self.max_msgs: int = int(getattr(s, "audit_max_msgs", 1_000_000))
        self.buffer: int = int(getattr(s, "audit_buffer", 10_000))
        self.stream_name = audit_stream(platform.name)
        self.categories = AuditCategoryRegistry()
        for cat, actions in CORE_CATEGORIES.items():
            self.categories.add(cat, actions, "core")
        platform.pm.hook.pycluster_audit_categories(registry=self.categories)
        self.dropped = 0
        self.written = 0
        self._queue: collections.deque[tuple[AuditEntry, str]] = collections.deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._roles: dict[str, str] = {}
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
        validate_token("category", category)
        validate_token("action", action)
        app_name = app.name if app is not None and not isinstance(app, str) else app
        if app_name is not None:
            validate_ident("app", app_name)
        entry = AuditEntry(
            time=time.time(), platform=self.platform.name, node=self.platform.node_id,
            category=category, action=action, app=app_name, data=dict(data or {}),
            trace_id=current_trace_id(),
            correlation_id=correlation_id or correlation_id_var() or None,
            id=os.urandom(8).hex(),
        )
        if not self.enabled:
            return entry
        self._enqueue(entry, msg_id or entry.id)
        return entry

    def _enqueue(self, entry: AuditEntry, msg_id: str) -> None:
        if len(self._queue) >= self.buffer:
            self._queue.popleft()
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("audit buffer full (%d entries): %d entries dropped so far",
                            self.buffer, self.dropped)
        self._queue.append((entry, msg_id))
        self._idle.clear()
        self._wake.set()
        metrics = self.platform.services.get("metrics")
        if metrics is not None:
            metrics.audit_entry(entry.category)  # type: ignore[attr-defined]

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued entry is stored; False if ``timeout`` passed first."""
        if not self._queue:
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
        pause = 0.1
        while True:
            if not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            js = self.platform.js
            entry, msg_id = self._queue[0]
            try:
                assert js is not None
                await js.publish(entry.subject(), entry.encode(), timeout=2.0,
                                 headers={"Nats-Msg-Id": msg_id})
            except nats.js.errors.NoStreamResponseError:
                with contextlib.suppress(Exception):  # the stream was deleted: re-create it
                    await self._ensure_stream(js)  # type: ignore[arg-type]
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            except nu.TRANSIENT_ERRORS as exc:
                log.debug("audit publish failed (%s); retrying", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            except Exception as exc:  # a permanent refusal: drop this entry, keep the rest
                log.error("audit entry %s/%s refused: %s", entry.category, entry.action, exc)
            pause = 0.1
            if self._queue and self._queue[0][0] is entry:
                self._queue.popleft()
                self.written += 1

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
        assert self.platform.js is not None
        await self._ensure_stream(self.platform.js)
        self._started = True
        self._task = supervise("audit:publisher", self._publisher)

    async def app_started(self, rt: AppRuntime) -> None:
        """Listen to the app's failover stages (failures are audited as ``hook`` entries)."""
        listeners = getattr(rt, "stage_listeners", None)
        if isinstance(listeners, list):
            app = rt.app
            listeners.append(lambda ev: self.stage_event(app, ev))

    def stage_event(self, app: App, ev: StageEvent) -> None:
        """A stage failed or timed out (``app-hooks`` failures are audited per hook)."""
        if ev.outcome not in ("failed", "timeout") or ev.stage == "app-hooks":
            return
        self.log("hook", "timeout" if ev.outcome == "timeout" else "failed",
                 {"hook": f"stage:{ev.stage}", "action": ev.action, "plugin": ev.plugin,
                  "error": ev.error, "policy": ev.policy, "attempt": ev.attempt,
                  "backoff": ev.backoff, "epoch": ev.epoch}, app=app)

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
            if not await self.flush(2.0):
                log.warning("audit: %d entries not stored before leaving", len(self._queue))
            await cancel_and_wait(self._task)
            self._task = None
        self._started = False

    # -- automatic entries (called by the platform) --------------------------------------------

    def transition(self, app: App, role: str, epoch: int | None, reason: str) -> None:
        """A role change of ``app`` on this node (`Platform.transition`)."""
        prev = self._roles.get(app.name)
        if role in ("active", "passive", "stopped"):
            self._roles[app.name] = role
        elected = app.mode.slots() is not None
        single = app.mode.slots() == 1
        if role in ("activation_failed", "stage_failed"):
            self.log("lifecycle", role, {"epoch": epoch, "error": reason}, app=app)
            return
        if role not in ("active", "passive", "stopped"):
            return
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
        if leader is not None and leader != node:  # our own win is logged by `transition`
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

    def lock_event(self, scope: str, event: str, lock: Any, fields: Mapping[str, Any]) -> None:
        """A lock of this node was acquired, released or lost."""
        if event not in ("acquired", "released", "expired"):
            return
        data = {"lock": getattr(lock, "name", "?"), "scope": scope, **fields}
        self.log("lock", event, data, app=None if scope == "_platform" else scope)

    def hook_failed(self, app: App | None, hook: str, function: str, error: BaseException,
                    timed_out: bool) -> None:
        """An app hook or stage failed or timed out."""
        self.log("hook", "timeout" if timed_out else "failed",
                 {"hook": hook, "function": function,
                  "error": f"{type(error).__name__}: {error}"}, app=app)


def correlation_id_var() -> str | None:
    """The current correlation id (alias of `correlation_id` for internal use)."""
    return _correlation.get()


def _mid(app: str, action: str, epoch: int | None, node: str | None) -> str:
    return f"election.{app}.{action}.{epoch}" + (f".{node}" if node else "")
