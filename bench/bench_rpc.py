"""RPC and API-bus round trips beside raw nats-py request/reply, measured in the same run.

Run: ``python bench/bench_rpc.py [--calls 3000] [--rounds 10] [--size 128]``. Starts its own
nats-server. One client, sequential calls with a ``--size``-byte payload; a server node and a
client node are two `Platform` objects (two NATS connections) in this process, and the raw
baseline likewise uses two connections of the same process, so both pay the same event loop.
Variants run interleaved in rounds to spread the noise of a shared machine evenly.

Printed per variant: p50 / p99 latency, calls/s, CPU time of this process per call (client and
server sides together: steadier than latency on a loaded machine), and the overhead over raw
(target: p50 within 30%), then the ratio of the variant's p50 to raw's p50 per round: median
(min..max) over the rounds. "+default mw" variants keep the middleware a platform installs by
default (observability: spans and metrics); the others measure the transport alone.

Then ``--concurrency`` (32) callers at once, each doing sequential calls, for raw nats-py and
the default-middleware variants: throughput per round (median and range), CPU per call, and the
ratio to raw's throughput in the same round (target: >= 0.7x). The load average is printed with
each section.

"raw nats-py + one header each way" is raw request/reply carrying one header each way, as
pycluster's calls did before their metadata moved into the reply subject (``Pc-Call`` out,
``Pc-Node`` back): nats-py builds and parses headers in Python, which is why pycluster's hot path
now carries none; shown for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from pycluster import App, AuthMiddleware, OnNodes, Platform, SignedAuth, Singleton
from pycluster.builtin.rpc.service import rpc_service
from pycluster.kernel.embedded import EmbeddedNatsServer
from pycluster.plugins import create_plugin_manager
from pycluster.signing import generate_keypair
from pycluster.testing import wait_for


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def measure(fn: Callable[[], Awaitable[Any]], n: int) -> tuple[list[float], float, float]:
    """Latencies, elapsed wall time, and CPU time of this process (both sides of the call)."""
    lat = []
    t_start, c_start = time.perf_counter(), time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        lat.append(time.perf_counter() - t0)
    return lat, time.perf_counter() - t_start, time.process_time() - c_start


async def concurrent(fn: Callable[[], Awaitable[Any]], callers: int, total: int) -> float:
    """Calls per second with ``callers`` tasks sharing ``total`` sequential calls."""
    share = total // callers

    async def caller() -> None:
        for _ in range(share):
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return share * callers / (time.perf_counter() - t0)


def load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=3000, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--size", type=int, default=128, help="payload bytes")
    ap.add_argument("--concurrency", type=int, default=32, help="callers of the throughput part")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-rpc-"))
    server = EmbeddedNatsServer(tmp / "nats")
    await server.start()
    try:
        return await run(server.url, args)
    finally:
        await server.stop()


async def run(url: str, args: argparse.Namespace) -> int:
    payload = os.urandom(args.size)
    json_payload = {"data": "x" * max(0, args.size - 12)}  # ~size bytes of JSON

    # raw nats-py: a responder on one connection, the requester on another.
    nc_srv = await nats.connect(url)
    nc_cli = await nats.connect(url)

    async def responder(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc_srv.subscribe("bench.raw.echo", cb=responder)
    # The same, with the one header pycluster sends each way (nats-py builds and parses
    # headers in Python): the floor of any request/reply that carries metadata.
    reply_headers = {"Pc-Node": "server"}
    call_headers = {"Pc-Call": "0a1b2c3d-1f/0123456789abcdef 4.999 client svc"}

    async def responder_h(msg: Any) -> None:
        await nc_srv.publish(msg.reply, msg.data, headers=reply_headers)

    await nc_srv.subscribe("bench.rawh.echo", cb=responder_h)
    await nc_srv.flush()

    # pycluster: a server node running the app, a client node that only calls.
    def plat(node: str, app: App) -> Platform:
        p = Platform("bench", node_id=node, nats_url=url, lease_ttl=5.0, heartbeat_interval=1.0,
                     plugin_manager=create_plugin_manager(load_entrypoints=False))
        p.register(app)
        return p

    srv_app = App("svc", Singleton())

    @srv_app.rpc.handler("echo")
    async def rpc_echo(data: Any) -> Any:
        return data

    @srv_app.handle("echo")
    async def api_echo(data: Any) -> Any:
        return data

    cli_app = App("svc", Singleton(), OnNodes("server"))  # registered, never placed here
    p_srv, p_cli = plat("server", srv_app), plat("client", cli_app)
    await p_srv.start()
    await p_cli.start()
    try:
        await wait_for(lambda: srv_app.is_active, 30)
        api = p_cli.api("svc")
        await wait_for(lambda: api.call("echo", b"x"), 30, ignore=(Exception,))

        # The platforms' default middleware (observability: spans, metrics), if any, is
        # measured separately: first the transport alone, then with it put back.
        chains = [rpc_service(p).middleware for p in (p_srv, p_cli)]
        defaults = [list(ch) for ch in chains]
        names = sorted({type(mw).__name__ for d in defaults for mw in d}) or ["none"]

        def set_middleware(on: bool) -> Callable[[], Awaitable[None]]:
            async def apply() -> None:
                for ch, d in zip(chains, defaults, strict=True):
                    for mw in list(ch):
                        ch.remove(mw)
                    if on:
                        for mw in d:
                            ch.add(mw)
            return apply

        bare, full = set_middleware(False), set_middleware(True)

        # Authentication alone (no other middleware): NKey signatures, and the weak token.
        seed, public = generate_keypair()
        signer = SignedAuth("client", seed)
        verifier = SignedAuth(trusted={"client": public})
        token = AuthMiddleware(token="t0ken")

        def auth(server_mw: Any, client_mw: Any) -> Callable[[], Awaitable[None]]:
            async def apply() -> None:
                await bare()
                chains[0].add(server_mw)
                chains[1].add(client_mw)
            return apply

        signed, weak = auth(verifier, signer), auth(token, token)
        variants: dict[str, tuple[Callable[[], Awaitable[None]],
                                  Callable[[], Awaitable[Any]]]] = {
            "raw nats-py request/reply": (bare, lambda: nc_cli.request("bench.raw.echo",
                                                                       payload, 5)),
            "raw nats-py + one header each way": (bare, lambda: nc_cli.request(
                "bench.rawh.echo", payload, 5, headers=call_headers)),
            "app.rpc.call(node)": (bare, lambda: cli_app.rpc.call("server", "echo", payload)),
            "app.rpc.call_leader": (bare, lambda: cli_app.rpc.call_leader("echo", payload)),
            "platform.api().call": (bare, lambda: api.call("echo", payload)),
            "platform.api().call (JSON dict)": (bare, lambda: api.call("echo", json_payload)),
            "app.rpc.call(node) +default mw": (full, lambda: cli_app.rpc.call("server", "echo",
                                                                              payload)),
            "app.rpc.call_leader +default mw": (full, lambda: cli_app.rpc.call_leader("echo",
                                                                               payload)),
            "platform.api().call +default mw": (full, lambda: api.call("echo", payload)),
            "platform.api().call +SignedAuth": (signed, lambda: api.call("echo", payload)),
            "platform.api().call +AuthMiddleware(token)": (weak, lambda: api.call("echo",
                                                                                 payload)),
        }
        for setup, fn in variants.values():  # warm up
            await setup()
            await measure(fn, 200)
        lat: dict[str, list[float]] = {k: [] for k in variants}
        round_p50: dict[str, list[float]] = {k: [] for k in variants}
        spent: dict[str, float] = dict.fromkeys(variants, 0.0)
        cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
        gc.disable()
        try:
            for _ in range(args.rounds):
                for name, (setup, fn) in variants.items():
                    await setup()
                    xs, t, c = await measure(fn, args.calls)
                    lat[name].extend(xs)
                    round_p50[name].append(pct(xs, 50))
                    spent[name] += t
                    cpu[name] += c
                gc.collect()
        finally:
            gc.enable()
        raw = "raw nats-py request/reply"
        base50 = pct(lat[raw], 50)
        base_cpu = cpu[raw] / len(lat[raw])
        print(f"round trips: {args.rounds} rounds x {args.calls} calls, {args.size}-byte "
              f"payload, one sequential client (python {sys.version.split()[0]}); "
              f"default middleware: {', '.join(names)}; load {load()}")
        for name in variants:
            p50, p99 = pct(lat[name], 50), pct(lat[name], 99)
            rate = len(lat[name]) / spent[name]
            per_cpu = cpu[name] / len(lat[name])
            line = (f"{name:<42} p50 {p50 * 1e6:7.1f} us  p99 {p99 * 1e6:8.1f} us  "
                    f"{rate:6.0f} calls/s  cpu {per_cpu * 1e6:6.1f} us/call")
            if name != raw:
                over = (p50 - base50) / base50 * 100
                verdict = "(ok < 30%)" if over < 30 else "(> 30%)"
                line += (f"  | overhead p50 {over:+5.1f}% {verdict}"
                         f", cpu {(per_cpu - base_cpu) * 1e6:+6.1f} us")
            else:
                line += "   (baseline)"
            print(line, flush=True)
        print("p50 ratio to raw per round, median (min..max); target <= 1.3x with the default "
              "middleware:")
        for name in variants:
            if name == raw:
                continue
            rs = [v / b for v, b in zip(round_p50[name], round_p50[raw], strict=True)]
            print(f"  {name:<42} {statistics.median(rs):.2f}x ({min(rs):.2f}..{max(rs):.2f})")

        # Throughput with many concurrent callers (the default middleware on).
        await full()
        conc = {
            "raw nats-py request/reply": lambda: nc_cli.request("bench.raw.echo", payload, 5),
            "raw nats-py + one header each way": lambda: nc_cli.request(
                "bench.rawh.echo", payload, 5, headers=call_headers),
            "app.rpc.call(node) +default mw": lambda: cli_app.rpc.call("server", "echo",
                                                                      payload),
            "app.rpc.call_leader +default mw": lambda: cli_app.rpc.call_leader("echo", payload),
            "platform.api().call +default mw": lambda: api.call("echo", payload),
        }
        total = max(args.concurrency, args.calls)
        for fn in conc.values():
            await concurrent(fn, args.concurrency, total // 4)
        rates: dict[str, list[float]] = {k: [] for k in conc}
        cpus: dict[str, list[float]] = {k: [] for k in conc}
        loads = []
        for _ in range(args.rounds):
            loads.append(load())
            for name, fn in conc.items():
                c0 = time.process_time()
                rates[name].append(await concurrent(fn, args.concurrency, total))
                cpus[name].append((time.process_time() - c0) / total)
        print(f"\nthroughput: {args.concurrency} concurrent callers, {total} calls per variant "
              f"per round, {args.rounds} rounds; load {' '.join(loads)}")
        for name in conc:
            r = rates[name]
            line = (f"{name:<42} {statistics.median(r):7.0f} calls/s "
                    f"({min(r):.0f}..{max(r):.0f})  cpu {statistics.median(cpus[name]) * 1e6:5.1f}"
                    " us/call")
            if name != raw:
                rs = [v / b for v, b in zip(r, rates[raw], strict=True)]
                line += (f"  | ratio to raw {statistics.median(rs):.2f}x "
                         f"({min(rs):.2f}..{max(rs):.2f})")
                if "nats-py" not in name:
                    line += " (target >= 0.7x)"
            print(line, flush=True)
    finally:
        await p_cli.stop()
        await p_srv.stop()
        await nc_cli.close()
        await nc_srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
