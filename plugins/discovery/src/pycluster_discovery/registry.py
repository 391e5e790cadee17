"""The default service registry: one lease per instance in the KV bucket ``{platform}_services``.

Each instance is the key ``<app>.<service>.<node>`` holding a JSON record, written with a
compare-and-set against its last sequence and a per-message TTL (``Nats-TTL``) equal to the
platform's lease TTL, and rewritten every heartbeat interval while registered. A node that dies
stops renewing, so its records expire within the lease; the bucket's expiry markers tell
watchers at once. Readers keep a view of the bucket from a KV watcher, reconciled by polling
(a watcher can silently stop when its server dies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import nats.errors

from pycluster.kernel import natsutil as nu
from pycluster.kernel.aio import cancel_and_wait, supervise
from pycluster.kernel.discovery import ServiceChange, ServiceInstance, ServiceRegistry

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from pycluster.kernel.platform import Platform

log = logging.getLogger("pycluster.discovery")

PASSING, STANDBY, CRITICAL = "passing", "standby", "critical"

_RENEW_ERRORS: tuple[type[BaseException], ...] = (nu.CASConflict, *nu.TRANSIENT_ERRORS)
_POLL_ERRORS: tuple[type[BaseException], ...] = (*nu.TRANSIENT_ERRORS, nats.errors.Error)


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into another error (a timeout), so a
    loop that survives errors still ends when its task is cancelled."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def encode(inst: ServiceInstance) -> bytes:
    """The JSON record of an instance (without ``platform`` and ``zone``: a registry is one
    platform's)."""
    d = asdict(inst)
    d["tags"] = list(inst.tags)
    del d["platform"], d["zone"]
    return json.dumps(d, sort_keys=True).encode()


def decode(data: bytes | None) -> ServiceInstance | None:
    """An instance from its JSON record (None when it is not one)."""
    if not data:
        return None
    try:
        d = json.loads(data)
        d["tags"] = tuple(d.get("tags") or ())
        return ServiceInstance(**d)
    except (ValueError, TypeError):
        return None


def matches(inst: ServiceInstance, service: str | None, app: str | None, tags: Iterable[str],
            healthy_only: bool) -> bool:
    """Whether ``inst`` answers a lookup."""
    return ((service is None or inst.service == service) and (app is None or inst.app == app)
            and set(tags) <= set(inst.tags) and (not healthy_only or inst.status == PASSING))


class KvServiceRegistry(ServiceRegistry):
    """`pycluster.kernel.discovery.ServiceRegistry` on NATS KV leases (see the module).

    :param platform: the platform (its NATS connection, name, lease TTL and heartbeat).
    :param poll_interval: seconds between reconciliations of the view with the bucket.
    """

    def __init__(self, platform: Platform, *, poll_interval: float = 1.0) -> None:
        self.platform = platform
        self.bucket = f"{platform.name}_services"
        self.ttl = platform.settings.lease_ttl
        self.renew_interval = platform.settings.heartbeat_interval
        self.poll_interval = poll_interval
        #: Instances this node registered: key -> (instance, last sequence written).
        self._owned: dict[str, tuple[ServiceInstance, int | None]] = {}
        #: The bucket as last seen: key -> (sequence, instance or None when gone).
        self._view: dict[str, tuple[float, ServiceInstance | None]] = {}
        self._watchers: list[asyncio.Queue[ServiceChange]] = []
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.synced = asyncio.Event()
        #: Renewals that failed (the record may expire if they keep failing).
        self.renew_failures = 0

    @property
    def _js(self) -> JetStreamContext:
        assert self.platform.js is not None, "the platform is not connected"
        return self.platform.js

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the bucket, load the view, start renewing and following."""
        await nu.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1,
                           replicas=self.platform.settings.stream_replicas)
        await self._poll_once()
        self.synced.set()
        self._tasks = [
            supervise(f"discovery-renew:{self.bucket}", self._renew_loop, logger=log),
            supervise(f"discovery-follow:{self.bucket}", self._follow, logger=log),
            supervise(f"discovery-poll:{self.bucket}", self._poll_loop, logger=log),
        ]

    async def stop(self, withdraw: bool = True) -> None:
        """Stop renewing (and, with ``withdraw``, delete this node's records)."""
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []
        if withdraw:
            for inst, _seq in list(self._owned.values()):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self.deregister(inst)
        self._owned.clear()

    # -- writes ---------------------------------------------------------------------------------

    def owned(self) -> list[ServiceInstance]:
        """The instances this node registered (and renews)."""
        return [inst for inst, _ in self._owned.values()]

    async def register(self, instance: ServiceInstance) -> None:
        """Write ``instance``'s record now and renew it until deregistered (an existing record
        of the same key is replaced: status and role changes go through here)."""
        async with self._lock:
            await self._write(instance, self._owned.get(instance.key, (None, None))[1])

    async def _write(self, inst: ServiceInstance, expected: int | None,
                     renewal: bool = False) -> None:
        payload = encode(inst)
        for _ in range(3):
            if expected is None:
                last = await nu.last_msg(self._js, self.bucket, inst.key, direct=False)
                expected = last.seq if last is not None else 0
            try:
                seq = await nu.cas_publish(self._js, self.bucket, inst.key, payload,
                                           expected_seq=expected, ttl=self.ttl)
            except nu.CASConflict:
                expected = None  # expired (a marker) or rewritten: write after what is there
                continue
            if renewal and inst.key not in self._owned:
                return  # deregistered while this renewal was in flight: its delete follows
            self._owned[inst.key] = (inst, seq)
            self._apply(inst.key, seq, inst)
            return
        raise nu.CASConflict(f"{self.bucket}/{inst.key}: kept changing under the registration")

    async def deregister(self, instance: ServiceInstance) -> None:
        """Stop renewing ``instance``'s record (at once, whatever happens next) and delete it
        (by its key). If the delete cannot be written (NATS cut off) or is cancelled, the
        record expires within its TTL: nothing renews it any more."""
        owned = self._owned.pop(instance.key, None)
        async with self._lock:
            expected = owned[1] if owned is not None else None
            for _ in range(3):
                if expected is None:
                    last = await nu.last_msg(self._js, self.bucket, instance.key, direct=False)
                    if last is None or last.tombstone:
                        return
                    expected = last.seq
                try:
                    seq = await nu.cas_delete(self._js, self.bucket, instance.key,
                                              expected_seq=expected)
                except nu.CASConflict:
                    expected = None
                    continue
                self._apply(instance.key, seq, None)
                return

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            async with self._lock:
                for key, (inst, seq) in list(self._owned.items()):
                    if key not in self._owned:
                        continue  # deregistered while an earlier renewal held the lock
                    try:
                        await self._write(inst, seq, renewal=True)
                    except _RENEW_ERRORS as exc:
                        stop_if_cancelled()
                        self.renew_failures += 1
                        log.warning("discovery: renewing %s failed: %s", key, exc)
                        # the next round reads what is there and writes after it
                        if key in self._owned:
                            self._owned[key] = (inst, None)

    # -- reads ----------------------------------------------------------------------------------

    async def lookup(self, service: str, *, app: str | None = None, tags: Iterable[str] = (),
                     healthy_only: bool = True) -> list[ServiceInstance]:
        """The live instances of ``service`` from the view (kept within milliseconds of the
        bucket by a watcher, within ``poll_interval`` by polling)."""
        return self.instances(service, app=app, tags=tags, healthy_only=healthy_only)

    def instances(self, service: str | None = None, *, app: str | None = None,
                  tags: Iterable[str] = (), healthy_only: bool = False) -> list[ServiceInstance]:
        """The view's live instances (synchronous: for DNS and exports), sorted by key."""
        tags = tuple(tags)
        out = [inst for _, inst in self._view.values()
               if inst is not None and matches(inst, service, app, tags, healthy_only)]
        return sorted(out, key=lambda i: i.key)

    async def read(self, service: str | None = None, *, app: str | None = None,
                   tags: Iterable[str] = (), healthy_only: bool = True) -> list[ServiceInstance]:
        """Like `lookup`, read from the bucket now (one request per key)."""
        tags = tuple(tags)
        msgs = await nu.live_msgs(self._js, self.bucket, "")
        out = [inst for inst in (decode(m.data) for m in msgs.values())
               if inst is not None and matches(inst, service, app, tags, healthy_only)]
        return sorted(out, key=lambda i: i.key)

    async def watch(self, service: str, *,
                    app: str | None = None) -> AsyncIterator[ServiceChange]:
        """Changes of ``service``'s instances in the order the bucket saw them; the current
        instances come first, as ``register`` changes."""
        queue: asyncio.Queue[ServiceChange] = asyncio.Queue()
        for inst in self.instances(service, app=app):
            queue.put_nowait(ServiceChange("register", inst))
        self._watchers.append(queue)
        try:
            while True:
                change = await queue.get()
                if matches(change.instance, service, app, (), False):
                    yield change
        finally:
            self._watchers.remove(queue)

    def _apply(self, key: str, seq: float, inst: ServiceInstance | None) -> None:
        """Record what the bucket holds at ``seq`` for ``key``; tell watchers what changed."""
        cur_seq, cur = self._view.get(key, (0, None))
        if seq <= cur_seq:
            return
        self._view[key] = (seq, inst)
        change: ServiceChange | None = None
        if cur is None and inst is not None:
            change = ServiceChange("register", inst)
        elif cur is not None and inst is None:
            change = ServiceChange("deregister", cur)
        elif cur is not None and inst is not None and cur != inst:
            change = ServiceChange("update", inst)
        if change is not None:
            for q in self._watchers:
                q.put_nowait(change)

    async def _follow(self) -> None:
        kv = await self._js.key_value(self.bucket)
        watcher = await kv.watchall()
        try:
            async for entry in watcher:
                if entry is None or entry.key.count(".") != 2:
                    continue
                gone = entry.operation in ("DEL", "PURGE") or not entry.value
                self._apply(entry.key, entry.revision or 0, None if gone else decode(entry.value))
        finally:
            # bounded: a cancelled follower must end even when the connection is gone
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._poll_once()
            except _POLL_ERRORS as exc:
                stop_if_cancelled()
                log.debug("discovery: polling %s failed: %s", self.bucket, exc)

    async def _poll_once(self) -> None:
        info = await self._js.stream_info(nu.kv_stream(self.bucket))
        before = info.state.last_seq
        msgs = await nu.live_msgs(self._js, self.bucket, "")
        for key, m in msgs.items():
            if key.count(".") == 2:
                self._apply(key, m.seq, decode(m.data))
        for key, (seq, inst) in list(self._view.items()):
            if inst is not None and key not in msgs and seq <= before:
                # expired without a marker seen: gone as of the snapshot (a later write wins)
                self._apply(key, before + 0.5, None)


def as_dict(inst: ServiceInstance) -> dict[str, Any]:
    """An instance as JSON-ready data (``platform`` and ``zone`` only when known: a result
    across platforms)."""
    d = asdict(inst)
    d["tags"] = list(inst.tags)
    if inst.platform is None:
        del d["platform"], d["zone"]
    return d
