"""Maintenance mode and cordons end to end: node processes on a real nats-server, the CLI as a
process, SIGKILL of the leader."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]
LEASE = 1.0


async def cli(*args: str) -> str:
    out = await asyncio.to_thread(subprocess.run, [*PYCLUSTER, *args], capture_output=True,
                                  text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def saw(c: NodeCluster, node: str, text: str) -> bool:
    return text in c.log_tail(node, 400)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_maintenance_sigkill_leaves_no_leader_until_off(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=LEASE, heartbeat=0.25)
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        leader = await c.wait_for_leader(20)
        epoch = c.role(leader)[1] or 0
        out = await cli("maintenance", "on", *common)
        assert json.loads(out)["maintenance"] is True
        for node in c.nodes:  # every node read the new state (its log says so)
            await wait_for(lambda n=node: saw(c, n, "'maintenance': True"), 20)
        c.kill(leader)
        # Three leases and more: a standby would have taken over long before.
        until = time.monotonic() + 4 * LEASE
        while time.monotonic() < until:
            assert c.active_nodes() == [], "a standby took over in maintenance mode"
            await asyncio.sleep(0.05)
        st = json.loads(await cli("status", *common))
        # The lease expired and nobody took it; status says why.
        assert st["apps"][0]["leader"] is None and st["apps"][0]["maintenance"] is True
        text = await cli("status", *common[:-2])
        assert "maintenance mode withholds failover" in text
        await cli("maintenance", "off", *common)
        new = await c.wait_for_leader(20, exclude=[leader], min_epoch=epoch + 1)
        assert new != leader
        await asyncio.sleep(4 * 0.25)
        assert c.leader_count() == 1
        await c.stop()
        assert c.overlaps() == [], f"two nodes active at once: {c.overlaps()}"
    finally:
        c.stop_sync()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_cordoned_node_is_skipped_at_failover(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    # n2 has the highest priority: the first choice at a failover, unless cordoned.
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=LEASE, heartbeat=0.25,
                    node_args={"n2": ["--priority", "10"]})
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start_node("n1")
        await c.wait_for_leader(20)
        await c.start_node("n2")
        await c.start_node("n3")
        await cli("node", "cordon", "n2", *common)
        for node in c.nodes:
            await wait_for(lambda n=node: saw(c, n, "'cordoned': {'n2'"), 20)
        nodes = json.loads(await cli("node", "list", *common))["nodes"]
        assert {n["node_id"]: n["cordoned"] for n in nodes} == {"n1": False, "n2": True,
                                                                "n3": False}
        epoch = c.role("n1")[1] or 0
        c.kill("n1")
        new = await c.wait_for_leader(20, exclude=["n1"], min_epoch=epoch + 1)
        assert new == "n3"
        await c.stop()
        assert c.overlaps() == []
    finally:
        c.stop_sync()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_drain_keeps_the_budget_with_node_processes(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=4, mode="replicas:2",
                    lease_ttl=LEASE, heartbeat=0.25, extra_args=["--budget-min", "1"])
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        await wait_for(lambda: len(c.active_nodes()) == 2, 20)
        target = c.active_nodes()[0]
        # The witness: the nodes' own event files, read from outside every 20 ms.
        samples: list[int] = []
        done = asyncio.Event()

        async def witness() -> None:
            while not done.is_set():
                samples.append(len(c.active_nodes()))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(witness())
        try:
            out = await cli("node", "drain", target, "--timeout", "60", *common)
        finally:
            done.set()
            await task
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        result = lines[-1]
        assert result["drained"] is True and [m["app"] for m in result["moved"]] == ["svc"]
        assert target not in c.active_nodes()
        await wait_for(lambda: len(c.active_nodes()) == 2, 20)
        assert samples and min(samples) >= 1, f"the budget broke: {min(samples)} active"
        nodes = json.loads(await cli("node", "list", *common))["nodes"]
        assert {n["node_id"] for n in nodes if n["cordoned"]} == {target}
    finally:
        c.stop_sync()
