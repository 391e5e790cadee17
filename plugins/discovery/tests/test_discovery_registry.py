"""Registration follows app roles, records are leases in ``{platform}_services``, manual
register/deregister, lookups and watches: in-process nodes on a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pycluster import App, Singleton, Spread
from pycluster.kernel import natsutil as nu
from pycluster.testing.wait import wait_for
from pycluster_discovery import Service, ServiceChange
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(60)


def disc(p: Any) -> Any:
    d = discovery_of(p)
    assert d is not None
    return d


async def nodes_of(p: Any, name: str = "http", **kw: Any) -> list[str]:
    return [i.node for i in await disc(p).lookup(name, **kw)]


def listed(p: Any, nodes: list[str], name: str = "http") -> Callable[[], Any]:
    """A wait_for predicate: the healthy lookup of ``name`` on ``p`` names ``nodes``."""
    async def check() -> bool:
        return await nodes_of(p, name) == nodes
    return check


async def test_singleton_active_registers_and_failover_moves_it(
        make_node: Callable[..., Any]) -> None:
    p1 = await make_node("n1")
    await wait_for(lambda: p1.apps["orders"].is_active, 10, message="n1 never active")
    p2 = await make_node("n2")
    await wait_for(lambda: nodes_of(p2), 5, message="n2 never saw the record")
    [inst] = await disc(p2).lookup("http", "orders")
    assert (inst.node, inst.role, inst.status, inst.address, inst.port) == (
        "n1", "primary", "passing", "127.0.0.1", 8080)
    assert inst.tags == ("v2",) and inst.metadata == {"path": "/api"}
    assert await disc(p2).lookup("http", tags=["v1"]) == []
    # the record's lease: a Nats-TTL of the platform's lease TTL
    assert p1.js is not None
    msg = await nu.last_msg(p1.js, f"{p1.name}_services", "orders.http.n1")
    assert msg is not None and nu.parse_ttl_header(msg.headers.get("Nats-TTL")) == 2.0

    await p1.stop()
    await wait_for(lambda: p2.apps["orders"].is_active, 10, message="n2 never took over")
    # registered in the stage before on_active completed: there once n2 is active
    assert await nodes_of(p2) == ["n2"]
    assert [i.node for i in await disc(p2).registry.read("http")] == ["n2"]


async def test_record_registered_before_on_active_hooks(make_node: Callable[..., Any]) -> None:
    seen: list[list[str]] = []
    app = App("orders", Singleton(), Service("http", port=8080, host="127.0.0.1"))

    @app.on_active
    async def active(ctx: Any) -> None:
        seen.append([i.node for i in await disc(p).registry.read("http")])

    p = await make_node("n1", app)
    await wait_for(lambda: seen, 10, message="on_active never ran")
    assert seen == [["n1"]]


async def test_dead_node_record_expires_within_the_lease(
        make_node: Callable[..., Any]) -> None:
    p1 = await make_node("n1")
    await wait_for(lambda: p1.apps["orders"].is_active, 10)
    p2 = await make_node("n2", App("other", Singleton()))
    await wait_for(lambda: nodes_of(p2), 5)
    # n1 stops renewing without withdrawing (as a node that died would)
    reg = disc(p1).registry
    await reg.stop(withdraw=False)  # type: ignore[attr-defined]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await wait_for(listed(p2, []), 2.0 + 2.0,
                   message="the dead node's record outlived its lease")
    # also gone from the bucket itself, not only from n2's view
    assert await disc(p2).registry.read("http") == []
    assert loop.time() - t0 <= 2.0 + 2.0


async def test_spread_lists_every_active_instance(make_node: Callable[..., Any]) -> None:
    ps = []
    for n in ("n1", "n2", "n3"):
        ps.append(await make_node(n, App("cache", Spread(), Service("redis", port=6379,
                                                                   host="127.0.0.1"))))
    await wait_for(listed(ps[0], ["n1", "n2", "n3"], "redis"), 10,
                   message="not every Spread instance registered")
    assert {i.role for i in await disc(ps[1]).lookup("redis")} == {"active"}
    await ps[2].stop()
    await wait_for(listed(ps[0], ["n1", "n2"], "redis"), 5,
                   message="a stopped node's instance stayed listed")


async def test_standbys_registered_with_role_standby(make_node: Callable[..., Any]) -> None:
    def app() -> App:
        return App("orders", Singleton(), Service("http", port=8080, host="127.0.0.1",
                                                  register_standby=True))

    p1 = await make_node("n1", app())
    await wait_for(lambda: p1.apps["orders"].is_active, 10)
    p2 = await make_node("n2", app())
    await wait_for(lambda: len(disc(p1).instances("http")) == 2 or None, 10)
    by_node = {i.node: i for i in await disc(p1).lookup("http", healthy_only=False)}
    assert (by_node["n1"].role, by_node["n1"].status) == ("primary", "passing")
    assert (by_node["n2"].role, by_node["n2"].status) == ("standby", "standby")
    assert await nodes_of(p1) == ["n1"]  # healthy lookups: the primary only
    await p1.stop()
    await wait_for(listed(p2, ["n2"]), 10)


async def test_manual_register_deregister_and_watch_order(
        make_node: Callable[..., Any]) -> None:
    p = await make_node("n1", App("idle", Singleton()))
    d = p.services  # the kernel's discovery API reaches the plugin's service
    changes: list[ServiceChange] = []

    async def follow() -> None:
        async for ch in d.watch("pg"):
            changes.append(ch)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    await d.register("pg", 5432, app="db", host="10.0.0.5", metadata={"az": "a"})
    await d.register("pg", 5432, app="db", host="10.0.0.5", status="critical")
    await d.register("pg", 5432, app="db", host="10.0.0.5")
    await d.deregister("pg", app="db")
    await wait_for(lambda: len(changes) >= 4 or None, 5)
    task.cancel()
    assert [(c.kind, c.instance.status) for c in changes] == [
        ("register", "passing"), ("update", "critical"), ("update", "passing"),
        ("deregister", "passing")]
    assert await d.lookup("pg") == []
    assert await disc(p).lookup("pg") == []


@pytest.mark.slow
async def test_manual_registration_is_renewed_past_the_lease(
        make_node: Callable[..., Any]) -> None:
    p = await make_node("n1", App("idle", Singleton()))
    d = disc(p)
    await d.register("ext", 9000, host="192.0.2.7")
    await asyncio.sleep(2.0 * 2)  # twice the lease
    [inst] = await d.registry.read("ext")  # type: ignore[attr-defined]
    assert inst.address == "192.0.2.7" and inst.role == "external"


async def test_started_on_first_use_when_no_app_has_a_service(
        make_node: Callable[..., Any]) -> None:
    import nats.js.errors

    p = await make_node("n1", App("idle", Singleton()))
    assert p.js is not None
    with pytest.raises(nats.js.errors.NotFoundError):
        await p.js.stream_info(f"KV_{p.name}_services")
    assert await disc(p).lookup("http") == []
    await p.js.stream_info(f"KV_{p.name}_services")  # created by the first lookup
