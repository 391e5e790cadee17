"""Discovery on a 3-server NATS cluster with R3 buckets: the Singleton's registration follows
the leader when the leader's server is cut off from the others, the cut-off node's record goes
away, and after the heal only the new leader is listed as primary."""

from __future__ import annotations

from typing import Any

import pytest

import pycluster_discovery.plugin as discovery_plugin
from pycluster import App, Platform, Singleton
from pycluster.plugins import create_plugin_manager
from pycluster.testing.wait import WaitTimeoutError, wait_for
from pycluster_discovery import Service
from pycluster_discovery.plugin import discovery_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def node(name: str, node_id: str, url: str) -> Platform:
    pm = create_plugin_manager(load_entrypoints=False,
                               extra=(("discovery", discovery_plugin),))
    p = Platform(name, node_id=node_id, nats_url=url, plugin_manager=pm, stream_replicas=3,
                 lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=5.0)
    p.register(App("orders", Singleton(), Service("http", port=8080, host="127.0.0.1")))
    return p


async def primaries(p: Platform) -> list[str]:
    d = discovery_of(p)
    assert d is not None
    return sorted(i.node for i in await d.lookup("http", "orders") if i.role == "primary")


async def test_registration_follows_the_leader_when_its_server_is_cut_off(
        nats_cluster: Any, unique_name: str) -> None:
    nodes = {f"n{i + 1}": node(unique_name, f"n{i + 1}", nats_cluster.url(i)) for i in range(3)}
    try:
        for p in nodes.values():
            await p.start()

        def leader() -> str | None:
            active = [n for n, p in nodes.items() if p.apps["orders"].is_active]
            return active[0] if len(active) == 1 else None

        first = await wait_for(leader, 60, message="one active instance")
        for p in nodes.values():
            await wait_for(lambda p=p: primaries(p), 30, message="the record seen everywhere")
            assert await primaries(p) == [first]

        cut = int(first[1]) - 1
        nats_cluster.partition(cut)
        majority = [p for n, p in nodes.items() if n != first]
        # The lease runs out, the majority elects stream leaders where the cut server led
        # them (up to ~9 s), then a new leader registers before its on_active.
        second = await wait_for(lambda: next((n for n, p in nodes.items() if n != first
                                              and p.apps["orders"].is_active), None), 60,
                                message="a leader on the majority side")

        async def only_second() -> bool:
            return all([await primaries(p) == [second] for p in majority])

        await wait_for(only_second, 30, message="the majority lists only the new leader")
        assert not nodes[first].apps["orders"].is_active

        nats_cluster.heal()

        seen: dict[str, list[str]] = {}

        async def everywhere() -> bool:
            # Leadership may move again after the heal (a legitimate failover): every node
            # must list exactly the node that is active now, and only it.
            now = leader()
            for n, p in nodes.items():
                seen[n] = await primaries(p)
            return now is not None and all(v == [now] for v in seen.values())

        try:
            await wait_for(everywhere, 60, message="after the heal, only the new leader everywhere")
        except WaitTimeoutError as exc:
            raise AssertionError(f"active now {leader()}; primaries seen per node: {seen}") from exc
    finally:
        for p in nodes.values():
            await p.stop()
