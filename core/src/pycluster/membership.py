"""Membership: each node's record in ``{platform}_platform`` under ``nodes.{node_id}``.

The record (id, labels, address, version, plugin set, apps, started) is written like a lease:
compare-and-set plus ``Nats-TTL``, refreshed every heartbeat, so a crashed node's record
expires and a graceful leave deletes it. Other nodes watch ``nodes.>`` (with a polling fallback,
since watchers can go silent) and raise ``on_member_join`` / ``on_member_leave``.

A second process starting with a node id whose record is alive asks that process over NATS
whether it is running (``{platform}._.node.{node_id}.ping``); if it answers, the start is refused
with `DuplicateNodeError`; if not (a crashed process whose record has not expired yet), the new
process takes the record over. A process whose record was taken over (it was paused or cut off
too long) learns it at its next refresh and shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from . import natsutil as nu
from .aio import cancel_and_wait
from .errors import DuplicateNodeError
from .names import platform_subject

log = logging.getLogger("pycluster.membership")

NODE_PREFIX = "nodes."


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
        replicas: int = 1,
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
        self.replicas = replicas
        self.incarnation = os.urandom(6).hex()
        self.members: dict[str, dict[str, Any]] = {}
        self._rev = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._ping_sub: Any = None
        self._watch_sub: Any = None
        self._wake = asyncio.Event()
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
            if await self._alive(subject):
                raise DuplicateNodeError(self.platform, self.node_id, holder)
            log.info("node %s: previous record (pid %s) is stale; taking it over",
                     self.node_id, holder.get("pid"))
        expected = existing.seq if existing is not None else 0
        try:
            self._rev = await nu.retry_transient(lambda: nu.cas_publish(
                self._js, self.bucket, self.key, self._encode(), expected_seq=expected,
                ttl=self.ttl,
            ))
        except nu.CASConflict:
            current = await nu.last_msg(self._js, self.bucket, self.key)
            body = _decode(current.data) if current else {}
            if current is None or body.get("incarnation") != self.incarnation:
                raise DuplicateNodeError(self.platform, self.node_id, body) from None
            self._rev = current.seq  # our own write landed before a retried timeout

        async def pong(msg: Msg) -> None:
            if msg.reply:
                await msg.respond(json.dumps({"incarnation": self.incarnation}).encode())

        self._ping_sub = await self._nc.subscribe(subject, cb=pong)
        await self._subscribe()
        await self.refresh_view()
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="membership:heartbeat"),
            asyncio.create_task(self._poll(), name="membership:poll"),
        ]

    async def _alive(self, subject: str) -> bool:
        try:
            await self._nc.request(subject, b"", timeout=min(1.0, self.ttl / 2))
            return True
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
            return False

    def _encode(self) -> bytes:
        return json.dumps(self.record(), separators=(",", ":"), default=str).encode()

    async def publish_now(self) -> None:
        """Refresh the record at once (e.g. after an app changed role)."""
        self._wake.set()

    async def _heartbeat(self) -> None:
        while not self._stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat):
                    await self._wake.wait()
            if self._stopped:
                return
            self._wake.clear()  # before encoding: a change from now on triggers another refresh
            try:
                self._rev = await nu.cas_publish(
                    self._js, self.bucket, self.key, self._encode(), expected_seq=self._rev,
                    ttl=self.ttl,
                )
            except nu.CASConflict:
                current = await nu.last_msg(self._js, self.bucket, self.key)
                body = _decode(current.data) if current and not current.tombstone else {}
                if current is None or current.tombstone:
                    # Our record expired (we were cut off); re-create it.
                    try:
                        self._rev = await nu.cas_publish(
                            self._js, self.bucket, self.key, self._encode(),
                            expected_seq=current.seq if current else 0, ttl=self.ttl,
                        )
                        continue
                    except Exception:
                        continue
                if body.get("incarnation") != self.incarnation:
                    log.error("node %s: another process took this node id over; leaving",
                              self.node_id)
                    self._on_replaced()
                    return
            except nu.TRANSIENT_ERRORS as exc:
                log.warning("node %s: membership refresh failed: %s", self.node_id, exc)

    async def _subscribe(self) -> None:
        async def on_msg(msg: Msg) -> None:
            key = msg.subject.split(".", 2)[2]
            node = key[len(NODE_PREFIX):]
            headers = msg.headers or {}
            if headers.get(nu.KV_OP) in ("DEL", "PURGE") or headers.get(nu.MARKER_REASON):
                self._left(node)
            else:
                self._seen(node, _decode(msg.data))

        try:
            self._watch_sub = await self._js.subscribe(
                nu.kv_subject(self.bucket, NODE_PREFIX + ">"), cb=on_msg,
                ordered_consumer=True, deliver_policy=DeliverPolicy.NEW, idle_heartbeat=2.0,
            )
        except Exception as exc:
            log.warning("membership watch failed (%s); polling only", exc)

    async def reconnected(self) -> None:
        """Re-create the watch after a reconnect."""
        sub, self._watch_sub = self._watch_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self._subscribe()

    def _seen(self, node: str, rec: dict[str, Any]) -> None:
        is_new = node not in self.members
        self.members[node] = rec
        if is_new:
            self._on_join(rec)

    def _left(self, node: str) -> None:
        rec = self.members.pop(node, None)
        if rec is not None:
            self._on_leave(rec)

    async def refresh_view(self) -> None:
        """Read every record (the polling fallback of the watch)."""
        try:
            live = {
                key[len(NODE_PREFIX):]: body
                for key, body in (await nu.live_values(self._js, self.bucket, NODE_PREFIX)).items()
            }
        except nu.TRANSIENT_ERRORS as exc:
            log.debug("membership poll failed: %s", exc)
            return
        for node in list(self.members):
            if node not in live:
                self._left(node)
        for node, rec in live.items():
            self._seen(node, rec)

    async def _poll(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.poll_interval)
            await self.refresh_view()

    async def leave(self) -> None:
        """Delete the record (others see the leave at once) and stop."""
        self._stopped = True
        self._wake.set()
        for t in self._tasks:
            await cancel_and_wait(t)
        for sub in (self._ping_sub, self._watch_sub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await nu.cas_delete(self._js, self.bucket, self.key, expected_seq=self._rev)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
