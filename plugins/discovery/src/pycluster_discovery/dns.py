"""A small authoritative DNS server (UDP and TCP on the same port) for the zone
``<platform>.pycluster.``, built on dnslib's message parsing and packing.

Names (case-insensitive), healthy (``passing``) instances only:

- ``<service>.<app>.<platform>.pycluster.``: ``A``/``AAAA`` (instance addresses), ``SRV``
  (as below), ``TXT`` (one string set per instance: node, status, role, metadata);
- ``_<service>._<proto>.<app>.<platform>.pycluster.``: ``SRV`` (``_proto`` is ``udp`` for udp
  services, else ``tcp``) with target ``<node>.<service>.<app>.<platform>.pycluster.``, whose
  address records come in the additional section;
- ``<node>.<service>.<app>.<platform>.pycluster.``: ``A``/``AAAA`` of that instance.

Unknown names answer NXDOMAIN, known names without healthy instances an empty NOERROR, both
with the zone's SOA; names outside the zone are REFUSED.

EDNS(0): a query with an OPT record gets one back (this server's UDP payload size,
`EDNS_UDP_SIZE`), and its UDP answer may be as large as the client's payload size (at least
512, at most ours); without EDNS the limit is 512 bytes. A larger UDP answer is sent empty
with TC set, and the client asks again over TCP (no limit there but the message's 64 KiB). An
EDNS version other than 0 answers BADVERS, more than one OPT record FORMERR.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from dnslib import AAAA, EDNS0, QTYPE, RCODE, RR, SOA, SRV, TXT, A, DNSLabel, DNSRecord

from pycluster.httpserver import parse_addr
from pycluster.kernel.discovery import ServiceInstance

if TYPE_CHECKING:
    from .service import Discovery

log = logging.getLogger("pycluster.discovery.dns")

ROOT = "pycluster"
#: The UDP payload size this server advertises in its OPT record and the largest UDP answer
#: it sends to an EDNS client (a client asking for less gets at most what it asked for).
EDNS_UDP_SIZE = 4096
#: The UDP answer limit without EDNS.
CLASSIC_UDP_SIZE = 512
#: The extended RCODE BADVERS (16): its upper 8 bits go in the OPT record, the lower 4 in
#: the header (0).
BADVERS = 16


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(addr)
    except ValueError:
        return None


class DnsServer(asyncio.DatagramProtocol):
    """Answers DNS queries over UDP from the discovery service's view of the registry.

    :param discovery: the discovery service (its ``instances()`` view is read per query).
    :param addr: ``host:port`` to bind (port 0: any free port, see `address`).
    :param ttl: TTL of every answer, seconds.
    """

    def __init__(self, discovery: Discovery, addr: str, *, ttl: int = 2) -> None:
        self.discovery = discovery
        self.addr = addr
        self.ttl = ttl
        self.zone = DNSLabel(f"{discovery.platform.name}.{ROOT}.")
        self.transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self.queries = 0

    @property
    def address(self) -> str | None:
        """``host:port`` bound (None while stopped)."""
        if self.transport is None:
            return None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def start(self) -> None:
        """Bind the UDP socket, then TCP on the same port (answers too large for UDP)."""
        host, port = parse_addr(self.addr)
        loop = asyncio.get_running_loop()
        # With port 0 the kernel picks a free UDP port, but the same TCP port may be taken
        # (by any socket, e.g. a client's ephemeral port): pick again a few times.
        attempts = 20 if port == 0 else 1
        for attempt in range(attempts):
            self.transport, _ = await loop.create_datagram_endpoint(lambda: self,
                                                                    local_addr=(host, port))
            bound = self.transport.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, host, bound)
                break
            except OSError as exc:
                self.transport.close()
                self.transport = None
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
        log.info("discovery DNS on %s for zone %s", self.address, self.zone)

    async def stop(self) -> None:
        """Close the sockets."""
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """DNS over TCP: two-byte length-prefixed messages until the client closes."""
        try:
            while True:
                async with asyncio.timeout(10.0):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                packed = self._reply(data, udp=False)
                if packed is None:
                    return
                writer.write(len(packed).to_bytes(2, "big") + packed)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        """Answer one query (malformed ones are dropped)."""
        packed = self._reply(data, udp=True)
        if packed is not None and self.transport is not None:
            self.transport.sendto(packed, addr)

    def _reply(self, data: bytes, udp: bool) -> bytes | None:
        """The packed reply to a query (None for a malformed one). Over UDP, an answer larger
        than the client can take (512 bytes, or its EDNS payload size) is replaced by an
        empty one with TC set: the client then asks over TCP."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        self.queries += 1
        opts = [rr for rr in request.ar if rr.rtype == QTYPE.OPT]
        if len(opts) > 1:  # RFC 6891 6.1.1
            reply = request.reply()
            reply.header.rcode = RCODE.FORMERR
            return bytes(reply.pack())
        opt = opts[0] if opts else None
        if opt is not None and (opt.ttl >> 16) & 0xFF != 0:  # only EDNS version 0
            reply = request.reply()
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE, ext_rcode=BADVERS >> 4))
            return bytes(reply.pack())
        limit = 65535
        if udp:
            limit = (max(CLASSIC_UDP_SIZE, min(int(opt.rclass), EDNS_UDP_SIZE))
                     if opt is not None else CLASSIC_UDP_SIZE)
        try:
            reply = self.answer(request)
        except Exception:
            log.exception("DNS query failed")
            reply = request.reply()
            reply.header.rcode = RCODE.SERVFAIL
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
        packed: bytes = reply.pack()
        if len(packed) > limit:
            reply = request.reply()
            reply.header.tc = 1
            if opt is not None:
                reply.add_ar(EDNS0(udp_len=EDNS_UDP_SIZE))
            packed = reply.pack()
        return packed

    # -- answers ----------------------------------------------------------------------------------

    def _soa(self) -> RR:
        return RR(self.zone, QTYPE.SOA, ttl=self.ttl,
                  rdata=SOA(f"ns.{self.zone}", f"hostmaster.{self.zone}",
                            (1, 60, 30, 3600, self.ttl)))

    def _addr_rr(self, name: DNSLabel, inst: ServiceInstance, qtype: int) -> RR | None:
        ip = _ip(inst.address)
        if ip is None:
            return None
        if ip.version == 4 and qtype in (QTYPE.A, QTYPE.ANY):
            return RR(name, QTYPE.A, ttl=self.ttl, rdata=A(str(ip)))
        if ip.version == 6 and qtype in (QTYPE.AAAA, QTYPE.ANY):
            return RR(name, QTYPE.AAAA, ttl=self.ttl, rdata=AAAA(str(ip)))
        return None

    def _target(self, inst: ServiceInstance) -> DNSLabel:
        return DNSLabel(f"{inst.node}.{inst.service}.{inst.app}.{self.zone}")

    def answer(self, request: DNSRecord) -> DNSRecord:
        """The reply to ``request``."""
        reply = request.reply()
        reply.header.aa = 1
        qname, qtype = request.q.qname, request.q.qtype
        if not qname.matchSuffix(self.zone):
            reply.header.aa = 0
            reply.header.rcode = RCODE.REFUSED
            return reply
        labels = [x.decode().lower() for x in qname.stripSuffix(self.zone).label]
        if not labels:  # the zone apex
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(self._soa())
            else:
                reply.add_auth(self._soa())
            return reply
        known, rrs, extra = self._resolve(qname, labels, qtype)
        for rr in rrs:
            reply.add_answer(rr)
        for rr in extra:
            reply.add_ar(rr)
        if not rrs:
            if not known:
                reply.header.rcode = RCODE.NXDOMAIN
            reply.add_auth(self._soa())
        return reply

    def _resolve(self, qname: DNSLabel, labels: list[str],
                 qtype: int) -> tuple[bool, list[RR], list[RR]]:
        """(name exists, answers, additional records)."""
        view = self.discovery.instances()

        def of(service: str, app: str) -> list[ServiceInstance]:
            return [i for i in view if i.service.lower() == service and i.app.lower() == app]

        rrs: list[RR] = []
        extra: list[RR] = []
        if len(labels) == 3 and labels[0].startswith("_") and labels[1] in ("_tcp", "_udp"):
            service, proto, app = labels[0][1:], labels[1][1:], labels[2]
            insts = [i for i in of(service, app)
                     if ("udp" if i.protocol == "udp" else "tcp") == proto]
            healthy = [i for i in insts if i.status == "passing"]
            if qtype in (QTYPE.SRV, QTYPE.ANY):
                rrs, extra = self._srv(qname, healthy)
            return bool(insts), rrs, extra
        if len(labels) == 2:
            service, app = labels
            insts = of(service, app)
            healthy = [i for i in insts if i.status == "passing"]
            if qtype in (QTYPE.SRV,):
                rrs, extra = self._srv(qname, healthy)
            elif qtype == QTYPE.TXT:
                rrs = [RR(qname, QTYPE.TXT, ttl=self.ttl, rdata=TXT(self._txt(i)))
                       for i in healthy]
            else:
                rrs = [rr for i in healthy if (rr := self._addr_rr(qname, i, qtype)) is not None]
            return bool(insts), rrs, extra
        if len(labels) == 3:
            node, service, app = labels
            insts = [i for i in of(service, app) if i.node.lower() == node]
            healthy = [i for i in insts if i.status == "passing"]
            rrs = [rr for i in healthy if (rr := self._addr_rr(qname, i, qtype)) is not None]
            return bool(insts), rrs, extra
        return False, [], []

    def _srv(self, qname: DNSLabel, insts: list[ServiceInstance]) -> tuple[list[RR], list[RR]]:
        rrs, extra = [], []
        for i in insts:
            target = self._target(i)
            rrs.append(RR(qname, QTYPE.SRV, ttl=self.ttl,
                          rdata=SRV(priority=0, weight=1, port=i.port, target=target)))
            if (rr := self._addr_rr(target, i, QTYPE.ANY)) is not None:
                extra.append(rr)
        return rrs, extra

    def _txt(self, inst: ServiceInstance) -> list[str]:
        out = [f"node={inst.node}", f"status={inst.status}", f"role={inst.role}",
               f"port={inst.port}", f"protocol={inst.protocol}"]
        if inst.tags:
            out.append("tags=" + ",".join(inst.tags))
        out += [f"{k}={v}" for k, v in sorted(inst.metadata.items())]
        return [s[:255] for s in out]
