"""`RuntimeBase`: what every side of a `SQLiteRuntime` shares (its state, paths, the
litestream config, the lease check, positions and lag, audit).

The runtime is split along its seams: the standby side (`pycluster_sqlite.standby`), promotion
(`pycluster_sqlite.promotion`), the primary side (`pycluster_sqlite.primary`) and the whole
(`pycluster_sqlite.runtime`: the `Replicator` the kernel drives, status and health).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycluster.builtin.process import ProcessBackend
from pycluster.kernel.context import Context
from pycluster.kernel.names import bucket
from pycluster.kernel.replication import ReplicationState

from . import litestream as ls
from .access import nats_access
from .errors import SQLiteError
from .follower import Follower
from .metrics import PromotionHistogram
from .snapshots import Snapshot, SnapshotStore
from .walindex import WalIndex, WriterRecord

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.coordinator import AppRuntime
    from pycluster.kernel.platform import Platform

    from .options import SQLite

log = logging.getLogger("pycluster.sqlite")

PLUGIN = "sqlite"
STANDBY_KEY = "sqlite.standby"
STATUS_FRESH = 5.0  # seconds a published standby status counts as current
REPLICATE_STAGE = "sqlite-replicate"


@dataclass
class Promotion:
    """What the catch-up stage hands to the promote stage."""

    kind: str  # replica | restore | empty | snapshot | local
    file: Path | None
    txid: int
    started: float
    epoch: int | None


class RuntimeBase:
    """The state of one app's replicated database on one node (see `SQLiteRuntime`)."""

    name = PLUGIN

    def __init__(self, option: SQLite, app: App, platform: Platform) -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.wal_bucket = bucket(platform.name, app.name, "wal")
        self.snap_bucket = bucket(platform.name, app.name, "snapshots")
        self.binary = ls.find_litestream(option.litestream)
        self.workdir = option.workdir
        self.role = ReplicationState.STOPPED
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
        self.promotions = PromotionHistogram()
        self._promotion: Promotion | None = None
        self._started = False
        self._follow_called = False
        self._start_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []
        self._active_tasks: list[asyncio.Task[Any]] = []
        self._unwatch: Any = None
        self._published: tuple[Any, ...] | None = None
        self._published_at = 0.0

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

    def _need(self) -> tuple[WalIndex, SnapshotStore, Follower]:
        if self.index is None or self.store is None or self.follower is None:
            raise SQLiteError(f"app {self.app.name!r}: sqlite runtime not started")
        return self.index, self.store, self.follower

    async def start(self) -> None:
        """Start as a standby (the standby side implements it)."""
        raise NotImplementedError

    async def _stop_replicator(self, ctx: Context) -> None:
        """Stop ``litestream replicate`` (if running)."""
        rep, self.replicator = self.replicator, None
        if rep is not None:
            await rep.stop(ctx)

    # -- positions ----------------------------------------------------------------------------

    def remote_txid(self) -> int:
        """The highest TXID known in the WAL bucket."""
        return self.index.max_txid() if self.index is not None else 0

    def replica_txid(self) -> int | None:
        """The standby replica's position."""
        return self.follower.txid() if self.follower is not None else None

    def lag(self) -> float:
        """Seconds this node's copy is behind the bucket (0.0 on the active instance; infinite
        on a standby whose replica does not exist yet while the bucket has data)."""
        if self.role in (ReplicationState.ACTIVE, ReplicationState.PROMOTING) or self.index is None:
            return 0.0
        f = self.follower
        if f is None or (f.txid() is None and self.index.has_data()):
            return float("inf")
        return self.index.lag(f.txid())

    def replicate_pid(self) -> int | None:
        """PID of the running ``litestream replicate`` (under its fence guard), if any."""
        rep = self.replicator
        return rep.pid if rep is not None else None

    # -- audit ----------------------------------------------------------------------------------

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
