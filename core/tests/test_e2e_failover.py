"""End-to-end: real node processes on real NATS, with crashes, pauses and partitions.

Each test reads the nodes' event files (`NodeCluster`) and checks, besides the scenario, that
no two nodes were ever active at the same time.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.fixture
async def cluster_factory(tmp_path: Path, unique_name: str) -> Any:
    made: list[NodeCluster] = []

    def make(urls: Any, **kw: Any) -> NodeCluster:
        c = NodeCluster(unique_name, urls, tmp_path / f"c{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_sync()


def _no_split_brain(c: NodeCluster) -> None:
    assert c.overlaps() == [], f"two nodes active at once: {c.overlaps()}"


async def test_sigkill_failover_raises_epoch(nats_url: str, cluster_factory: Any) -> None:
    c = cluster_factory([nats_url], lease_ttl=1.0, heartbeat=0.25)
    await c.start()
    leader = await c.wait_for_leader(20)
    epoch = c.role(leader)[1]
    t0 = time.time()
    c.kill(leader)
    new = await c.wait_for_leader(20, exclude=[leader], min_epoch=epoch + 1)
    assert new != leader and c.role(new)[1] > epoch
    took = time.time() - t0
    assert took < 10  # bounded by the 1 s lease; generous for a loaded CI machine
    await c.start_node(leader)
    await asyncio.sleep(0.5)
    assert c.leader_count() == 1 and c.role(leader)[0] == "passive"
    await c.stop()
    _no_split_brain(c)


async def test_graceful_sigterm_hands_over_and_exits_zero(nats_url: str,
                                                        cluster_factory: Any) -> None:
    c = cluster_factory([nats_url], lease_ttl=10.0, heartbeat=3.0, size=2)
    await c.start()
    leader = await c.wait_for_leader(20)
    t0 = time.time()
    assert await c.terminate(leader) == 0
    other = next(n for n in c.nodes if n != leader)
    await c.wait_for_leader(8, exclude=[leader])
    assert time.time() - t0 < 8  # far below the 10 s lease: handed over, not expired
    assert c.role(other)[0] == "active"
    await c.stop()
    _no_split_brain(c)


async def test_paused_leader_does_not_act_after_resume(nats_url: str,
                                                      cluster_factory: Any) -> None:
    c = cluster_factory([nats_url], lease_ttl=1.0, heartbeat=0.25)
    await c.start()
    zombie = await c.wait_for_leader(20)
    epoch = c.role(zombie)[1]
    c.pause(zombie)
    paused_at = time.time()
    new = await c.wait_for_leader(20, exclude=[zombie], min_epoch=epoch + 1)
    new_epoch = c.role(new)[1]
    await asyncio.sleep(0.5)
    c.resume(zombie)
    resumed_at = time.time()
    # The zombie notices at once that its lease is gone and settles as a standby.
    await wait_for(lambda: c.role(zombie)[0] == "passive", 10)
    await asyncio.sleep(1.0)
    assert c.active_nodes() == [new] and c.role(new)[1] == new_epoch
    late_acts = [t for t in c.acts(zombie) if t > paused_at]
    assert all(t < resumed_at for t in late_acts) and not [
        t for t in late_acts if t > paused_at + 0.2
    ], f"the paused leader acted after its lease: {late_acts}"
    await c.stop()


async def test_partitioned_leader_fences_and_majority_elects(nats_cluster: Any,
                                                             cluster_factory: Any) -> None:
    urls = [[nats_cluster.url(i)] for i in range(3)]  # node i talks only to server i
    c = cluster_factory(urls, lease_ttl=2.0, heartbeat=0.5,
                        extra_args=["--stream-replicas", "3"])
    await c.start()
    leader = await c.wait_for_leader(30)
    idx = int(leader[1:]) - 1
    epoch = c.role(leader)[1]
    nats_cluster.partition(idx)
    cut_at = time.time()
    # The isolated leader stops being active within its lease ...
    await wait_for(lambda: c.role(leader)[0] != "active", 10)
    stopped = time.time() - cut_at
    assert stopped < 2.0 + 1.0
    # ... and the majority elects another node (after the stream leader moved, if it had to).
    new = await c.wait_for_leader(40, exclude=[leader], min_epoch=epoch + 1)
    assert new != leader
    _no_split_brain(c)
    nats_cluster.heal()
    # After the heal exactly one leader (it may move again while stream leaders settle).
    await asyncio.sleep(3.0)
    await c.wait_for_leader(30)
    await c.stop()
    _no_split_brain(c)


async def test_nats_restart_nodes_reconnect(tmp_path: Path, cluster_factory: Any) -> None:
    from pycluster.testing import NatsServer

    server = NatsServer()
    await server.start()
    try:
        c = cluster_factory([server.url], lease_ttl=2.0, heartbeat=0.5)
        await c.start()
        await c.wait_for_leader(20)
        await server.restart()
        await asyncio.sleep(0.5)
        await c.wait_for_leader(30)
        # Stable afterwards.
        await asyncio.sleep(1.0)
        assert c.leader_count() == 1
        await c.stop()
        _no_split_brain(c)
    finally:
        await server.stop()


async def test_duplicate_node_id_is_refused(nats_url: str, cluster_factory: Any,
                                            tmp_path: Path) -> None:
    c = cluster_factory([nats_url], size=1)
    await c.start()
    twin = cluster_factory([nats_url], size=1)  # same platform, same node id "n1"
    twin.nodes["n1"].args[twin.nodes["n1"].args.index("--state-dir") + 1] = str(
        tmp_path / "twin")
    twin._spawn(twin.nodes["n1"])
    proc = twin.nodes["n1"].proc
    assert proc is not None
    code = await asyncio.to_thread(proc.wait, 30)
    assert code == 3
    assert "already alive" in twin.log_tail("n1")
    assert c.nodes["n1"].alive
    # After a crash the same id can come back at once (the old process does not answer).
    c.kill("n1")
    await c.start_node("n1")
    await c.stop()
