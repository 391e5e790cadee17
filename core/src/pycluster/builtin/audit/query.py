"""The audit trail's records and how to read them: `AuditEntry`, `AuditFilter`, `AuditReader`
(also used by ``pycluster audit``), the stream ``{platform}_audit`` and its subjects.

Each entry is stored on ``{platform}._.audit.{category}.{app|_}.{node}``, so queries by
category, app and node are filtered by the server. Reading needs only a JetStream context.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Any

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

from ...kernel.errors import ConfigError, InvalidNameError
from ...kernel.names import bucket, platform_subject, validate_ident

log = logging.getLogger("pycluster.audit")

SCHEMA_VERSION = 1
MAX_ENTRY_BYTES = 64 * 1024
DUPLICATE_WINDOW = 120.0
TOKEN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def validate_token(kind: str, value: object) -> str:
    """A category or action: lower-case letters, digits and ``_``, starting with a letter."""
    if not isinstance(value, str) or not TOKEN.match(value):
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
        # Built by hand: `dataclasses.asdict` deep-copies ``data`` and costs several times the
        # JSON encoding (this runs for every entry, e.g. twice per lock operation).
        d = {"time": self.time, "platform": self.platform, "node": self.node,
             "category": self.category, "action": self.action, "app": self.app,
             "data": self.data, "trace_id": self.trace_id,
             "correlation_id": self.correlation_id, "id": self.id, "v": SCHEMA_VERSION}
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


