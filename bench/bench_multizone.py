"""Cross-zone API calls (over a NATS leaf link) beside the same calls inside the zone, same run.

Run: ``python bench/bench_multizone.py [--calls 2000] [--rounds 6]``. Starts two embedded
nats-servers on loopback: the hub zone's (``Platform(hub=HubListen(...))``) and a leaf zone's
(``Platform(leaf=LeafOf(...))``). The app ``convex`` runs on the hub platform's node; two
callers in this process call it sequentially:

* ``local``: a second node of the hub platform, on the hub's server (client -> hub server ->
  app node);
* ``cross-zone``: the leaf platform's node, ``platform.remote("hub").api("convex")`` (client ->
  leaf server -> leaf link -> hub server -> app node).

Both run interleaved in rounds (noise of a shared machine spread evenly). Printed per variant:
p50 / p99 latency and calls/s, then the cross-zone p50 over the local p50 per round (median,
min..max), with the load average.

Then (``--promotion-rounds``, 0 to skip) the time from hub loss to a promoted zone: a hub and
two leaf zones plus a witness voter (links through TCP proxies), an app with
``PromoteOnHubFailure(detection=--detection)``; the hub zone is cut off and the time until
the hub stops writing and until a leaf may write is printed beside its floor in the same run
(detection to notice, then the old primary's lease: ``promotion_wait(detection)``).

With ``--sqlite-promotion-rounds`` (needs pycluster-sqlite and litestream), the same with a
SQLite app: the hub's database followed by a leaf zone standby (``StandbyOf``), a witness as
the third zone; the leaf is writable once the SQLite plugin has turned its replica into the
primary (WAL mode, ``litestream replicate`` into its own bucket), printed beside the floor and
the plain app's rounds of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pycluster import App, HubListen, LeafOf, Platform, Singleton
from pycluster.kernel.embedded import free_port
from pycluster.kernel.settings import secret_value
from pycluster.kernel.zones import PromoteOnHubFailure, promotion_wait
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.zones import Witness


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


async def measure(call: Any, n: int) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        await call(i)
        lat.append(time.perf_counter() - s)
    return lat, time.perf_counter() - t0


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--promotion-rounds", type=int, default=3)
    ap.add_argument("--detection", type=float, default=2.0)
    ap.add_argument("--sqlite-promotion-rounds", type=int, default=0)
    args = ap.parse_args()
    if args.rounds:
        await latency(args)
    for r in range(max(args.promotion_rounds, args.sqlite_promotion_rounds)):
        if r < args.promotion_rounds:
            await promotions(1, args.detection)
        if r < args.sqlite_promotion_rounds:
            await sqlite_promotions(1, args.detection)
    return 0


async def sqlite_promotion_round(tmp: Path, detection: float) -> tuple[float, float]:
    """A hub with a SQLite app, a leaf zone standby of it, a witness; cut the hub zone off:
    seconds until the hub is fenced and until the leaf's promoted copy may be written."""
    import pycluster_sqlite.plugin as sqlite_plugin
    from pycluster_sqlite import SQLite, StandbyOf

    witness = Witness("convex", tmp / "witness", detection=detection, zones=3)
    await witness.server.start()
    port = free_port()
    link = TcpProxy("127.0.0.1", port)
    votes = [TcpProxy("127.0.0.1", witness.server.port) for _ in range(2)]
    started: list[Platform] = []
    try:
        for proxy in (link, *votes):
            await proxy.start()
        await witness.start_voter()

        def promote(vote: TcpProxy) -> PromoteOnHubFailure:
            return PromoteOnHubFailure(detection=detection, zones=3,
                                       vote_url=f"nats://127.0.0.1:{vote.port}")

        def pm() -> Any:
            return create_plugin_manager(load_entrypoints=False,
                                         extra=[("sqlite", sqlite_plugin)])

        hub = Platform("hub", node_id="h1", zone="hq", data_dir=str(tmp / "hub"),
                       plugin_manager=pm(), lease_ttl=2.0, heartbeat_interval=0.5,
                       hub=HubListen(host="127.0.0.1", port=port, user="leaf",
                                     password="bench", no_advertise=True))
        hub_db = SQLite(tmp / "hubdb" / "data.db")
        hub_app = App("convex", Singleton(), hub_db, promote(votes[0]))
        leaf = Platform("edge", node_id="e1", zone="z1", data_dir=str(tmp / "edge"),
                        plugin_manager=pm(), lease_ttl=2.0, heartbeat_interval=0.5,
                        leaf=LeafOf(f"nats-leaf://127.0.0.1:{link.port}", user="leaf",
                                    password="bench", reconnect=0.25))
        leaf_db = SQLite(tmp / "leafdb" / "data.db")
        leaf_app = App("convex", Singleton(), leaf_db, StandbyOf("hub", "convex"),
                       promote(votes[1]))
        for p, a in ((hub, hub_app), (leaf, leaf_app)):
            p.register(a)
            await p.start()
            started.append(p)
            assert await a.wait_for_leadership(20)
        await wait_for(lambda: hub_app.zone.writable, 30)
        await wait_for(lambda: leaf_app.zone.silent_for() < 1.0, 30)
        con = sqlite3.connect(hub_db.path)
        con.executescript("CREATE TABLE t(v); INSERT INTO t VALUES (1);")
        con.close()
        await hub_db.wal.sync()
        await wait_for(lambda: (leaf_db.wal.status().get("replica_txid") or 0) > 0, 60)
        link.cut()
        votes[0].cut()
        t0 = time.monotonic()
        await wait_for(lambda: not hub_app.zone.writable, 60, interval=0.01)
        fenced = time.monotonic() - t0
        await wait_for(lambda: leaf_app.zone.writable, 120, interval=0.01)
        return fenced, time.monotonic() - t0
    finally:
        for p in reversed(started):
            await p.stop()
        await witness.stop()
        for proxy in (link, *votes):
            await proxy.close()


