"""Promotion, the becoming-active half of a `SQLiteRuntime`, and its undo.

1. Catch-up (stage ``sqlite-catchup``, CATCH_UP): claim the WAL bucket for this epoch (the
   writer record, a compare-and-set that fails when a newer epoch is recorded), refuse the
   promotion when this replica is more than ``max_promotion_lag`` behind and a more current
   standby is alive, let the follower apply the bucket up to its authoritative head, stop it.
   A follower that cannot get there is replaced by a full ``litestream restore``.
2. Promote (stage ``sqlite-promote``, PROMOTE): verify (``quick_check``/``integrity_check``,
   WAL mode) and atomically rename the file onto ``path``; a replica that fails verification is
   rebuilt from the bucket and verified again. An empty bucket means: the newest snapshot of
   the snapshots bucket (disaster recovery), else the existing local database (first start),
   else a new one.
3. Demote (the undo of promote, after the backend stopped): on a graceful step-down everything
   is synced to NATS before Litestream stops; when the lease was lost it stops at once.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from pycluster.kernel.context import Context
from pycluster.kernel.replication import ReplicationState

from . import dbfile
from . import litestream as ls
from .base import Promotion, log
from .errors import PromotionError, PromotionRefused, ReplicaVerificationError
from .follower import FollowerState
from .snapshots import SnapshotStore
from .standby import StandbySide


class PromotionSide(StandbySide):
    """Catch-up, promotion and demotion (see the module docstring)."""

    async def catch_up(self, ctx: Context) -> None:
        """CATCH_UP: claim the bucket for ``ctx.epoch`` and bring the local copy to its head."""
        await self.start()
        index, _, follower = self._need()
        started = time.monotonic()
        self.role = ReplicationState.PROMOTING
        self.epoch = ctx.epoch
        self.fenced_by = None
        self._promotion = None
        self.audit("promotion_started", {"epoch": ctx.epoch, "replica_txid": follower.txid()})
        try:
            # Announce the new epoch first: any older writer that is still alive stops.
            await index.claim_writer(ctx.epoch or 0, self.platform.node_id)
            head = await index.head()
            if head == 0 and not index.has_data():
                await follower.stop()
                self._promotion = Promotion("empty", None, 0, started, ctx.epoch)
                return
            own = follower.txid() if follower.state is FollowerState.FOLLOWING else None
            lag = index.lag(own)
            if (own or 0) < head and lag > self.option.max_promotion_lag:
                better = await self._better_standby(own or 0)
                if better is not None:
                    raise PromotionRefused(self.app.name, lag, self.option.max_promotion_lag,
                                           better)
            if follower.state is FollowerState.FOLLOWING:
                wait = min(self.option.promotion_timeout / 4, 15.0)
                reached = await follower.wait_txid(head, wait)
                await follower.stop()
                have = follower.txid()
                if reached and have is not None and have >= head:
                    again = await index.head()
                    if again <= have and self.option.replica_path.exists():
                        self._promotion = Promotion("replica", self.option.replica_path, have,
                                                    started, ctx.epoch)
                        return
                    log.warning("app %s: the bucket moved on during catch-up (%d > %d)",
                                self.app.name, again, have)
                else:
                    log.warning("app %s: replica at txid %s did not reach the bucket's head %d "
                                "in %.1fs; restoring from the bucket", self.app.name, have,
                                head, wait)
            else:
                await follower.stop()
            file = await self._restore_to_temp("promote.db")
            self._promotion = Promotion("restore", file, await index.head(), started, ctx.epoch)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.audit("promotion_failed", {"epoch": ctx.epoch, "stage": "catch-up",
                                                "error": f"{type(exc).__name__}: {exc}"})
            raise

    async def _restore_to_temp(self, name: str, txid: int | None = None) -> Path:
        """A full ``litestream restore`` of the bucket into a temporary file of the workdir."""
        tmp = self.workdir / name
        await asyncio.to_thread(dbfile.remove_with_sidecars, tmp, (".tmp",))
        await ls.restore(self.binary, self._config(), self.db_path, tmp,
                         timeout=self.option.promotion_timeout, txid=txid)
        return tmp

    async def promote(self, ctx: Context) -> None:
        """PROMOTE: verify the caught-up copy and swap it into ``path``."""
        index, store, follower = self._need()
        p = self._promotion
        if p is None or p.epoch != ctx.epoch:
            raise PromotionError(self.app.name, "no catch-up for this epoch")
        path = self.option.path
        try:
            source = p.kind
            if p.kind == "empty":
                p, source = await self._seed(p, store)
            if p.file is not None:
                try:
                    info = await asyncio.to_thread(dbfile.verify, p.file, self.option.verify)
                except ReplicaVerificationError as exc:
                    self.audit("replica_rejected", {"epoch": ctx.epoch, "source": p.kind,
                                                    "reason": exc.reason})
                    log.error("app %s: %s; rebuilding it from the WAL bucket", self.app.name,
                              exc)
                    if not index.has_data():
                        raise PromotionError(self.app.name, str(exc)) from exc
                    file = await self._restore_to_temp("promote.db")
                    p = Promotion("restore", file, await index.head(), p.started, p.epoch)
                    source = "restore (replica rejected)"
                    try:
                        info = await asyncio.to_thread(dbfile.verify, file, self.option.verify)
                    except ReplicaVerificationError as exc2:
                        raise PromotionError(self.app.name, str(exc2)) from exc2
                assert p.file is not None
                kept = await asyncio.to_thread(dbfile.swap_into, p.file, path,
                                               self.option.keep_previous)
                if kept is not None:
                    log.info("app %s: previous database kept as %s", self.app.name, kept)
                await asyncio.to_thread(follower.discard)
            else:
                info = await asyncio.to_thread(dbfile.verify, path, self.option.verify)
                await asyncio.to_thread(shutil.rmtree, dbfile.meta_dir(path), True)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                self.audit("promotion_failed", {"epoch": ctx.epoch, "stage": "promote",
                                                "error": f"{type(exc).__name__}: {exc}"})
            raise
        took = time.monotonic() - p.started
        self.local_txid = p.txid
        self.role = ReplicationState.ACTIVE
        self.last_promotion = {"epoch": ctx.epoch, "source": source, "txid": p.txid,
                               "seconds": round(took, 4), "at": time.time(), **info}
        log.info("app %s: promoted %s (source %s, txid %d, epoch %s) in %.3fs", self.app.name,
                 path, source, p.txid, ctx.epoch, took)
        self.audit("promotion_completed", self.last_promotion)
        self.promotions.observe(took)

    async def _seed(self, p: Promotion, store: SnapshotStore) -> tuple[Promotion, str]:
        """The source of a promotion when the WAL bucket is empty."""
        try:
            snap = await store.latest()
        except Exception as exc:
            log.warning("app %s: snapshots unavailable (%s)", self.app.name, exc)
            snap = None
        if snap is not None:
            tmp = self.workdir / "promote.db"
            await store.download(snap.id, tmp, overwrite=True, verify=None)
            log.warning("app %s: the WAL bucket %s is empty; rebuilding from snapshot %s "
                        "(txid %d): changes after it are not available", self.app.name,
                        self.wal_bucket, snap.id, snap.txid)
            self.audit("rebuilt_from_snapshot", {"snapshot": snap.id, "txid": snap.txid})
            return Promotion("snapshot", tmp, snap.txid, p.started, p.epoch), "snapshot"
        path = self.option.path
        mode = await asyncio.to_thread(dbfile.journal_mode_of, path)
        if mode in ("wal", "rollback"):
            await asyncio.to_thread(dbfile.check_wal_mode, path)
            return Promotion("local", None, 0, p.started, p.epoch), "local database"
        await asyncio.to_thread(dbfile.remove_with_sidecars, path)
        await asyncio.to_thread(dbfile.create_empty, path)
        return Promotion("local", None, 0, p.started, p.epoch), "new database"

    async def demote(self, ctx: Context) -> None:
        """Undo of the promotion: the backend has stopped; sync everything, stop Litestream."""
        fenced = ctx.deadline is not None or not self.lease_valid()
        if self.replicator is not None:
            if not fenced:
                try:
                    res = await self.control.sync(self.db_path, min(10.0, ctx.remaining(10.0)),
                                                  self.app.name)
                    self.local_txid = int(res.get("txid", 0)) or self.local_txid
                    self.last_sync = time.time()
                    log.info("app %s: final sync before stepping down: txid %s",
                             self.app.name, res.get("replicated_txid"))
                except Exception as exc:
                    log.warning("app %s: final sync before stepping down failed: %s",
                                self.app.name, exc)
            await self._stop_replicator(ctx)
        if self.role is not ReplicationState.STOPPED:
            self.role = ReplicationState.STANDBY
