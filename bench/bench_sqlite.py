"""SQLite replication benchmark: lag (commit on the active -> visible on a standby) and promotion.

Run: ``python bench/bench_sqlite.py [--seconds 20] [--rate 20] [--failovers 6]``. Starts its own
nats-server. Prints p50/p99 of each figure next to baselines measured in the same run:

* lag, at a steady write rate (one committed row every 1/rate s; a reader polls the standby's
  replica every 2 ms and notes when each row appears):
  - raw nats-py publish -> receive of a message (the NATS floor);
  - bare litestream with its own default intervals (1 s monitor/sync/follow), read with a new
    connection per poll (a connection kept open would not see updates, see dbfile.py);
  - bare litestream with all intervals at 100 ms (same reader);
  - pycluster-sqlite with its default settings (two in-process nodes), read through one
    connection kept open (`open_replica`), the way an application reads;
* promotion, over SIGKILL failovers of real node processes (lease 2 s):
  - core failover without SQLite (kill -> new leader active), the baseline;
  - lease won -> promoted database (catch-up, verification, swap);
  - lease won -> first row committed by the new leader's writer;
  - kill -> first row committed on the new leader.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from pycluster import App, Platform, Singleton
from pycluster.plugins import create_plugin_manager
from pycluster.testing.nodes import NodeCluster
from pycluster.testing.servers import NatsServer
from pycluster_sqlite import SQLite, open_replica
from pycluster_sqlite import plugin as sqlite_plugin
from pycluster_sqlite.litestream import find_litestream
from pycluster_sqlite.walindex import ensure_object_store


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


def row(name: str, xs: list[float], extra: str = "") -> None:
    print(f"{name:<52} p50 {1000 * pct(xs, 50):8.1f} ms  p99 {1000 * pct(xs, 99):8.1f} ms  "
          f"max {1000 * max(xs or [float('nan')]):8.1f} ms  (n={len(xs)}){extra}", flush=True)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / 100.0
        except (OSError, IndexError, ValueError):
            pass
    return total


# -- lag -------------------------------------------------------------------------------------


def measure_lag(db: Path, replica: Callable[[], sqlite3.Connection], rate: float,
                seconds: float, fresh: bool) -> list[float]:
    """Commit one row every 1/rate s into ``db``; return commit -> visible-in-replica times.
    ``fresh``: a new reader connection per poll (else one connection kept open)."""
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    stop = threading.Event()

    def observe() -> None:
        con: sqlite3.Connection | None = None
        while not stop.is_set():
            try:
                if con is None:
                    con = replica()
                got = con.execute("SELECT max(id) FROM t").fetchall()
                top = int(got[0][0] or 0)
                if fresh:
                    con.close()
                    con = None
                now = time.monotonic()
                for i in list(committed):
                    if i <= top and i not in seen:
                        seen[i] = now
            except sqlite3.Error:
                if con is not None:
                    con.close()
                con = None
            time.sleep(0.002)
        if con is not None:
            con.close()

    obs = threading.Thread(target=observe, daemon=True)
    obs.start()
    w = sqlite3.connect(str(db), isolation_level=None, timeout=10.0)
    w.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
    time.sleep(1.0)  # the table reaches the replica before the clock starts
    start = time.monotonic()
    n = int(seconds * rate)
    for k in range(n):
        due = start + k / rate
        time.sleep(max(0.0, due - time.monotonic()))
        cur = w.execute("INSERT INTO t(v) VALUES ('x')")
        committed[int(cur.lastrowid or 0)] = time.monotonic()
    deadline = time.monotonic() + 15.0
    while len(seen) < len(committed) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    obs.join()
    w.close()
    missing = len(committed) - len(seen)
    if missing:
        print(f"  ({missing} rows never became visible within 15 s)")
    return [seen[i] - committed[i] for i in committed if i in seen]


async def nats_floor(url: str, n: int) -> list[float]:
    nc = await nats.connect(url)
    out: list[float] = []
    got = asyncio.Event()
    t0 = 0.0

    async def cb(msg: Any) -> None:
        out.append(time.monotonic() - t0)
        got.set()

    await nc.subscribe("bench.floor", cb=cb)
    await nc.flush()
    for _ in range(n):
        got.clear()
        t0 = time.monotonic()
        await nc.publish("bench.floor", b"x" * 100)
        await asyncio.wait_for(got.wait(), 5)
        await asyncio.sleep(0.005)
    await nc.close()
    return out


async def bare_litestream(url: str, work: Path, name: str, interval: float | None,
                          rate: float, seconds: float) -> tuple[list[float], float]:
    """Litestream alone (replicate + restore -f), with its defaults (None) or one interval."""
    binary = find_litestream()
    bucket = f"bench_{name}"
    nc = await nats.connect(url)
    await ensure_object_store(nc.jetstream(), bucket)
    await nc.close()
    d = work / name
    d.mkdir()
    db = d / "a.db"
    con = sqlite3.connect(str(db))
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.close()
    host = url.split("//", 1)[1]
    timing = ""
    if interval is not None:
        ms = f"{round(interval * 1000)}ms"
        timing = f"    monitor-interval: {ms}\n"
    cfg = d / "ls.yml"
    cfg.write_text(f"dbs:\n  - path: {db}\n{timing}    replica:\n      type: nats\n"
                   f"      url: nats://{host}/{bucket}\n"
                   + (f"      sync-interval: {round(interval * 1000)}ms\n" if interval else ""))
    rep = subprocess.Popen([binary, "replicate", "-config", str(cfg)],  # noqa: ASYNC220
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(2.0)
    follow = ["-follow-interval", f"{round(interval * 1000)}ms"] if interval else []
    fol = subprocess.Popen([binary, "restore", "-config", str(cfg), "-f", *follow, "-o",  # noqa: ASYNC220
                            str(d / "r.db"), str(db)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while not (d / "r.db-txid").exists():
            await asyncio.sleep(0.05)
        c0 = cpu_seconds([rep.pid, fol.pid])

        def ro() -> sqlite3.Connection:
            return sqlite3.connect(f"file:{d / 'r.db'}?mode=ro", uri=True, timeout=5.0)

        lags = await asyncio.to_thread(measure_lag, db, ro, rate, seconds, True)
        cpu = (cpu_seconds([rep.pid, fol.pid]) - c0) / seconds
    finally:
        for p in (rep, fol):
            p.send_signal(signal.SIGTERM)
            p.wait()
    return lags, cpu


async def plugin_lag(url: str, work: Path, rate: float, seconds: float) -> tuple[list[float],
                                                                                  float]:
    """Two in-process nodes with the plugin's default settings."""
    nodes = []
    for node in ("n1", "n2"):
        base = work / "plugin" / node
        base.mkdir(parents=True)
        db = SQLite(base / "data.db", replica_path=base / "replica.db")
        pm = create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])
        p = Platform("benchsqlite", node_id=node, nats_url=url, plugin_manager=pm,
                     lease_ttl=2.0, heartbeat_interval=0.5)
        app = App("db", Singleton(), db)
        p.register(app)
        await p.start()
        nodes.append((p, app, db))
        if node == "n1":
            while not app.is_active:
                await asyncio.sleep(0.05)
    (pa, _, dba), (pb, _, dbb) = nodes
    try:
        con = sqlite3.connect(str(dba.path))
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        con.commit()
        con.close()
        await dba.wal.sync()
        while (dbb.wal.position().txid or 0) < (dba.wal.position().txid or 0):
            await asyncio.sleep(0.05)
        pids = [p for p in (dba.wal.status()["replicate"]["pid"],
                            dbb.wal.status()["follower"]["pid"]) if p]
        c0 = cpu_seconds(pids)
        lags = await asyncio.to_thread(measure_lag, dba.path, lambda: open_replica(dbb),
                                       rate, seconds, False)
        cpu = (cpu_seconds(pids) - c0) / seconds
    finally:
        await pb.stop()
        await pa.stop()
    return lags, cpu


