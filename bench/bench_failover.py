"""Failover benchmark: crash failover (SIGKILL) and graceful handover, beside the NATS floor.

Run: ``python bench/bench_failover.py [--rounds 20] [--long]`` (``--long`` adds lease_ttl=10 s,
which takes a few minutes). Starts its own nats-server. Prints p50/p99 per scenario, each next
to the floor measured in the same run with raw nats-py:

* crash floor: a key written with ``Nats-TTL`` (the lease), renewed at the same interval, then
  "crashed" (renewals stop at a random moment); the time until a raw watcher has seen the expiry
  marker and won the key with a compare-and-set. pycluster cannot beat this: it is the lease.
* handover floor: holder deletes the key, a raw watcher sees the delete and creates the key.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import nats

from pycluster import App, Platform
from pycluster.kernel import natsutil as nu
from pycluster.kernel.embedded import EmbeddedNatsServer
from pycluster.plugins import create_plugin_manager
from pycluster.testing.nodes import NodeCluster


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def row(name: str, xs: list[float], floor: list[float] | None = None) -> None:
    s = f"{name:<44} p50 {1000 * pct(xs, 50):8.1f} ms  p99 {1000 * pct(xs, 99):8.1f} ms"
    if floor:
        s += f"   | floor p50 {1000 * pct(floor, 50):8.1f} ms  p99 {1000 * pct(floor, 99):8.1f} ms"
    print(s, flush=True)


async def crash_floor(url: str, ttl: float, hb: float, rounds: int) -> list[float]:
    """Raw nats-py: lease renewed every hb, stopped at a random moment; watcher takes over."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    bucket = f"floor_crash_{round(ttl * 10)}"
    await nu.ensure_kv(js, bucket, history=1, marker_ttl=1)
    out = []
    for _ in range(rounds):
        rev = await nu.cas_publish(js, bucket, "k", b"x", expected_seq=(
            m.seq if (m := await nu.last_msg(js, bucket, "k")) else 0), ttl=ttl)
        stop_after = random.uniform(1, 3) * hb
        t_end = time.monotonic() + stop_after
        while time.monotonic() < t_end:
            await asyncio.sleep(hb)
            rev = await nu.cas_publish(js, bucket, "k", b"x", expected_seq=rev, ttl=ttl)
        await asyncio.sleep(random.uniform(0, hb))
        crashed = time.monotonic()
        got = asyncio.Event()

        async def cb(msg: nats.aio.msg.Msg, got: asyncio.Event = got) -> None:
            got.set()

        sub = await js.subscribe(nu.kv_subject(bucket, "k"), cb=cb, ordered_consumer=True,
                                 deliver_policy=nats.js.api.DeliverPolicy.NEW)
        while True:
            got.clear()
            m = await nu.last_msg(js, bucket, "k")
            if m is not None and m.tombstone:
                await nu.cas_publish(js, bucket, "k", b"y", expected_seq=m.seq, ttl=ttl)
                break
            try:
                await asyncio.wait_for(got.wait(), 0.5)
            except TimeoutError:
                pass
        out.append(time.monotonic() - crashed)
        await sub.unsubscribe()
    await nc.close()
    return out


async def handover_floor(url: str, rounds: int) -> list[float]:
    """Raw nats-py: delete by the holder → a watcher sees it → compare-and-set create."""
    a, b = await nats.connect(url), await nats.connect(url)
    ja, jb = a.jetstream(), b.jetstream()
    bucket = "floor_handover"
    await nu.ensure_kv(ja, bucket, history=1, marker_ttl=1)
    out = []
    rev = await nu.cas_publish(ja, bucket, "k", b"a", expected_seq=0, ttl=10)
    for _ in range(rounds):
        seen: asyncio.Queue[int] = asyncio.Queue()

        async def cb(msg: nats.aio.msg.Msg, seen: asyncio.Queue[int] = seen) -> None:
            if (msg.headers or {}).get(nu.KV_OP) == "DEL":
                seen.put_nowait(msg.metadata.sequence.stream)

        sub = await jb.subscribe(nu.kv_subject(bucket, "k"), cb=cb, ordered_consumer=True,
                                 deliver_policy=nats.js.api.DeliverPolicy.NEW)
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await nu.cas_delete(ja, bucket, "k", expected_seq=rev)
        seq = await seen.get()
        rev = await nu.cas_publish(jb, bucket, "k", b"b", expected_seq=seq, ttl=10)
        out.append(time.monotonic() - t0)
        await sub.unsubscribe()
    await a.close()
    await b.close()
    return out


