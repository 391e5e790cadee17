"""Discovery benchmark: lookup latency (API view, fresh KV read, DNS) beside a raw KV get; the
Prometheus SD export on the health address beside ``/health`` on the same server; a 40-record
SRV answer over UDP with EDNS 4096 beside the same answer without EDNS (UDP, TC, then TCP); and
the time from a SIGKILL of the active node to the updated DNS SRV answer.

Run: ``python bench/bench_discovery.py [--lookups 2000] [--rounds 5]``. Starts its own
nats-server. Lease TTL 2 s, heartbeat 0.5 s (the failover floor is the lease: a crashed holder's
record and lease expire after up to 2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.resolver
import nats

import pycluster_discovery.plugin as discovery_plugin
from pycluster import App, Platform, Spread
from pycluster.kernel import natsutil as nu
from pycluster.kernel.embedded import EmbeddedNatsServer
from pycluster.plugins import create_plugin_manager
from pycluster.testing.nodes import NodeCluster
from pycluster_discovery import Service


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def row(name: str, xs: list[float]) -> None:
    print(f"{name:<46} p50 {1000 * pct(xs, 50):8.3f} ms  p99 {1000 * pct(xs, 99):8.3f} ms",
          flush=True)


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def resolver(port: int) -> dns.asyncresolver.Resolver:
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.lifetime = 2.0
    r.cache = None
    return r


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KeepAlive:
    """``GET`` over one kept-alive HTTP/1.1 connection (connecting is not measured)."""

    def __init__(self, base: str) -> None:
        host, port = base.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> bytes:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        return await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def lookups(url: str, n: int) -> None:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("discovery", discovery_plugin)])
    p = Platform("benchdisc", node_id="n1", nats_url=url, plugin_manager=pm, lease_ttl=2.0,
                 heartbeat_interval=0.5, health_addr="127.0.0.1:0")
    p.register(App("cache", Spread(), Service("redis", port=6379, host="127.0.0.1")))
    d = discovery_plugin.discovery_of(p)
    assert d is not None
    d.dns_addr = "127.0.0.1:0"
    await p.start()
    try:
        while not d.instances("redis"):
            await asyncio.sleep(0.05)
        assert p.js is not None and d.dns is not None and d.dns.address is not None
        r = resolver(int(d.dns.address.rsplit(":", 1)[1]))
        name = "redis.cache.benchdisc.pycluster."
        nc = await nats.connect(url)
        kv = await nc.jetstream().key_value("benchdisc_services")
        row("raw KV get (nats-py kv.get, same key)",
            await timed(lambda: kv.get("cache.redis.n1"), n))
        row("raw last-msg direct get (natsutil)",
            await timed(lambda: nu.last_msg(nc.jetstream(), "benchdisc_services",
                                            "cache.redis.n1"), n))
        row("lookup() (API, the watched view)", await timed(lambda: d.lookup("redis"), n))
        row("registry.read() (fresh read of the bucket)",
            await timed(lambda: d.registry.read("redis"), max(50, n // 10)))
        row("DNS A query (dnspython, UDP)", await timed(lambda: r.resolve(name, "A"), n))
        await nc.close()

        assert p.health.url is not None
        for label, path in (("GET /health (health_addr, baseline)", "/health"),
                            ("GET /v1/sd/prometheus (health_addr)", "/v1/sd/prometheus")):
            # one connection per row: the server closes one after 1000 requests
            http = KeepAlive(p.health.url)
            row(label, await timed(lambda: http.get(path), min(n, 900)))  # noqa: B023
            await http.close()

        for i in range(40):
            await d.register("big", 7000 + i, app="ext", host=f"10.0.0.{i + 1}", node=f"x{i}")
        while len(d.instances("big")) < 40:
            await asyncio.sleep(0.05)
        srv = "_big._tcp.ext.benchdisc.pycluster."
        port = int(d.dns.address.rsplit(":", 1)[1])

        async def edns() -> None:
            q = dns.message.make_query(srv, "SRV", use_edns=0, payload=4096)
            a = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=2)
            assert not a.flags & dns.flags.TC and len(a.answer[0]) == 40

        async def classic() -> None:
            q = dns.message.make_query(srv, "SRV")
            a = await dns.asyncquery.udp(q, "127.0.0.1", port=port, timeout=2)
            assert a.flags & dns.flags.TC
            a = await dns.asyncquery.tcp(q, "127.0.0.1", port=port, timeout=2)
            assert len(a.answer[0]) == 40

        row("SRV x40, no EDNS (UDP, TC, then TCP)", await timed(classic, n))
        row("SRV x40, EDNS 4096 (one UDP round)", await timed(edns, n))
    finally:
        await p.stop()


async def failover(url: str, tmp: Path, rounds: int) -> None:
    ports = {n: free_udp_port() for n in ("n1", "n2", "n3")}
    node_args = {n: ["--setup", "pycluster_discovery.testing:setup",
                     "--setup-arg", f"dns=127.0.0.1:{p}"] for n, p in ports.items()}
    cluster = NodeCluster("benchfo", [url], tmp, size=3, app="orders", lease_ttl=2.0,
                          heartbeat=0.5, node_args=node_args)
    await cluster.start()
    qname = "_http._tcp.orders.benchfo.pycluster."

    async def srv(node: str) -> list[str]:
        try:
            ans = await resolver(ports[node]).resolve(qname, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.Timeout):
            return []
        return [str(x.target).split(".")[0] for x in ans]

    times = []
    try:
        for _ in range(rounds):
            leader = await cluster.wait_for_leader(timeout=30)
            survivor = next(n for n in ports if n != leader)
            while await srv(survivor) != [leader]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5 + 0.5 * (len(times) % 3) / 3)  # a random renewal phase
            cluster.kill(leader)
            t0 = time.monotonic()
            while True:
                got = await srv(survivor)
                if len(got) == 1 and got[0] != leader:
                    break
                await asyncio.sleep(0.01)
            times.append(time.monotonic() - t0)
            await cluster.restart(leader)
        row(f"SIGKILL -> DNS SRV names the new node ({rounds})", times)
    finally:
        await cluster.stop()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    server = EmbeddedNatsServer(tmp / "nats")
    await server.start()
    print(f"pycluster discovery benchmark, nats-server at {server.url}\n")
    try:
        await lookups(server.url, args.lookups)
        await failover(server.url, tmp, args.rounds)
    finally:
        await server.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
