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

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    else:
        try:  # a submodule not imported yet
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


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
