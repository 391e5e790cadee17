"""The ring: partitions moved per join/leave against the minimum, time to a stable ring after a
join, a graceful leave and a crash from 3 to 9 nodes, and key-routed call latency beside a
leader-route call in the same run.

Run from the repository root::

    python bench/bench_ring.py [--partitions 64] [--rounds 3] [--lease 2.0] [--calls 500]

One nats-server and up to nine node processes (``pycluster.testing.node`` with the ring's
``--setup`` hook, app ``cache``, ``Spread()`` + ``Ring``). Stable = the assignment covers
exactly the live nodes and every partition is owned by its assigned node (read from the ring's
bucket every 50 ms, from outside). Join times run from the new node's "ready" line (its
platform started); leave and crash times from the signal. The minimum for a move is what any
balanced assignment must move: the partitions above each node's new quota.

Numbers, not a test: nothing here asserts on timings (the witness check at the end must pass).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))
sys.path.insert(0, str(ROOT / "plugins" / "ring" / "src"))

import nats  # noqa: E402

from pycluster import ForKey, Platform  # noqa: E402
from pycluster.plugins import create_plugin_manager  # noqa: E402
from pycluster.testing import NatsServer  # noqa: E402
from pycluster.testing.nodes import NodeCluster  # noqa: E402
from pycluster_ring.assignment import quotas  # noqa: E402
from pycluster_ring.cli import read_ring  # noqa: E402
from pycluster_ring.testing import check_witness, read_witness  # noqa: E402

PLATFORM, APP = "ringbench", "cache"


async def state(nc: Any) -> dict[str, Any]:
    return await read_ring(nc.jetstream(), PLATFORM, APP)


async def wait_stable(nc: Any, nodes: set[str], parts: int, timeout: float = 60.0
                      ) -> tuple[float, dict[int, str]]:
    """(monotonic time it became stable, partition -> owner)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            st = await state(nc)
        except Exception:
            st = None
        if st is not None and set(st["members"]) == nodes and not st["unowned"] \
                and not st["misplaced"] and set(st["owned"]) == nodes \
                and sum(len(v) for v in st["owned"].values()) == parts:
            return time.monotonic(), {p: n for n, ps in st["owned"].items() for p in ps}
        await asyncio.sleep(0.05)
    raise TimeoutError(f"ring not stable on {sorted(nodes)} within {timeout}s")


def minimum(before: dict[int, str], nodes: set[str], parts: int) -> int:
    """Partitions any balanced assignment of ``nodes`` must move from ``before``."""
    q = quotas({n: 1.0 for n in nodes}, parts)
    count: dict[str, int] = {}
    for n in before.values():
        count[n] = count.get(n, 0) + 1
    # Partitions of nodes that left, plus each remaining node's surplus over its quota.
    gone = sum(c for n, c in count.items() if n not in q)
    return gone + sum(max(0, count.get(n, 0) - q[n]) for n in q)


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for p in after if before.get(p) != after[p])


