"""The discovery DNS server answered through dnspython's resolver and ``dig``: A, SRV, TXT,
NXDOMAIN, healthy instances only, EDNS(0) payload sizes; and (slow) an SRV answer that follows
a SIGKILL failover of node processes within the lease plus a bound."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.resolver
import pytest
from dnslib import EDNS0, DNSRecord

from pycluster import App, Platform, Spread
from pycluster.testing import require
from pycluster.testing.nodes import NodeCluster
from pycluster.testing.wait import wait_for
from pycluster_discovery import PyCheck, Service
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(60)


def disc(p: Any) -> Any:
    d = discovery_of(p)
    assert d is not None
    return d


def free_udp_port() -> int:
    """A port free for UDP and for TCP (the DNS server binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            try:
                t.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both UDP and TCP")


def resolver(addr: str) -> dns.asyncresolver.Resolver:
    host, port = addr.rsplit(":", 1)
    r = dns.asyncresolver.Resolver(configure=False)
    r.nameservers = [host]
    r.port = int(port)
    r.lifetime = 5.0
    r.cache = None
    return r


async def dns_node(make_node: Callable[..., Any], node: str, *apps: App) -> Platform:
    p: Platform = await make_node(node, *apps, start=False)
    disc(p).dns_addr = "127.0.0.1:0"
    await p.start()
    return p


async def test_a_srv_txt_and_negative_answers(make_node: Callable[..., Any]) -> None:
    ok = {"n2": True}

    def app(node: str) -> App:
        check = PyCheck(lambda: ok.get(node, True), interval=0.2)
        return App("cache", Spread(), Service("redis", port=6379, host=f"127.0.0.{node[1]}",
                                              tags=["v2"], metadata={"zone": "a"},
                                              health=check))

    p1 = await dns_node(make_node, "n1", app("n1"))
    await make_node("n2", app("n2"))
    zone = f"{p1.name}.pycluster."
    r = resolver(disc(p1).dns.address)

    async def a_records() -> list[str]:
        ans = await r.resolve(f"redis.cache.{zone}", "A", raise_on_no_answer=False)
        return sorted(x.address for x in ans)

    async def a_is(want: list[str]) -> bool:
        return await a_records() == want

    await wait_for(lambda: a_is(["127.0.0.1", "127.0.0.2"]), 10)
    srv = await r.resolve(f"_redis._tcp.cache.{zone}", "SRV")
    assert sorted((x.port, str(x.target)) for x in srv) == [
        (6379, f"n1.redis.cache.{zone}"), (6379, f"n2.redis.cache.{zone}")]
    assert srv.rrset is not None and srv.rrset.ttl <= 2
    target = await r.resolve(f"n2.redis.cache.{zone}", "A")
    assert [x.address for x in target] == ["127.0.0.2"]
    txt = await r.resolve(f"redis.cache.{zone}", "TXT")
    strings = sorted(b" ".join(x.strings).decode() for x in txt)
    assert "node=n1" in strings[0] and "zone=a" in strings[0] and "tags=v2" in strings[0]
    # case-insensitive names
    assert len(await r.resolve(f"REDIS.Cache.{zone.upper()}", "A")) == 2
    # healthy instances only
    ok["n2"] = False
    await wait_for(lambda: a_is(["127.0.0.1"]), 5, message="critical n2 still answered")
    srv = await r.resolve(f"_redis._tcp.cache.{zone}", "SRV")
    assert [str(x.target) for x in srv] == [f"n1.redis.cache.{zone}"]
    # negative answers
    with pytest.raises(dns.resolver.NXDOMAIN):
        await r.resolve(f"nope.cache.{zone}", "A")
    with pytest.raises(dns.resolver.NXDOMAIN):  # a tcp service has no _udp name
        await r.resolve(f"_redis._udp.cache.{zone}", "SRV")
    with pytest.raises(dns.resolver.NoAnswer):  # the name exists, without IPv6 addresses
        await r.resolve(f"redis.cache.{zone}", "AAAA")
    with pytest.raises(dns.resolver.NoNameservers):  # REFUSED outside the zone
        await r.resolve("example.com.", "A")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_srv_follows_a_sigkill_failover(nats_url: str, unique_name: str,
                                              tmp_path: Path) -> None:
    """SIGKILL the active node: the SRV answer (asked of a surviving node's DNS server) names
    the new active node within the lease TTL (2 s) plus 3 s."""
    ports = {n: free_udp_port() for n in ("n1", "n2", "n3")}
    node_args = {n: ["--setup", "pycluster_discovery.testing:setup",
                     "--setup-arg", "service=http", "--setup-arg", "port=8080",
                     "--setup-arg", f"dns=127.0.0.1:{p}"] for n, p in ports.items()}
    cluster = NodeCluster(unique_name, [nats_url], tmp_path, size=3, app="orders",
                          lease_ttl=2.0, heartbeat=0.5, node_args=node_args)
    await cluster.start()
    try:
        leader = await cluster.wait_for_leader(timeout=30)
        zone = f"{unique_name}.pycluster."

        async def srv_nodes(node: str) -> list[str]:
            r = resolver(f"127.0.0.1:{ports[node]}")
            try:
                ans = await r.resolve(f"_http._tcp.orders.{zone}", "SRV")
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return []
            return [str(x.target).split(".")[0] for x in ans]

        survivor = next(n for n in ports if n != leader)

        async def names(node: str, want: str) -> bool:
            return await srv_nodes(node) == [want]

        await wait_for(lambda: names(survivor, leader), 15, ignore=(dns.exception.Timeout,))
        cluster.kill(leader)
        t0 = time.monotonic()

        async def moved() -> str | None:
            got = await srv_nodes(survivor)
            return got[0] if len(got) == 1 and got[0] != leader else None

        new = await wait_for(moved, 2.0 + 3.0 + 2.0, interval=0.05,
                             ignore=(dns.exception.Timeout,),
                             message="SRV did not move off the killed node")
        took = time.monotonic() - t0
        assert new in ports and new != leader
        assert took <= 2.0 + 3.0, f"SRV moved after {took:.2f}s"
        await wait_for(lambda: cluster.active_nodes() == [new], 10)
    finally:
        await cluster.stop()
        await asyncio.sleep(0)


async def test_large_answers_truncate_over_udp_and_come_over_tcp(
        make_node: Callable[..., Any]) -> None:
    p = await dns_node(make_node, "n1", App("idle", Spread()))
    d = disc(p)
    for i in range(40):
        await d.register("big", 7000 + i, app="ext", host=f"10.0.0.{i + 1}", node=f"x{i}")
    await wait_for(lambda: len(d.instances("big")) == 40 or None, 10)
    r = resolver(d.dns.address)
    name = f"_big._tcp.ext.{p.name}.pycluster."
    udp = dns.message.make_query(name, "SRV")
    host, port = d.dns.address.rsplit(":", 1)
    reply = await dns.asyncquery.udp(udp, host, port=int(port), timeout=5)
    assert reply.flags & dns.flags.TC
    ans = await r.resolve(name, "SRV")  # the resolver retries over TCP
    assert len(ans) == 40


async def test_a_taken_tcp_port_fails_start_clearly_and_frees_udp(
        make_node: Callable[..., Any]) -> None:
    """An explicit DNS port whose TCP side is taken: start fails with the bind error and the
    UDP socket it had bound is closed again (nothing half-bound is left)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        p: Platform = await make_node("n1", App("cache", Spread(), Service("redis", port=6379)),
                                      start=False)
        disc(p).dns_addr = f"127.0.0.1:{port}"
        with pytest.raises(OSError, match="address already in use"):
            await p.start()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", port))  # the UDP side was released


async def _big_service(make_node: Callable[..., Any], count: int) -> tuple[Platform, str]:
    """A node with DNS and ``count`` external instances of service ``big`` of app ``ext``;
    returns the platform and the SRV name."""
    p = await dns_node(make_node, "n1", App("idle", Spread()))
    d = disc(p)
    for i in range(count):
        await d.register("big", 7000 + i, app="ext", host=f"10.0.0.{i + 1}", node=f"x{i}")
    await wait_for(lambda: len(d.instances("big")) == count or None, 10)
    return p, f"_big._tcp.ext.{p.name}.pycluster."


async def test_edns_payload_size_is_honoured_before_truncating(
        make_node: Callable[..., Any]) -> None:
    """EDNS(0): the answer carries an OPT record, and a UDP answer may be as large as the
    client's payload size: a SRV answer that truncates at 512 bytes (no EDNS) or at a payload
    of 1232 fits with 4096."""
    p, name = await _big_service(make_node, 40)
    host, port_s = disc(p).dns.address.rsplit(":", 1)
    port = int(port_s)

    async def udp(**kw: Any) -> dns.message.Message:
        return await dns.asyncquery.udp(dns.message.make_query(name, "SRV", **kw), host,
                                        port=port, timeout=5)

    full = await dns.asyncquery.tcp(dns.message.make_query(name, "SRV"), host, port=port,
                                    timeout=5)
    size = len(full.to_wire())
    assert len(full.answer[0]) == 40 and 1232 < size <= 4096, size

    plain = await udp()  # no EDNS: 512 bytes at most, no OPT in the answer
    assert plain.flags & dns.flags.TC and not plain.answer and plain.edns == -1
    small = await udp(use_edns=0, payload=1232)
    assert small.flags & dns.flags.TC and not small.answer
    assert small.edns == 0 and small.payload == 4096  # the OPT is there when truncated too
    big = await udp(use_edns=0, payload=4096)
    assert not big.flags & dns.flags.TC and big.rcode() == dns.rcode.NOERROR
    assert big.edns == 0 and big.payload == 4096
    assert sorted(r.port for r in big.answer[0]) == list(range(7000, 7040))
    assert len(big.additional) == 40  # the targets' addresses (the OPT is not among them)
    huge = await udp(use_edns=0, payload=65000)  # more than we offer: our size is the limit
    assert not huge.flags & dns.flags.TC and len(huge.answer[0]) == 40
    tiny = await udp(use_edns=0, payload=100)  # below 512 counts as 512
    assert tiny.flags & dns.flags.TC and tiny.edns == 0
    # a small answer with EDNS: an OPT record back, over UDP and TCP
    one = dns.message.make_query(f"x0.big.ext.{p.name}.pycluster.", "A", use_edns=0)
    for reply in (await dns.asyncquery.udp(one, host, port=port, timeout=5),
                  await dns.asyncquery.tcp(one, host, port=port, timeout=5)):
        assert reply.edns == 0 and [r.address for r in reply.answer[0]] == ["10.0.0.1"]
    # EDNS version 1: BADVERS
    bad = await udp(use_edns=1)
    assert bad.rcode() == dns.rcode.BADVERS and bad.edns == 0 and not bad.answer
    # two OPT records: FORMERR (dnslib builds the malformed query)
    twice = DNSRecord.question(name, "SRV")
    twice.add_ar(EDNS0(udp_len=4096))
    twice.add_ar(EDNS0(udp_len=4096))

    def ask_raw(wire: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(wire, (host, port))
            return sock.recv(65535)

    formerr = dns.message.from_wire(await asyncio.to_thread(ask_raw, twice.pack()))
    assert formerr.rcode() == dns.rcode.FORMERR and not formerr.answer


def dig(*args: str) -> str:
    """Run ``dig`` (``+time=5 +tries=1``) and return its output."""
    out = subprocess.run(["dig", "+time=5", "+tries=1", *args], capture_output=True, text=True,
                         timeout=30, check=True)
    return out.stdout


def answers(output: str) -> list[list[str]]:
    """The answer lines of ``dig +noall +answer``: [name, ttl, class, type, rdata...]."""
    return [line.split() for line in output.splitlines()
            if line.strip() and not line.startswith(";")]


async def test_dig_queries_a_srv_txt_over_udp_and_tcp(make_node: Callable[..., Any]) -> None:
    """The DNS server asked with ``dig`` (BIND's client): A, SRV, TXT, over UDP and +tcp,
    EDNS, NXDOMAIN, and a large answer retried over TCP without EDNS."""
    require("dig", shutil.which("dig") is not None,
            "dig is not installed (Debian: bind9-dnsutils, see .ci/install-system.sh)")
    p, big = await _big_service(make_node, 40)
    d = disc(p)
    await d.register("web", 8443, app="shop", host="127.0.0.7", node="w1", tags=["v2"],
                     metadata={"zone": "a"})
    await wait_for(lambda: d.instances("web") or None, 10)
    host, port = d.dns.address.rsplit(":", 1)
    zone = f"{p.name}.pycluster."
    at = [f"@{host}", "-p", port]

    def ask(*args: str) -> str:
        return dig(*at, *args)

    for transport in ((), ("+tcp",)):
        out = await asyncio.to_thread(ask, *transport, "+noall", "+answer",
                                      f"web.shop.{zone}", "A")
        assert answers(out) == [[f"web.shop.{zone}", "2", "IN", "A", "127.0.0.7"]], out
        out = await asyncio.to_thread(ask, *transport, "+noall", "+answer",
                                      f"_web._tcp.shop.{zone}", "SRV")
        [[name, ttl, cls, rtype, prio, weight, srv_port, target]] = answers(out)
        assert (name, cls, rtype, srv_port, target) == (
            f"_web._tcp.shop.{zone}", "IN", "SRV", "8443", f"w1.web.shop.{zone}")
        assert int(ttl) <= 2 and (prio, weight) == ("0", "1")
        out = await asyncio.to_thread(ask, *transport, "+noall", "+answer",
                                      f"web.shop.{zone}", "TXT")
        [txt] = answers(out)
        assert txt[3] == "TXT"
        strings = [s.strip('"') for s in txt[4:]]
        assert {"node=w1", "status=passing", "port=8443", "tags=v2", "zone=a"} <= set(strings)
    # the target's address comes in the additional section
    out = await asyncio.to_thread(ask, "+noall", "+additional", f"_web._tcp.shop.{zone}", "SRV")
    assert [f"w1.web.shop.{zone}", "2", "IN", "A", "127.0.0.7"] in answers(out)
    # dig sends EDNS by default: the answer carries our OPT record
    out = await asyncio.to_thread(ask, f"web.shop.{zone}", "A")
    assert re.search(r"EDNS: version: 0, flags:;? udp: 4096", out), out
    assert "status: NOERROR" in out and "flags: qr aa" in out
    out = await asyncio.to_thread(ask, f"nope.shop.{zone}", "A")
    assert "status: NXDOMAIN" in out and "SOA" in out
    # 40 SRV records: over 512 bytes without EDNS, dig is told TC and retries over TCP
    out = await asyncio.to_thread(ask, "+noedns", big, "SRV")
    assert "Truncated, retrying in TCP mode" in out
    assert len([a for a in answers(out) if a[3] == "SRV"]) == 40
    # with EDNS 4096 the same answer comes over UDP at once
    out = await asyncio.to_thread(ask, "+bufsize=4096", "+noall", "+answer", "+comments", big,
                                  "SRV")
    assert "Truncated" not in out and len(answers(out)) == 40
