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
