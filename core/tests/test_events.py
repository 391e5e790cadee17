"""Events (``app.events``, ``platform.events``): live and durable subscriptions on a real NATS
server, with platforms in one process (a restart is a new Platform with the same node id)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from pycluster import App, ConfigError, Event, InvalidNameError, Middleware, Spread
from pycluster.kernel.errors import PayloadTooLargeError
from pycluster.middleware import use
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


async def test_app_events_live_with_wildcards(make_platform: Any) -> None:
    a, b = App("shop", Spread()), App("shop", Spread())
    pa = await make_platform("a", a)
    await make_platform("b", b)
    got: list[Event] = []
    star: list[str] = []

    async def on(ev: Event) -> None:
        got.append(ev)

    async def on_star(ev: Event) -> None:
        star.append(ev.type)

    await b.events.subscribe("order.>", on)
    await b.events.subscribe("order.*", on_star)
    t0 = datetime.now(UTC)
    sent = await a.events.publish("order.created", {"id": 7})
    await a.events.publish("order.line.added", b"\x01")
    await a.events.publish("user.created", {"id": 1})
    await wait_for(lambda: len(got) == 2, 10)
    ev = got[0]
    assert (ev.id, ev.type, ev.source_app, ev.source_node, ev.data) == (
        sent.id, "order.created", "shop", "a", {"id": 7})
    assert ev.time >= t0.replace(microsecond=0)
    assert ev.subject == f"{pa.name}.shop.events.order.created"
    assert sent.seq is not None and sent.seq >= 1
    assert got[1].data == b"\x01" and got[1].type == "order.line.added"
    assert star == ["order.created"]
    # Iteration instead of a callback.
    sub = await b.events.subscribe("user.*")
    await a.events.publish("user.deleted", "x")
    ev = await sub.next(timeout=10)
    assert (ev.type, ev.data) == ("user.deleted", "x")
    await sub.stop()


async def test_platform_events_filter_by_source_app(make_platform: Any) -> None:
    p1 = await make_platform("a")
    p2 = await make_platform("b")
    billing: list[tuple[str | None, str]] = []
    everything: list[tuple[str | None, str]] = []

    async def on_billing(ev: Event) -> None:
        billing.append((ev.source_app, ev.type))

    async def on_all(ev: Event) -> None:
        everything.append((ev.source_app, ev.type))

    await p2.events.subscribe("invoice.*", on_billing, source_app="billing")
    await p2.events.subscribe(">", on_all)
    await p1.events.publish("invoice.paid", {"n": 1}, source_app="billing")
    await p1.events.publish("invoice.paid", {"n": 2}, source_app="web")
    await p1.events.publish("node.note", "hello")  # from the platform itself
    await wait_for(lambda: len(everything) == 3, 10)
    assert billing == [("billing", "invoice.paid")]
    assert sorted(everything, key=str) == sorted(
        [("billing", "invoice.paid"), ("web", "invoice.paid"), (None, "node.note")], key=str)


async def test_durable_subscription_survives_a_subscriber_restart(make_platform: Any) -> None:
    publisher = await make_platform("pub")
    got: list[Any] = []

    async def on(ev: Event) -> None:
        got.append(ev.data)

    sub_platform = await make_platform("sub", start=True)
    await sub_platform.events.subscribe_durable("audit.*", "auditor", on)
    await publisher.events.publish("audit.login", 1)
    await wait_for(lambda: got == [1], 10)
    await sub_platform.stop()  # the subscriber goes down ...
    for i in (2, 3, 4):
        await publisher.events.publish("audit.login", i)
    await publisher.events.publish("other.thing", 99)
    again = await make_platform("sub")  # ... and comes back (a new process would do the same)
    await again.events.subscribe_durable("audit.*", "auditor", on)
    await wait_for(lambda: got == [1, 2, 3, 4], 15)


@pytest.mark.slow
async def test_unacknowledged_events_are_redelivered(make_platform: Any) -> None:
    p = await make_platform("a")
    attempts: list[tuple[Any, int]] = []

    async def flaky(ev: Event) -> None:
        attempts.append((ev.data, ev.deliveries))
        if ev.deliveries == 1:
            raise RuntimeError("not now")

    await p.events.subscribe_durable("job.*", "worker", flaky, retry_delay=0.2)
    await p.events.publish("job.run", "j1")
    await wait_for(lambda: len(attempts) == 2, 15)
    assert attempts == [("j1", 1), ("j1", 2)]
    # Manual acknowledgement: what is not acked comes back after ack_wait.
    sub = await p.events.subscribe_durable("task.*", "manual", ack_wait=1.0)
    await p.events.publish("task.a", "t")
    first = await sub.next(timeout=10)
    assert first.durable and first.deliveries == 1
    second = await sub.next(timeout=10)  # not acked: redelivered
    assert (second.id, second.deliveries) == (first.id, 2)
    await second.ack()
    with pytest.raises(TimeoutError):
        await sub.next(timeout=2.0)
    await sub.delete()


async def test_durable_deliver_all_and_name_conflicts(make_platform: Any) -> None:
    p = await make_platform("a")
    await p.events.publish("hist.one", 1)
    sub = await p.events.subscribe_durable("hist.*", "replayer", deliver="all")
    assert (await sub.next(timeout=10)).data == 1
    await sub.stop()
    with pytest.raises(ConfigError):
        await p.events.subscribe_durable("other.*", "replayer")
    with pytest.raises(InvalidNameError):
        await p.events.subscribe_durable("hist.*", "bad.name")
    with pytest.raises(InvalidNameError):
        await p.events.publish("bad type", 1)
    with pytest.raises(InvalidNameError):
        await p.events.subscribe("a.>.b")


async def test_oversized_event_fails_before_sending(make_platform: Any) -> None:
    p = await make_platform("a")
    assert p.nc is not None
    with pytest.raises(PayloadTooLargeError) as ei:
        await p.events.publish("big.blob", b"x" * p.nc.max_payload)
    assert ei.value.limit == p.nc.max_payload


async def test_event_middleware_carries_headers(make_platform: Any) -> None:
    p1 = await make_platform("a")
    p2 = await make_platform("b")
    seen: list[str] = []

    class Trace(Middleware):
        async def on_publish(self, event: Event, call_next: Any) -> Any:
            event.headers["traceparent"] = f"00-{'a' * 32}-{'b' * 16}-01"
            return await call_next(event)

        async def on_event(self, event: Event, call_next: Any) -> Any:
            seen.append(event.headers.get("traceparent", ""))
            return await call_next(event)

    use(p1, Trace())
    use(p2, Trace())
    got: list[Event] = []

    async def on(ev: Event) -> None:
        got.append(ev)

    await p2.events.subscribe("t.*", on)
    t0 = time.monotonic()
    await p1.events.publish("t.x", 1)
    await wait_for(lambda: got, 10)
    assert seen == [f"00-{'a' * 32}-{'b' * 16}-01"]
    assert time.monotonic() - t0 < 60
    await asyncio.sleep(0)
