"""The standby side of a `SQLiteRuntime`: start (buckets, WAL index, follower), following,
the published standby status (for lag-aware promotion), stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.context import Context
from pycluster.kernel.replication import ReplicationState

from .base import STANDBY_KEY, STATUS_FRESH, RuntimeBase, log
from .errors import LitestreamError, SQLiteError
from .follower import Follower, FollowerState
from .snapshots import SnapshotStore
from .walindex import WalIndex, ensure_object_store


class StandbySide(RuntimeBase):
    """Start, follow, publish the standby status, stop."""

    async def start(self) -> None:
        """Start as a standby: buckets, the WAL index, the follower, status publishing.

        Idempotent; called when the app starts on this node (and again by the stages).
        """
        async with self._start_lock:
            if self._started:
                return
            js = self.platform.js
            if js is None:
                raise SQLiteError("the platform is not connected")
            await asyncio.to_thread(self.workdir.mkdir, mode=0o700, parents=True, exist_ok=True)
            replicas = self.platform.settings.stream_replicas
            await ensure_object_store(js, self.wal_bucket, replicas,
                                      f"pycluster-sqlite WAL of {self.app.name}")
            self.store = SnapshotStore(js, self.snap_bucket, replicas)
            await self.store.ensure()
            self.index = WalIndex(js, self.wal_bucket)
            await self.index.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.index.loaded.wait(), 5.0)
            self.follower = Follower(
                binary=self.binary, config=self._config, db_path=self.db_path,
                replica=self.option.replica_path, interval=self.option.follow_interval,
                index=self.index, snapshots=self.store, app=self.app.name,
            )
            self._started = True
            if self.role in (ReplicationState.STOPPED, ReplicationState.STANDBY):
                self.role = ReplicationState.STANDBY
                self.follower.start()
            self._tasks.append(asyncio.create_task(self._status_loop(),
                                                   name=f"sqlite-status:{self.app.name}"))
            log.info("app %s: sqlite replication of %s via bucket %s (litestream %s)",
                     self.app.name, self.db_path, self.wal_bucket, self.binary)

    async def follow(self, ctx: Context) -> None:
        """Standby: start (the first call, when the app starts here) or resume following (the
        end of a step-down, the undo of catch-up; a start that failed is retried by the next
        catch-up, never here, so that a step-down does not wait for NATS)."""
        self._promotion = None
        if not self._follow_called:
            self._follow_called = True
            await self.start()
            return
        if self.role is not ReplicationState.STOPPED:
            self.role = ReplicationState.STANDBY
        if self.follower is not None and self._started:
            self.follower.start()

    async def stop(self) -> None:
        """Stop everything (the app stops on this node; it already stepped down)."""
        for t in self._tasks + self._active_tasks:
            await cancel_and_wait(t)  # a single cancel can be swallowed by wait_for on 3.11
        self._tasks, self._active_tasks = [], []
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.follower is not None:
            await self.follower.stop()
        if self.replicator is not None:
            ctx = Context(app=self.app, platform=self.platform, node_id=self.platform.node_id,
                          reason="stopping")
            with contextlib.suppress(Exception):
                await self.replicator.stop(ctx)
            self.replicator = None
        if self.index is not None:
            await self.index.stop()
        if self.app.platform is not None and self.platform.js is not None:
            with contextlib.suppress(Exception):
                await self.app.kv.delete(f"{STANDBY_KEY}.{self.platform.node_id}")
        self._started = False
        self.role = ReplicationState.STOPPED

    async def reconnected(self) -> None:
        """After a NATS reconnect: re-create the bucket watch."""
        if self.index is not None:
            await self.index.reconnected()

    async def _status_loop(self) -> None:
        key = f"{STANDBY_KEY}.{self.platform.node_id}"
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.role is ReplicationState.ACTIVE and self.replicate_pid() is not None:
                    with contextlib.suppress(LitestreamError, OSError, TimeoutError, ValueError):
                        self.local_txid = await self.control.txid(self.db_path, 1.0)
                f = self.follower
                lag = self.lag()
                st = {"node": self.platform.node_id, "role": str(self.role),
                      "state": str(f.state) if f else "none", "txid": self.replica_txid(),
                      "lag": None if lag == float("inf") else round(lag, 3)}
                now = time.monotonic()
                sig = tuple(st.values())
                if sig != self._published or now - self._published_at > 2.0:
                    await self.app.kv.put(key, json.dumps({**st, "at": time.time()}))
                    self._published, self._published_at = sig, now
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("app %s: publishing the standby status failed: %s", self.app.name, exc)

    async def _better_standby(self, own: int) -> str | None:
        """A live standby whose replica is more current than ``own`` and within the lag limit."""
        kv = self.app.kv
        try:
            keys = await kv.keys(f"{STANDBY_KEY}.>")
        except Exception as exc:
            log.info("app %s: standby statuses unavailable (%s)", self.app.name, exc)
            return None
        now = time.time()
        best: tuple[int, str] | None = None
        for key in keys:
            node = key[len(STANDBY_KEY) + 1:]
            if node == self.platform.node_id:
                continue
            raw = await kv.get(key)
            try:
                st = json.loads(raw or b"{}")
            except ValueError:
                continue
            if (st.get("role") != ReplicationState.STANDBY
                    or st.get("state") != FollowerState.FOLLOWING
                    or now - float(st.get("at", 0)) > STATUS_FRESH):
                continue
            txid = int(st.get("txid") or 0)
            if txid > own and float(st.get("lag", 1e9)) <= self.option.max_promotion_lag:
                if best is None or txid > best[0]:
                    best = (txid, node)
        return best[1] if best else None
