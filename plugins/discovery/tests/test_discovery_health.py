"""Health checks of registered services (HTTP, TCP, Python): failing instances are
``critical`` and left out of healthy lookups, recovering ones come back; real nats-server."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pycluster import App, Spread
from pycluster.httpserver import HttpServer, Request, Response
from pycluster.testing.wait import wait_for
from pycluster_discovery import HttpCheck, PyCheck, Service, TcpCheck
from pycluster_discovery.checks import run_check
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(60)


def disc(p: Any) -> Any:
    d = discovery_of(p)
    assert d is not None
    return d


class Target:
    """A local HTTP server whose /healthz answers ``status`` with ``body``."""

    def __init__(self) -> None:
        self.status = 200
        self.body = "ok"
        self.server = HttpServer("127.0.0.1:0", name="target")
        self.server.route("/healthz", self.handle)

    async def handle(self, request: Request) -> Response:
        return Response.text(self.body, self.status)

    @property
    def port(self) -> int:
        return self.server.address[1]


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    await t.server.start()
    yield t
    await t.server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_http_check_status_and_body(target: Target) -> None:
    assert (await run_check(HttpCheck("/healthz"), "127.0.0.1", target.port))[0]
    assert (await run_check(HttpCheck("/healthz", body="ok"), "127.0.0.1", target.port))[0]
    ok, detail = await run_check(HttpCheck("/healthz", body="ready"), "127.0.0.1", target.port)
    assert not ok and "body" in detail
    target.status = 503
    ok, detail = await run_check(HttpCheck("/healthz"), "127.0.0.1", target.port)
    assert not ok and "503" in detail
    assert (await run_check(HttpCheck("/healthz", status=503), "127.0.0.1", target.port))[0]


async def test_tcp_and_python_checks(target: Target) -> None:
    assert (await run_check(TcpCheck(), "127.0.0.1", target.port))[0]
    assert not (await run_check(TcpCheck(), "127.0.0.1", free_port()))[0]
    assert (await run_check(PyCheck(lambda: True), "h", 1))[0]
    assert not (await run_check(PyCheck(lambda: False), "h", 1))[0]

    async def hangs() -> None:
        await asyncio.sleep(10)

    ok, detail = await run_check(PyCheck(hangs, timeout=0.1), "h", 1)
    assert not ok and "timed out" in detail


async def test_spread_drops_a_failing_instance_and_adds_it_back(
        make_node: Callable[..., Any], target: Target) -> None:
    """n1 is checked over HTTP against ``target``, n2 by a Python check that passes."""
    def app(health: Any) -> App:
        return App("cache", Spread(), Service("http", port=target.port, host="127.0.0.1",
                                              health=health))

    p1 = await make_node("n1", app(HttpCheck("/healthz", interval=0.2, timeout=1)))
    p2 = await make_node("n2", app(PyCheck(lambda: True, interval=0.2)))

    async def healthy() -> list[str]:
        return [i.node for i in await disc(p2).lookup("http", "cache")]

    async def is_(nodes: list[str]) -> bool:
        return await healthy() == nodes

    await wait_for(lambda: is_(["n1", "n2"]), 10, message="both never listed")
    changes: list[tuple[str, str, str]] = []

    async def follow() -> None:
        async for ch in disc(p2).watch("http"):
            changes.append((ch.kind, ch.instance.node, ch.instance.status))

    task = asyncio.create_task(follow())
    target.status = 500
    await wait_for(lambda: is_(["n2"]), 5, message="the failing instance stayed listed")
    crit = {i.node: i.status for i in await disc(p2).lookup("http", healthy_only=False)}
    assert crit == {"n1": "critical", "n2": "passing"}
    target.status = 200
    await wait_for(lambda: is_(["n1", "n2"]), 5, message="the recovered instance is missing")
    await wait_for(lambda: ("update", "n1", "passing") in changes, 5)
    task.cancel()
    assert changes[2:] == [("update", "n1", "critical"), ("update", "n1", "passing")]
    assert disc(p1).checks_total[("http", "critical")] >= 1
    assert disc(p1).checks_total[("http", "passing")] >= 2


async def test_standby_status_is_role_aware_and_failing_standby_is_critical(
        make_node: Callable[..., Any]) -> None:
    from pycluster import Singleton

    ok = {"n1": True, "n2": True}

    def app(node: str) -> App:
        return App("orders", Singleton(), Service(
            "http", port=8080, host="127.0.0.1", register_standby=True,
            health=PyCheck(lambda: ok[node], interval=0.2)))

    p1 = await make_node("n1", app("n1"))
    await wait_for(lambda: p1.apps["orders"].is_active, 10)
    await make_node("n2", app("n2"))

    async def statuses() -> dict[str, str]:
        return {i.node: i.status for i in await disc(p1).lookup("http", healthy_only=False)}

    async def are(want: dict[str, str]) -> bool:
        return await statuses() == want

    await wait_for(lambda: are({"n1": "passing", "n2": "standby"}), 10)
    ok["n2"] = False
    await wait_for(lambda: are({"n1": "passing", "n2": "critical"}), 5)
    ok["n1"] = False
    await wait_for(lambda: are({"n1": "critical", "n2": "critical"}), 5)
    assert await disc(p1).lookup("http") == []