async def step_down_inprocess(url: str, rounds: int) -> list[float]:
    """pycluster: two platforms in one process; ``step_down()`` → the other is active."""
    apps = [App("svc"), App("svc")]
    plats = []
    for i, app in enumerate(apps):
        p = Platform("benchsd", node_id=f"n{i}", nats_url=url, lease_ttl=10,
                     heartbeat_interval=3,
                     plugin_manager=create_plugin_manager(load_entrypoints=False))
        p.register(app)
        await p.start()
        plats.append(p)
    out = []
    while not any(a.is_leader for a in apps):
        await asyncio.sleep(0.01)
    for _ in range(rounds):
        cur = next(a for a in apps if a.is_leader)
        other = next(a for a in apps if a is not cur)
        await asyncio.sleep(0.6)  # past the previous round's cooldown
        t0 = time.monotonic()
        await cur.step_down(cooldown=0.5)
        while not other.is_leader:
            await asyncio.sleep(0.0005)
        out.append(time.monotonic() - t0)
    for p in plats:
        await p.stop()
    return out


def _active_at(c: NodeCluster, node: str, after: float) -> float | None:
    for e in c.events(node):
        if e.get("event") == "role" and e.get("role") == "active" and e["t"] >= after:
            return float(e["t"])
    return None


async def crash_processes(url: str, workdir: Path, ttl: float, hb: float,
                          rounds: int) -> list[float]:
    """pycluster: 3 node processes; SIGKILL the leader; time until another is active."""
    c = NodeCluster(f"benchcrash{int(ttl * 100)}", [url], workdir / f"crash{ttl}", size=3,
                    lease_ttl=ttl, heartbeat=hb, extra_args=["--log-level", "WARNING"])
    out = []
    try:
        await c.start()
        for _ in range(rounds):
            leader = await c.wait_for_leader(60)
            epoch = c.role(leader)[1] or 0
            await asyncio.sleep(random.uniform(0, hb) + hb)
            t0 = time.time()
            c.kill(leader)
            new = await c.wait_for_leader(60, exclude=[leader], min_epoch=epoch + 1)
            out.append((_active_at(c, new, t0) or time.time()) - t0)
            await c.start_node(leader)
        assert not c.overlaps(), c.overlaps()
    finally:
        await c.stop()
        c.stop_sync()
    return out


async def sigterm_processes(url: str, workdir: Path, rounds: int) -> list[float]:
    """pycluster: SIGTERM the leader process (graceful leave); time until another is active."""
    c = NodeCluster("benchterm", [url], workdir / "term", size=2, lease_ttl=10, heartbeat=3,
                    extra_args=["--log-level", "WARNING"])
    out = []
    try:
        await c.start()
        for _ in range(rounds):
            leader = await c.wait_for_leader(60)
            epoch = c.role(leader)[1] or 0
            t0 = time.time()
            await c.terminate(leader)
            new = await c.wait_for_leader(60, exclude=[leader], min_epoch=epoch + 1)
            out.append((_active_at(c, new, t0) or time.time()) - t0)
            await c.start_node(leader)
    finally:
        await c.stop()
        c.stop_sync()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--long", action="store_true", help="also lease_ttl=10 s (minutes)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    server = EmbeddedNatsServer(tmp / "nats")
    await server.start()
    n = args.rounds
    print(f"pycluster failover benchmark, {n} rounds each, nats-server at {server.url}\n")
    try:
        hf = await handover_floor(server.url, n)
        row("graceful: step_down() (in-process)", await step_down_inprocess(server.url, n), hf)
        row("graceful: SIGTERM of the leader process", await sigterm_processes(server.url, tmp, n),
            hf)
        for ttl, hb in [(1.0, 0.25), (1.0, 0.5)] + ([(10.0, 3.0)] if args.long else []):
            floor = await crash_floor(server.url, ttl, hb, n)
            got = await crash_processes(server.url, tmp, ttl, hb, n)
            row(f"crash: SIGKILL, lease_ttl={ttl:g}s heartbeat={hb:g}s", got, floor)
    finally:
        await server.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
