"""The `VIP` App option; its fields are also the config-file section ``vip:``."""

from __future__ import annotations

import ipaddress
import re
from typing import TYPE_CHECKING, Any, Literal

from pycluster.kernel.declare import option
from pycluster.kernel.errors import ConfigError

if TYPE_CHECKING:
    from .manager import VipManager, VipStatus

_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


@option(eq=False, frozen=False)
class VIP:
    """A virtual IPv4 address that follows the active instance of an app.

    Acquired in the VIP stage of the failover sequence (before the backend starts): the address
    is added to ``interface`` over netlink and announced with gratuitous ARP. Released when the
    node steps down (after the backend stopped). While held it is watched: re-added if someone
    removes it, re-announced when the link comes back up (a healed cable or partition).

    The option object is also the handle to the feature on this node: ``await vip.check()``,
    ``await vip.announce()``, ``vip.held``, ``vip.events`` (the audit records). Give each App
    its own `VIP` object.

    Example::

        App("convex", Singleton(), VIP("10.0.1.100/24", "eth0", peer="10.0.1.1"))

    :param cidr: the address with its prefix length (``"10.0.1.100/24"``; no prefix = /32).
    :param interface: the network interface that carries it.
    :param netns: a named network namespace (``ip netns``) holding ``interface``; None = this
        process's namespace.
    :param label: an address label (``"eth0:vip"``), shown by ``ip addr``.
    :param arp_count: gratuitous ARP rounds sent on each announcement (0 = none).
    :param arp_interval: seconds between those rounds.
    :param probe: ``"arp"`` probes for another host answering for the address (RFC 5227) and,
        with ``peer``, that the peer answers ARP from the address; ``"none"`` only checks that
        the address is present and the link up.
    :param peer: a neighbour (e.g. the gateway) that must answer an ARP request sent from the
        VIP, proving the address works on the segment.
    :param check_interval: seconds between checks while the address is held.
    :param refresh_interval: re-announce every so many seconds while held (None = only on
        acquire and after a link heal).
    :param probe_timeout: seconds to wait for ARP answers in a check.
    :param release_stale: when the app settles as a standby here and the address is still on
        the interface (left behind by a crashed process of this node), remove it.
    """

    cidr: str
    interface: str
    netns: str | None = None
    label: str | None = None
    arp_count: int = 3
    arp_interval: float = 0.5
    probe: Literal["arp", "none"] = "arp"
    peer: str | None = None
    check_interval: float = 2.0
    refresh_interval: float | None = None
    probe_timeout: float = 0.5
    release_stale: bool = True
    def __post_init__(self) -> None:
        try:
            iface = ipaddress.ip_interface(self.cidr)
        except ValueError:
            raise ConfigError("VIP.cidr", self.cidr,
                              "not an IP address with optional /prefix") from None
        if iface.version != 4:
            raise ConfigError("VIP.cidr", self.cidr, "only IPv4 virtual IPs are supported")
        if iface.ip.is_loopback or iface.ip.is_multicast or iface.ip.is_unspecified:
            raise ConfigError("VIP.cidr", self.cidr, "must be a unicast, non-loopback address")
        if not isinstance(self.interface, str) or not _IFNAME.match(self.interface):
            raise ConfigError("VIP.interface", self.interface,
                              "must be an interface name of 1-15 characters")
        if self.netns is not None and not _NETNS.match(self.netns):
            raise ConfigError("VIP.netns", self.netns, "not a network namespace name")
        if self.label is not None and not (
            _IFNAME.match(self.label) and self.label.startswith(self.interface)
        ):
            raise ConfigError("VIP.label", self.label,
                              "must start with the interface name and have at most 15 characters")
        if self.probe not in ("arp", "none"):
            raise ConfigError("VIP.probe", self.probe, "must be 'arp' or 'none'")
        if self.peer is not None:
            try:
                ipaddress.IPv4Address(self.peer)
            except ValueError:
                raise ConfigError("VIP.peer", self.peer, "not an IPv4 address") from None
        if self.arp_count < 0 or self.arp_count > 100:
            raise ConfigError("VIP.arp_count", self.arp_count, "must be between 0 and 100")
        for name in ("arp_interval", "check_interval", "probe_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"VIP.{name}", getattr(self, name), "must be > 0")
        if self.refresh_interval is not None and self.refresh_interval <= 0:
            raise ConfigError("VIP.refresh_interval", self.refresh_interval, "must be > 0")

    @property
    def address(self) -> str:
        """The address without prefix (``"10.0.1.100"``)."""
        return str(ipaddress.ip_interface(self.cidr).ip)

    @property
    def prefixlen(self) -> int:
        """The prefix length (``24``)."""
        return ipaddress.ip_interface(self.cidr).network.prefixlen

    # -- the handle ---------------------------------------------------------------------------

    def _manager(self) -> VipManager | None:
        """The manager of this option on this node: the option's app (the kernel's `app_of`),
        then the app's plugin state, where the plugin keeps the managers the kernel built."""
        from pycluster.kernel.app import app_of

        app = app_of(self)
        if app is None:
            return None
        managers: list[VipManager] = app.state("vip").get("managers", [])
        return next((m for m in managers if m.option is self), None)

    def _mgr(self) -> VipManager:
        mgr = self._manager()
        if mgr is None:
            raise RuntimeError("this VIP is not attached to a started app")
        return mgr

    @property
    def held(self) -> bool:
        """Whether this node holds the address now."""
        mgr = self._manager()
        return mgr is not None and mgr.held

    @property
    def events(self) -> list[dict[str, Any]]:
        """Audit records of this VIP on this node (newest last)."""
        return list(self._mgr().events)

    async def check(self) -> VipStatus:
        """Check the address on this node (see `VipManager.check`)."""
        return await self._mgr().check()

    async def announce(self, reason: str = "requested") -> None:
        """Send gratuitous ARP for the address now (only while held)."""
        await self._mgr().announce(reason)
