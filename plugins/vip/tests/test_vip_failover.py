"""VIP failover between real node processes, each running inside its own network namespace.

Hosts: h0 runs nats-server (the nodes reach it over the bridge), h1 and h2 run nodes n1 and n2
(``ip netns exec hX python -m pycluster.testing.node`` with a `VIP` from
``pycluster_vip.testing:setup`` and a Process backend recording whether the VIP is present when
it starts and stops), h3 is a peer that records every ARP packet and keeps a neighbour entry
for the VIP.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pycluster.kernel.embedded import find_nats_server
from pycluster.testing.engines.netns import NetNamespaces, netns_available
from pycluster.testing.nodes import NodeCluster, NodeProc
from pycluster.testing.pytest_plugin import require
from pycluster.testing.wait import wait_for
from pycluster_vip.testing import read_sniffed

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BACKEND = """#!/bin/sh
# The node's backend: notes whether the VIP is on eth0 when it starts and when it is stopped.
vip=$1; log=$2/order-$PYCLUSTER_NODE.log
state() { if ip -o addr show dev eth0 | grep -q " $vip/"; then echo present;
          else echo absent; fi; }
echo "start $(state)" >> "$log"
trap 'trap "" TERM; echo "stop $(state)" >> "$log"; exit 0' TERM
while :; do sleep 0.1; done
"""


class NamespacedNodes(NodeCluster):
    """`NodeCluster` whose node processes run inside network namespaces."""

    def __init__(self, *args: Any, hosts: dict[str, str], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hosts = hosts

    def _spawn(self, node: NodeProc) -> None:
        node.log_path = self.workdir / f"{node.node_id}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with node.log_path.open("ab") as log:
            node.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.hosts[node.node_id], sys.executable, "-m",
                 "pycluster.testing.node", *node.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        node.paused = False


class World:
    """The namespaces, nats-server, the ARP sniffer and the node cluster."""

    def __init__(self, net: NetNamespaces, tmp: Path, nodes: NamespacedNodes) -> None:
        self.net = net
        self.tmp = tmp
        self.nodes = nodes
        self.nats_host, self.h1, self.h2, self.peer = net.hosts
        self.vip = net.address(200)

    def present(self, ns: str) -> bool:
        out = self.net.run(ns, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        return f" {self.vip}/" in out

    def garps_from(self, mac: str, since: float) -> list[dict[str, Any]]:
        return [p for p in read_sniffed(self.tmp / "arp.jsonl")
                if p["gratuitous"] and p["spa"] == self.vip and p["sha"] == mac
                and p["t"] >= since]

    def peer_neighbour(self) -> str:
        return self.net.run(self.peer, "ip", "neigh", "show", self.vip).stdout

    def order(self, node: str) -> list[str]:
        path = self.tmp / f"order-{node}.log"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def world(tmp_path: Path, unique_name: str) -> Iterator[World]:
    ok, reason = netns_available()
    require("network namespaces", ok, reason)
    with NetNamespaces(4, subnet=62) as net:
        h0, h1, h2, h3 = net.hosts
        nats_log = tmp_path / "nats.log"
        with nats_log.open("ab") as log:
            net.popen(h0, [find_nats_server(), "-js", "-a", net.ip(h0), "-p", "4222",
                           "-sd", str(tmp_path / "nats")], stdout=log, stderr=subprocess.STDOUT)
        sniffer = net.popen(h3, [sys.executable, "-m", "pycluster_vip.testing", "sniff", "eth0",
                                 str(tmp_path / "arp.jsonl")], stdout=subprocess.PIPE, text=True)
        assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "READY"
        script = tmp_path / "backend.sh"
        script.write_text(BACKEND)
        vip = net.address(200)
        nodes = NamespacedNodes(
            unique_name, [f"nats://{net.ip(h0)}:4222"], tmp_path, size=2, lease_ttl=3.0,
            heartbeat=0.5, hosts={"n1": h1, "n2": h2},
            extra_args=["--setup", "pycluster_vip.testing:setup", "--setup-arg", f"vip={vip}/24",
                        "--setup-arg", f"peer={net.ip(h3)}", "--setup-arg", "check_interval=0.5",
                        "--backend-cmd", shlex.join(["sh", str(script), vip, str(tmp_path)])],
        )
        try:
            wait_ready = time.monotonic() + 30
            while b"Server is ready" not in nats_log.read_bytes():
                assert time.monotonic() < wait_ready, nats_log.read_text()
                time.sleep(0.05)
            yield World(net, tmp_path, nodes)
        finally:
            nodes.stop_sync()


async def test_vip_moves_to_the_new_leader_and_the_peer_follows(world: World) -> None:
    w, net, nodes = world, world.net, world.nodes
    mac1, mac2 = net.mac(w.h1), net.mac(w.h2)

    # n1 leads: the VIP is on h1, and was there before its backend started.
    await nodes.start_node("n1", timeout=60)
    assert await nodes.wait_for_leader(60) == "n1"
    await wait_for(lambda: w.order("n1") == ["start present"], 30, message="n1 backend up")
    assert w.present(w.h1)
    await nodes.start_node("n2", timeout=60)
    assert not w.present(w.h2)
    net.run(w.peer, "ping", "-c", "1", "-W", "5", w.vip)  # the peer learns VIP → h1
    assert mac1 in w.peer_neighbour()

    # Graceful failover: n1 stops its backend, then releases the VIP; n2 takes both.
    mark = time.time()
    await nodes.terminate("n1")
    assert await nodes.wait_for_leader(60, exclude=["n1"]) == "n2"
    await wait_for(lambda: w.order("n2") == ["start present"], 30, message="n2 backend up")
    assert w.order("n1") == ["start present", "stop present"]
    assert w.present(w.h2) and not w.present(w.h1)
    await wait_for(lambda: w.garps_from(mac2, mark), 30, message="peer saw n2's GARP")
    # The peer's cache moved to h2 by the announcement alone (it sent nothing meanwhile).
    await wait_for(lambda: mac2 in w.peer_neighbour(), 30, message="peer neighbour → h2")

    # Crash failover: n2 is SIGKILLed (its address stays behind); n1 takes over and announces.
    await nodes.start_node("n1", timeout=60)
    epoch = nodes.role("n2")[1] or 0
    mark = time.time()
    nodes.kill("n2")
    assert await nodes.wait_for_leader(60, exclude=["n2"], min_epoch=epoch + 1) == "n1"
    assert w.present(w.h1)
    await wait_for(lambda: w.garps_from(mac1, mark), 30, message="peer saw n1's GARP")
    await wait_for(lambda: mac1 in w.peer_neighbour(), 30, message="peer neighbour → h1")
    # n2 comes back as a standby and removes the address its crashed process left behind.
    await nodes.start_node("n2", timeout=60)
    await wait_for(lambda: not w.present(w.h2), 30, message="stale VIP removed from h2")

    # A heal: h1's cable is pulled and put back; n1 re-announces the VIP.
    mark = time.time()
    net.link_down(w.h1)
    await wait_for(lambda: "state UP" not in net.run(w.h1, "ip", "link", "show", "eth0").stdout,
                   10, message="h1 link down")
    net.link_up(w.h1)
    await wait_for(lambda: w.garps_from(mac1, mark), 30, message="re-announced after the heal")
    assert nodes.active_nodes() == ["n1"] and w.present(w.h1)

    await nodes.stop()
    assert not w.present(w.h1) and not w.present(w.h2)
    assert not nodes.overlaps()
