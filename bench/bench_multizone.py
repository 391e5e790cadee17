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
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pycluster import App, HubListen, LeafOf, Platform, Singleton
from pycluster.kernel.embedded import free_port
from pycluster.kernel.settings import secret_value
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for


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
    args = ap.parse_args()
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
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
