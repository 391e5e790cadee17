"""Health checks and the health endpoints, with real HTTP requests against a real NATS server."""

from __future__ import annotations

import asyncio
import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from pycluster import App, ConfigError, Singleton
from pycluster.builtin.health.checks import CheckStatus
from pycluster.builtin.health.service import PlatformHealth
from pycluster.httpserver import HttpServer, Request, Response, Route, parse_addr
from pycluster.kernel.context import Context
from pycluster.kernel.embedded import EmbeddedNatsServer
from pycluster.testing import NatsServer, wait_for

pytestmark = pytest.mark.timeout(120)


def _request(url: str, method: str = "GET", path: str = "",
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        target = (u.path or "/") + path + (f"?{u.query}" if u.query else "")
        conn.request(method, target, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A real HTTP request (in a thread: http.client blocks)."""
    return await asyncio.to_thread(_request, url, method)


async def get_json(url: str) -> tuple[int, Any]:
    status, _, body = await get(url)
    return status, json.loads(body)


# -- pure logic -------------------------------------------------------------------------------


def test_parse_addr() -> None:
    assert parse_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_addr("[::1]:0") == ("::1", 0)
    for bad in ("8080", ":80", "host:x", "host:70000"):
        with pytest.raises(ConfigError):
            parse_addr(bad)


def test_register_validates() -> None:
    app = App("svc")
    with pytest.raises(ConfigError, match="callable"):
        app.health.register("db", "not a function")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="interval"):
        app.health.register("db", lambda: True, interval=0)
    with pytest.raises(ConfigError, match="failure_threshold"):
        app.health.register("db", lambda: True, failure_threshold=0)
    with pytest.raises(ConfigError):
        app.health.register("bad name", lambda: True)
    with pytest.raises(ConfigError, match="itself"):
        app.health.register("db", lambda: True, depends_on=["db"])
    app.health.register("db", lambda: True)
    with pytest.raises(ConfigError, match="already"):
        app.health.register("db", lambda: True)


def test_settings_validate_addresses() -> None:
    from pycluster import Platform

    with pytest.raises(ConfigError, match="health_addr"):
        Platform("p", node_id="n", health_addr="nowhere")
    with pytest.raises(ConfigError, match="health_interval"):
        Platform("p", node_id="n", health_interval=0)


async def test_http_server_basics() -> None:
    server = HttpServer("127.0.0.1:0")

    async def hello(req: Any) -> Response:
        return Response.json({"q": req.param("q")})

    server.route("/hello", hello)
    await server.start()
    try:
        status, headers, body = await get(server.url + "/hello?q=1")
        assert status == 200 and json.loads(body) == {"q": "1"}
        assert headers["content-type"] == "application/json"
        status, _, body = await get(server.url + "/nope")
        assert status == 404 and b"/hello" in body
        status, headers, _ = await get(server.url + "/hello", "POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        status, headers, body = await get(server.url + "/hello", "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        # Keep-alive: several requests on one connection; a malformed one gets a 400.
        reader, writer = await asyncio.open_connection(*server.address)
        for _ in range(3):
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200")
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
    finally:
        await server.stop()


async def test_prefix_routes_exact_first_then_longest_prefix() -> None:
    server = HttpServer("127.0.0.1:0")

    def answer(tag: str) -> Any:
        async def handler(req: Request) -> Response:
            return Response.json({"by": tag, "path": req.path})
        return handler

    server.add(Route("/v1/items/", answer("items"), prefix=True))
    server.add(Route("/v1/items/special/", answer("special"), prefix=True))
    server.add(Route("/v1/items/fixed", answer("fixed")))
    assert server.paths == ["/v1/items/*", "/v1/items/fixed", "/v1/items/special/*"]
    await server.start()
    try:
        for path, by in (("/v1/items/a?x=1", "items"), ("/v1/items/special/b", "special"),
                         ("/v1/items/fixed", "fixed"), ("/v1/items/", "items")):
            status, body = await get_json(server.url + path)
            assert status == 200 and body["by"] == by, path
        assert (await get(server.url + "/v1/item"))[0] == 404
    finally:
        await server.stop()


async def test_busy_address_is_a_clear_error() -> None:
    a = HttpServer("127.0.0.1:0")
    await a.start()
    try:
        host, port = a.address
        b = HttpServer(f"{host}:{port}", name="health")
        with pytest.raises(ConfigError, match="health address"):
            await b.start()
    finally:
        await a.stop()


# -- endpoints ---------------------------------------------------------------------------------


async def test_endpoints_report_node_apps_and_checks(make_platform: Any) -> None:
    app = App("svc", Singleton())
    app.health.register("db", lambda: {"connections": 3}, interval=0.2)
    p = await make_platform("n1", app, labels={"zone": "a"}, health_addr="127.0.0.1:0")
    assert await app.wait_for_leadership(15)
    base = p.health.url
    assert base is not None

    status, body = await get_json(base + "/health")
    assert status == 200 and body["status"] == "ok" and body["node"] == "n1"

    await wait_for(lambda: "svc.db" in p.health.checks and
                   p.health.checks["svc.db"].status is CheckStatus.HEALTHY, 10)
    status, body = await get_json(base + "/ready")
    assert status == 200 and body == {"ready": True, "node": "n1", "reasons": []}

    status, doc = await get_json(base + "/status?history=1")
    assert status == 200
    assert doc["node_id"] == "n1" and doc["labels"] == {"zone": "a"}
    svc = doc["apps"]["svc"]
    assert svc["role"] == "active" and svc["leader"] == "n1" and svc["epoch"] >= 1
    assert 0 <= svc["lease_age"] <= 2.0 and svc["lease_remaining"] > 0
    checks = doc["checks"]
    assert {"nats", "jetstream", "svc.election", "svc.db"} <= set(checks)
    db = checks["svc.db"]
    assert db["status"] == "healthy" and db["latency"] >= 0
    assert db["details"] == {"connections": 3} and len(db["history"]) >= 1
    assert checks["svc.election"]["status"] == "healthy"
    assert doc["ready"] is True and doc["healthy"] is True
    # /metrics is served on the health address when metrics_addr is not set.
    status, _, text = await get(base + "/metrics")
    assert status == 200 and b"pycluster_leader" in text


async def test_plugin_status_and_checks_hooks(make_platform: Any) -> None:
    from pycluster import hookimpl

    changes: list[tuple[str, str, str]] = []

    class Lag:
        @hookimpl
        def pycluster_status(self, platform: Any) -> dict[str, Any]:
            return {"replication_lag": 0.25}

        @hookimpl
        def pycluster_health_changed(self, platform: Any, check: str, status: str,
                                     previous: str, app: Any) -> Any:
            async def note() -> None:  # an awaitable result is awaited by the core
                changes.append((check, previous, status))

            return note()

        @hookimpl
        def pycluster_health_checks(self, platform: Any, health: PlatformHealth) -> None:
            health.register("replica", lambda: True, depends_on=["jetstream"])

    p = await make_platform("n1", health_addr="127.0.0.1:0", extra_plugins=[("lag", Lag())])
    _, doc = await get_json(p.health.url + "/status")  # type: ignore[operator]
    assert doc["plugins_status"] == {"lag": {"replication_lag": 0.25}}
    assert "replica" in doc["checks"] and doc["checks"]["replica"]["depends_on"] == ["jetstream"]
    await wait_for(lambda: ("replica", "unknown", "healthy") in changes, 10)


async def test_plugin_http_routes_on_the_health_address(make_platform: Any) -> None:
    """``pycluster_http_routes``: a plugin's exact and prefix routes are served beside the
    built-in endpoints; a path already served is skipped, a raising hook adds nothing."""
    from pycluster import hookimpl

    async def hello(req: Request) -> Response:
        return Response.json({"path": req.path, "q": req.param("q")})

    async def stolen(req: Request) -> Response:
        return Response.text("not the status\n")

    class Web:
        @hookimpl
        def pycluster_http_routes(self, platform: Any) -> list[Route]:
            return [Route("/v1/hello", hello), Route("/v1/things/", hello, prefix=True),
                    Route("/status", stolen)]

    class Broken:
        @hookimpl
        def pycluster_http_routes(self, platform: Any) -> list[Route]:
            raise RuntimeError("no routes today")

    p = await make_platform("n1", health_addr="127.0.0.1:0",
                            extra_plugins=[("web", Web()), ("broken", Broken())])
    base = p.health.url
    assert base is not None
    status, body = await get_json(base + "/v1/hello?q=2")
    assert status == 200 and body == {"path": "/v1/hello", "q": "2"}
    status, body = await get_json(base + "/v1/things/a/b")
    assert status == 200 and body["path"] == "/v1/things/a/b"
    status, doc = await get_json(base + "/status")  # the built-in one, not the plugin's
    assert status == 200 and doc["node_id"] == "n1"
    status, _, text = await get(base + "/nope")
    assert status == 404 and b"/v1/things/*" in text


async def test_disabled_metrics_plugin_takes_its_route_away(make_platform: Any) -> None:
    """Every route comes from ``pycluster_http_routes``: with the metrics plugin disabled
    ``/metrics`` is 404 and the health plugin's endpoints still answer; with it enabled the
    same address serves it."""
    off = await make_platform("n1", health_addr="127.0.0.1:0", disabled_plugins=["metrics"])
    base = off.health.url
    assert base is not None and "metrics" not in off.services
    status, _, text = await get(base + "/metrics")
    assert status == 404 and b"/metrics" not in text.split(b"endpoints:")[1]
    for path in ("/health", "/ready", "/status"):
        status, _, _ = await get(base + path)
        assert status == 200, path
    on = await make_platform("n2", health_addr="127.0.0.1:0")
    assert on.health.url is not None
    status, _, text = await get(on.health.url + "/metrics")
    assert status == 200 and b"pycluster_" in text


async def test_failing_check_history_breaker_and_change_hook(make_platform: Any) -> None:
    calls: list[int] = []
    state = {"ok": False}
    changes: list[dict[str, Any]] = []

    def flaky() -> bool:
        calls.append(1)
        if not state["ok"]:
            raise RuntimeError("disk full")
        return True

    app = App("svc", Singleton())
    app.health.register("disk", flaky, interval=0.05, timeout=1, breaker_threshold=3,
                        breaker_cooldown=0.6)
    app.health.register("api", lambda: True, interval=0.05, depends_on=["disk"])

    @app.on_health_change
    async def changed(ctx: Context) -> None:
        changes.append(dict(ctx.extra))

    p = await make_platform("n1", app)
    chk = await wait_for(lambda: p.health.checks.get("svc.disk"), 10)
    await wait_for(lambda: chk.breaker.value == "open", 10, message="breaker never opened")
    assert chk.status is CheckStatus.UNHEALTHY and len(calls) == 3
    assert chk.last is not None and "disk full" in (chk.history[0].error or "")
    # While open the check is not called.
    await asyncio.sleep(0.3)
    assert len(calls) == 3 and "circuit open" in (chk.last.error or "")
    # The dependent check fails without being called.
    api = p.health.checks["svc.api"]
    assert api.status is CheckStatus.UNHEALTHY and "dependency svc.disk" in (api.last.error or "")
    # The hook saw the change, with the check in ctx.extra.
    await wait_for(lambda: any(c["check"] == "svc.disk" and c["status"] == "unhealthy"
                               for c in changes), 5)
    # After the cool-down one trial call (half-open); success closes the breaker.
    state["ok"] = True
    await wait_for(lambda: chk.status is CheckStatus.HEALTHY, 10)
    assert chk.breaker.value == "closed" and len(calls) >= 4
    await wait_for(lambda: p.health.checks["svc.api"].status is CheckStatus.HEALTHY, 5)
    assert p.health.healthy
    # The change was audited.
    await p.audit.flush()
    entries = await p.audit.query(category="health", app="svc")
    assert any(e.action == "changed" and e.data["check"] == "svc.disk"
               and e.data["status"] == "unhealthy" for e in entries)


async def test_unhealthy_active_instance_steps_down(make_platform: Any) -> None:
    sick = {"n1": False, "n2": False}

    def make(node: str) -> App:
        app = App("svc", Singleton())
        app.health.register("backend", lambda: not sick[node], interval=0.1, step_down=True)
        return app

    a1, a2 = make("n1"), make("n2")
    p1 = await make_platform("n1", a1)
    assert await a1.wait_for_leadership(15)
    p2 = await make_platform("n2", a2)

    def standby_lease_age() -> float | None:  # since the standby last saw n1 renew
        age = p2.health.node_status()["apps"]["svc"]["lease_age"]
        return age if age is not None and age < 2.0 else None

    await wait_for(lambda: standby_lease_age() is not None, 10)
    sick["n1"] = True
    await wait_for(lambda: a2.is_active, 20, message="n2 never took over")
    assert not a1.is_active
    # n1 stays out while it is unhealthy (it holds its campaign).
    await asyncio.sleep(1.0)
    assert a2.is_active and not a1.is_active
    await p1.audit.flush()
    entries = await p2.audit.query(category="health")
    assert any(e.action == "step_down" and e.node == "n1" for e in entries)


async def test_ready_follows_nats_connection(unique_name: str, tmp_path: Any) -> None:
    """/ready turns 503 when NATS goes away and 200 again after it comes back."""
    from pycluster import Platform
    from pycluster.plugins import create_plugin_manager

    server = NatsServer(tmp_path / "nats")
    await server.start()
    app = App("svc", Singleton())
    p = Platform(unique_name, node_id="n1", nats_url=server.url, health_addr="127.0.0.1:0",
                 lease_ttl=2.0, heartbeat_interval=0.5, reconnect_wait=0.2,
                 plugin_manager=create_plugin_manager(load_entrypoints=False))
    p.register(app)
    try:
        await p.start()
        assert await app.wait_for_leadership(15)
        url = p.health.url + "/ready"  # type: ignore[operator]

        async def status() -> int:
            return (await get(url))[0]

        await wait_for(lambda: _eq(status(), 200), 15, message="never ready")
        await EmbeddedNatsServer.stop(server)  # keeps the data directory
        await wait_for(lambda: _eq(status(), 503), 15, message="still ready without NATS")
        _, body = await get_json(url)
        assert any("NATS" in r for r in body["reasons"])
        # Liveness does not depend on NATS.
        assert (await get(p.health.url + "/health"))[0] == 200  # type: ignore[operator]
        server.spawn()
        await server.wait_ready(15)
        await wait_for(lambda: _eq(status(), 200), 30, message="not ready after NATS returned")
    finally:
        await p.stop()
        await server.stop()


async def _eq(aw: Any, value: Any) -> bool:
    return bool(await aw == value)
