"""pycluster-sqlite: a replicated SQLite database for Singleton apps.

The active instance streams its WAL to NATS with Litestream; every standby keeps a read-only
replica current; on failover the new leader catches up, verifies and promotes its replica before
the backend starts. Only the lease holder ever replicates (see docs/sqlite.md).

Example::

    from pycluster import App, Platform, Singleton
    from pycluster_sqlite import SQLite

    db = SQLite("/data/app.db")
    app = App("db", Singleton(), db)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycluster.lazy import lazy_exports

if TYPE_CHECKING:
    from .errors import (
        FencedError,
        LitestreamError,
        LitestreamNotFoundError,
        NotWALModeError,
        PathNotWritableError,
        PromotionError,
        PromotionRefused,
        ReplicationNotRunningError,
        ReplicaVerificationError,
        SnapshotNotFoundError,
        SQLiteError,
        SyncTimeoutError,
    )
    from .handles import SnapshotHandle, WalHandle, WalPosition, open_replica
    from .options import SQLite, StandbyOf
    from .snapshots import Snapshot

# The public names are imported on first use (PEP 562): the command line imports this
# package for its command declarations only.
_EXPORTS: dict[str, str] = {
    "FencedError": ".errors",
    "LitestreamError": ".errors",
    "LitestreamNotFoundError": ".errors",
    "NotWALModeError": ".errors",
    "PathNotWritableError": ".errors",
    "PromotionError": ".errors",
    "PromotionRefused": ".errors",
    "ReplicaVerificationError": ".errors",
    "ReplicationNotRunningError": ".errors",
    "SQLite": ".options",
    "SQLiteError": ".errors",
    "Snapshot": ".snapshots",
    "SnapshotHandle": ".handles",
    "SnapshotNotFoundError": ".errors",
    "StandbyOf": ".options",
    "SyncTimeoutError": ".errors",
    "WalHandle": ".handles",
    "WalPosition": ".handles",
    "open_replica": ".handles",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())



__all__ = [
    "FencedError",
    "LitestreamError",
    "LitestreamNotFoundError",
    "NotWALModeError",
    "PathNotWritableError",
    "PromotionError",
    "PromotionRefused",
    "ReplicaVerificationError",
    "ReplicationNotRunningError",
    "SQLite",
    "SQLiteError",
    "Snapshot",
    "SnapshotHandle",
    "SnapshotNotFoundError",
    "StandbyOf",
    "SyncTimeoutError",
    "WalHandle",
    "WalPosition",
    "open_replica",
]
