"""Benchmark of `app.kv` reads and conditional writes beside the raw nats-py floor, same run.

Run from the repository root::

    python bench/bench_kv.py [--ops 500] [--readers 8]

On one server (R1 bucket) and on a 3-server cluster (R3 bucket), loopback, it prints p50/p99 of:

- raw floors: a direct get (any replica), a leader get (``$JS.API.STREAM.MSG.GET``), a
  compare-and-set publish (``Nats-Expected-Last-Subject-Sequence``), and the raw one-round-trip
  read guard (a conditional publish with ``Nats-Expected-Last-Subject-Sequence-Subject``);
- pycluster: ``get(stale_ok=True)``, ``get()`` (linearizable: read + guard on R3), ``update``,
  ``transform`` (an increment) against the raw floor "direct get + CAS publish";
- ``--readers`` concurrent linearizable readers of one key (guards of one key are decided one
  at a time by the stream leader) beside the same number of raw direct-get readers.

Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

import nats  # noqa: E402
import nats.js.errors  # noqa: E402

from pycluster.kernel import natsutil as nu  # noqa: E402
from pycluster.kernel.kv import AppKV  # noqa: E402
from pycluster.testing import NatsCluster, NatsServer  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def _time(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up
        await fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


def _row(name: str, values: list[float], floor: list[float] | None = None) -> None:
    p50, p99 = _pct(values, 50) * 1e3, _pct(values, 99) * 1e3
    ratio = f"  {_pct(values, 50) / _pct(floor, 50):5.2f}x floor" if floor else ""
    print(f"  {name:44s} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms{ratio}")


async def _suite(urls: list[str], replicas: int, ops: int, readers: int) -> None:
    nc = await nats.connect(urls)
    js = nc.jetstream()
    bucket = f"bench_kv_r{replicas}"
    kv = AppKV(js, bucket)
    await kv.ensure(replicas=replicas)
    rev = await kv.put("k", "0")
    stream, subject = nu.kv_stream(bucket), nu.kv_subject(bucket, "k")

    async def raw_direct() -> Any:
        return await js.get_last_msg(stream, subject, direct=True)

    async def raw_leader() -> Any:
        return await js.get_last_msg(stream, subject, direct=False)

    async def raw_guard() -> Any:
        return await nu.confirm_read(js, bucket, "k", rev)

    cas_rev = [await kv.put("c", "0")]

    async def raw_cas() -> None:
        ack = await js.publish(nu.kv_subject(bucket, "c"), b"x",
                               headers={nu.EXPECTED_LAST_SUBJECT_SEQ: str(cas_rev[0])})
        cas_rev[0] = ack.seq

    retries = [0]

    async def raw_rmw() -> None:
        # A follower's direct get can lag behind a just-acknowledged write even in a healthy
        # cluster: on a conflict, read again from the stream leader (what transform does).
        direct = True
        while True:
            msg = await js.get_last_msg(stream, nu.kv_subject(bucket, "n"), direct=direct)
            try:
                await js.publish(nu.kv_subject(bucket, "n"), str(int(msg.data) + 1).encode(),
                                 headers={nu.EXPECTED_LAST_SUBJECT_SEQ: str(msg.seq)})
                return
            except nats.js.errors.BadRequestError:
                retries[0] += 1
                direct = False

    await kv.put("n", "0")
    upd_rev = [await kv.put("u", "0")]

    async def update() -> None:
        upd_rev[0] = await kv.update("u", "x", upd_rev[0])

    def inc(old: bytes | None) -> str:
        return str(int(old or b"0") + 1)

    print(f"\n{len(urls)} server(s), R{replicas} bucket, {ops} ops each")
    direct = await _time(raw_direct, ops)
    _row("raw direct get (floor, any replica)", direct)
    _row("raw leader get", await _time(raw_leader, ops))
    guard = await _time(raw_guard, ops)
    _row("raw read guard (one conditional publish)", guard)
    floor_read = [a + b for a, b in zip(direct, guard, strict=False)]
    cas = await _time(raw_cas, ops)
    _row("raw CAS publish (floor for update)", cas)
    rmw = await _time(raw_rmw, ops)
    _row("raw direct get + CAS publish (floor)", rmw)
    print(f"    (the raw read-modify-write re-read from the leader {retries[0]} times)")
    _row("kv.get(stale_ok=True)", await _time(lambda: kv.get("k", stale_ok=True), ops), direct)
    lin = await _time(lambda: kv.get("k"), ops)
    _row("kv.get() linearizable", lin, direct)
    if replicas > 1:
        _row("   vs floor direct get + guard", lin, floor_read)
    _row("kv.update()", await _time(update, ops), cas)
    _row("kv.transform() increment", await _time(lambda: kv.transform("n", inc), ops), rmw)

    async def many(fn: Callable[[], Awaitable[Any]]) -> list[float]:
        lat: list[float] = []

        async def one() -> None:
            for _ in range(max(1, ops // readers)):
                t = time.perf_counter()
                await fn()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(readers)))
        print(f"    ({len(lat) / (time.perf_counter() - t0):7.0f} reads/s)", end="")
        return lat

    raw_many = await many(raw_direct)
    _row(f" {readers} concurrent raw direct-get readers", raw_many)
    lin_many = await many(lambda: kv.get("k"))
    _row(f" {readers} concurrent kv.get() readers, one key", lin_many, raw_many)
    await nc.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=int, default=500)
    ap.add_argument("--readers", type=int, default=8)
    ns = ap.parse_args()
    async with NatsServer() as server:
        await _suite([server.url], 1, ns.ops, ns.readers)
    async with NatsCluster(3) as cluster:
        await _suite(cluster.urls, 3, ns.ops, ns.readers)


if __name__ == "__main__":
    asyncio.run(main())
