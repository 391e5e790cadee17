"""Placement decision time: one node's full re-evaluation of every app (filters of every
node, scores and ranking of every candidate) for 3 to 30 nodes and 1 to 100 apps, on a
simulated membership view (no NATS), and the time of one migration (``platform.move``) between
two real platforms on a real nats-server.

Run from the repository root::

    python bench/bench_placement.py [--repeat 20]

Each app has a hard label constraint, a soft label preference, a weighted anti-affinity and the
``zone`` strategy (every 3rd app) or ``spread``; node records carry every app, active on one
node each. Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

from pycluster import (  # noqa: E402
    App,
    AvoidLabel,
    AwayFromApp,
    Platform,
    PreferLabel,
    Strategy,
)
from pycluster.kernel.placement import PlacementView  # noqa: E402
from pycluster.plugins import create_plugin_manager  # noqa: E402
from pycluster.testing import NatsServer, wait_for  # noqa: E402


def simulated(nodes: int, apps: int) -> tuple[Platform, list[App], PlacementView]:
    pm = create_plugin_manager(load_entrypoints=False)
    platform = Platform("bench", node_id="n0", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    app_objs = []
    for i in range(apps):
        opts: list[Any] = [AvoidLabel("broken"), PreferLabel("disk", "ssd", weight=5),
                           AwayFromApp(f"a{(i + 1) % apps}", weight=2)]
        if i % 3 == 0:
            opts.append(Strategy("zone"))
        app = App(f"a{i}", *opts)
        platform.register(app)
        app_objs.append(app)
    records: dict[str, dict[str, Any]] = {}
    for n in range(nodes):
        node = f"n{n}"
        records[node] = {
            "node_id": node,
            "labels": {"zone": f"z{n % 3}", "disk": "ssd" if n % 2 else "hdd"},
            "apps": {f"a{i}": {"role": "active" if i % nodes == n else "passive",
                               "eligible": True, "no_failover": False, "priority": 0}
                     for i in range(apps)},
        }
    view = PlacementView("n0", records, lambda _node: True)
    return platform, app_objs, view


def decision_time(nodes: int, apps: int, repeat: int) -> tuple[float, float]:
    platform, app_objs, view = simulated(nodes, apps)
    pl = platform.placement
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for app in app_objs:
            for node in view.nodes():
                pl.eligible(app, view.node_info(node))
            pl.candidates(app, view)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, (max(times) - min(times)) * 1000


async def migration_time(rounds: int) -> list[float]:
    with NatsServer() as server:
        url = server.url
        out = []
        pa = Platform("benchmove", node_id="a", nats_url=url, lease_ttl=2.0,
                      heartbeat_interval=0.5, migration_cooldown=0,
                      plugin_manager=create_plugin_manager(load_entrypoints=False))
        pb = Platform("benchmove", node_id="b", nats_url=url, lease_ttl=2.0,
                      heartbeat_interval=0.5, migration_cooldown=0,
                      plugin_manager=create_plugin_manager(load_entrypoints=False))
        a, b = App("svc"), App("svc")
        pa.register(a)
        pb.register(b)
        await pa.start()
        await wait_for(lambda: a.is_leader, 10)
        await pb.start()
        await wait_for(lambda: pa.membership is not None and "b" in pa.membership.members, 10)
        try:
            for r in range(rounds):
                target = "b" if r % 2 == 0 else "a"
                res = await pa.move("svc", to=target)
                out.append(res["seconds"])
                await asyncio.sleep(1.0)  # the former leader's cooldown
        finally:
            await pb.stop()
            await pa.stop()
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--moves", type=int, default=6)
    args = ap.parse_args()
    print("decision time: one node re-evaluates every app (filters of every node, ranking)")
    print(f"{'nodes':>5} {'apps':>5} {'median ms':>10} {'spread ms':>10} {'per app us':>11}")
    for nodes in (3, 9, 30):
        for apps in (1, 10, 100):
            med, spread = decision_time(nodes, apps, args.repeat)
            print(f"{nodes:>5} {apps:>5} {med:>10.2f} {spread:>10.2f} "
                  f"{med * 1000 / apps:>11.1f}")
    secs = asyncio.run(migration_time(args.moves))
    print(f"\nmigration (platform.move, lease 2 s, 2 nodes): median {statistics.median(secs):.3f}s"
          f" min {min(secs):.3f}s max {max(secs):.3f}s over {len(secs)} moves")


if __name__ == "__main__":
    main()
