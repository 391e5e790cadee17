"""Placement decision time: one node's full re-evaluation of every app (filters of every
node, scores and ranking of every candidate) for 3 to 30 nodes and 1 to 100 apps, on a
simulated membership view (no NATS); the time of one migration (``platform.move``) between
two real platforms on a real nats-server; and the time of ``pycluster node drain`` with real
node processes (3 nodes x 3 Singleton apps, lease 2 s), next to the same run's baseline of
the CLI itself (``pycluster node list``: process start, connect, read).

Run from the repository root::

    python bench/bench_placement.py [--repeat 20]

Each app has a hard label constraint, a soft label preference, a weighted anti-affinity and the
``zone`` strategy (every 3rd app) or ``spread``; node records carry every app, active on one
node each. Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
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
from pycluster.testing.nodes import NodeCluster  # noqa: E402

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


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


def _cli(*args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([*PYCLUSTER, *args], capture_output=True, text=True, timeout=300)
    return time.perf_counter() - t0, out.stdout


async def drain_time(rounds: int) -> list[tuple[str, float, int, list[float]]]:
    """Move the three leaders to n1 and drain it (uncordoning it after), then n2, n3,
    ``rounds`` times: (node, seconds, moves, seconds per move) per drain; the first entry is
    the ``node list`` baseline."""
    apps = ["a0", "a1", "a2"]
    out: list[tuple[str, float, int, list[float]]] = []
    with NatsServer() as server, tempfile.TemporaryDirectory() as tmp:
        c = NodeCluster("benchdrain", [server.url], tmp, size=3, app="a0", lease_ttl=2.0,
                        heartbeat=0.5, extra_args=["--extra-app", "a1", "--extra-app", "a2",
                                                   "--migration-cooldown", "0",
                                                   "--migrations-per-minute", "1000"])
        common = ("--nats-url", server.url, "--platform", "benchdrain", "--output", "json")
        try:
            await c.start()

            def ready() -> bool:
                nodes = json.loads(_cli("node", "list", *common)[1] or "{}").get("nodes", [])
                active = [a for n in nodes for a, s in n["apps"].items()
                          if s["role"] == "active"]
                passive = [a for n in nodes for a, s in n["apps"].items()
                           if s["role"] == "passive"]
                return len(nodes) == 3 and sorted(active) == apps and len(passive) == 6

            await wait_for(lambda: ready(), 60)
            base = [_cli("node", "list", *common)[0] for _ in range(3)]
            out.append(("baseline", statistics.median(base), 0, []))
            for _ in range(rounds):
                for node in c.nodes:
                    for app in apps:  # every leader on the node to drain: three moves
                        _cli("app", "move", app, "--to", node, *common)
                    secs, text = _cli("node", "drain", node, "--timeout", "120", *common)
                    res = json.loads(text.splitlines()[-1])
                    out.append((node, secs, len(res["moved"]),
                                [m["seconds"] for m in res["moved"]]))
                    _cli("node", "uncordon", node, *common)
                    await wait_for(lambda: ready(), 60)
        finally:
            c.stop_sync()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--moves", type=int, default=6)
    ap.add_argument("--drains", type=int, default=1, help="rounds of drains (0: none)")
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
    if args.drains:
        drains = asyncio.run(drain_time(args.drains))
        print("\ndrain (pycluster node drain, node processes, 3 nodes x 3 Singleton apps, "
              "lease 2 s)")
        print(f"{'node':>9} {'seconds':>8} {'moves':>6} {'per move (s)':>24}")
        for node, secs, moves, each in drains:
            print(f"{node:>9} {secs:>8.2f} {moves:>6} "
                  f"{' '.join(f'{x:.2f}' for x in each) or '-':>24}")


if __name__ == "__main__":
    main()
