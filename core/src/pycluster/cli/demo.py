"""``pycluster demo``: a whole failover story on an embedded nats-server, in under a minute.

Three node processes run one Singleton app; the demo shows the election, SIGKILLs the leader
and measures the crash failover, brings the node back as a standby, then asks the leader to
step down and measures the graceful handover.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

import click

from ..kernel.embedded import EmbeddedNatsServer
from ..testing.nodes import NodeCluster


def _say(msg: str, **style: object) -> None:
    click.secho(msg, **style)  # type: ignore[arg-type]


def _active_since(cluster: NodeCluster, node: str, after: float) -> float | None:
    for e in cluster.events(node):
        if e.get("event") == "role" and e.get("role") == "active" and e["t"] >= after:
            return float(e["t"])
    return None


async def run_demo(lease_ttl: float = 2.0, size: int = 3) -> int:
    """Run the story; returns the process exit code."""
    from .inspect import read_status, request_stepdown

    tmp = Path(tempfile.mkdtemp(prefix="pycluster-demo-"))
    server = EmbeddedNatsServer(tmp / "nats")
    cluster: NodeCluster | None = None
    try:
        _say("pycluster demo", bold=True)
        await server.start()
        _say(f"  embedded nats-server with JetStream at {server.url}")
        cluster = NodeCluster(
            "demo", [server.url], tmp, size=size, app="orders", lease_ttl=lease_ttl,
            heartbeat=lease_ttl / 4, extra_args=["--log-level", "WARNING"],
        )
        t0 = time.time()
        await cluster.start()
        leader = await cluster.wait_for_leader(30)
        epoch = cluster.role(leader)[1]
        _say(f"\n1. election: {size} nodes started; {leader} leads 'orders' (epoch {epoch}) "
             f"{time.time() - t0:.2f}s after launch", fg="green")

        _say(f"\n2. crash: SIGKILL {leader} (lease_ttl={lease_ttl}s)", fg="yellow")
        killed_at = time.time()
        cluster.kill(leader)
        new = await cluster.wait_for_leader(30, exclude=[leader], min_epoch=(epoch or 0) + 1)
        at = _active_since(cluster, new, killed_at) or time.time()
        new_epoch = cluster.role(new)[1]
        _say(f"   {new} took over (epoch {new_epoch}) {at - killed_at:.2f}s after the crash "
             f"(bounded by the lease: the dead node could not renew)", fg="green")

        await cluster.start_node(leader)
        _say(f"   {leader} restarted and rejoined as a standby: {cluster.role(leader)[0]}")

        _say(f"\n3. graceful handover: `pycluster stepdown orders` to {new}", fg="yellow")
        asked = time.time()
        res = await request_stepdown(server.url, "demo", "orders", None, None)
        nxt = await cluster.wait_for_leader(30, exclude=[new],
                                            min_epoch=(new_epoch or 0) + 1)
        at = _active_since(cluster, nxt, asked) or time.time()
        released = max((e["t"] for e in cluster.events(new)
                        if e.get("event") == "role" and e.get("role") == "passive"
                        and e["t"] >= asked), default=asked)
        _say(f"   {res['node']} released the lease; {nxt} active (epoch "
             f"{cluster.role(nxt)[1]}) {1000 * max(0.0, at - released):.1f} ms after the "
             f"release ({at - asked:.2f}s for the whole request)", fg="green")

        st = await read_status(server.url, "demo")
        _say("\n4. status (what `pycluster status --platform demo` shows):")
        for a in st["apps"]:
            _say(f"   app {a['app']}: leader {a['leader']}, epoch {a['epoch']}, "
                 f"standby on {', '.join(a['standby_on'])}")
        overlaps = cluster.overlaps()
        _say(f"\n5. split brain check: {len(overlaps)} overlapping active periods "
             f"across {len(cluster.intervals())} leaderships",
             fg="green" if not overlaps else "red")
        await cluster.stop()
        _say("\ndone: every node left gracefully.", bold=True)
        return 0 if not overlaps else 1
    finally:
        if cluster is not None:
            cluster.stop_sync()
        with contextlib.suppress(Exception):
            await server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(run_demo()))
