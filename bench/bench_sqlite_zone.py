"""Zone standby lag beside a local standby's, same run: the time from a commit on the hub's
primary to its visibility in a replica.

Run: ``python bench/bench_sqlite_zone.py [--commits 100]``. Starts two embedded nats-servers on
loopback joined by a leaf link: the hub zone's, with a platform of two nodes running the
SQLite app ``convex`` (the primary and a **local** standby), and a leaf zone's, whose platform
runs ``convex`` with ``StandbyOf(hub, "convex")`` (the **zone** standby: a JetStream mirror of
the hub's WAL bucket across the link, followed by Litestream). For each commit (one row, one
transaction) on the primary the bench records when each replica's position reaches the
commit's TXID (polled every 2 ms). Printed: p50 / p90 / p99 / max per replica, with the load
average. Intervals: the SQLite defaults (monitor, sync and follow every 50 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import pycluster_sqlite.plugin as sqlite_plugin
from pycluster import App, HubListen, LeafOf, Platform, Singleton
from pycluster.kernel.embedded import free_port
from pycluster.kernel.settings import secret_value
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster_sqlite import SQLite, StandbyOf
from pycluster_sqlite.runtime import runtime_of


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def commit(path: Path, i: int) -> None:
    con = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
    try:
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        con.execute("INSERT INTO t(v) VALUES (?)", (f"row-{i}",))
    finally:
        con.close()


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=100)
    ap.add_argument("--pause", type=float, default=0.2, help="seconds between commits")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-sqlite-zone-"))
    port = free_port()

    def pm() -> Any:
        return create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])

    hub = Platform("hub", node_id="primary", zone="hq", data_dir=str(tmp / "hub"),
                   plugin_manager=pm(),
                   hub=HubListen(host="127.0.0.1", port=port, user="leaf", password="bench"))
    db1 = SQLite(tmp / "primary" / "data.db")
    app1 = App("convex", Singleton(), db1)
    hub.register(app1)
    leaf = Platform("edge", node_id="edge-1", zone="paris", data_dir=str(tmp / "edge"),
                    plugin_manager=pm(),
                    leaf=LeafOf(f"nats-leaf://127.0.0.1:{port}", user="leaf",
                                password="bench"))
    db3 = SQLite(tmp / "zone" / "data.db")
    leaf.register(App("convex", Singleton(), db3, StandbyOf("hub", "convex")))
    started: list[Platform] = []
    try:
        await hub.start()
        started.append(hub)
        assert await app1.wait_for_leadership(15)
        assert hub.embedded is not None
        local = Platform("hub", node_id="standby", zone="hq", nats_url=hub.embedded.url,
                         nats_user=hub.settings.nats_user,
                         nats_password=secret_value(hub.settings.nats_password),
                         data_dir=str(tmp / "standby-node"), plugin_manager=pm())
        db2 = SQLite(tmp / "standby" / "data.db")
        local.register(App("convex", Singleton(), db2))
        await local.start()
        started.append(local)
        await leaf.start()
        started.append(leaf)
        await asyncio.to_thread(commit, db1.path, -1)
        first = await db1.wal.sync()
        replicas = {"local": runtime_of(db2), "zone": runtime_of(db3)}
        for rt in replicas.values():
            await wait_for(lambda rt=rt: (rt.replica_txid() or 0) >= (first.txid or 0), 60)
        lag: dict[str, list[float]] = {k: [] for k in replicas}
        print(f"{args.commits} commits, one every {args.pause}s; load {load()}")
        for i in range(args.commits):
            await asyncio.to_thread(commit, db1.path, i)
            t0 = time.perf_counter()
            pos = await db1.wal.sync()  # the commit's TXID (replicas may see it meanwhile)
            target = pos.txid or 0
            seen: dict[str, float] = {}
            while len(seen) < len(replicas):
                for name, rt in replicas.items():
                    if name not in seen and (rt.replica_txid() or 0) >= target:
                        seen[name] = time.perf_counter() - t0
                if time.perf_counter() - t0 > 30:
                    raise TimeoutError(f"commit {i}: replicas {seen}")
                await asyncio.sleep(0.002)
            for name, s in seen.items():
                lag[name].append(s)
            await asyncio.sleep(args.pause)
        for name, xs in lag.items():
            print(f"  {name:<6} standby: p50 {pct(xs, 50) * 1e3:6.1f} ms  p90 "
                  f"{pct(xs, 90) * 1e3:6.1f} ms  p99 {pct(xs, 99) * 1e3:6.1f} ms  max "
                  f"{max(xs) * 1e3:6.1f} ms")
        print(f"  load {load()}")
    finally:
        for p in reversed(started):
            await p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
