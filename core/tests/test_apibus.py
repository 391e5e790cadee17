"""The API bus (``platform.api(app).call``), payloads, errors, middleware, auth and the circuit
breaker, with several platforms in one process on a real NATS server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import nats
import pytest
from pydantic import BaseModel

from pycluster import (
    App,
    AuthMiddleware,
    BreakerPolicy,
    CircuitOpenError,
    ForKey,
    Middleware,
    NoInstanceError,
    PayloadTooLargeError,
    PluginError,
    RemoteError,
    Request,
    Singleton,
    Spread,
    ToAny,
    ToLeader,
    ToNode,
    hookimpl,
)
from pycluster.builtin.api.breaker import BreakerState, CircuitBreaker
from pycluster.builtin.api.bus import api_subject
from pycluster.codec import CodecError, decode, encode
from pycluster.middleware import Call, use
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


class Order(BaseModel):
    sku: str
    qty: int


class Receipt(BaseModel):
    sku: str
    total: float


def api_app(name: str = "shop", *options: Any) -> App:
    app = App(name, *(options or (Singleton(),)))

    @app.handle("whoami")
    async def whoami() -> dict[str, Any]:
        assert app.platform is not None
        return {"node": app.platform.node_id, "active": app.is_active}

    @app.handle("order")
    async def order(o: Order) -> Receipt:
        return Receipt(sku=o.sku, total=o.qty * 2.5)

    @app.handle("echo")
    async def echo(req: Request) -> Any:
        req.reply_headers["X-Seen-Content-Type"] = req.content_type or "none"
        return req.payload

    @app.handle("fail")
    async def fail(kind: str) -> None:
        if kind == "value":
            raise ValueError("bad value")
        raise PermissionError("nope")

    @app.handle("big")
    async def big(n: int) -> bytes:
        return b"x" * n

    return app


async def leader(apps: list[App]) -> App:
    return await wait_for(lambda: next((a for a in apps if a.is_active), None), 15)


async def test_default_route_follows_the_mode(make_platform: Any) -> None:
    a, b = api_app(), api_app()
    await make_platform("a", a)
    await make_platform("b", b)
    client = await make_platform("c")  # a platform without the app
    lead = await leader([a, b])
    assert lead.platform is not None
    shop = client.api("shop")
    assert (await shop.call("whoami"))["node"] == lead.platform.node_id
    assert (await shop.call("whoami", route=ToLeader()))["node"] == lead.platform.node_id
    assert (await shop.call("whoami", route=ToNode("a")))["node"] == "a"
    assert (await shop.call("whoami", route=ToNode("b")))["node"] == "b"
    seen = {(await shop.call("whoami", route=ToAny()))["node"] for _ in range(40)}
    assert seen == {"a", "b"}  # ToAny reaches standbys too


async def test_any_routing_spreads_over_instances(make_platform: Any) -> None:
    apps = [api_app("shop", Spread()) for _ in range(3)]
    for i, app in enumerate(apps):
        await make_platform(f"n{i}", app)
    await wait_for(lambda: all(a.is_active for a in apps), 15)
    client = await make_platform("c")
    seen = [(await client.api("shop").call("whoami"))["node"] for _ in range(60)]
    assert len(set(seen)) >= 2


async def test_payloads(make_platform: Any) -> None:
    await make_platform("a", api_app())
    client = await make_platform("c")
    shop = client.api("shop")
    await wait_for(lambda: shop.call("whoami"), 15, ignore=(NoInstanceError, TimeoutError))
    # pydantic in, validated on the server, pydantic out.
    got = await shop.call("order", Order(sku="a1", qty=4), response_model=Receipt)
    assert got == Receipt(sku="a1", total=10.0)
    assert await shop.call("order", {"sku": "b", "qty": 1}) == {"sku": "b", "total": 2.5}
    with pytest.raises(RemoteError) as ei:
        await shop.call("order", {"sku": "b", "qty": "many"})
    assert ei.value.code == "invalid_request" and ei.value.type == "ValidationError"
    assert ei.value.details[0]["loc"] == ["qty"]
    # bytes pass through; JSON by default; msgpack on request; the content type travels.
    cases = [(b"\x00\xff", "application/octet-stream", "json"),
             ({"k": [1, "2"]}, "application/json", "json"),
             ({"k": [1, "2"]}, "application/msgpack", "msgpack"),
             ("text", "application/json", "json"),
             (None, "none", "json")]
    for value, _ct, codec in cases:
        c = client.api("shop", codec=codec)
        assert await c.call("echo", value) == value

    class Seen(Middleware):
        async def on_call(self, call: Call, call_next: Any) -> Any:
            result = await call_next(call)
            seen.append(call.reply_headers.get("X-Seen-Content-Type"))
            return result

    seen: list[str | None] = []
    use(client, Seen())
    for value, _ct, codec in cases:
        await client.api("shop", codec=codec).call("echo", value)
    assert seen == [ct for _, ct, _ in cases]


async def test_remote_exceptions_reach_the_caller_typed(make_platform: Any) -> None:
    await make_platform("a", api_app())
    client = await make_platform("c")
    shop = client.api("shop")
    await wait_for(lambda: shop.call("whoami"), 15, ignore=(NoInstanceError, TimeoutError))
    with pytest.raises(RemoteError) as ei:
        await shop.call("fail", "value")
    e = ei.value
    assert (e.app, e.method, e.type, e.message, e.code, e.node) == (
        "shop", "fail", "ValueError", "bad value", "handler_error", "a")
    with pytest.raises(RemoteError) as ei:
        await shop.call("fail", "perm")
    assert ei.value.type == "PermissionError"
    with pytest.raises(RemoteError) as ei:
        await shop.call("missing")
    assert ei.value.code == "unknown_method"


async def test_no_instance_fails_fast(make_platform: Any) -> None:
    client = await make_platform("c")
    for route in (None, ToLeader(), ToAny(), ToNode("n9")):
        t0 = time.monotonic()
        with pytest.raises(NoInstanceError) as ei:
            await client.api("ghost").call("whoami", route=route, timeout=60)
        assert time.monotonic() - t0 < 30  # not after the 60 s timeout
        assert ei.value.app == "ghost"


async def test_oversized_payloads(make_platform: Any) -> None:
    calls: list[int] = []
    app = api_app()

    @app.handle("sink")
    async def sink(data: bytes) -> int:
        calls.append(len(data))
        return len(data)

    await make_platform("a", app)
    client = await make_platform("c")
    shop = client.api("shop")
    await wait_for(lambda: shop.call("whoami"), 15, ignore=(NoInstanceError, TimeoutError))
    assert client.nc is not None
    limit = client.nc.max_payload
    with pytest.raises(PayloadTooLargeError) as ei:
        await shop.call("sink", b"x" * limit)
    assert ei.value.limit == limit and str(limit) in str(ei.value)
    assert calls == []  # nothing was sent
    assert await shop.call("sink", b"x" * 1000) == 1000
    # An oversized reply becomes an error, not a hang.
    with pytest.raises(RemoteError) as ei2:
        await shop.call("big", limit, timeout=10)
    assert ei2.value.code == "reply_too_large"


async def test_malformed_requests_never_break_the_handler_loop(make_platform: Any,
                                                               nats_url: str) -> None:
    p = await make_platform("a", api_app())
    await wait_for(lambda: p.apps["shop"].is_active, 15)
    nc = await nats.connect(nats_url)
    try:
        subject = api_subject(p.name, "shop", "order")
        bad = [
            (b"{not json", {"Content-Type": "application/json"}, "bad_request"),
            (b"\xc1", {"Content-Type": "application/msgpack"}, "bad_request"),
            (b"[1,2]", {"Content-Type": "application/json"}, "invalid_request"),
            (b"{}", {"Content-Type": "application/json", "Pycluster-Call": "r1 soon n1"},
             "bad_request"),
            (b"raw bytes", None, "invalid_request"),
        ]
        for body, headers, code in bad:
            msg = await nc.request(subject, body, timeout=10, headers=headers)
            assert msg.headers is not None and msg.headers["Pycluster-Error"] == code, body
            assert json.loads(msg.data)["code"] == code
        # A plain request with bytes and no headers at all reaches a bytes handler.
        msg = await nc.request(api_subject(p.name, "shop", "echo"), b"hi", timeout=10)
        assert msg.data == b"hi"
        # Still serving normally.
        client = await make_platform("c")
        assert (await client.api("shop").call("whoami"))["node"] == "a"
    finally:
        await nc.close()


async def test_key_routing_without_the_ring_plugin(make_platform: Any) -> None:
    await make_platform("a", api_app())
    client = await make_platform("c")
    with pytest.raises(PluginError) as ei:
        await client.api("shop").call("whoami", route=ForKey("user-42"))
    assert ei.value.plugin == "ring" and ei.value.distribution == "pycluster-ring"
    assert "ring" in str(ei.value)


async def test_key_routing_through_the_hook(make_platform: Any) -> None:
    class Owner:
        @hookimpl
        def pycluster_route_key(self, app_name: str, key: str, platform: Any) -> str | None:
            return {"k-a": "a", "k-b": "b"}.get(key)

    a, b = api_app(), api_app()
    await make_platform("a", a)
    await make_platform("b", b)
    client = await make_platform("c", extra_plugins=[("owner", Owner())])
    await wait_for(lambda: a.is_active or b.is_active, 15)
    shop = client.api("shop")
    assert (await shop.call("whoami", route=ForKey("k-a")))["node"] == "a"
    assert (await shop.call("whoami", route=ForKey("k-b")))["node"] == "b"
    with pytest.raises(NoInstanceError):
        await shop.call("whoami", route=ForKey("k-none"))


async def test_middleware_order_and_headers(make_platform: Any) -> None:
    log: list[str] = []

    class Mark(Middleware):
        def __init__(self, name: str) -> None:
            self.name = name

        async def on_call(self, call: Call, call_next: Any) -> Any:
            log.append(f"call>{self.name}")
            call.headers.setdefault("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")
            result = await call_next(call)
            log.append(f"call<{self.name}:{call.reply_headers.get('X-Trace-Back')}")
            return result

        async def on_request(self, request: Request, call_next: Any) -> Any:
            log.append(f"req>{self.name}:{request.headers.get('traceparent', '')[:5]}")
            request.reply_headers["X-Trace-Back"] = "yes"
            result = await call_next(request)
            log.append(f"req<{self.name}")
            return result

    app = api_app()

    @app.handle("mark")
    async def mark() -> str:
        log.append("handler")
        return "ok"

    server = await make_platform("a", app)
    use(server, Mark("s1"), Mark("s2"))
    client = await make_platform("c")
    use(client, Mark("c1"), Mark("c2"))
    await wait_for(lambda: app.is_active, 15)
    assert await client.api("shop").call("mark") == "ok"
    assert log == [
        "call>c1", "call>c2", "req>s1:00-11", "req>s2:00-11", "handler", "req<s2", "req<s1",
        "call<c2:yes", "call<c1:yes",
    ]


async def test_auth_middleware(make_platform: Any) -> None:
    app = api_app()
    server = await make_platform("a", app)
    use(server, AuthMiddleware(credentials={"web": "w-secret", "ops": "o-secret"},
                               allow={"fail": ["ops"]}))
    good = await make_platform("c1")
    use(good, AuthMiddleware(identity=("web", "w-secret")))
    ops = await make_platform("c2")
    use(ops, AuthMiddleware(identity=("ops", "o-secret")))
    bad = await make_platform("c3")
    use(bad, AuthMiddleware(identity=("web", "guess")))
    anon = await make_platform("c4")
    await wait_for(lambda: app.is_active, 15)
    assert (await good.api("shop").call("whoami"))["node"] == "a"
    for client, why in ((bad, "bad credentials"), (anon, "missing credentials")):
        with pytest.raises(RemoteError) as ei:
            await client.api("shop").call("whoami")
        assert ei.value.code == "unauthorized" and why in ei.value.message
    with pytest.raises(RemoteError) as ei:
        await good.api("shop").call("fail", "value")
    assert ei.value.code == "unauthorized"  # web may not call "fail"
    with pytest.raises(RemoteError) as ei:
        await ops.api("shop").call("fail", "value")
    assert ei.value.type == "ValueError"  # ops may: the handler ran


async def test_shared_token_auth(make_platform: Any) -> None:
    app = api_app()
    server = await make_platform("a", app)
    use(server, AuthMiddleware(token="t0ken"))
    client = await make_platform("c")
    use(client, AuthMiddleware(token="t0ken"))
    await wait_for(lambda: app.is_active, 15)
    assert (await client.api("shop").call("whoami"))["node"] == "a"
    # The auth also guards app.rpc between the app's own nodes.
    with pytest.raises(RemoteError) as ei:
        other = await make_platform("b", api_app())
        await other.apps["shop"].rpc.call("a", "whoami")
    assert ei.value.code == "unauthorized"


async def test_circuit_breaker_opens_and_recovers(make_platform: Any) -> None:
    client = await make_platform("c")
    shop = client.api("shop", breaker=BreakerPolicy(failure_threshold=3, reset_timeout=0.5))
    for _ in range(3):
        with pytest.raises(NoInstanceError):
            await shop.call("whoami")
    assert shop.breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as ei:
        await shop.call("whoami")
    assert ei.value.app == "shop" and ei.value.failures == 3
    # The app comes up; after the reset timeout a probe goes through and closes the circuit.
    app = api_app()
    await make_platform("a", app)
    await wait_for(lambda: app.is_active, 15)
    got = await wait_for(lambda: shop.call("whoami"), 15, ignore=(CircuitOpenError,))
    assert got["node"] == "a"
    assert shop.breaker.state is BreakerState.CLOSED
    # Handler exceptions are answers: they do not open the circuit.
    for _ in range(5):
        with pytest.raises(RemoteError):
            await shop.call("fail", "value")
    assert shop.breaker.state is BreakerState.CLOSED


async def test_failover_retry_reaches_the_new_leader(make_platform: Any) -> None:
    a, b = api_app(), api_app()
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_active, 15)
    await make_platform("b", b)
    client = await make_platform("c")
    shop = client.api("shop", timeout=20)
    assert (await shop.call("whoami"))["node"] == "a"
    results: list[str] = []

    async def loop() -> None:
        for _ in range(40):
            results.append((await shop.call("whoami"))["node"])
            await asyncio.sleep(0.02)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.2)
    await pa.stop()
    await task
    assert results[-1] == "b" and set(results) <= {"a", "b"}


# -- pure logic ----------------------------------------------------------------------------------


def test_breaker_states_with_a_fake_clock() -> None:
    now = [0.0]
    br = CircuitBreaker("x", BreakerPolicy(failure_threshold=2, reset_timeout=10),
                        clock=lambda: now[0])
    assert br.before_call() is False
    br.record(False, TimeoutError())
    br.record(False, RemoteError("x", "m", "ValueError", "v"))  # an answer resets the count
    br.record(False, TimeoutError())
    assert br.state is BreakerState.CLOSED
    br.record(False, NoInstanceError("x", "leader", "none"))
    assert br.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as ei:
        br.before_call()
    assert ei.value.retry_after == pytest.approx(10)
    now[0] = 10.0
    assert br.state is BreakerState.HALF_OPEN
    assert br.before_call() is True  # the probe
    with pytest.raises(CircuitOpenError):
        br.before_call()  # only one probe at a time
    br.record(True, TimeoutError())
    assert br.state is BreakerState.OPEN
    now[0] = 20.0
    probe = br.before_call()
    br.abandon(probe)  # cancelled: the slot is free again
    probe = br.before_call()
    br.record(probe, None)
    assert br.state is BreakerState.CLOSED and br.failures == 0


def test_codec_rules() -> None:
    assert encode(None) == (b"", None)
    assert encode(b"ab") == (b"ab", "application/octet-stream")
    assert encode(bytearray(b"ab"))[0] == b"ab"
    assert encode({"a": 1}) == (b'{"a":1}', "application/json")
    assert decode(*encode(Order(sku="s", qty=1))) == {"sku": "s", "qty": 1}
    assert decode(*encode(Order(sku="s", qty=1), "msgpack")) == {"sku": "s", "qty": 1}
    assert decode(b"xyz", None) == b"xyz" and decode(b"", None) is None
    assert decode(b"xyz", "text/plain") == b"xyz"
    with pytest.raises(CodecError):
        decode(b"{", "application/json")
    with pytest.raises(CodecError):
        encode(object())
