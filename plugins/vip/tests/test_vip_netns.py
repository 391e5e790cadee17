"""`VipManager` against real network namespaces (driven from this process with ``netns=``).

Host 0 carries the VIP, host 1 plays a second claimant, host 2 is a peer on the segment that
records every ARP packet it sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

import pycluster_vip.plugin as vip_plugin
from pycluster import App, Platform
from pycluster.builtin.audit.log import AuditReader
from pycluster.builtin.process import Process
from pycluster.plugins import create_plugin_manager
from pycluster.testing.engines.netns import NetNamespaces, netns_available
from pycluster.testing.pytest_plugin import require
from pycluster.testing.wait import wait_for
from pycluster_vip import VIP, VipError, VipManager
from pycluster_vip.testing import read_sniffed

pytestmark = pytest.mark.timeout(120)


class Segment:
    """Three hosts on a bridge, with an ARP sniffer on the last one."""

    def __init__(self, net: NetNamespaces, sniff_file: Path) -> None:
        self.net = net
        self.holder, self.other, self.peer = net.hosts
        self.vip = net.address(200)
        self.sniff_file = sniff_file

    def addresses(self, ns: str) -> str:
        return self.net.run(ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout

    def present(self, ns: str) -> bool:
        return f" {self.vip}/" in self.addresses(ns)

    def garps(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Gratuitous ARP for the VIP seen by the peer since ``since``."""
        return [p for p in read_sniffed(self.sniff_file)
                if p["gratuitous"] and p["spa"] == self.vip and p["t"] >= since]

    def vip_option(self, **kw: Any) -> VIP:
        kw.setdefault("arp_interval", 0.1)
        kw.setdefault("check_interval", 0.3)
        kw.setdefault("probe_timeout", 0.3)
        return VIP(f"{self.vip}/24", "eth0", netns=self.holder, **kw)


@pytest.fixture
def seg(tmp_path: Path) -> Iterator[Segment]:
    ok, reason = netns_available()
    require("network namespaces", ok, reason)
    with NetNamespaces(3, subnet=61) as net:
        sniff_file = tmp_path / "arp.jsonl"
        sniffer = net.popen(net.hosts[2], [sys.executable, "-m", "pycluster_vip.testing",
                                           "sniff", "eth0", str(sniff_file)],
                            stdout=subprocess.PIPE, text=True)
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "READY"
        yield Segment(net, sniff_file)


async def test_acquire_announce_check_release(seg: Segment) -> None:
    v = seg.vip_option(peer=seg.net.ip(seg.peer))
    mgr = VipManager(v)
    started = time.time()
    try:
        await mgr.acquire()
        assert seg.present(seg.holder) and mgr.held
        mac = seg.net.mac(seg.holder)
        # The peer sees the announcements (request and reply), from the holder's MAC.
        await wait_for(lambda: len(seg.garps(started)) >= 2 * v.arp_count, 10,
                       message="all gratuitous ARP rounds seen by the peer")
        assert {(p["op"], p["sha"]) for p in seg.garps(started)} == {(1, mac), (2, mac)}
        st = await mgr.check()
        assert st.healthy and st.present and st.link_up and st.peer_answers, st
        assert st.conflict == []
        assert (await mgr.health()).healthy
    finally:
        await mgr.release()
        await mgr.close()
    assert not seg.present(seg.holder) and not mgr.held
    audited = [e["action"] for e in mgr.events if e["action"] in ("acquired", "released")]
    assert audited == ["acquired", "released"]


async def test_conflict_is_detected_and_answered(seg: Segment) -> None:
    v = seg.vip_option()
    mgr = VipManager(v)
    try:
        await mgr.acquire()
        seg.net.add_address(seg.other, seg.vip)  # a second host claims the address
        st = await mgr.check()
        assert st.conflict == [seg.net.mac(seg.other)] and not st.healthy
        assert "also answered by" in st.detail
        mark = time.time()
        await wait_for(lambda: any(e["action"] == "conflict" for e in mgr.events), 10,
                       message="conflict audited by the periodic check")
        await wait_for(lambda: seg.garps(mark), 10, message="re-announced after the conflict")
        seg.net.del_address(seg.other, seg.vip)
    finally:
        await mgr.release()
        await mgr.close()


async def test_removed_address_is_restored(seg: Segment) -> None:
    v = seg.vip_option()
    mgr = VipManager(v)
    try:
        await mgr.acquire()
        seg.net.del_address(seg.holder, seg.vip)
        await wait_for(lambda: seg.present(seg.holder), 10, message="address restored")
        # The kernel shows the address before the manager's add call returns and records it.
        await wait_for(lambda: any(e["action"] == "restored" for e in mgr.events), 10,
                       message="restore recorded")
    finally:
        await mgr.release()
        await mgr.close()
    assert not seg.present(seg.holder)