# -- promotion -------------------------------------------------------------------------------


def sqlite_events(cluster: NodeCluster, node: str) -> list[dict[str, Any]]:
    path = cluster.state_dir / f"{node}.sqlite.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


async def failovers(url: str, work: Path, rounds: int, with_sqlite: bool) -> dict[str, list[float]]:
    extra = ["--setup", "pycluster_sqlite.testing_node:options", "--setup-arg", "batch=5",
             "--setup-arg", "write_interval=0.02"] if with_sqlite else []
    name = f"bench{'sq' if with_sqlite else 'core'}{int(time.time()) % 100000}"
    cluster = NodeCluster(name, [url], work / name, size=2, app="db", lease_ttl=2.0,
                          heartbeat=0.5, extra_args=extra)
    res: dict[str, list[float]] = {"kill_active": [], "won_promoted": [], "won_write": [],
                                   "kill_write": []}
    try:
        await cluster.start(timeout=60)
        leader = await cluster.wait_for_leader(60)
        for _ in range(rounds):
            epoch = cluster.role(leader)[1] or 0
            await asyncio.sleep(1.5)
            killed = time.time()
            cluster.kill(leader)
            new = await cluster.wait_for_leader(60, exclude=[leader], min_epoch=epoch + 1)
            new_epoch = cluster.role(new)[1]
            active_at = next(e["t"] for e in cluster.events(new) if e.get("event") == "role"
                             and e.get("role") == "active" and e.get("epoch") == new_epoch)
            res["kill_active"].append(active_at - killed)
            if with_sqlite:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    ev = sqlite_events(cluster, new)
                    won = [e for e in ev if e.get("event") == "leader"
                           and e.get("epoch") == new_epoch]
                    wrote = [e for e in ev if e.get("event") == "written"
                             and e.get("epoch") == new_epoch]
                    act = [e for e in ev if e.get("event") == "active"
                           and e.get("epoch") == new_epoch]
                    if won and wrote and act:
                        res["won_promoted"].append(act[0]["promotion"]["seconds"])
                        res["won_write"].append(wrote[0]["t"] - won[0]["t"])
                        res["kill_write"].append(wrote[0]["t"] - killed)
                        break
                    await asyncio.sleep(0.05)
            await cluster.start_node(leader, timeout=60)
            leader = new
    finally:
        await cluster.stop()
    return res


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=float, default=20.0, help="commits per second")
    ap.add_argument("--failovers", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sqlite-"))
    server = NatsServer()
    await server.start()
    try:
        print(f"replication lag: commit on the active -> row visible on a standby, "
              f"{args.rate:g} commits/s for {args.seconds:g} s (loopback, 2 cores, shared)")
        row("raw nats-py publish -> receive (floor)", await nats_floor(server.url, 200))
        lags, cpu = await bare_litestream(server.url, work, "defaults", None, args.rate,
                                          args.seconds)
        row("bare litestream, its defaults (1 s intervals)", lags, f"  cpu {cpu:.2f} cores")
        lags, cpu = await bare_litestream(server.url, work, "ms100", 0.1, args.rate,
                                          args.seconds)
        row("bare litestream, all intervals 100 ms", lags, f"  cpu {cpu:.2f} cores")
        lags, cpu = await plugin_lag(server.url, work, args.rate, args.seconds)
        row("pycluster-sqlite defaults (50 ms monitor/sync/follow)", lags,
            f"  cpu {cpu:.2f} cores")
        print(f"\npromotion over {args.failovers} SIGKILL failovers (real node processes, "
              f"lease 2 s, heartbeat 0.5 s)")
        core = await failovers(server.url, work, args.failovers, with_sqlite=False)
        row("core failover without SQLite: kill -> active (baseline)", core["kill_active"])
        sq = await failovers(server.url, work, args.failovers, with_sqlite=True)
        row("sqlite: kill -> new leader active", sq["kill_active"])
        row("sqlite: lease won -> promoted database", sq["won_promoted"])
        row("sqlite: lease won -> first row written by new leader", sq["won_write"])
        row("sqlite: kill -> first row written by new leader", sq["kill_write"])
    finally:
        await server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.platform != "linux":
        sys.exit("Linux only")
    asyncio.run(main())
