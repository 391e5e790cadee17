"""`SQLiteRuntime`: one app's replicated database on one node, the plugin's implementation
of the kernel's `pycluster.kernel.replication.Replicator`.

Standby: a `Follower` keeps the replica current; the node publishes its replica's position in
the app KV (``sqlite.standby.<node>``) for lag-aware promotion (`pycluster_sqlite.standby`).

Becoming active, the kernel drives it at the stages of the failover sequence, in this order:
``sqlite-catchup`` (CATCH_UP) and ``sqlite-promote`` (PROMOTE) (`pycluster_sqlite.promotion`),
then (VIP, backend: other plugins), ``sqlite-replicate`` (REPLICATE) and ``sqlite-snapshots``
(SNAPSHOTS) (`pycluster_sqlite.primary`). Stepping down reverses it: replication stops at once
when the lease was lost, else after the backend stopped and a final sync; following resumes.

Under connection loss: a standby keeps its replica at the last position (lag grows); an active
node keeps replicating until the lease ends, when the guard and the coordinator stop it.

The runtime of an app is kept in the app's plugin state (``app.state("sqlite")["runtime"]``),
where the option's handles (``db.wal``, ``db.snapshots``) find it (`runtime_of`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pycluster.kernel.app import app_of
from pycluster.kernel.context import Context
from pycluster.kernel.replication import ReplicationState, ReplicationStep

from .base import PLUGIN, REPLICATE_STAGE
from .errors import SQLiteError
from .follower import FollowerState
from .primary import PrimarySide, make_snapshot
from .zone import ZoneSide

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

    from .options import SQLite

__all__ = ["PLUGIN", "REPLICATE_STAGE", "SQLiteRuntime", "make_snapshot", "runtime_of",
           "runtimes_of"]


class _Snapshots:
    """The snapshot schedule of the active instance (stage ``sqlite-snapshots``)."""

    def __init__(self, rt: PrimarySide) -> None:
        self._rt = rt

    async def start(self, ctx: Context) -> None:
        """Start the periodic snapshot loop."""
        await self._rt.snapshots_on(ctx)

    async def stop(self, ctx: Context) -> None:
        """Stop it."""
        await self._rt.snapshots_off(ctx)


class SQLiteRuntime(ZoneSide):
    """The plugin's state for one app on one node, and its `Replicator` (see the module
    docstring)."""

    def __init__(self, option: SQLite, app: App, platform: Platform) -> None:
        super().__init__(option, app, platform)
        self._snapshot_schedule = _Snapshots(self)
        app.state(PLUGIN)["runtime"] = self

    # -- the Replicator protocol (besides the sides' methods) ---------------------------------

    def timeout(self, step: ReplicationStep) -> float | None:
        """Catch-up and promotion: ``promotion_timeout`` each; replicate 60 s; snapshots 30 s."""
        if step in (ReplicationStep.CATCH_UP, ReplicationStep.PROMOTE):
            return self.option.promotion_timeout
        return 60.0 if step is ReplicationStep.REPLICATE else 30.0

    def snapshots(self) -> _Snapshots:
        """The snapshot schedule (stage ``sqlite-snapshots``)."""
        return self._snapshot_schedule

    def state(self) -> ReplicationState:
        """The role of this copy."""
        return self.role

    def position(self) -> int | None:
        """Litestream's local TXID on the active instance, the replica's on a standby."""
        if self.role in (ReplicationState.ACTIVE, ReplicationState.PROMOTING):
            return self.local_txid
        return self.replica_txid()

    async def check(self) -> dict[str, Any]:
        """Active: Litestream replicates. Standby: the follower is up and not too far behind."""
        if self.role is ReplicationState.ACTIVE:
            if self.replicate_pid() is None:
                state = self.replicator.state if self.replicator else "not started"
                raise RuntimeError(f"litestream replicate is not running ({state})")
            return {"role": "active", "txid": self.local_txid, "remote_txid": self.remote_txid(),
                    "last_sync": self.last_sync}
        f = self.follower
        if self.role is not ReplicationState.STANDBY or f is None:
            return {"role": str(self.role)}
        if f.state is FollowerState.RESTARTING:
            raise RuntimeError(f"replica follower restarting: {f.last_error}")
        lag = self.lag()
        if f.state is FollowerState.FOLLOWING and lag > self.option.lag_alert:
            raise RuntimeError(f"replica is {lag:.1f}s behind the WAL bucket "
                               f"(alert at {self.option.lag_alert}s)")
        return {"role": "standby", "state": str(f.state), "txid": self.replica_txid(),
                "lag": None if lag == float("inf") else round(lag, 3)}

    def status(self) -> dict[str, Any]:
        """Everything about this database on this node (JSON-friendly)."""
        f = self.follower
        lag = self.lag()
        return {
            "app": self.app.name, "role": str(self.role), "path": self.db_path,
            "replica_path": str(self.option.replica_path), "bucket": self.wal_bucket,
            "epoch": self.epoch, "remote_txid": self.remote_txid(),
            "local_txid": self.local_txid, "replica_txid": self.replica_txid(),
            "lag": None if lag == float("inf") else round(lag, 4),
            "follower": None if f is None else {
                "state": str(f.state), "pid": f.pid, "restarts": f.restarts,
                "last_error": f.last_error, "bootstrapped_from": f.bootstrapped_from},
            "replicate": None if self.replicator is None else {
                "state": self.replicator.state, "pid": self.replicate_pid(),
                "restarts": self.replicator.restarts},
            "writer": None if self.index is None or self.index.writer is None else {
                "epoch": self.index.writer.epoch, "node": self.index.writer.node},
            "last_sync": self.last_sync, "last_promotion": self.last_promotion,
            "zone": self.zone_status(),
            "last_snapshot": self.last_snapshot.as_dict() if self.last_snapshot else None,
        }


def runtime_of(db: SQLite) -> SQLiteRuntime:
    """The runtime of a `SQLite` option: its app (the kernel's `app_of`), then the app's plugin
    state. Raises `SQLiteError` before the app started on a platform."""
    app = app_of(db)
    rt = app.state(PLUGIN).get("runtime") if app is not None else None
    if not isinstance(rt, SQLiteRuntime):
        raise SQLiteError(f"{db!r} is not running: register its app with a platform and start "
                          "the platform first")
    return rt


def runtimes_of(platform: Platform) -> dict[str, SQLiteRuntime]:
    """The SQLite runtimes of a platform's apps on this node, by app name."""
    out = {}
    for name, app in list(platform.apps.items()):
        rt = app.state(PLUGIN).get("runtime")
        if isinstance(rt, SQLiteRuntime):
            out[name] = rt
    return out
