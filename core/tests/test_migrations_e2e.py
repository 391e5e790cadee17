"""Automatic rebalancing, migration cooldowns and Spread drains end to end: node processes on a
real nats-server, the CLI as a process, the nodes' own event files as the outside witness."""

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


async def cli(*args: str, ok: bool = True) -> tuple[int, str, str]:
    out = await asyncio.to_thread(subprocess.run, [*PYCLUSTER, *args], capture_output=True,
                                  text=True, timeout=90)
    if ok:
        assert out.returncode == 0, out.stderr
    return out.returncode, out.stdout, out.stderr


def saw(c: NodeCluster, node: str, text: str) -> bool:
    return text in c.log_tail(node, 400)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_auto_rebalance_moves_once_never_in_maintenance(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    """A label makes another node clearly better: nothing moves in maintenance mode; once it
    is off, exactly one automatic migration (one graceful hand-over, never two leaders), and
    no move back."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=LEASE, heartbeat=0.25,
                    extra_args=["--prefer-label", "disk=ssd:20", "--auto-rebalance",
                                "--migration-cooldown", "0"])
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        leader = await c.wait_for_leader(20)
        target = next(n for n in c.nodes if n != leader)
        await cli("maintenance", "on", "svc", *common)
        for node in c.nodes:
            await wait_for(lambda n=node: saw(c, n, "'maintenance_apps': ['svc']"), 20)
        await cli("node", "label", target, "disk=ssd", *common)
        until = time.monotonic() + 6 * 0.25 + 3 * LEASE
        while time.monotonic() < until:  # settling time and more: nothing may move
            assert c.active_nodes() == [leader], "moved during maintenance mode"
            await asyncio.sleep(0.05)
        await cli("maintenance", "off", "svc", *common)
        await c.wait_for_leader(20, exclude=[leader])
        await asyncio.sleep(3 * LEASE)  # no second move, no move back
        assert c.active_nodes() == [target]
        iv = sorted(c.intervals(), key=lambda i: i[1])
        assert [i[0] for i in iv] == [leader, target], iv
        assert c.overlaps() == []
        assert saw(c, leader, f"migrating from {leader} to {target} (auto)")
        assert not any(saw(c, n, "(auto)") for n in c.nodes if n != leader)
    finally:
        c.stop_sync()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_cooldown_holds_across_nodes(nats_url: str, unique_name: str,
                                           tmp_path: Path) -> None:
    """The cooldown is the app's, not a node's: the new leader refuses the next move (the
    reply says why), `--force` skips it; the event files show exactly two hand-overs."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=LEASE, heartbeat=0.25,
                    extra_args=["--migration-cooldown", "60"])
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        first = await c.wait_for_leader(20)
        second, third = (n for n in c.nodes if n != first)
        await wait_for(lambda: all(c.role(n)[0] in ("active", "passive") for n in c.nodes), 20)
        _, out, _ = await cli("app", "move", "svc", "--to", second, *common)
        assert json.loads(out)["outcome"] == "completed"
        rc, _, err = await cli("app", "move", "svc", "--to", third, *common, ok=False)
        assert rc != 0 and "cooldown 60s" in err and f"refused by {second}" in err
        assert c.active_nodes() == [second]
        _, out, _ = await cli("app", "move", "svc", "--to", third, "--force", *common)
        assert json.loads(out)["outcome"] == "completed"
        iv = sorted(c.intervals(), key=lambda i: i[1])
        assert [i[0] for i in iv] == [first, second, third] and c.overlaps() == []
    finally:
        c.stop_sync()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_drain_of_a_spread_app_keeps_the_budget(nats_url: str, unique_name: str,
                                                      tmp_path: Path) -> None:
    """Spread on 3 nodes, `min_available=2`: draining one node stops its instance; draining a
    second waits for the budget, says why and times out; the witness (the nodes' event files,
    every 20 ms) never sees fewer than 2 active."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, mode="spread", lease_ttl=LEASE,
                    heartbeat=0.25, extra_args=["--budget-min", "2",
                                                "--migration-cooldown", "0"])
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        await wait_for(lambda: len(c.active_nodes()) == 3, 20)
        samples: list[int] = []
        done = asyncio.Event()

        async def witness() -> None:
            while not done.is_set():
                samples.append(len(c.active_nodes()))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(witness())
        try:
            _, out, _ = await cli("node", "drain", "n1", "--timeout", "30", *common)
            result = json.loads(out.splitlines()[-1])
            assert result["drained"] is True and [m["app"] for m in result["moved"]] == ["svc"]
            await wait_for(lambda: "n1" not in c.active_nodes(), 10)
            rc, out, _ = await cli("node", "drain", "n2", "--timeout", "3", *common, ok=False)
        finally:
            done.set()
            await task
        lines = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert rc == 1 and lines[-1]["drained"] is False and lines[-1]["remaining"] == ["svc"]
        assert any("budget needs 2" in str(e.get("waiting")) for e in lines[:-1])
        assert sorted(c.active_nodes()) == ["n2", "n3"]
        assert samples and min(samples) >= 2, f"the budget broke: {min(samples)} active"
    finally:
        c.stop_sync()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_operator_places_a_leaderless_app_in_maintenance_mode(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    """Maintenance mode, the leader SIGKILLed: nobody takes over until the operator moves the
    app to a named node, which alone campaigns; then a move of the led app hands over."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=LEASE, heartbeat=0.25,
                    extra_args=["--migration-cooldown", "0"])
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    try:
        await c.start()
        leader = await c.wait_for_leader(20)
        await cli("maintenance", "on", *common)
        for node in c.nodes:
            await wait_for(lambda n=node: saw(c, n, "'maintenance': True"), 20)
        c.kill(leader)
        await asyncio.sleep(3 * LEASE)
        assert c.active_nodes() == []
        first, second = (n for n in c.nodes if n != leader)
        _, out, _ = await cli("app", "move", "svc", "--to", second, *common)
        res = json.loads(out)
        assert res["outcome"] == "completed" and res["from"] is None and res["to"] == second
        assert c.active_nodes() == [second]
        _, out, _ = await cli("app", "move", "svc", "--to", first, *common)
        assert json.loads(out)["outcome"] == "completed" and c.active_nodes() == [first]
        ops = json.loads((await cli("maintenance", "show", *common))[1])
        assert ops["maintenance"] is True
        _, out, _ = await cli("node", "list", *common)
        assert json.loads(out)["operations"]["operator_moves"] == {}
        assert c.overlaps() == []
    finally:
        c.stop_sync()
