"""End-to-end routing with real node processes (``pycluster.testing.rpc_node`` handlers) on a
real NATS server: leader routing across a SIGKILL failover, load-balanced calls, broadcast with
a dead node, and a durable event subscriber that is killed and restarted."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster import App, NoInstanceError, OnNodes, Singleton, Spread, ToNode
from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SETUP = ["--setup", "pycluster.testing.rpc_node:options"]


@pytest.fixture
async def cluster_factory(tmp_path: Path, unique_name: str) -> Any:
    made: list[NodeCluster] = []

    def make(urls: Any, **kw: Any) -> NodeCluster:
        kw["extra_args"] = [*SETUP, *kw.get("extra_args", ())]
        c = NodeCluster(unique_name, urls, tmp_path / f"c{len(made)}", **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_sync()


def _observer(mode: Any) -> App:
    """The app as seen from the test process: registered, but never placed here."""
    return App("svc", mode, OnNodes("n1", "n2", "n3"))


async def test_leader_routing_across_sigkill_failover(nats_url: str, cluster_factory: Any,
                                                      make_platform: Any) -> None:
    c = cluster_factory([nats_url], lease_ttl=1.0, heartbeat=0.25)
    await c.start()
    old = await c.wait_for_leader(30)
    epoch = c.role(old)[1]
    app = _observer(Singleton())
    client = await make_platform("client", app)
    api = client.api("svc", timeout=30)
    assert (await api.call("whoami"))["node"] == old
    assert (await app.rpc.call_leader("whoami", timeout=30))["node"] == old

    answers: list[tuple[float, str, str]] = []
    stop = asyncio.Event()

    async def keep_calling() -> None:
        while not stop.is_set():  # each answer is stamped with the time its call started
            t = time.time()
            r1 = await api.call("whoami", idempotent=True)
            answers.append((t, "api", r1["node"]))
            t = time.time()
            r2 = await app.rpc.call_leader("whoami", timeout=30, idempotent=True)
            answers.append((t, "rpc", r2["node"]))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(keep_calling())
    await asyncio.sleep(0.3)
    c.kill(old)  # returns once the process is gone
    killed_at = time.time()
    new = await c.wait_for_leader(30, exclude=[old], min_epoch=(epoch or 0) + 1)
    await wait_for(lambda: sum(1 for t, _, _ in answers if t > killed_at) >= 10 or task.done(),
                   40)
    stop.set()
    await task  # no call failed: each was retried until the new leader answered
    after = [(kind, node) for t, kind, node in answers if t > killed_at]
    assert {kind for kind, _ in after} == {"api", "rpc"}
    assert all(node == new for _, node in after), after
    got = await api.call("whoami")
    assert got["node"] == new and got["active"] and got["epoch"] > epoch
    await c.stop()


async def test_any_routing_spreads_over_instances(nats_url: str, cluster_factory: Any,
                                                  make_platform: Any) -> None:
    c = cluster_factory([nats_url], mode="spread")
    await c.start()
    await wait_for(lambda: len(c.active_nodes()) == 3, 30)
    client = await make_platform("client")
    api = client.api("svc", timeout=20)
    await wait_for(lambda: api.call("whoami"), 20, ignore=(NoInstanceError,))
    seen = [(await api.call("whoami"))["node"] for _ in range(60)]
    assert len(set(seen)) >= 2, seen
    for node in ("n1", "n2", "n3"):
        assert (await api.call("whoami", route=ToNode(node)))["node"] == node
    await c.stop()


async def test_broadcast_reaches_live_nodes_and_reports_a_dead_one(
        nats_url: str, cluster_factory: Any, make_platform: Any) -> None:
    # A long lease keeps the dead node's membership record alive while we broadcast.
    c = cluster_factory([nats_url], mode="spread", lease_ttl=10.0, heartbeat=3.0)
    await c.start()
    await wait_for(lambda: len(c.active_nodes()) == 3, 30)
    app = _observer(Spread())
    await make_platform("client", app)
    await wait_for(lambda: app.rpc.nodes(), 20)
    await wait_for(lambda: _eq(app.rpc.nodes(), ["n1", "n2", "n3"]), 20)
    results = await app.rpc.broadcast("whoami", timeout=10)
    assert [(r.node, r.ok) for r in results] == [("n1", True), ("n2", True), ("n3", True)]
    c.kill("n3")

    async def n3_gone() -> bool:
        try:
            await app.rpc.call("n3", "whoami", timeout=1.0)
        except NoInstanceError:
            return True
        except Exception:
            return False
        return False

    # The server drops the dead process's subscriptions when it notices the closed
    # connection, which under load can take a moment after the kill.
    await wait_for(n3_gone, 15)
    t0 = time.monotonic()
    results = await app.rpc.broadcast("whoami", timeout=20)
    took = time.monotonic() - t0
    by_node = {r.node: r for r in results}
    assert by_node["n1"].ok and by_node["n1"].value["node"] == "n1"
    assert by_node["n2"].ok and by_node["n2"].value["node"] == "n2"
    assert isinstance(by_node["n3"].error, NoInstanceError)
    assert took < 15  # the dead node was reported at once, not after the 20 s timeout
    await c.stop()


async def _eq(coro: Any, expected: Any) -> bool:
    return bool(await coro == expected)


async def test_durable_subscriber_process_is_killed_and_restarted(
        nats_url: str, cluster_factory: Any, make_platform: Any) -> None:
    c = cluster_factory([nats_url], mode="spread", size=1,
                        extra_args=["--setup-arg", "durable=auditor"])
    await c.start()
    log = c.state_dir / "n1.events.jsonl"

    def received() -> list[Any]:
        if not log.exists():
            return []
        return [json.loads(line)["data"] for line in log.read_text().splitlines() if line]

    client = await make_platform("client")
    await client.events.publish("test.a", "a")
    await wait_for(lambda: "a" in received(), 20)
    c.kill("n1")
    for x in ("b", "c", "d"):
        await client.events.publish(f"test.{x}", x)
    await c.start_node("n1")
    await wait_for(lambda: {"a", "b", "c", "d"} <= set(received()), 30)
    assert sorted(set(received())) == ["a", "b", "c", "d"]  # at least once; nothing else
    await c.stop()
