"""``pycluster leaf list|status|ping|promote|demote``, ``pycluster partition
status|conflicts``, ``pycluster witness``: zones, as seen from a platform's NATS."""

from __future__ import annotations

import asyncio
import contextlib
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


# -- promotion on hub loss ----------------------------------------------------------------------


async def _zone_request(nc: Any, platform: str, what: str, body: dict[str, Any],
                        timeout: float) -> dict[str, Any]:
    from .service import zone_control_subject

    try:
        msg = await nc.request(zone_control_subject(platform, what),
                               json.dumps(body).encode(), timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise click.ClickException(f"no node of platform {platform!r} answers (is it running "
                                   "an app with PromoteOnHubFailure?)") from None
    doc: dict[str, Any] = json.loads(msg.data)
    if doc.get("error"):
        raise click.ClickException(str(doc["error"]))
    return doc


@leaf_group.command("promote")
@click.argument("app")
@connection_options
@click.option("--force", is_flag=True,
              help="Promote without a majority of zones (the operator's vote replaces it).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the outcome.")
@_OUTPUT
def promote_cmd(app: str, config: str | None, nats_url: str | None, data_dir: str | None,
                platform: str, force: bool, yes: bool, timeout: float, output: str) -> None:
    """Make PLATFORM's zone (--platform) the primary of APP now.

    Without --force the zone campaigns at once: the other zones still grant only when the
    primary is unreachable from them too, and the zone writes only after the old primary's
    lease ran out. With --force it takes a new term without a majority: if the old primary
    is alive and reachable by a majority, both write until it hears the higher term (split
    brain): use it only when the old primary's zone is known to be gone.

    Example: ``pycluster leaf promote convex -p edge --nats-url nats://edge:4222``
    """
    if not yes:
        click.confirm(f"promote {platform} to primary of {app}"
                      f"{' WITHOUT a majority' if force else ''}?", abort=True)
    doc = _run(config, nats_url, data_dir, platform, lambda nc: _zone_request(
        nc, platform, "promote", {"app": app, "force": force}, timeout))
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{platform}: {'promoted' if doc.get('promoted') else 'not promoted'} "
                   f"(term {doc.get('term')}, {doc.get('reason', '')})")
    if not doc.get("promoted"):
        raise SystemExit(1)


@leaf_group.command("demote")
@click.argument("app")
@connection_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_OUTPUT
def demote_cmd(app: str, config: str | None, nats_url: str | None, data_dir: str | None,
               platform: str, yes: bool, output: str) -> None:
    """Make PLATFORM's zone stop being APP's primary now: it stops writing and becomes a
    replica; after the detection time the other zones elect a primary among themselves.

    Example: ``pycluster leaf demote convex -p prod --yes --nats-url nats://hub:4222``
    """
    if not yes:
        click.confirm(f"demote {platform} for {app} (it stops writing at once)?", abort=True)
    doc = _run(config, nats_url, data_dir, platform, lambda nc: _zone_request(
        nc, platform, "demote", {"app": app}, 10.0))
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{platform}: role {doc.get('role')} (term {doc.get('term')})")


@click.group("partition")
def partition_group() -> None:
    """Zone partitions: primary, lease and conflicts of apps with PromoteOnHubFailure (plugin
    leaf)."""


@partition_group.command("status")
@connection_options
@_OUTPUT
def partition_status_cmd(config: str | None, nats_url: str | None, data_dir: str | None,
                         platform: str, output: str) -> None:
    """Show, per app of PLATFORM with PromoteOnHubFailure: this zone's role, state (primary,
    fenced, autonomous, replica), term, whether it may write, the zones acknowledging it.

    Example: ``pycluster partition status -p edge -o json --nats-url nats://edge:4222``
    """
    doc = _run(config, nats_url, data_dir, platform,
               lambda nc: _zone_request(nc, platform, "partition", {}, 5.0))
    apps = doc.get("apps", {})
    if output == "json":
        click.echo(json.dumps(apps, indent=2))
        return
    from ...cli.common import _table

    rows = [[name, str(a["zone"]), str(a["role"]), str(a["state"]), str(a["term"]),
             "yes" if a["writable"] else "no", str(a.get("primary") or "-"),
             f"{len(a['acks'])}+1/{a['quorum']}"] for name, a in sorted(apps.items())]
    click.echo(_table(rows, ["APP", "ZONE", "ROLE", "STATE", "TERM", "WRITABLE", "PRIMARY",
                             "ACKS/QUORUM"]))


@partition_group.command("conflicts")
@connection_options
@_OUTPUT
def partition_conflicts_cmd(config: str | None, nats_url: str | None, data_dir: str | None,
                            platform: str, output: str) -> None:
    """List the write windows PLATFORM's zone kept without the majority (the autonomous
    strategy): app, zone, epoch, from/to, the rival term. Reconcile them by hand.

    Example: ``pycluster partition conflicts -p edge -o json --nats-url nats://edge:4222``
    """
    doc = _run(config, nats_url, data_dir, platform,
               lambda nc: _zone_request(nc, platform, "partition", {}, 5.0))
    rows = doc.get("conflicts", [])
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    import datetime as dt

    def ts(v: Any) -> str:
        return dt.datetime.fromtimestamp(float(v), dt.UTC).isoformat(timespec="seconds")

    for c in rows:
        click.echo(f"{c['app']} zone {c['zone']} epoch {c['epoch']}: {ts(c['from'])} -> "
                   f"{ts(c['to'])} (rival term {c.get('rival_term') or '?'})")
    if not rows:
        click.echo("no conflicts")


@click.command("witness")
@click.option("--vote-url", required=True, envvar="PYCLUSTER_ZONE_VOTE_URL",
              help="The witness bus (nats://host:4222).")
@click.option("--group", "groups", multiple=True, required=True,
              help="An app group to vote for (the app name, or PromoteOnHubFailure.group); "
                   "repeat for several.")
@click.option("--state-dir", type=click.Path(file_okay=False), required=True,
              help="Where the votes are kept (one file per group).")
@click.option("--zone", default="witness", show_default=True, help="This voter's zone name.")
@click.option("--detection", type=float, default=30.0, show_default=True,
              help="PromoteOnHubFailure.detection of the apps.")
@click.option("--zones", type=int, default=None, help="PromoteOnHubFailure.zones of the apps.")
def witness_cmd(vote_url: str, groups: tuple[str, ...], state_dir: str, zone: str,
                detection: float, zones: int | None) -> None:
    """Run a witness voter: it casts a vote in zone promotions without running apps (the
    tie-breaking zone of two-leaf setups). Runs until interrupted.

    Example: ``pycluster witness --vote-url nats://witness:4222 --group convex --state-dir
    /var/lib/pycluster-witness --detection 30 --zones 4``
    """
    from pathlib import Path

    from .zones import WitnessVoter

    Path(state_dir).mkdir(parents=True, exist_ok=True)

    async def go() -> None:
        voters = [WitnessVoter(vote_url, g, Path(state_dir) / f"{g}.json", zone=zone,
                               detection=detection, zones=zones) for g in groups]
        for v in voters:
            await v.start()
        click.echo(f"witness {zone} voting for {', '.join(groups)} on {vote_url}")
        try:
            await asyncio.Event().wait()
        finally:
            for v in voters:
                await v.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(go())
