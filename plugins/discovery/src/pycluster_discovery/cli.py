"""``pycluster services list | show NAME | watch NAME | export --format ...``.

The commands read the registry bucket ``{platform}_services`` from NATS directly (no node needs
to run on this host). They connect like every command (`pycluster.cli.options`): ``--config``
(the node's config file) or ``PYCLUSTER_CONFIG``, ``--nats-url``, or the local embedded server;
there is no default URL.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click
from nats.aio.client import Client as NATS

from pycluster.cli.options import cli_connect, connection_options
from pycluster.kernel import natsutil as nu
from pycluster.kernel.discovery import ServiceInstance

from .exports import (
    consul_catalog_services,
    consul_health_service,
    prometheus_groups,
)
from .federation import DEFAULT_WAIT, GlobalInstances, lookup_global
from .registry import as_dict, decode, matches

OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output format.")
APP_OPT = click.option("--app", "-a", "app", default=None, help="Only this app's instances.")
SCOPE_OPT = click.option(
    "--scope", type=click.Choice(["local", "global"]), default="local", show_default=True,
    help="global: also the platforms reachable over leaf links (with PLATFORM and ZONE).")
WAIT_OPT = click.option(
    "--wait", type=click.FloatRange(0.05, 30.0), default=DEFAULT_WAIT, show_default=True,
    metavar="SECONDS", help="With --scope global: how long to collect the answers.")


def _fail(exc: BaseException) -> None:
    from pycluster.cli.common import _fail as fail

    fail(exc)


Conn = tuple[str | None, str | None, str | None, str]
"""``(config, nats_url, data_dir, platform)``: what `connection_options` gives a command."""


async def _connect(conn: Conn) -> NATS:
    nc: NATS = await cli_connect(*conn)
    return nc


async def _read(nc: NATS, platform: str) -> list[ServiceInstance]:
    try:
        msgs = await nu.live_msgs(nc.jetstream(), f"{platform}_services", "")
    except nu.StreamGoneError:
        return []
    insts = [i for i in (decode(m.data) for m in msgs.values()) if i is not None]
    return sorted(insts, key=lambda i: i.key)


async def read_instances(conn: Conn) -> list[ServiceInstance]:
    """Every live instance in the platform's registry, sorted by key."""
    nc = await _connect(conn)
    try:
        return await _read(nc, conn[3])
    finally:
        await nc.close()


async def read_global(conn: Conn, name: str | None, app: str | None, tags: tuple[str, ...],
                      healthy: bool, wait: float) -> GlobalInstances:
    """The instances of this platform (its bucket) and of every platform that answers within
    ``wait`` seconds (see `pycluster_discovery.federation`)."""
    nc = await _connect(conn)
    try:
        async def local() -> list[ServiceInstance]:
            return [i for i in await _read(nc, conn[3]) if matches(i, name, app, tags, healthy)]

        return await lookup_global(nc, name, app=app, tags=tags, healthy_only=healthy,
                                   wait=wait, local=conn[3], local_lookup=local)
    finally:
        await nc.close()


def _echo_global(found: GlobalInstances, output: str, empty: str) -> None:
    if output == "json":
        click.echo(json.dumps(found.as_dict(), indent=2))
    elif found:
        click.echo(_table([[i.platform or "", i.zone or "-", *r]
                           for i, r in zip(found, _rows(list(found)), strict=True)],
                          ["PLATFORM", "ZONE", *HEADER]))
    else:
        click.echo(empty)
    for u in found.unreachable:
        click.echo(f"note: platform {u.platform} (zone {u.zone or '-'}) did not answer "
                   f"({u.reason}); its services are not listed", err=True)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*r) for r in rows])


def _rows(insts: list[ServiceInstance]) -> list[list[str]]:
    return [[i.service, i.app, i.node, f"{i.address}:{i.port}", i.protocol, i.role, i.status,
             ",".join(i.tags)] for i in insts]


HEADER = ["SERVICE", "APP", "NODE", "ADDRESS", "PROTO", "ROLE", "STATUS", "TAGS"]


@click.group("services")
def services_group() -> None:
    """Service discovery: the registry's instances (plugin discovery)."""


@services_group.command("list")
@connection_options
@APP_OPT
@SCOPE_OPT
@WAIT_OPT
@OUTPUT
def list_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
             app: str | None, scope: str, wait: float, output: str) -> None:
    """Every registered instance.

    With ``--scope global``, the instances of every platform reachable over leaf links too;
    a platform known but cut off is named on stderr (and under ``unreachable`` in JSON).

    \b
    Examples:
      pycluster services list --config node.yaml --output json
      pycluster services list -p edge --scope global
    """
    if scope == "global":
        try:
            every = asyncio.run(read_global((config, nats_url, data_dir, platform), None, app,
                                            (), False, wait))
        except Exception as exc:
            _fail(exc)
        _echo_global(every, output, "no services registered")
        return
    try:
        found = asyncio.run(read_instances((config, nats_url, data_dir, platform)))
        insts = [i for i in found if app is None or i.app == app]
    except Exception as exc:
        _fail(exc)
    if output == "json":
        click.echo(json.dumps([as_dict(i) for i in insts], indent=2))
    elif insts:
        click.echo(_table(_rows(insts), HEADER))
    else:
        click.echo("no services registered")


