"""``pycluster ring show APP``: the assignment and the owners of an app's ring."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from pycluster.cli.options import cli_connect, connection_options
from pycluster.kernel import natsutil as nu
from pycluster.kernel.errors import PyclusterError

from .runtime import ASSIGNMENT, COORDINATOR, LEASE_PREFIX, OWNERS, _loads, ring_bucket


async def read_ring(js: Any, platform: str, app: str) -> dict[str, Any]:
    """The ring of ``app`` as stored: assignment, owners, live leases, coordinator."""
    b = ring_bucket(platform, app)
    a = await nu.last_msg(js, b, ASSIGNMENT, direct=False)
    o = await nu.last_msg(js, b, OWNERS, direct=False)
    c = await nu.last_msg(js, b, COORDINATOR, direct=False)
    leases = {k[len(LEASE_PREFIX):]: json.loads(m.data)
              for k, m in (await nu.live_msgs(js, b, LEASE_PREFIX)).items()}
    adoc = _loads(a.data) if a is not None and not a.tombstone else {}
    odoc = (_loads(o.data).get("partitions") or {}) if o is not None and not o.tombstone else {}
    owners = {int(p): e for p, e in odoc.items() if isinstance(e, dict)}
    live = {int(p): e["node"] for p, e in owners.items()
            if leases.get(str(e.get("node")), {}).get("inc") == e.get("inc")}
    per: dict[str, list[int]] = {}
    for p, n in sorted(live.items()):
        per.setdefault(n, []).append(p)
    nodes = adoc.get("nodes") or []
    return {
        "app": app, "partitions": adoc.get("partitions", len(nodes)),
        "epoch": a.seq if a is not None else 0, "members": adoc.get("members", {}),
        "moves_total": adoc.get("moves", 0),
        "coordinator": _loads(c.data).get("node") if c is not None and not c.tombstone else None,
        "owned": {n: ps for n, ps in sorted(per.items())},
        "unowned": [p for p in range(len(nodes)) if p not in live],
        "misplaced": [p for p, n in enumerate(nodes) if live.get(p) not in (None, n)],
        "epochs": {str(p): e.get("epoch") for p, e in sorted(owners.items())},
    }


@click.group("ring")
def ring_group() -> None:
    """Rings of partitioned apps (plugin ring)."""


@ring_group.command("show")
@click.argument("app")
@connection_options
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def show(app: str, config: str | None, nats_url: str | None, data_dir: str | None,
         platform: str, output: str) -> None:
    """Show who owns which partitions of APP's ring.

    Example: ``pycluster ring show cache --config /etc/pycluster/node.yaml -o json``
    """
    async def run() -> dict[str, Any]:
        nc = await cli_connect(config, nats_url, data_dir, platform)
        try:
            return await read_ring(nc.jetstream(), platform, app)
        finally:
            await nc.close()

    try:
        doc = asyncio.run(run())
    except (PyclusterError, nu.StreamGoneError) as exc:
        raise click.ClickException(f"ring of {app!r} on platform {platform!r}: {exc}") from None
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"ring {app}: {doc['partitions']} partitions, assignment epoch {doc['epoch']}, "
               f"coordinator {doc['coordinator'] or '-'}, {doc['moves_total']} moves so far")
    for node, ps in doc["owned"].items():
        click.echo(f"  {node:<20} {len(ps):>5}  {_ranges(ps)}")
    if doc["unowned"]:
        click.echo(f"  {'(unowned)':<20} {len(doc['unowned']):>5}  {_ranges(doc['unowned'])}")


def _ranges(ps: list[int]) -> str:
    from .runtime import _ranges as r

    return r(ps)