def ready_time(c: NodeCluster, node: str, after: int) -> float:
    """Wall-clock time of the node's last "ready" line, as monotonic time now."""
    evs = [e for e in c.events(node)[after:] if e.get("event") == "ready"]
    return time.monotonic() - (time.time() - float(evs[-1]["t"]))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def fmt(xs: list[float]) -> str:
    if not xs:
        return "-"
    return (f"median {statistics.median(xs):.2f}s (min {min(xs):.2f}, max {max(xs):.2f}, "
            f"n={len(xs)})")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lease", type=float, default=2.0)
    ap.add_argument("--heartbeat", type=float, default=0.5)
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--calls", type=int, default=500)
    ns = ap.parse_args()
    P = ns.partitions
    server = NatsServer()
    await server.start()
    work = Path(tempfile.mkdtemp(prefix="bench-ring-"))
    c = NodeCluster(PLATFORM, [server.url], work, size=9, app=APP, mode="spread",
                    lease_ttl=ns.lease, heartbeat=ns.heartbeat,
                    extra_args=["--setup", "pycluster_ring.testing:setup",
                                "--setup-arg", f"partitions={P}",
                                "--setup-arg", f"settle={ns.settle}", "--log-level", "WARNING"])
    nc = await nats.connect(server.url)
    rows: list[str] = []
    join_t: list[float] = []
    leave_t: list[float] = []
    crash_t: list[float] = []
    try:
        live = {"n1", "n2", "n3"}
        for n in sorted(live):
            await c.start_node(n)
        _, cur = await wait_stable(nc, live, P)
        print(f"3 nodes stable, {P} partitions")
        for i in range(4, 10):
            node = f"n{i}"
            mark = len(c.events(node))
            await c.start_node(node)
            t0 = ready_time(c, node, mark)
            live.add(node)
            t1, after = await wait_stable(nc, live, P)
            rows.append(f"join  {len(live) - 1}->{len(live)}: moved {moved(cur, after):3d} "
                        f"(minimum {minimum(cur, live, P):3d}), stable after {t1 - t0:.2f}s")
            join_t.append(t1 - t0)
            cur = after
            print(rows[-1], flush=True)

        # Key-routed calls beside leader-route calls (same app, same caller, interleaved).
        caller = Platform(PLATFORM, node_id="caller", nats_url=server.url,
                          plugin_manager=create_plugin_manager(), lease_ttl=ns.lease,
                          heartbeat_interval=ns.heartbeat)
        await caller.start()
        await caller.service("ring").follow(APP)
        api = caller.api(APP, timeout=10.0)
        key_lat: list[float] = []
        leader_lat: list[float] = []
        for i in range(ns.calls):
            k = f"key-{i}"
            t = time.perf_counter()
            await api.call("whoami", k, route=ForKey(k), idempotent=True)
            key_lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            await api.call("ping", k, idempotent=True)
            leader_lat.append(time.perf_counter() - t)
        await caller.stop()
        lat = (f"ForKey call p50 {pct(key_lat, 0.5) * 1e3:.2f} ms / p99 "
               f"{pct(key_lat, 0.99) * 1e3:.2f} ms; leader-route call p50 "
               f"{pct(leader_lat, 0.5) * 1e3:.2f} ms / p99 {pct(leader_lat, 0.99) * 1e3:.2f} ms "
               f"({ns.calls} each, interleaved, 9 nodes)")
        print(lat, flush=True)

        for r in range(ns.rounds):
            # Graceful leave of n9 (SIGTERM), then it joins again.
            t0 = time.monotonic()
            await c.terminate("n9")
            live.discard("n9")
            t1, after = await wait_stable(nc, live, P)
            rows.append(f"leave 9->8 (SIGTERM) round {r + 1}: moved {moved(cur, after):3d} "
                        f"(minimum {minimum(cur, live, P):3d}), stable after {t1 - t0:.2f}s")
            leave_t.append(t1 - t0)
            print(rows[-1], flush=True)
            cur = after
            mark = len(c.events("n9"))
            await c.start_node("n9")
            t0 = ready_time(c, "n9", mark)
            live.add("n9")
            t1, after = await wait_stable(nc, live, P)
            join_t.append(t1 - t0)
            rows.append(f"join  8->9 round {r + 1}: moved {moved(cur, after):3d} "
                        f"(minimum {minimum(cur, live, P):3d}), stable after {t1 - t0:.2f}s")
            print(rows[-1], flush=True)
            cur = after
            # Crash of n8 (SIGKILL), then it joins again.
            t0 = time.monotonic()
            c.kill("n8")
            live.discard("n8")
            t1, after = await wait_stable(nc, live, P)
            crash_t.append(t1 - t0)
            rows.append(f"crash 9->8 (SIGKILL) round {r + 1}: moved {moved(cur, after):3d} "
                        f"(minimum {minimum(cur, live, P):3d}), stable after {t1 - t0:.2f}s")
            print(rows[-1], flush=True)
            cur = after
            mark = len(c.events("n8"))
            await c.start_node("n8")
            t0 = ready_time(c, "n8", mark)
            live.add("n8")
            t1, after = await wait_stable(nc, live, P)
            join_t.append(t1 - t0)
            cur = after
        await c.stop()
        bad = check_witness(read_witness(c.state_dir))
        print()
        print(f"partitions={P} lease={ns.lease}s heartbeat={ns.heartbeat}s settle={ns.settle}s")
        print(f"time to stable after a join (from the node's ready): {fmt(join_t)}")
        print(f"time to stable after a graceful leave (SIGTERM):     {fmt(leave_t)}")
        print(f"time to stable after a crash (SIGKILL):              {fmt(crash_t)}")
        print(lat)
        print(f"witness: {'no two owners at once, epochs increasing' if not bad else bad[:5]}")
    finally:
        c.stop_sync()
        await nc.close()
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
