"""Inter-node RPC (``app.rpc``) with several platforms in one process, on a real NATS server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pycluster import (
    App,
    CallTimeoutError,
    NoInstanceError,
    RemoteError,
    Request,
    RetryPolicy,
    Singleton,
    Spread,
)
from pycluster.builtin.rpc.service import rpc_service
from pycluster.kernel.errors import InvalidNameError
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


def svc_app(name: str = "svc", *options: Any) -> App:
    """An app whose rpc handlers say who answered."""
    app = App(name, *(options or (Singleton(),)))

    @app.rpc.handler("whoami")
    async def whoami() -> dict[str, Any]:
        assert app.platform is not None
        return {"node": app.platform.node_id, "active": app.is_active}

    @app.rpc.handler("echo")
    async def echo(data: Any) -> Any:
        return data

    return app


async def leader_of(apps: list[App]) -> App:
    return await wait_for(lambda: next((a for a in apps if a.is_active), None), 15,
                          message="a leader")


async def test_call_node_and_leader(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()
    await make_platform("a", a)
    await make_platform("b", b)
    leader = await leader_of([a, b])
    assert (await a.rpc.call("b", "whoami"))["node"] == "b"
    assert (await b.rpc.call("a", "whoami"))["node"] == "a"
    assert leader.platform is not None
    for caller in (a, b):
        got = await caller.rpc.call_leader("whoami")
        assert got == {"node": leader.platform.node_id, "active": True}
    assert await a.rpc.call("b", "echo", {"x": [1, 2]}) == {"x": [1, 2]}
    assert await a.rpc.call("b", "echo", b"\x00raw") == b"\x00raw"
    assert await a.rpc.call("b", "echo", None) is None
    assert await a.rpc.call("b", "echo", {"m": 1}, codec="msgpack") == {"m": 1}
    assert await a.rpc.nodes() == ["a", "b"]


async def test_leader_route_is_served_only_while_active(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()
    pa = await make_platform("a", a)
    pb = await make_platform("b", b)
    leader = await leader_of([a, b])
    other = b if leader is a else a
    for p, app in ((pa, a), (pb, b)):
        await wait_for(
            lambda p=p, app=app: rpc_service(p).subscribed("svc")["rpc:leader"] == app.is_active, 5
        )
    assert rpc_service(pa).subscribed("svc")["rpc:node"]
    # The leader hands over: the leader route follows it.
    await leader.step_down()
    await wait_for(lambda: other.is_active, 10)
    assert other.platform is not None
    got = await leader.rpc.call_leader("whoami", timeout=10)
    assert got["node"] == other.platform.node_id


async def test_call_leader_retries_through_a_handover(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()
    await make_platform("a", a)
    await make_platform("b", b)
    leader = await leader_of([a, b])
    other = b if leader is a else a
    assert other.platform is not None

    async def calls() -> list[str]:
        seen = []
        for _ in range(60):
            seen.append((await other.rpc.call_leader("whoami", timeout=15))["node"])
            await asyncio.sleep(0.02)
        return seen

    task = asyncio.create_task(calls())
    await asyncio.sleep(0.2)
    await leader.step_down(cooldown=30)
    seen = await task
    assert seen[-1] == other.platform.node_id  # every call got an answer, the last one from b


async def test_broadcast_reports_a_slow_node_as_timeout(make_platform: Any) -> None:
    apps = [svc_app("svc", Spread()) for _ in range(3)]
    release = asyncio.Event()

    @apps[2].rpc.handler("stats")
    async def slow() -> str:
        await release.wait()
        return "late"

    for app in apps[:2]:
        app.rpc.register("stats", lambda app=app: app.platform.node_id)  # a plain function
    for i, app in enumerate(apps):
        await make_platform(f"n{i}", app)
    await wait_for(lambda: all(a.is_active for a in apps), 15)
    await wait_for(lambda: _nodes(apps[0]) == ["n0", "n1", "n2"], 10)
    t0 = time.monotonic()
    results = await apps[0].rpc.broadcast("stats", timeout=1.0)
    took = time.monotonic() - t0
    release.set()
    by_node = {r.node: r for r in results}
    assert sorted(by_node) == ["n0", "n1", "n2"]
    assert by_node["n0"].ok and by_node["n0"].value == "n0"
    assert by_node["n1"].ok and by_node["n1"].value == "n1"
    assert isinstance(by_node["n2"].error, CallTimeoutError)
    assert took < 10  # the slow node cost its own timeout, not a serial wait


def _nodes(app: App) -> list[str]:
    assert app.platform is not None and app.platform.membership is not None
    from pycluster.builtin.rpc.wire import running_nodes

    return running_nodes(app.platform.membership.members, app.name)


async def test_errors_are_typed(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()

    class Conflict(Exception):
        code = "conflict"

    @b.rpc.handler("boom")
    async def boom(data: Any) -> None:
        if data == "conflict":
            raise Conflict("version 3 is taken")
        raise KeyError("missing")

    await make_platform("a", a)
    await make_platform("b", b)
    with pytest.raises(RemoteError) as ei:
        await a.rpc.call("b", "boom", "x")
    assert (ei.value.type, ei.value.code, ei.value.node) == ("KeyError", "handler_error", "b")
    assert "missing" in ei.value.message
    with pytest.raises(RemoteError) as ei:
        await a.rpc.call("b", "boom", "conflict")
    assert (ei.value.type, ei.value.code) == ("Conflict", "conflict")
    with pytest.raises(RemoteError) as ei:
        await a.rpc.call("b", "nope")
    assert ei.value.code == "unknown_method" and "boom" in ei.value.message
    t0 = time.monotonic()
    with pytest.raises(NoInstanceError):
        await a.rpc.call("ghost", "whoami", timeout=30)
    assert time.monotonic() - t0 < 15  # at once, not after the 30 s timeout
    with pytest.raises(InvalidNameError):
        await a.rpc.call("b", "bad method")
    with pytest.raises(InvalidNameError):
        await a.rpc.call("bad.node", "whoami")


async def test_handler_may_take_the_request(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()

    @b.rpc.handler("meta")
    async def meta(req: Request) -> dict[str, Any]:
        return {"src": req.source_node, "app": req.source_app, "method": req.method,
                "ct": req.content_type, "payload": req.payload, "kind": req.kind,
                "left": req.remaining() is not None and req.remaining() > 0}

    await make_platform("a", a)
    await make_platform("b", b)
    got = await a.rpc.call("b", "meta", [1])
    assert got == {"src": "a", "app": "svc", "method": "meta", "ct": "application/json",
                   "payload": [1], "kind": "rpc", "left": True}


async def test_deadline_and_cancellation_reach_the_handler(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()
    outcome: dict[str, str] = {}
    started = asyncio.Event()

    @b.rpc.handler("wait")
    async def wait(tag: str) -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            outcome[tag] = "cancelled"
            raise
        return "done"

    await make_platform("a", a)
    await make_platform("b", b)
    # The caller's deadline passes: the server cancels the handler.
    with pytest.raises(CallTimeoutError):
        await a.rpc.call("b", "wait", "deadline", timeout=0.5)
    await wait_for(lambda: outcome.get("deadline") == "cancelled", 10)
    # The caller cancels its call: the server is told and cancels the handler.
    started.clear()
    task = asyncio.create_task(a.rpc.call("b", "wait", "cancel", timeout=60))
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: outcome.get("cancel") == "cancelled", 10)


async def test_calls_need_a_started_platform() -> None:
    app = svc_app()
    with pytest.raises(RuntimeError):
        await app.rpc.call("n1", "whoami")


async def test_only_idempotent_calls_are_resent_after_a_lost_answer(make_platform: Any) -> None:
    a, b = svc_app(), svc_app()
    seen: list[str] = []

    @b.rpc.handler("flaky")
    async def flaky(req: Request) -> int:
        seen.append(req.request_id)
        if len(seen) == 1:
            await asyncio.sleep(60)  # this answer never arrives in time
        return len(seen)

    await make_platform("a", a)
    await make_platform("b", b)
    with pytest.raises(CallTimeoutError) as ei:
        await a.rpc.call("b", "flaky", timeout=1.0)
    assert "sent" in ei.value.reason and len(seen) == 1  # not sent again
    seen.clear()
    got = await a.rpc.call("b", "flaky", timeout=20, idempotent=True,
                           retry=RetryPolicy(attempt_timeout=0.5))
    assert got == 2 and len(seen) == 2 and seen[0] == seen[1]  # the same request, sent twice