@services_group.command("show")
@click.argument("name")
@connection_options
@APP_OPT
@click.option("--tag", "tags", multiple=True, help="Only instances with this tag (repeat).")
@click.option("--healthy", is_flag=True, help="Only passing instances.")
@SCOPE_OPT
@WAIT_OPT
@OUTPUT
def show_cmd(name: str, config: str | None, nats_url: str | None, data_dir: str | None,
             platform: str, app: str | None, tags: tuple[str, ...], healthy: bool,
             scope: str, wait: float, output: str) -> None:
    """The instances of service NAME (exit status 1 when there is none).

    With ``--scope global``, those of every platform reachable over leaf links too (a
    platform known but cut off is named on stderr and under ``unreachable`` in JSON).

    \b
    Examples:
      pycluster services show http --app orders
      pycluster services show http -p edge --scope global --healthy -o json
    """
    if scope == "global":
        try:
            every = asyncio.run(read_global((config, nats_url, data_dir, platform), name, app,
                                            tags, healthy, wait))
        except Exception as exc:
            _fail(exc)
        _echo_global(every, output, f"no instances of {name!r}")
        if not every:
            sys.exit(1)
        return
    try:
        found = asyncio.run(read_instances((config, nats_url, data_dir, platform)))
        insts = [i for i in found if matches(i, name, app, tags, healthy)]
    except Exception as exc:
        _fail(exc)
    if output == "json":
        click.echo(json.dumps([as_dict(i) for i in insts], indent=2))
    elif insts:
        click.echo(_table(_rows(insts), HEADER))
        for i in insts:
            if i.metadata:
                click.echo(f"  {i.key}: " + " ".join(f"{k}={v}" for k, v in
                                                      sorted(i.metadata.items())))
    else:
        click.echo(f"no instances of {name!r}")
    if not insts:
        sys.exit(1)


async def _watch(conn: Conn, name: str, app: str | None, output: str,
                 count: int | None) -> None:
    platform = conn[3]
    nc = await _connect(conn)
    seen: dict[str, ServiceInstance] = {}
    printed = 0
    try:
        kv = await nc.jetstream().key_value(f"{platform}_services")
        watcher = await kv.watchall()
        async for entry in watcher:
            if entry is None or entry.key.count(".") != 2:
                continue
            gone = entry.operation in ("DEL", "PURGE") or not entry.value
            inst = None if gone else decode(entry.value)
            old = seen.pop(entry.key, None)
            if inst is not None:
                seen[entry.key] = inst
            kind = ("deregister" if inst is None else "register" if old is None
                    else "update" if old != inst else "")
            shown = inst or old
            if not kind or shown is None or not matches(shown, name, app, (), False):
                continue
            if output == "json":
                click.echo(json.dumps({"change": kind, "instance": as_dict(shown)}))
            else:
                click.echo(f"{kind:<10}  {_rows([shown])[0]}")
            printed += 1
            if count is not None and printed >= count:
                return
    finally:
        await nc.close()


@services_group.command("watch")
@click.argument("name")
@connection_options
@APP_OPT
@click.option("--count", type=int, default=None, help="Exit after this many changes.")
@OUTPUT
def watch_cmd(name: str, config: str | None, nats_url: str | None, data_dir: str | None,
              platform: str, app: str | None, count: int | None, output: str) -> None:
    """Print the changes of service NAME as they happen (the current instances first);
    ``--output json`` prints one JSON object per line.

    \b
    Example: pycluster services watch redis --output json
    """
    try:
        asyncio.run(_watch((config, nats_url, data_dir, platform), name, app, output, count))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        _fail(exc)


@services_group.command("export")
@connection_options
@click.option("--format", "fmt", type=click.Choice(["prometheus", "consul", "json"]),
              default="json", show_default=True,
              help="prometheus: file_sd target groups; consul: catalog services and health "
                   "entries; json: every instance.")
@click.option("--output", "-o", type=click.Choice(["json"]), default="json",
              help="Always JSON.")
def export_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
               fmt: str, output: str) -> None:
    """Print the registry in an export format (for file SD or another tool).

    \b
    Example: pycluster services export --format prometheus > targets.json
    """
    try:
        insts = asyncio.run(read_instances((config, nats_url, data_dir, platform)))
    except Exception as exc:
        _fail(exc)
    doc: Any
    if fmt == "prometheus":
        doc = prometheus_groups(insts, platform)
    elif fmt == "consul":
        doc = {"catalog": consul_catalog_services(insts),
               "health": {name: consul_health_service([i for i in insts if i.service == name],
                                                      platform, 1)
                          for name in sorted({i.service for i in insts})}}
    else:
        doc = {"platform": platform, "services": [as_dict(i) for i in insts]}
    click.echo(json.dumps(doc, indent=2))
