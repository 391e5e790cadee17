"""The feature handles of a `SQLite` option: ``db.wal`` and ``db.snapshots``.

They work once the app runs on a started platform: a handle finds the app of its option through
the kernel (`pycluster.kernel.app.app_of`), and the plugin's runtime in the app's plugin state
(the kernel builds it when the app starts here); before that, every call raises `SQLiteError`.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycluster.kernel.app import app_of
from pycluster.kernel.replication import ReplicationState

from .errors import SQLiteError
from .runtime import runtime_of as _runtime

if TYPE_CHECKING:
    from .options import SQLite
    from .snapshots import Snapshot

_PRIMARY = (ReplicationState.ACTIVE, ReplicationState.PROMOTING)


@dataclass(frozen=True)
class WalPosition:
    """Where this node's copy of the database stands.

    :ivar role: ``"active"``, ``"promoting"``, ``"standby"`` or ``"stopped"``.
    :ivar txid: this node's position: Litestream's local TXID on the active instance, the
        replica's on a standby (None before the replica exists).
    :ivar remote_txid: the highest TXID in the WAL bucket (as known to this node).
    :ivar replicated_txid: on the active instance after `WalHandle.sync`: the TXID confirmed
        stored in NATS.
    :ivar lag: seconds behind the bucket (0.0 on the active instance).
    :ivar at: when this was read (UTC seconds).
    """

    role: str
    txid: int | None
    remote_txid: int
    replicated_txid: int | None = None
    lag: float = 0.0
    at: float = 0.0


class WalHandle:
    """``db.wal``: replication position, lag and the durability barrier ``sync()``."""

    def __init__(self, db: SQLite) -> None:
        self._db = db

    def position(self) -> WalPosition:
        """This node's position and the bucket's (from memory: cheap, never blocks)."""
        rt = _runtime(self._db)
        txid = rt.local_txid if rt.role in _PRIMARY else rt.replica_txid()
        return WalPosition(rt.role, txid, max(rt.remote_txid(), txid or 0), None, rt.lag(),
                           time.time())

    def lag(self) -> float:
        """Seconds this node's copy is behind the WAL bucket: the age of the oldest change it
        has not applied (0.0 when current, and on the active instance; ``inf`` on a standby
        whose replica is still being built)."""
        return _runtime(self._db).lag()

    async def sync(self, timeout: float = 30.0) -> WalPosition:
        """On the active instance: return once everything committed so far is stored in NATS
        (the point after which a failover loses nothing).

        :raises pycluster.errors.NotLeaderError: not the active instance.
        :raises SyncTimeoutError: not confirmed within ``timeout`` seconds.
        :raises ReplicationNotRunningError: Litestream is not running (yet).
        """
        rt = _runtime(self._db)
        res = await rt.sync(timeout)
        txid = int(res.get("txid") or 0) or None
        rep = int(res.get("replicated_txid") or 0) or None
        return WalPosition(rt.role, txid, max(rt.remote_txid(), rep or 0), rep, 0.0, time.time())

    def status(self) -> dict[str, Any]:
        """Everything about replication on this node (role, positions, processes, last
        promotion and snapshot), JSON-friendly."""
        return _runtime(self._db).status()


class SnapshotHandle:
    """``db.snapshots``: whole-database snapshots in ``{platform}_{app}_snapshots``."""

    def __init__(self, db: SQLite) -> None:
        self._db = db

    async def create(self) -> Snapshot:
        """Make a verified snapshot of the WAL bucket's current state (any node)."""
        return await _runtime(self._db).create_snapshot()

    async def list(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        rt = _runtime(self._db)
        await rt.start()
        assert rt.store is not None
        return await rt.store.list()

    async def latest(self) -> Snapshot | None:
        """The newest snapshot, or None."""
        rt = _runtime(self._db)
        await rt.start()
        assert rt.store is not None
        return await rt.store.latest()

    async def restore(self, snapshot_id: str, dest: str | Path, *,
                      overwrite: bool = False) -> Path:
        """Write snapshot ``snapshot_id`` to ``dest`` as a verified SQLite file (never onto the
        live database of an active instance)."""
        rt = _runtime(self._db)
        d = Path(dest).expanduser().absolute()
        if d == self._db.path and rt.role in _PRIMARY:
            raise SQLiteError(f"{d} is the live database of the active instance; restore to "
                              "another path")
        await rt.start()
        assert rt.store is not None
        return await rt.store.download(snapshot_id, d, overwrite=overwrite)

    async def delete(self, snapshot_id: str) -> None:
        """Remove one snapshot."""
        rt = _runtime(self._db)
        await rt.start()
        assert rt.store is not None
        await rt.store.delete(snapshot_id)


def open_replica(db: SQLite, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to a standby's replica.

    The replica is updated in place by Litestream under an exclusive file lock; keep reads
    short (a long read transaction delays the follower), never write, and reopen if the
    connection fails while the replica is rebuilt.
    """
    path = Path(db.replica_path)
    app = app_of(db)
    rt = app.state("sqlite").get("runtime") if app is not None else None
    follower = getattr(rt, "follower", None)
    if getattr(rt, "zone_mode", False) and follower is not None:
        path = Path(follower.replica)  # a zone standby's replica is the database itself
    # as_uri(): a plain "file:" + path breaks on "%", "#" or "?" in a folder name.
    uri = f"{path.absolute().as_uri()}?mode=ro"
    con = sqlite3.connect(uri, uri=True, timeout=timeout)
    con.execute("PRAGMA query_only=1")
    return con
