"""``pycluster leaf list|status|ping``: the zones reachable from a platform's NATS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import nats.errors

from ...cli.options import cli_connect, connection_options
from ...kernel.errors import PyclusterError
from ...kernel.leaf import HUB_SUBJECT
from .service import gather_zones, ping_zone

_T = TypeVar("_T")

_OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                       show_default=True, help="Output format.")


def _run(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
         work: Callable[[Any], Awaitable[_T]]) -> _T:
    async def go() -> _T:
        nc = await cli_connect(config, nats_url, data_dir, platform)
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except PyclusterError as exc:
        raise click.ClickException(str(exc)) from None


def _ms(v: Any) -> str:
    return f"{v * 1000:.2f} ms" if isinstance(v, int | float) else "-"


async def list_zones(nc: Any, wait: float) -> list[dict[str, Any]]:
    """Every platform that answers, plus leaves the hub heard from that do not (down)."""
    zones = await gather_zones(nc, wait)
    seen = {z["platform"] for z in zones}
    for z in zones:
        z["link"] = "up"
    hub = next((z for z in zones if z.get("role") == "hub"), None)
    if hub is None:
        try:
            msg = await nc.request(HUB_SUBJECT, b"", timeout=1.0)
            hub = json.loads(msg.data)
        except (nats.errors.Error, ValueError):
            hub = None
    for leaf in (hub or {}).get("leaves") or []:
        if leaf["platform"] not in seen:
            zones.append({"platform": leaf["platform"], "zone": leaf.get("zone"),
                          "domain": leaf.get("domain"), "role": "leaf", "rtt": None,
                          "link": "up" if leaf.get("up") else "down",
                          "last_seen": leaf.get("last_seen")})
    return sorted(zones, key=lambda z: str(z["platform"]))


@click.group("leaf")
def leaf_group() -> None:
    """Zones joined by NATS leaf nodes (plugin leaf)."""


@leaf_group.command("list")
@connection_options
@click.option("--wait", type=float, default=1.0, show_default=True,
              help="Seconds to collect answers.")
@_OUTPUT
def list_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
             wait: float, output: str) -> None:
    """List the platforms (zones) reachable from here: zone, role, JetStream domain, leaf
    link, round trip. Leaves the hub heard from but that do not answer show as down.

    Example: ``pycluster leaf list --config /etc/pycluster/node.yaml -o json``
    """
    zones = _run(config, nats_url, data_dir, platform, lambda nc: list_zones(nc, wait))
    if output == "json":
        click.echo(json.dumps(zones, indent=2))
        return
    from ...cli.common import _table

    rows = [[str(z["platform"]), str(z.get("zone") or "-"), str(z.get("role")),
             str(z.get("domain") or "-"), str(z.get("link")), _ms(z.get("rtt"))]
            for z in zones]
    click.echo(_table(rows, ["PLATFORM", "ZONE", "ROLE", "DOMAIN", "LINK", "RTT"]))


@leaf_group.command("status")
@connection_options
@_OUTPUT
def status_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
               output: str) -> None:
    """Show the zone of PLATFORM (--platform): its role and domain, its hub link (a leaf)
    or the leaves it heard from (the hub).

    Example: ``pycluster leaf status -p edge --nats-url nats://127.0.0.1:4222``
    """
    async def work(nc: Any) -> dict[str, Any]:
        try:
            return await ping_zone(nc, platform)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise click.ClickException(f"no node of platform {platform!r} answers (is it "
                                       "running, with the leaf plugin?)") from None

    doc = _run(config, nats_url, data_dir, platform, work)
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"platform {doc['platform']}: zone {doc.get('zone') or '-'}, role "
               f"{doc.get('role')}, JetStream domain {doc.get('domain')} (answered by "
               f"{doc.get('node')} in {_ms(doc.get('rtt'))})")
    hub = doc.get("hub")
    if hub:
        click.echo(f"hub link: {'up' if hub.get('up') else 'DOWN'} (hub {hub.get('platform')},"
                   f" zone {hub.get('zone') or '-'}, rtt {_ms(hub.get('rtt'))})")
    for leaf in doc.get("leaves") or []:
        click.echo(f"leaf {leaf['platform']} (zone {leaf.get('zone') or '-'}): "
                   f"{'up' if leaf.get('up') else 'DOWN'}, last seen {leaf['last_seen']:.1f}s "
                   "ago")


@leaf_group.command("ping")
@click.argument("remote")
@connection_options
@click.option("--count", "-n", type=click.IntRange(1, 1000), default=3, show_default=True,
              help="Pings to send.")
@click.option("--timeout", type=float, default=2.0, show_default=True,
              help="Seconds to wait for each answer.")
@_OUTPUT
def ping_cmd(remote: str, config: str | None, nats_url: str | None, data_dir: str | None,
             platform: str, count: int, timeout: float, output: str) -> None:
    """Ping platform REMOTE over the leaf links: round trips, its zone and the answering node.

    Example: ``pycluster leaf ping prod --nats-url nats://127.0.0.1:4222 -n 5``
    """
    async def work(nc: Any) -> list[dict[str, Any]]:
        out = []
        for _ in range(count):
            try:
                out.append(await ping_zone(nc, remote, timeout=timeout))
            except nats.errors.NoRespondersError:
                out.append({"error": "no responders (zone unreachable: leaf link down?)"})
            except nats.errors.TimeoutError:
                out.append({"error": f"no answer within {timeout}s"})
        return out

    pings = _run(config, nats_url, data_dir, platform, work)
    rtts = [p["rtt"] for p in pings if "rtt" in p]
    doc = {"remote": remote, "sent": count, "answered": len(rtts),
           "min": min(rtts) if rtts else None, "avg": sum(rtts) / len(rtts) if rtts else None,
           "max": max(rtts) if rtts else None, "pings": pings}
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        for p in pings:
            click.echo(f"{remote}: {p['error']}" if "error" in p else
                       f"{remote} (zone {p.get('zone') or '-'}, node {p.get('node')}): "
                       f"{_ms(p['rtt'])}")
        click.echo(f"{len(rtts)}/{count} answered; rtt min/avg/max "
                   f"{_ms(doc['min'])} / {_ms(doc['avg'])} / {_ms(doc['max'])}")
    if not rtts:
        raise SystemExit(1)
