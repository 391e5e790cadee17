"""The primary side of a `SQLiteRuntime`: replication while active, fencing by a newer
writer epoch, periodic snapshots, the durability barrier ``sync``.

Replicate (stage ``sqlite-replicate``, REPLICATE, after the backend started): ``litestream
replicate`` under the core's fence guard (`pycluster.fenceguard`, via the process backend): the
guard is told the lease deadline on every renewal and kills Litestream when it passes, even if
this node is paused or its event loop stuck; if the node dies, Litestream dies with it
(parent-death signal). The node also watches the writer record and stops at once if a newer
epoch appears. Snapshots (stage ``sqlite-snapshots``, SNAPSHOTS, failure policy continue):
materialise Litestream's snapshots into the snapshots bucket, prune by ``retention``.

Stepping down: when the lease is lost, Litestream is stopped at once (it is already dead if the
guard's deadline passed); on a graceful step-down it keeps running until the backend has
stopped, and `pycluster_sqlite.promotion.PromotionSide.demote` syncs and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from pycluster.builtin.process import Process, ProcessBackend
from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.context import Context
from pycluster.kernel.replication import ReplicationState

from . import dbfile
from . import litestream as ls
from .base import REPLICATE_STAGE, RuntimeBase, log
from .errors import FencedError, PromotionError, ReplicationNotRunningError, SQLiteError
from .snapshots import Snapshot, SnapshotStore
from .walindex import WalIndex, WriterRecord


class PrimarySide(RuntimeBase):
    """Replication, fencing, snapshots, sync (see the module docstring)."""

    async def replicate(self, ctx: Context) -> None:
        """REPLICATE: start ``litestream replicate`` for ``ctx.epoch`` (refused when fenced)."""
        index, _, _ = self._need()
        if not self.lease_valid():
            raise PromotionError(self.app.name, "the lease is gone: not replicating")
        rec = await index.read_writer()
        if rec is not None and rec.epoch > (ctx.epoch or 0):
            self.fenced_by = rec
            raise FencedError(self.wal_bucket, ctx.epoch, rec.epoch, rec.node)
        cfg = self._config(socket=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        o = self.option
        proc = Process((self.binary, "replicate", "-config", str(cfg), "-no-expand-env"),
                       grace=5.0, restart="always", max_restarts=o.max_restarts,
                       restart_backoff=o.restart_backoff)
        self.replicator = ProcessBackend(proc, self.app, self.platform, stage=REPLICATE_STAGE)
        await self.replicator.start(ctx)
        await self._wait_control(30.0)
        self._unwatch = index.on_writer(self._writer_changed)
        self._active_tasks.append(asyncio.create_task(self._janitor(),
                                                      name=f"sqlite-janitor:{self.app.name}"))
        log.info("app %s: replicating %s to %s (epoch %s, litestream pid %s)", self.app.name,
                 self.db_path, self.wal_bucket, ctx.epoch, self.replicate_pid())

    async def _wait_control(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            rep = self.replicator
            if rep is None or rep.state in ("failed", "stopped"):
                raise ReplicationNotRunningError(self.app.name, rep.state if rep else "absent")
            try:
                self.local_txid = await self.control.txid(self.db_path, 2.0)
                return
            except (OSError, TimeoutError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise ReplicationNotRunningError(
                    self.app.name, f"no answer on the control socket within {timeout}s")
            await asyncio.sleep(0.05)

    async def stop_replicating(self, ctx: Context) -> None:
        """Undo of REPLICATE: stop at once when the lease was lost or a newer writer fenced
        this node; on a graceful step-down Litestream runs on until `demote`."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        tasks, self._active_tasks = self._active_tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ctx.deadline is not None or not self.lease_valid() or self.fenced_by is not None:
            await self._stop_replicator(ctx)
        # Graceful: Litestream keeps running while the backend stops; `demote` syncs and
        # stops it afterwards, so nothing committed before the step-down is lost.

    def _writer_changed(self, rec: WriterRecord) -> None:
        primary = (ReplicationState.ACTIVE, ReplicationState.PROMOTING)
        if self.role not in primary or rec.epoch <= (self.epoch or 0):
            return
        self.fenced_by = rec
        log.error("app %s: epoch %s (node %s) is now the bucket's writer; this node (epoch %s) "
                  "stops replicating at once", self.app.name, rec.epoch, rec.node, self.epoch)
        self.audit("fenced", {"epoch": self.epoch, "newer_epoch": rec.epoch, "node": rec.node})

        async def fence() -> None:
            ctx = Context(app=self.app, platform=self.platform, node_id=self.platform.node_id,
                          epoch=self.epoch, reason="fenced by a newer writer",
                          deadline=time.monotonic())
            await self._stop_replicator(ctx)
            rt = self._core()
            if rt is not None:
                rt.report_failure(REPLICATE_STAGE, f"newer writer epoch {rec.epoch}")

        self.platform.spawn(fence(), f"{self.app.name}:sqlite-fence")

    async def _janitor(self) -> None:
        """Purge the markers of deleted LTX files (only the writer does it)."""
        if self.index is not None:  # a full reload: markers a standby already forgot
            await self.index.reconnected()
        while True:
            await asyncio.sleep(10.0)
            if self.index is None or not self.lease_valid():
                continue
            try:
                n = await self.index.purge_deleted(older_than=60.0)
                if n:
                    log.debug("app %s: purged %d deleted LTX markers", self.app.name, n)
            except Exception as exc:
                log.debug("app %s: purging deleted LTX markers failed: %s", self.app.name, exc)

    async def snapshots_on(self, ctx: Context) -> None:
        """SNAPSHOTS: start the periodic snapshot loop."""
        self._active_tasks.append(asyncio.create_task(
            self._snapshot_loop(), name=f"sqlite-snapshots:{self.app.name}"))

    async def snapshots_off(self, ctx: Context) -> None:
        """Undo of SNAPSHOTS: stop the loop."""
        keep = []
        for t in self._active_tasks:
            if t.get_name().startswith("sqlite-snapshots:"):
                await cancel_and_wait(t)
            else:
                keep.append(t)
        self._active_tasks = keep

    async def _snapshot_loop(self) -> None:
        """Materialise each new Litestream snapshot; prune by retention."""
        period = min(60.0, max(1.0, self.option.snapshot_interval / 4))
        while True:
            await asyncio.sleep(period)
            if self.role is not ReplicationState.ACTIVE or self.index is None or self.store is None:
                continue
            try:
                l9 = self.index.latest_snapshot()
                last = self.store.last or await self.store.latest()
                due = last is None or time.time() - last.created >= (
                    0.5 * self.option.snapshot_interval)
                if l9 is not None and due and (last is None or l9.max_txid > last.txid):
                    await self.create_snapshot(txid=l9.max_txid, source="litestream-snapshot")
                removed = await self.store.prune(self.option.retention)
                if removed:
                    log.info("app %s: pruned snapshots %s", self.app.name, ", ".join(removed))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("app %s: periodic snapshot failed: %s", self.app.name, exc)

    async def create_snapshot(self, txid: int | None = None,
                              source: str = "on-demand") -> Snapshot:
        """A verified snapshot of the bucket at ``txid`` (default: its head), uploaded to the
        snapshots bucket. Works on any node of the app."""
        await self.start()
        index, store, _ = self._need()
        snap = await make_snapshot(
            binary=self.binary, config=self._config(), db_path=self.db_path, index=index,
            store=store, tmpdir=self.workdir, node=self.platform.node_id, source=source,
            txid=txid, timeout=self.option.promotion_timeout,
        )
        self.last_snapshot = snap
        self.audit("snapshot_created", snap.as_dict())
        return snap

    async def sync(self, timeout: float) -> dict[str, Any]:
        """Upload everything committed so far and wait for it (active instance only)."""
        from pycluster.kernel.errors import NotLeaderError

        if self.role not in (ReplicationState.ACTIVE, ReplicationState.PROMOTING):
            raise NotLeaderError(self.app.name, self.app.leader, self.app.epoch)
        deadline = time.monotonic() + timeout
        while self.replicate_pid() is None:
            if self.role not in (ReplicationState.ACTIVE, ReplicationState.PROMOTING):
                raise NotLeaderError(self.app.name, self.app.leader, self.app.epoch)
            if time.monotonic() >= deadline:
                state = self.replicator.state if self.replicator else "not started"
                raise ReplicationNotRunningError(self.app.name, state)
            await asyncio.sleep(0.02)
        if not self.lease_valid():
            raise NotLeaderError(self.app.name, self.app.leader, self.app.epoch)
        try:
            res = await self.control.sync(self.db_path, max(0.1, deadline - time.monotonic()),
                                          self.app.name)
        except OSError as exc:
            raise ReplicationNotRunningError(self.app.name, f"control socket: {exc}") from exc
        self.local_txid = int(res.get("txid", 0)) or self.local_txid
        self.last_sync = time.time()
        return res


async def make_snapshot(*, binary: str, config: Path, db_path: str, index: WalIndex,
                        store: SnapshotStore, tmpdir: Path, node: str, source: str,
                        txid: int | None, timeout: float) -> Snapshot:
    """Restore the bucket at ``txid`` (default: its head) into a temporary file, verify it and
    upload it as a snapshot. Used by the active node, `SnapshotHandle.create` and the CLI."""
    head = txid if txid is not None else await index.head()
    if head == 0:
        raise SQLiteError(f"the WAL bucket {index.bucket} is empty: nothing to snapshot")
    tmp = tmpdir / f"snapshot-{os.getpid()}-{os.urandom(4).hex()}.db"
    try:
        await ls.restore(binary, config, db_path, tmp, timeout=timeout, txid=head)
        await asyncio.to_thread(dbfile.verify, tmp, "quick")
        writer = index.writer or await index.read_writer()
        snap = await store.upload(tmp, head, node=node, epoch=writer.epoch if writer else None,
                                  source=source)
    finally:
        await asyncio.to_thread(dbfile.remove_with_sidecars, tmp, (".tmp",))
    log.info("snapshot %s of %s created (txid %d, %d bytes)", snap.id, index.bucket, snap.txid,
             snap.size)
    return snap
