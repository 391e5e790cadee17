"""ARP on a raw packet socket: gratuitous announcements and request/reply probes (IPv4).

No external tool is run: frames are built here and sent on an ``AF_PACKET`` socket bound to the
interface (needs ``CAP_NET_RAW``). With ``netns`` the socket is created inside that network
namespace (pyroute2 forks a short-lived helper for it); it then keeps working from this process.

- `garp_frames` builds the two announcements keepalived and ``arping -U/-A`` send: an ARP request
  and an ARP reply whose sender and target IP are both the announced address. Hosts on the
  segment that already have an entry for the address update it to the sender's MAC.
- `ArpSocket.request` sends "who-has TARGET tell SENDER" and collects the MACs that answer.
  With sender 0.0.0.0 it is an RFC 5227 probe: any answer means another host holds the address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import time
from dataclasses import dataclass

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
_ZERO_MAC = b"\x00" * 6
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_MIN_FRAME = 60  # Ethernet minimum without FCS; short frames are zero-padded


def mac_bytes(mac: str) -> bytes:
    """``"aa:bb:cc:dd:ee:ff"`` → 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return raw


def mac_str(raw: bytes) -> str:
    """6 bytes → ``"aa:bb:cc:dd:ee:ff"``."""
    return ":".join(f"{b:02x}" for b in raw)


def arp_frame(op: int, sha: bytes, spa: str, tha: bytes, tpa: str, eth_dst: bytes) -> bytes:
    """One Ethernet frame carrying an IPv4-over-Ethernet ARP packet (``op`` 1 request, 2 reply)."""
    eth = eth_dst + sha + struct.pack("!H", ETH_P_ARP)
    body = _ARP.pack(1, 0x0800, 6, 4, op, sha, ipaddress.IPv4Address(spa).packed, tha,
                     ipaddress.IPv4Address(tpa).packed)
    frame = eth + body
    return frame + b"\x00" * max(0, _MIN_FRAME - len(frame))


def garp_frames(mac: bytes, address: str) -> list[bytes]:
    """The gratuitous ARP request and reply announcing that ``address`` is at ``mac``."""
    return [
        arp_frame(1, mac, address, _ZERO_MAC, address, BROADCAST),
        arp_frame(2, mac, address, mac, address, BROADCAST),
    ]


@dataclass(frozen=True)
class ArpPacket:
    """A parsed ARP packet."""

    op: int
    sha: str
    spa: str
    tha: str
    tpa: str
    eth_src: str

    @property
    def gratuitous(self) -> bool:
        """Sender and target IP are equal (an announcement)."""
        return self.spa == self.tpa


def parse_frame(frame: bytes) -> ArpPacket | None:
    """Parse an Ethernet frame; None unless it is an IPv4 ARP packet."""
    if len(frame) < 14 + _ARP.size or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP.unpack(frame[14:14 + _ARP.size])
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return ArpPacket(op, mac_str(sha), str(ipaddress.IPv4Address(spa)), mac_str(tha),
                     str(ipaddress.IPv4Address(tpa)), mac_str(frame[6:12]))


def open_socket(interface: str, netns: str | None = None) -> socket.socket:
    """A non-blocking raw socket receiving and sending ARP frames on ``interface`` (blocking call:
    with ``netns`` it forks a helper to create the socket inside the namespace)."""
    proto = socket.htons(ETH_P_ARP)
    if netns is None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, proto)
    else:
        from pyroute2.netns import create_socket

        sock = create_socket(netns, socket.AF_PACKET, socket.SOCK_RAW, proto)
    try:
        sock.bind((interface, ETH_P_ARP))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ArpSocket:
    """An ARP socket on one interface (use ``await ArpSocket.open(...)``; ``close()`` after)."""

    def __init__(self, sock: socket.socket, interface: str, mac: bytes) -> None:
        self.sock = sock
        self.interface = interface
        self.mac = mac

    @classmethod
    async def open(cls, interface: str, mac: str, netns: str | None = None) -> ArpSocket:
        """Open the socket (in a thread: creating it inside a namespace blocks)."""
        sock = await asyncio.to_thread(open_socket, interface, netns)
        return cls(sock, interface, mac_bytes(mac))

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    async def _send(self, frame: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def announce(self, address: str) -> None:
        """Send one gratuitous ARP request and reply for ``address``."""
        for frame in garp_frames(self.mac, address):
            await self._send(frame)

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                self.sock.recv(2048)

    async def request(self, target: str, sender: str, timeout: float) -> set[str]:
        """Ask "who-has ``target`` tell ``sender``"; return the MACs (other than ours) that
        answer within ``timeout`` seconds. ``sender="0.0.0.0"`` makes it an RFC 5227 probe."""
        self._drain()
        await self._send(arp_frame(1, self.mac, sender, _ZERO_MAC, target, BROADCAST))
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        own = mac_str(self.mac)
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await asyncio.wait_for(loop.sock_recv(self.sock, 2048), left)
            except TimeoutError:
                break
            pkt = parse_frame(frame)
            if pkt and pkt.op == 2 and pkt.spa == target and pkt.sha != own:
                seen.add(pkt.sha)
        return seen