async def sqlite_promotions(rounds: int, detection: float) -> None:
    """Time from hub loss to a writable promoted SQLite zone standby, beside its floor."""
    floor = detection + promotion_wait(detection)
    for _ in range(rounds):
        tmp = Path(tempfile.mkdtemp(prefix="bench-sqlite-promotion-"))
        fenced, promoted = await sqlite_promotion_round(tmp, detection)
        print(f"  sqlite round: hub fenced after {fenced:.2f}s, the leaf's copy writable after "
              f"{promoted:.2f}s ({promoted - floor:+.2f}s over the floor {floor:.2f}s); "
              f"load {load()}")


async def promotion_round(tmp: Path, detection: float) -> tuple[float, float]:
    """Cut the hub zone off; seconds until the hub is fenced and until a leaf may write."""
    witness = Witness("convex", tmp / "witness", detection=detection, zones=4)
    await witness.server.start()
    port = free_port()
    links = [TcpProxy("127.0.0.1", port) for _ in range(2)]
    votes = [TcpProxy("127.0.0.1", witness.server.port) for _ in range(3)]
    started: list[Platform] = []
    try:
        for proxy in (*links, *votes):
            await proxy.start()
        await witness.start_voter()

        def app(vote: TcpProxy) -> App:
            return App("convex", Singleton(), PromoteOnHubFailure(
                detection=detection, zones=4, vote_url=f"nats://127.0.0.1:{vote.port}"))

        pm = lambda: create_plugin_manager(load_entrypoints=False)  # noqa: E731
        hub = Platform("hub", node_id="h1", zone="hq", data_dir=str(tmp / "hub"),
                       plugin_manager=pm(), lease_ttl=2.0, heartbeat_interval=0.5,
                       hub=HubListen(host="127.0.0.1", port=port, user="leaf",
                                     password="bench", no_advertise=True))
        leaves = [Platform(f"edge{i}", node_id=f"e{i}", zone=f"z{i}",
                           data_dir=str(tmp / f"edge{i}"), plugin_manager=pm(),
                           lease_ttl=2.0, heartbeat_interval=0.5,
                           leaf=LeafOf(f"nats-leaf://127.0.0.1:{links[i].port}", user="leaf",
                                       password="bench", reconnect=0.25))
                  for i in range(2)]
        apps = {}
        for p, vote in zip((hub, *leaves), votes, strict=True):
            apps[p.name] = app(vote)
            p.register(apps[p.name])
            await p.start()
            started.append(p)
        for a in apps.values():
            assert await a.wait_for_leadership(20)
        await wait_for(lambda: apps["hub"].zone.writable, 30)
        for leaf in leaves:
            await wait_for(lambda leaf=leaf: apps[leaf.name].zone.silent_for() < 1.0, 30)
        for proxy in (*links, votes[0]):
            proxy.cut()
        t0 = time.monotonic()
        await wait_for(lambda: not apps["hub"].zone.writable, 60, interval=0.01)
        fenced = time.monotonic() - t0
        await wait_for(lambda: any(apps[p.name].zone.writable for p in leaves), 120,
                       interval=0.01)
        return fenced, time.monotonic() - t0
    finally:
        for p in reversed(started):
            await p.stop()
        await witness.stop()
        for proxy in (*links, *votes):
            await proxy.close()


