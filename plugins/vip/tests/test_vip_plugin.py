"""The VIP plugin without touching a network: options, ARP frames, hooks, start-up check."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import pycluster_vip.plugin as vip_plugin
from pycluster import App, Platform
from pycluster.cli.config_apps import build_app
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.registry import ConfigRegistry
from pycluster.kernel.settings import AppConfig
from pycluster.kernel.stages import StageOrder, StageRegistry
from pycluster.kernel.vip import build_vips, vip_stages
from pycluster.plugins import create_plugin_manager
from pycluster.testing.pytest_plugin import require
from pycluster_vip import VIP
from pycluster_vip.arp import garp_frames, mac_bytes, parse_frame
from pycluster_vip.manager import VipManager

pytestmark = pytest.mark.timeout(60)


def test_vip_validation() -> None:
    v = VIP("10.0.1.100/24", "eth0")
    assert (v.address, v.prefixlen) == ("10.0.1.100", 24)
    assert VIP("10.0.1.100", "eth0").prefixlen == 32
    for kwargs, field in (
        ({"cidr": "10.0.1.300/24"}, "cidr"), ({"cidr": "fd00::1/64"}, "IPv4"),
        ({"cidr": "127.0.0.5/8"}, "loopback"),
        ({"interface": "a-very-long-interface"}, "interface"),
        ({"interface": "eth0 x"}, "interface"), ({"label": "wlan0:vip"}, "label"),
        ({"peer": "gateway"}, "peer"), ({"probe": "icmp"}, "probe"),
        ({"arp_count": -1}, "arp_count"), ({"check_interval": 0}, "check_interval"),
        ({"netns": "../etc"}, "netns"),
    ):
        args = {"cidr": "10.0.1.100/24", "interface": "eth0", **kwargs}
        with pytest.raises(ConfigError, match=field):
            VIP(**args)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not attached"):
        _ = v.events


def test_gratuitous_arp_frames_round_trip() -> None:
    mac = "02:00:00:aa:bb:cc"
    req, rep = garp_frames(mac_bytes(mac), "10.0.1.100")
    assert len(req) == 60 and req[:6] == b"\xff" * 6
    a, b = parse_frame(req), parse_frame(rep)
    assert a is not None and b is not None
    assert (a.op, a.sha, a.spa, a.tpa, a.gratuitous) == (1, mac, "10.0.1.100", "10.0.1.100", True)
    assert (b.op, b.sha, b.eth_src) == (2, mac, mac)
    assert parse_frame(b"\x00" * 60) is None


def test_config_section_builds_the_option() -> None:
    reg = ConfigRegistry()
    vip_plugin.pycluster_config_sections(registry=reg)
    cfg = AppConfig.model_validate({"name": "db", "vip": {
        "cidr": "10.0.1.100/24", "interface": "eth0", "peer": "10.0.1.1", "arp_count": 5}})
    app = build_app(cfg, reg)
    v = next(o for o in app.options if isinstance(o, VIP))
    assert (v.address, v.peer, v.arp_count) == ("10.0.1.100", "10.0.1.1", 5)
    bad = AppConfig.model_validate({"name": "db", "vip": {"cidr": "10.0.1.100/24"}})
    with pytest.raises(ConfigError, match=r"apps\.db\.vip\.interface"):
        build_app(bad, reg)


def test_option_is_claimed_and_joins_the_vip_stage() -> None:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("vip", vip_plugin)])
    p = Platform("unit", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    v = VIP("10.0.1.100/24", "eth0")
    app = p.register(App("db", v))
    assert "vip-10_0_1_100" in app.health.specs
    # The kernel matches the option in the VIP registry and builds the stage.
    reg = StageRegistry()
    vips = build_vips(app, p)
    vip_stages(vips, reg)
    (stage,) = reg.ordered()
    assert stage.order == StageOrder.VIP < StageOrder.BACKEND and stage.plugin == "vip"
    assert stage.name == "vip-10.0.1.100" and stage.timeout == 10.0 + v.probe_timeout
    (av,) = vips
    assert isinstance(av.manager, VipManager) and av.manager.option is v
    # The option's handle finds the manager through the app's plugin state.
    assert v._manager() is av.manager and vip_plugin.managers(app) == [av.manager]
    assert not v.held and not hasattr(v, "_runtime")


@pytest.mark.slow
def test_missing_netlink_rights_are_reported_at_start_up(nats_url: str,
                                                          unique_name: str) -> None:
    require("setpriv (util-linux)", shutil.which("setpriv") is not None, "setpriv not installed")
    # A node process without CAP_NET_ADMIN / CAP_NET_RAW (root, but capabilities dropped).
    code = (
        "import asyncio, logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.WARNING)\n"
        "from pycluster import App, OnNodes, Platform\n"
        "from pycluster_vip import VIP\n"
        "async def main():\n"
        f"    p = Platform({unique_name!r}, node_id='n1', nats_url={nats_url!r})\n"
        "    i = p.pm.infos['vip']\n"
        "    print('INFO', i.status, i.distribution, i.version)\n"
        "    await p.start()\n"  # no app uses vip: no warning
        "    await p.stop()\n"
        "    print('WITH AN APP')\n"
        f"    p = Platform({unique_name!r}, node_id='n1', nats_url={nats_url!r})\n"
        "    p.register(App('db', VIP('10.0.1.100/24', 'eth0'), OnNodes('elsewhere')))\n"
        "    await p.start()\n"
        "    await p.stop()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin,-net_raw", "--inh-caps=-net_admin,-net_raw",
         sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    assert "INFO unusable pycluster-vip 0.1.0" in out
    before, after = out.split("WITH AN APP")
    assert "unusable here" not in before
    assert "plugin vip (pycluster-vip 0.1.0), used by app(s) db, is unusable here: no netlink " \
        "rights: the process lacks CAP_NET_ADMIN and CAP_NET_RAW" in after
