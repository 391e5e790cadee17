"""Plugin "vip": a virtual IP that follows the active instance of an app.

Hooks: the `VIP` option class and its claim (which also registers the app health check
``vip-<address>``), its manager (``pycluster_register_vips``: a `VipManager` per `VIP` option,
which the kernel acquires at the stage ``vip-<address>`` (`StageOrder.VIP`: before the backend
starts), releases after the backend stopped and closes when the app stops), the ``vip:``
config section, the audit category
``vip``, metrics, removal of a stale address when the app settles as a standby, and a start-up
check for netlink and raw-socket rights (``CAP_NET_ADMIN``, ``CAP_NET_RAW``).

Metrics (per app and address): ``pycluster_vip_held`` (1 while this node holds it),
``pycluster_vip_healthy`` (the last check while held) and ``pycluster_vip_announcements_total``
(gratuitous ARP rounds sent).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pycluster.kernel.registry import ConfigRegistry, OptionRegistry
from pycluster.kernel.vip import VipRegistry
from pycluster.pluginkit import claim_with_health_check
from pycluster.plugins import hookimpl

from .manager import VipManager
from .options import VIP

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

PLUGIN = "vip"
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13


def _effective_caps() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        return None
    return None


def missing_dependency() -> str | None:
    """Why VIPs cannot be managed here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return f"virtual IPs need Linux netlink (this is {sys.platform})"
    # Found, not imported: the check runs whenever the plugin manager is built (every node
    # start, ``pycluster plugins``); importing pyroute2 there costs a tenth of a second.
    if importlib.util.find_spec("pyroute2") is None:
        return "pyroute2 is not installed"
    caps = _effective_caps()
    if caps is None:
        return "cannot read the process capabilities (/proc/self/status)"
    needed = (("CAP_NET_ADMIN", CAP_NET_ADMIN), ("CAP_NET_RAW", CAP_NET_RAW))
    missing = [name for name, bit in needed if not caps >> bit & 1]
    if missing:
        return (f"no netlink rights: the process lacks {' and '.join(missing)} (needed to add "
                "addresses and send gratuitous ARP; run as root or grant the capabilities)")
    return None


def managers(app: App) -> list[VipManager]:
    """The VIP managers of an app on this node (kept in the app's plugin state once the kernel
    built them, when the app started here)."""
    return list(app.state(PLUGIN).get("managers", []))


def _manager(option: VIP, app: App, platform: Platform) -> VipManager:
    """The factory the kernel calls for each `VIP` option of an app starting here."""
    mgr = VipManager(option, app, platform)
    app.state(PLUGIN).setdefault("managers", []).append(mgr)
    return mgr


@hookimpl
def pycluster_register_vips(registry: VipRegistry) -> None:
    """`VIP` options are held by a `VipManager` (netlink, gratuitous ARP)."""
    registry.add(VIP, _manager, plugin=PLUGIN)


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `VIP` option."""
    registry.add(VIP, plugin=PLUGIN)


def check_name(option: VIP) -> str:
    """The app health check of a `VIP` option: ``vip-<address>`` (``.`` → ``_``)."""
    return "vip-" + option.address.replace(".", "_")


def _health_check(option: VIP) -> Any:
    async def check() -> dict[str, Any]:
        mgr = option._manager()
        if mgr is None or not mgr.held:
            return {"state": "not held here"}
        # The manager checks every check_interval while held; reuse its last answer.
        st = mgr.last_status or await mgr.check()
        if not st.healthy:
            raise RuntimeError(f"VIP {option.address}: {st.detail}")
        return st.as_dict()

    return check


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `VIP` options; the address's check becomes an app health check."""
    return claim_with_health_check(app, option, VIP, lambda a, o: check_name(o), _health_check,
                                   timeout=10.0)


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``vip:`` section of an app."""
    registry.add(PLUGIN, VIP)  # the section is the declaration of VIP


@hookimpl
def pycluster_role_changed(app: App, role: str, epoch: int | None, leader: str | None) -> Any:
    """On settling as a standby, remove addresses a crashed process of this node left behind."""
    if role != "passive":
        return None
    stale = [m for m in managers(app) if m.option.release_stale and not m.held]
    if not stale:
        return None

    async def clean() -> None:
        for m in stale:
            await m.remove_stale()

    return clean()


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``vip`` audit category."""
    registry.add(PLUGIN, {
        "acquired": "the address was added and announced on becoming active (data: address, "
                    "interface, epoch, mac, already_present)",
        "released": "the address was removed on stepping down (data: address, epoch, reason)",
        "announced": "gratuitous ARP was sent again (data: address, reason: heal, conflict, "
                     "refresh, ...)",
        "link_down": "the interface lost its link while the address was held",
        "link_up": "the interface's link came back while the address was held (a heal)",
        "restored": "the address had disappeared while held and was added again",
        "conflict": "another host answered ARP for the held address (data: macs)",
        "stale_removed": "a standby removed the address left by a crashed process",
        "health": "the address's check changed (data: healthy, detail)",
    }, plugin=PLUGIN)


class _Collector:
    """Scrape-time metrics of the platform's VIPs."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        held = GaugeMetricFamily("pycluster_vip_held", "1 while this node holds the address",
                                 labels=["app", "address"])
        healthy = GaugeMetricFamily("pycluster_vip_healthy",
                                    "1 when the held address passed its last check, else 0",
                                    labels=["app", "address"])
        sent = CounterMetricFamily("pycluster_vip_announcements",
                                   "Gratuitous ARP rounds sent", labels=["app", "address"])
        for app in self.platform.apps.values():
            for m in managers(app):
                labels = [app.name, m.address]
                held.add_metric(labels, 1.0 if m.held else 0.0)
                sent.add_metric(labels, m.announcements)
                if m.held and m.last_status is not None:
                    healthy.add_metric(labels, 1.0 if m.last_status.healthy else 0.0)
        yield held
        yield healthy
        yield sent


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """``pycluster_vip_held``, ``pycluster_vip_healthy``, ``pycluster_vip_announcements_total``."""
    registry.register(_Collector(platform))  # type: ignore[arg-type]


@hookimpl
def pycluster_check() -> str | None:
    """Report missing netlink / raw-socket rights or a missing pyroute2."""
    return missing_dependency()