async def promotions(rounds: int, detection: float) -> None:
    """Time from hub loss to a promoted zone, per round, beside its floor."""
    floor = detection + promotion_wait(detection)
    print(f"hub loss -> promoted zone, detection {detection:g}s (floor: detection + lease "
          f"wait = {floor:.2f}s), load {load()}")
    took = []
    for r in range(rounds):
        tmp = Path(tempfile.mkdtemp(prefix="bench-promotion-"))
        fenced, promoted = await promotion_round(tmp, detection)
        took.append(promoted)
        print(f"  round {r + 1}: hub fenced after {fenced:.2f}s, a leaf writable after "
              f"{promoted:.2f}s ({promoted - floor:+.2f}s over the floor)")
    print(f"  median {statistics.median(took):.2f}s (floor {floor:.2f}s); load {load()}")


async def latency(args: Any) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-multizone-"))
    port = free_port()

    def pm() -> Any:
        return create_plugin_manager(load_entrypoints=False)

    hub = Platform("hub", node_id="app-node", zone="hq", data_dir=str(tmp / "hub"),
                   plugin_manager=pm(),
                   hub=HubListen(host="127.0.0.1", port=port, user="leaf", password="bench"))
    convex = App("convex", Singleton())

    @convex.handle("echo")
    async def echo(x: int) -> int:
        return x

    hub.register(convex)
    leaf = Platform("edge", node_id="edge-1", zone="paris", data_dir=str(tmp / "edge"),
                    plugin_manager=pm(),
                    leaf=LeafOf(f"nats-leaf://127.0.0.1:{port}", user="leaf",
                                password="bench"))
    started: list[Platform] = []
    try:
        await hub.start()
        started.append(hub)
        assert await convex.wait_for_leadership(15)
        assert hub.embedded is not None
        local = Platform("hub", node_id="client", zone="hq", nats_url=hub.embedded.url,
                         nats_user=hub.settings.nats_user,
                         nats_password=secret_value(hub.settings.nats_password),
                         data_dir=str(tmp / "client"), plugin_manager=pm())
        await local.start()
        started.append(local)
        await leaf.start()
        started.append(leaf)
        local_api = local.api("convex")
        remote_api = leaf.remote("hub").api("convex")
        await wait_for(lambda: remote_api.call("echo", 1), 30, ignore=(Exception,))
        await wait_for(lambda: local_api.call("echo", 1), 30, ignore=(Exception,))
        variants = {"local": local_api.call, "cross-zone": remote_api.call}
        for call in variants.values():  # warm up
            for i in range(200):
                await call("echo", i)
        lat: dict[str, list[float]] = {k: [] for k in variants}
        rate: dict[str, list[float]] = {k: [] for k in variants}
        ratios = []
        print(f"{args.calls} sequential calls per variant, {args.rounds} rounds, "
              f"load {load()}")
        for _ in range(args.rounds):
            p50 = {}
            for name, fn in variants.items():
                xs, elapsed = await measure(lambda i, fn=fn: fn("echo", i), args.calls)
                lat[name] += xs
                rate[name].append(args.calls / elapsed)
                p50[name] = pct(xs, 50)
            ratios.append(p50["cross-zone"] / p50["local"])
        for name in variants:
            xs = lat[name]
            print(f"  {name:<11} p50 {pct(xs, 50) * 1e3:6.3f} ms  p99 {pct(xs, 99) * 1e3:6.3f} ms"
                  f"  {statistics.median(rate[name]):7.0f} calls/s")
        print(f"  cross-zone p50 / local p50 per round: median {statistics.median(ratios):.2f}x"
              f" ({min(ratios):.2f}..{max(ratios):.2f}); load {load()}")
    finally:
        for p in reversed(started):
            await p.stop()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
