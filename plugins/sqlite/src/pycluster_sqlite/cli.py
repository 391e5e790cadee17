"""``pycluster snapshot create | list | restore``: snapshots of an app's replicated database.

The commands talk to NATS directly (no node needs to run): ``create`` restores the WAL bucket
with the local litestream binary into a temporary file, verifies and uploads it; ``list`` reads
the snapshots bucket; ``restore`` downloads a snapshot into a file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from nats.aio.client import Client as NATS

from pycluster.cli.inspect import cli_settings
from pycluster.cli.options import connection_options
from pycluster.kernel.connection import connect
from pycluster.kernel.errors import PyclusterError
from pycluster.kernel.names import bucket, validate_ident
from pycluster.kernel.settings import PlatformSettings

from . import litestream as ls
from .snapshots import Snapshot, SnapshotStore
from .walindex import WalIndex

APP_OPT = click.option("--app", "-a", "app", required=True, help="The app whose database.")
OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output format.")


def _fail(exc: BaseException) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


def _settings(conn: dict[str, Any]) -> PlatformSettings:
    # --config FILE / --nats-url / the local embedded server, credentials and TLS from the
    # file or PYCLUSTER_* variables: as for every other command (no default URL).
    return cli_settings(conn["nats_url"], conn["platform"], conn["data_dir"], conn["config"])


async def _connect(conn: dict[str, Any]) -> NATS:
    return await connect(_settings(conn))


def _conn(config: str | None, nats_url: str | None, data_dir: str | None,
          platform: str) -> dict[str, Any]:
    return {"config": config, "nats_url": nats_url, "data_dir": data_dir, "platform": platform}


def _names(platform: str, app: str) -> tuple[str, str]:
    validate_ident("platform name", platform)
    validate_ident("app name", app)
    return bucket(platform, app, "wal"), bucket(platform, app, "snapshots")


def _row(s: Snapshot) -> list[str]:
    when = dt.datetime.fromtimestamp(s.created, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return [s.id, str(s.txid), when, str(s.size), s.node, str(s.epoch or "-"), s.source]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


@click.group("snapshot")
def snapshot_group() -> None:
    """Snapshots of an app's replicated SQLite database (plugin sqlite)."""


async def _create(conn: dict[str, Any], app: str, binary: str | None) -> Snapshot:
    from .access import access_for
    from .primary import make_snapshot

    wal_bucket, snap_bucket = _names(conn["platform"], app)
    exe = ls.find_litestream(binary)
    settings = _settings(conn)
    nc = await connect(settings)
    tmp = Path(tempfile.mkdtemp(prefix="pycluster-snapshot-"))
    try:
        js = nc.jetstream()
        index = WalIndex(js, wal_bucket)
        await index.start()
        await asyncio.wait_for(index.loaded.wait(), 10.0)
        access = access_for(settings, nc)
        cfg = ls.LitestreamConfig(db_path=str(tmp / "db"), bucket=wal_bucket, access=access)
        cfg_path = cfg.write(tmp / "restore.yml")
        store = SnapshotStore(js, snap_bucket)
        try:
            return await make_snapshot(binary=exe, config=cfg_path, db_path=str(tmp / "db"),
                                       index=index, store=store, tmpdir=tmp, node="cli",
                                       source="on-demand", txid=None, timeout=600.0)
        finally:
            await index.stop()
    finally:
        await nc.close()
        shutil.rmtree(tmp, ignore_errors=True)


@snapshot_group.command("create")
@APP_OPT
@connection_options
@OUTPUT
@click.option("--litestream", "binary", default=None, help="Path of the litestream binary.")
def create_cmd(app: str, config: str | None, nats_url: str | None, data_dir: str | None,
               platform: str, output: str, binary: str | None) -> None:
    """Make a verified snapshot of APP's database now (from its WAL bucket).

    Example: ``pycluster snapshot create --app db --config /etc/pycluster/node.yaml``
    """
    try:
        snap = asyncio.run(_create(_conn(config, nats_url, data_dir, platform), app, binary))
    except (PyclusterError, TimeoutError) as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(snap.as_dict()))
    else:
        click.echo(f"snapshot {snap.id} created (txid {snap.txid}, {snap.size} bytes)")


async def _list(conn: dict[str, Any], app: str) -> list[Snapshot]:
    _, snap_bucket = _names(conn["platform"], app)
    nc = await _connect(conn)
    try:
        return await SnapshotStore(nc.jetstream(), snap_bucket).list()
    finally:
        await nc.close()


@snapshot_group.command("list")
@APP_OPT
@connection_options
@OUTPUT
def list_cmd(app: str, config: str | None, nats_url: str | None, data_dir: str | None,
             platform: str, output: str) -> None:
    """List APP's snapshots, oldest first.

    Example: ``pycluster snapshot list --app db --config /etc/pycluster/node.yaml -o json``
    """
    try:
        snaps = asyncio.run(_list(_conn(config, nats_url, data_dir, platform), app))
    except (PyclusterError, TimeoutError) as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps([s.as_dict() for s in snaps], indent=2))
        return
    if not snaps:
        click.echo(f"no snapshots of {app}")
        return
    click.echo(_table([_row(s) for s in snaps],
                      ["ID", "TXID", "CREATED (UTC)", "BYTES", "NODE", "EPOCH", "SOURCE"]))


async def _restore(conn: dict[str, Any], app: str, snapshot_id: str, dest: str,
                   force: bool) -> Any:
    _, snap_bucket = _names(conn["platform"], app)
    nc = await _connect(conn)
    try:
        store = SnapshotStore(nc.jetstream(), snap_bucket)
        if snapshot_id == "latest":
            latest = await store.latest()
            if latest is None:
                raise PyclusterError(f"no snapshots of {app}")
            snapshot_id = latest.id
        path = await store.download(snapshot_id, dest, overwrite=force)
        return snapshot_id, path
    finally:
        await nc.close()


@snapshot_group.command("restore")
@click.argument("snapshot_id")
@click.argument("dest", type=click.Path(dir_okay=False))
@APP_OPT
@connection_options
@OUTPUT
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def restore_cmd(snapshot_id: str, dest: str, app: str, config: str | None,
                nats_url: str | None, data_dir: str | None, platform: str, output: str,
                force: bool) -> None:
    """Write snapshot SNAPSHOT_ID (or "latest") of APP to the file DEST (verified).

    Never point DEST at the live database of a running active instance: stop the app first,
    or restore elsewhere.

    Example: ``pycluster snapshot restore latest /tmp/db.sqlite --app db --config node.yaml``
    """
    try:
        sid, path = asyncio.run(_restore(_conn(config, nats_url, data_dir, platform), app,
                                         snapshot_id, dest, force))
    except (PyclusterError, TimeoutError) as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps({"id": sid, "path": str(path)}))
    else:
        click.echo(f"snapshot {sid} restored to {path}")
