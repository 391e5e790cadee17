"""`SQLiteRuntime`: one app's replicated database on one node, and its failover stages.

Standby: a `Follower` keeps the replica current; the node publishes its replica's position in
the app KV (``sqlite.standby.<node>``) for lag-aware promotion.

Becoming active (stages of the coordinator, in this order):

1. ``sqlite-catchup`` (CATCH_UP): claim the WAL bucket for this epoch (the writer record, a
   compare-and-set that fails when a newer epoch is recorded), refuse the promotion when this
   replica is more than ``max_promotion_lag`` behind and a more current standby is alive,
   let the follower apply the bucket up to its authoritative head, stop it. A follower that
   cannot get there is replaced by a full ``litestream restore``.
2. ``sqlite-promote`` (PROMOTE): verify (``quick_check``/``integrity_check``, WAL mode) and
   atomically rename the file onto ``path``; a replica that fails verification is rebuilt from
   the bucket and verified again. An empty bucket means: the newest snapshot of the snapshots
   bucket (disaster recovery), else the existing local database (first start), else a new one.
3. (VIP, backend: other plugins.)
4. ``sqlite-replicate`` (REPLICATE): ``litestream replicate`` under the core's fence guard
   (`pycluster.fenceguard`, via the process backend): the guard is told the lease deadline on
   every renewal and kills Litestream when it passes, even if this node is paused or its event
   loop stuck; if the node dies, Litestream dies with it (parent-death signal). The node also
   watches the writer record and stops at once if a newer epoch appears.
5. ``sqlite-snapshots`` (SNAPSHOTS): materialise Litestream's snapshots into the snapshots
   bucket, prune by ``retention`` (failure policy: continue).

Stepping down reverses it. On a graceful step-down Litestream keeps running until the backend
has stopped, then everything is synced to NATS (``sync``) before it stops (in the undo of
``sqlite-promote``, which runs after the backend's). When the lease is lost, Litestream is
stopped at once (it is already dead if the guard's deadline passed). Following resumes.

Under connection loss: a standby keeps its replica at the last position (lag grows); an active
node keeps replicating until the lease ends, when the guard and the coordinator stop it.

Size: one runtime per app whose stages (catch-up, promote, replicate, snapshots) share the
follower, Litestream and WAL-index state; split along the stages when it grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycluster.builtin.process import Process, ProcessBackend
from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.context import Context
from pycluster.kernel.names import bucket
from pycluster.kernel.settings import secret_value
from pycluster.kernel.stages import FailurePolicy, Stage, StageOrder

from . import dbfile
from . import litestream as ls
from .errors import (
    FencedError,
    LitestreamError,
    PromotionError,
    PromotionRefused,
    ReplicationNotRunningError,
    ReplicaVerificationError,
    SQLiteError,
)
from .follower import Follower
from .snapshots import Snapshot, SnapshotStore
from .walindex import WalIndex, WriterRecord, ensure_object_store

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from pycluster.kernel.app import App
    from pycluster.kernel.coordinator import AppRuntime
    from pycluster.kernel.platform import Platform
    from pycluster.kernel.settings import PlatformSettings

    from .options import SQLite

log = logging.getLogger("pycluster.sqlite")

PLUGIN = "sqlite"
STANDBY_KEY = "sqlite.standby"
STATUS_FRESH = 5.0  # seconds a published standby status counts as current
REPLICATE_STAGE = "sqlite-replicate"

_RUNTIMES: weakref.WeakKeyDictionary[Platform, dict[str, SQLiteRuntime]] = (
    weakref.WeakKeyDictionary()
)


def runtimes_of(platform: Platform) -> dict[str, SQLiteRuntime]:
    """The SQLite runtimes of a platform, by app name."""
    return _RUNTIMES.setdefault(platform, {})


@dataclass
class Promotion:
    """What the catch-up stage hands to the promote stage."""

    kind: str  # replica | restore | empty
    file: Path | None
    txid: int
    started: float
    epoch: int | None


def nats_access(platform: Platform) -> ls.NatsAccess:
    """How Litestream reaches the NATS server this node is connected to, with its credentials."""
    embedded = platform.embedded.url if platform.embedded is not None else None
    return access_for(platform.settings, platform.nc, embedded)


def access_for(s: PlatformSettings, nc: NATS | None, fallback: str | None = None
               ) -> ls.NatsAccess:
    """`NatsAccess` from settings and the connection in use (Litestream takes one server:
    the one ``nc`` is connected to, else ``fallback``, else the first configured URL)."""
    url = None
    if nc is not None and nc.connected_url is not None:
        u = nc.connected_url
        url = f"{u.scheme}://{u.hostname}:{u.port or 4222}"
    elif fallback:
        url = fallback
    elif s.nats_url:
        url = s.nats_url[0]
    if url is None:
        raise SQLiteError("no NATS URL known for litestream")
    if s.nats_nkey_seed:
        raise SQLiteError("litestream cannot authenticate with an nkey seed; use a creds file "
                          "(nats_creds) or user/password for platforms with SQLite apps")
    return ls.NatsAccess.from_url(
        url, username=s.nats_user, password=secret_value(s.nats_password),
        token=secret_value(s.nats_token),
        creds=s.nats_creds, tls=bool(s.tls_ca or s.tls_cert),
        root_cas=[s.tls_ca] if s.tls_ca else [], client_cert=s.tls_cert, client_key=s.tls_key,
    )


class SQLiteRuntime:
    """The plugin's state for one app on one node (see the module docstring)."""

    def __init__(self, option: SQLite, app: App, platform: Platform) -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.wal_bucket = bucket(platform.name, app.name, "wal")
        self.snap_bucket = bucket(platform.name, app.name, "snapshots")
        self.binary = ls.find_litestream(option.litestream)
        self.workdir = option.workdir
        self.role = "stopped"  # standby | promoting | active | stopped
        self.epoch: int | None = None
        self.index: WalIndex | None = None
        self.store: SnapshotStore | None = None
        self.follower: Follower | None = None
        self.replicator: ProcessBackend | None = None
        self.local_txid: int | None = None
        self.last_sync: float | None = None
        self.last_promotion: dict[str, Any] | None = None
        self.last_snapshot: Snapshot | None = None
        self.fenced_by: WriterRecord | None = None
        self._promotion: Promotion | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._active_tasks: list[asyncio.Task[Any]] = []
        self._unwatch: Any = None
        self._published: tuple[Any, ...] | None = None
        self._published_at = 0.0
        runtimes_of(platform)[app.name] = self

    # -- paths and config files --------------------------------------------------------------

    @property
    def db_path(self) -> str:
        """The database path as a string."""
        return str(self.option.path)

    @property
    def socket_path(self) -> str:
        """The control socket of ``litestream replicate`` (short enough for AF_UNIX)."""
        p = str(self.workdir / "litestream.sock")
        if len(p.encode()) < 100:
            return p
        import hashlib
        import tempfile

        h = hashlib.sha1(p.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), f"pycluster-sqlite-{h}.sock")

    def _config(self, socket: bool = False) -> Path:
        """Write a litestream config for this database (with the current NATS server)."""
        o = self.option
        cfg = ls.LitestreamConfig(
            db_path=self.db_path, bucket=self.wal_bucket, access=nats_access(self.platform),
            socket_path=self.socket_path if socket else None,
            monitor_interval=o.monitor_interval, sync_interval=o.sync_interval,
            snapshot_interval=o.snapshot_interval, retention=o.retention,
            compaction_levels=o.compaction_levels, l0_retention=o.l0_retention,
        )
        return cfg.write(self.workdir / ("replicate.yml" if socket else "restore.yml"))

    def _core(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app.name)

    def lease_valid(self) -> bool:
        """Whether this node holds the app's lease right now (checked against the clock)."""
        rt = self._core()
        return rt is None or rt.election is None or rt.election.is_leader

    @property
    def control(self) -> ls.ControlClient:
        """Client of the running ``litestream replicate``'s control socket."""
        return ls.ControlClient(self.socket_path)

    # -- lifecycle -------------------------------------------------------------------------------

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
            if self.role in ("stopped", "standby"):
                self.role = "standby"
                self.follower.start()
            self._tasks.append(asyncio.create_task(self._status_loop(),
                                                   name=f"sqlite-status:{self.app.name}"))
            log.info("app %s: sqlite replication of %s via bucket %s (litestream %s)",
                     self.app.name, self.db_path, self.wal_bucket, self.binary)

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
        self.role = "stopped"

    async def reconnected(self) -> None:
        """After a NATS reconnect: re-create the bucket watch."""
        if self.index is not None:
            await self.index.reconnected()

    # -- stages ------------------------------------------------------------------------------------

    def stages(self) -> list[Stage]:
        """The stages this database adds to the app's failover sequence."""
        budget = self.option.promotion_timeout
        return [
            Stage("sqlite-catchup", StageOrder.CATCH_UP, self._catch_up, self._resume_following,
                  timeout=budget, plugin=PLUGIN, extra={"sqlite": self}),
            Stage("sqlite-promote", StageOrder.PROMOTE, self._promote, self._demote,
                  timeout=budget, plugin=PLUGIN, extra={"sqlite": self}),
            Stage(REPLICATE_STAGE, StageOrder.REPLICATE, self._replicate, self._replicate_undo,
                  timeout=60.0, plugin=PLUGIN, extra={"sqlite": self}),
            Stage("sqlite-snapshots", StageOrder.SNAPSHOTS, self._snapshots_on,
                  self._snapshots_off, timeout=30.0, plugin=PLUGIN,
                  on_failure=FailurePolicy.CONTINUE, extra={"sqlite": self}),
        ]

    def _need(self) -> tuple[WalIndex, SnapshotStore, Follower]:
        if self.index is None or self.store is None or self.follower is None:
            raise SQLiteError(f"app {self.app.name!r}: sqlite runtime not started")
        return self.index, self.store, self.follower

    # 1. catch-up -------------------------------------------------------------------------------

    async def _catch_up(self, ctx: Context) -> None:
        await self.start()
        index, _, follower = self._need()
        started = time.monotonic()
        self.role = "promoting"
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
            own = follower.txid() if follower.state == "following" else None
            lag = index.lag(own)
            if (own or 0) < head and lag > self.option.max_promotion_lag:
                better = await self._better_standby(own or 0)
                if better is not None:
                    raise PromotionRefused(self.app.name, lag, self.option.max_promotion_lag,
                                           better)
            if follower.state == "following":
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
            if (st.get("role") != "standby" or st.get("state") != "following"
                    or now - float(st.get("at", 0)) > STATUS_FRESH):
                continue
            txid = int(st.get("txid") or 0)
            if txid > own and float(st.get("lag", 1e9)) <= self.option.max_promotion_lag:
                if best is None or txid > best[0]:
                    best = (txid, node)
        return best[1] if best else None

    async def _restore_to_temp(self, name: str, txid: int | None = None) -> Path:
        """A full ``litestream restore`` of the bucket into a temporary file of the workdir."""
        tmp = self.workdir / name
        await asyncio.to_thread(dbfile.remove_with_sidecars, tmp, (".tmp",))
        await ls.restore(self.binary, self._config(), self.db_path, tmp,
                         timeout=self.option.promotion_timeout, txid=txid)
        return tmp

    async def _resume_following(self, ctx: Context) -> None:
        self._promotion = None
        if self.role != "stopped":
            self.role = "standby"
        if self.follower is not None and self._started:
            self.follower.start()

    # 2. promote -------------------------------------------------------------------------------

    async def _promote(self, ctx: Context) -> None:
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
        self.role = "active"
        self.last_promotion = {"epoch": ctx.epoch, "source": source, "txid": p.txid,
                               "seconds": round(took, 4), "at": time.time(), **info}
        log.info("app %s: promoted %s (source %s, txid %d, epoch %s) in %.3fs", self.app.name,
                 path, source, p.txid, ctx.epoch, took)
        self.audit("promotion_completed", self.last_promotion)
        from .metrics import observe_promotion

        observe_promotion(self.platform, self.app.name, took)

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

    async def _demote(self, ctx: Context) -> None:
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
        if self.role != "stopped":
            self.role = "standby"

    # 3. replicate -------------------------------------------------------------------------------

    async def _replicate(self, ctx: Context) -> None:
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

    async def _replicate_undo(self, ctx: Context) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        tasks, self._active_tasks = self._active_tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if ctx.deadline is not None or not self.lease_valid() or self.fenced_by is not None:
            await self._stop_replicator(ctx)
        # Graceful: Litestream keeps running while the backend stops; `_demote` syncs and
        # stops it afterwards, so nothing committed before the step-down is lost.

    async def _stop_replicator(self, ctx: Context) -> None:
        rep, self.replicator = self.replicator, None
        if rep is not None:
            await rep.stop(ctx)

    def _writer_changed(self, rec: WriterRecord) -> None:
        if self.role not in ("active", "promoting") or rec.epoch <= (self.epoch or 0):
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

    def replicate_pid(self) -> int | None:
        """PID of the running ``litestream replicate`` (under its fence guard), if any."""
        rep = self.replicator
        child = getattr(rep, "_child", None) if rep is not None else None
        pid = getattr(child, "pid", None)
        running = child is not None and getattr(child, "running", False)
        return int(pid) if pid is not None and running else None

    # 4. snapshots -------------------------------------------------------------------------------

    async def _snapshots_on(self, ctx: Context) -> None:
        self._active_tasks.append(asyncio.create_task(
            self._snapshot_loop(), name=f"sqlite-snapshots:{self.app.name}"))

    async def _snapshots_off(self, ctx: Context) -> None:
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
            if self.role != "active" or self.index is None or self.store is None:
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

    # -- the public handles' backend -------------------------------------------------------------

    async def sync(self, timeout: float) -> dict[str, Any]:
        """Upload everything committed so far and wait for it (active instance only)."""
        from pycluster.kernel.errors import NotLeaderError

        if self.role not in ("active", "promoting"):
            raise NotLeaderError(self.app.name, self.app.leader, self.app.epoch)
        deadline = time.monotonic() + timeout
        while self.replicate_pid() is None:
            if self.role not in ("active", "promoting"):
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

    def remote_txid(self) -> int:
        """The highest TXID known in the WAL bucket."""
        return self.index.max_txid() if self.index is not None else 0

    def replica_txid(self) -> int | None:
        """The standby replica's position."""
        return self.follower.txid() if self.follower is not None else None

    def lag(self) -> float:
        """Seconds this node's copy is behind the bucket (0.0 on the active instance; infinite
        on a standby whose replica does not exist yet while the bucket has data)."""
        if self.role in ("active", "promoting") or self.index is None:
            return 0.0
        f = self.follower
        if f is None or (f.txid() is None and self.index.has_data()):
            return float("inf")
        return self.index.lag(f.txid())

    def status(self) -> dict[str, Any]:
        """Everything about this database on this node (JSON-friendly)."""
        f = self.follower
        lag = self.lag()
        return {
            "app": self.app.name, "role": self.role, "path": self.db_path,
            "replica_path": str(self.option.replica_path), "bucket": self.wal_bucket,
            "epoch": self.epoch, "remote_txid": self.remote_txid(),
            "local_txid": self.local_txid, "replica_txid": self.replica_txid(),
            "lag": None if lag == float("inf") else round(lag, 4),
            "follower": None if f is None else {
                "state": f.state, "pid": f.pid, "restarts": f.restarts,
                "last_error": f.last_error, "bootstrapped_from": f.bootstrapped_from},
            "replicate": None if self.replicator is None else {
                "state": self.replicator.state, "pid": self.replicate_pid(),
                "restarts": self.replicator.restarts},
            "writer": None if self.index is None or self.index.writer is None else {
                "epoch": self.index.writer.epoch, "node": self.index.writer.node},
            "last_sync": self.last_sync, "last_promotion": self.last_promotion,
            "last_snapshot": self.last_snapshot.as_dict() if self.last_snapshot else None,
        }

    # -- status publishing, audit --------------------------------------------------------------

    async def _status_loop(self) -> None:
        key = f"{STANDBY_KEY}.{self.platform.node_id}"
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.role == "active" and self.replicate_pid() is not None:
                    with contextlib.suppress(LitestreamError, OSError, TimeoutError, ValueError):
                        self.local_txid = await self.control.txid(self.db_path, 1.0)
                f = self.follower
                lag = self.lag()
                st = {"node": self.platform.node_id, "role": self.role,
                      "state": f.state if f else "none", "txid": self.replica_txid(),
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

    def audit(self, action: str, data: dict[str, Any]) -> None:
        """Write an audit entry in the ``sqlite`` category (logged when audit is unavailable)."""
        try:
            audit = self.platform.services.get("audit")
            if audit is not None:
                audit.log(PLUGIN, action, data, app=self.app.name)  # type: ignore[attr-defined]
                return
        except Exception as exc:
            log.debug("audit %s failed: %s", action, exc)
        log.info("app %s: sqlite %s %s", self.app.name, action, data)


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
