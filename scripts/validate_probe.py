"""Probe nodes for ``scripts/validate-locks.sh`` and ``validate-api.sh``: in-process platforms
that join the cluster named by ``PYCLUSTER_CONFIG`` (its platform name, NATS URL, credentials,
TLS, replicas) under node ids ``vprobe-<pid>-<i>``, without HTTP endpoints, and leave at the end.

Prints one line with the figure; exits 1 on a violation.

    python scripts/validate_probe.py locks [--nodes 3] [--rounds 20]
    python scripts/validate_probe.py api [--calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from pycluster import App, Platform, Spread
from pycluster.kernel.settings import load_settings


def probe(i: int, tmp: str, *apps: App) -> Platform:
    s = load_settings(os.environ["PYCLUSTER_CONFIG"])
    kw: dict[str, Any] = s.model_dump(exclude_none=True, exclude={
        "apps", "name", "node_id", "health_addr", "metrics_addr", "data_dir", "labels"})
    p = Platform(s.name, node_id=f"vprobe-{os.getpid()}-{i}", data_dir=f"{tmp}/{i}",
                 labels={"probe": "validate"}, **kw)
    for app in apps:
        p.register(app)
    return p


async def locks(nodes: int, rounds: int) -> int:
    """``nodes`` probes each add 1 ``rounds`` times under one platform lock; the counter lives
    in a fresh KV bucket and is read, then written after a pause (no compare-and-set: only the
    lock keeps two writers apart)."""
    with tempfile.TemporaryDirectory() as tmp:
        ps = [probe(i, tmp) for i in range(nodes)]
        for p in ps:
            await p.start()
        bucket = f"validate_locks_{os.getpid()}"
        try:
            assert ps[0].js is not None
            kv = await ps[0].js.create_key_value(bucket=bucket,
                                                 replicas=ps[0].settings.stream_replicas)
            await kv.put("n", b"0")
            name = f"validate-{os.getpid()}"

            async def worker(p: Platform) -> None:
                for _ in range(rounds):
                    async with p.lock(name, ttl=10):
                        value = int((await kv.get("n")).value or b"0")
                        await asyncio.sleep(0.005)
                        await kv.put("n", str(value + 1).encode())

            t = time.monotonic()
            await asyncio.gather(*(worker(p) for p in ps))
            took = time.monotonic() - t
            got = int((await kv.get("n")).value or b"0")
            await ps[0].js.delete_key_value(bucket)
        finally:
            for p in reversed(ps):
                await p.stop()
    want = nodes * rounds
    if got != want:
        print(f"counter {got}, expected {want}: {abs(want - got)} increment(s) "
              f"{'lost' if got < want else 'doubled'}")
        return 1
    print(f"{want} lock-protected increments from {nodes} nodes, none lost or doubled; "
          f"{want / took:.1f} hand-overs/s")
    return 0


async def api(calls: int) -> int:
    """A probe serves ``validate_api_<pid>.echo``; another calls it ``calls`` times."""
    app_name = f"validate_api_{os.getpid()}"
    server_app, client_app = App(app_name, Spread()), App(f"{app_name}_c", Spread())

    @server_app.handle("echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return {"n": body.get("n"), "node": server.node_id}

    with tempfile.TemporaryDirectory() as tmp:
        server, client = probe(0, tmp, server_app), probe(1, tmp, client_app)
        await server.start()
        await client.start()
        try:
            for _ in range(200):  # until the server's instance is active
                if server_app.is_active:
                    break
                await asyncio.sleep(0.05)
            bus = client.api(app_name, timeout=10)
            lat: list[float] = []
            bad = 0
            for n in range(calls):
                t = time.monotonic()
                res = await bus.call("echo", {"n": n})
                lat.append(time.monotonic() - t)
                bad += res != {"n": n, "node": server.node_id}
        finally:
            await client.stop()
            await server.stop()
    if bad:
        print(f"{bad} of {calls} calls answered wrongly")
        return 1
    q = statistics.quantiles(lat, n=100)
    print(f"{calls} calls over the API bus, p50 {q[49] * 1000:.1f} ms, "
          f"p99 {q[98] * 1000:.1f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lk = sub.add_parser("locks")
    lk.add_argument("--nodes", type=int, default=3)
    lk.add_argument("--rounds", type=int, default=20)
    ap_ = sub.add_parser("api")
    ap_.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    if args.cmd == "locks":
        return asyncio.run(locks(args.nodes, args.rounds))
    return asyncio.run(api(args.calls))


if __name__ == "__main__":
    sys.exit(main())