async def test_reannounced_after_link_heal(seg: Segment) -> None:
    v = seg.vip_option()
    mgr = VipManager(v)
    try:
        await mgr.acquire()
        await wait_for(lambda: len(seg.garps()) >= 2 * v.arp_count, 10, message="initial GARP")
        seg.net.link_down(seg.holder)
        await wait_for(lambda: any(e["action"] == "link_down" for e in mgr.events), 10,
                       message="link down seen")
        healed = time.time()
        seg.net.link_up(seg.holder)
        await wait_for(lambda: seg.garps(healed), 10, message="GARP after the heal")
        actions = [(e["action"], e.get("reason")) for e in mgr.events]
        assert ("link_up", None) in actions and ("announced", "link up (heal)") in actions
        assert seg.present(seg.holder)
    finally:
        await mgr.release()
        await mgr.close()


async def test_stale_address_is_removed_and_errors_are_clear(seg: Segment) -> None:
    seg.net.add_address(seg.holder, seg.vip)  # left behind by a crashed process
    mgr = VipManager(seg.vip_option())
    try:
        st = await mgr.check()
        assert st.healthy and "present" in st.detail  # not held: only informative
        assert await mgr.remove_stale()
        assert not seg.present(seg.holder)
        assert not await mgr.remove_stale()
    finally:
        await mgr.close()
    bad = VipManager(VIP(f"{seg.vip}/24", "eth9", netns=seg.holder))
    try:
        with pytest.raises(VipError, match=r"eth9.*no such interface"):
            await bad.acquire()
    finally:
        await bad.close()


ORDER_SCRIPT = """#!/bin/sh
# Records whether the VIP is on the holder's interface when the backend starts and stops.
ns=$1; vip=$2; log=$3
state() { if ip -n "$ns" -o addr show dev eth0 | grep -q " $vip/"; then echo present;
          else echo absent; fi; }
echo "start $(state)" >> "$log"
trap 'trap "" TERM; echo "stop $(state)" >> "$log"; exit 0' TERM
while :; do sleep 0.1; done
"""


async def test_sequence_order_and_audit_trail(
    seg: Segment, tmp_path: Path, nats_url: str, unique_name: str
) -> None:
    """VIP acquired before the backend starts, released after it stopped; both audited."""
    script, log = tmp_path / "order.sh", tmp_path / "order.log"
    script.write_text(ORDER_SCRIPT)
    v = seg.vip_option()
    app = App("db", v, Process(("sh", str(script), seg.holder, seg.vip, str(log)), grace=5))
    pm = create_plugin_manager(load_entrypoints=False, extra=[("vip", vip_plugin)])
    p = Platform(unique_name, node_id="n1", nats_url=nats_url, plugin_manager=pm,
                 lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=10.0)
    p.register(app)
    await p.start()
    try:
        assert await app.wait_for_leadership(60)
        await wait_for(lambda: log.exists() and log.read_text(), 20, message="backend started")
        assert seg.present(seg.holder) and v.held
        await wait_for(lambda: p.health.status().get("db.vip-10_213_61_200", {})
                       .get("status") == "healthy", 30, message="app health check healthy")
    finally:
        await p.stop()
    assert log.read_text().split("\n")[:2] == ["start present", "stop present"]
    assert not seg.present(seg.holder)
    nc = await nats.connect(nats_url)
    try:
        entries = await AuditReader(nc.jetstream(), unique_name).query(category="vip")
    finally:
        await nc.close()
    actions = [e.action for e in entries if e.app == "db"]
    assert actions[0] == "acquired" and "released" in actions, actions
    assert entries[0].data["address"] == seg.vip and entries[0].node == "n1"


@pytest.mark.slow
async def test_pycluster_status_shows_who_holds_the_vip(
    seg: Segment, nats_url: str, unique_name: str
) -> None:
    """`pycluster status` asks the node (over NATS) which VIP it holds."""
    v = seg.vip_option()
    app = App("db", v)
    pm = create_plugin_manager(load_entrypoints=False, extra=[("vip", vip_plugin)])
    p = Platform(unique_name, node_id="n1", nats_url=nats_url, plugin_manager=pm,
                 lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=10.0)
    p.register(app)
    await p.start()
    try:
        assert await app.wait_for_leadership(60)
        await wait_for(lambda: v.held, 20, message="VIP held")
        env = {k: val for k, val in os.environ.items() if not k.startswith("PYCLUSTER_")}
        cli = [sys.executable, "-m", "pycluster.cli", "status", "-p", unique_name,
               "--nats-url", nats_url]
        out = await asyncio.to_thread(subprocess.run, [*cli, "-o", "json"], capture_output=True,
                                      text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        (db,) = json.loads(out.stdout)["apps"]
        (held,) = db["vips"]["n1"]
        assert held["held"] is True and held["plugin"] == "vip"
        assert held["address"].split("/")[0] == seg.vip
        text = await asyncio.to_thread(subprocess.run, cli, capture_output=True, text=True,
                                       timeout=60, env=env)
        assert "@n1" in text.stdout and seg.vip in text.stdout, text.stdout
    finally:
        await p.stop()
