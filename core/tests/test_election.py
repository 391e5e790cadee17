"""The election through the public API, with several platforms in one process (real NATS)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pycluster import App, Context, Election, Singleton
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(60)


def leaders(platforms: list[Any], name: str) -> list[str]:
    return [p.node_id for p in platforms if p.apps[name].is_leader]


async def test_five_contenders_one_leader(make_platform: Any) -> None:
    apps = [App("svc", Singleton()) for _ in range(5)]
    platforms = await asyncio.gather(*(make_platform(f"n{i}", a) for i, a in enumerate(apps)))
    await wait_for(lambda: len(leaders(platforms, "svc")) == 1, 10)
    # Stays exactly one for a few renewals, and everyone agrees on who and which epoch.
    for _ in range(20):
        assert len(leaders(platforms, "svc")) == 1
        await asyncio.sleep(0.05)
    (leader,) = leaders(platforms, "svc")
    epoch = next(p for p in platforms if p.node_id == leader).apps["svc"].epoch
    await wait_for(lambda: all(p.apps["svc"].leader == leader for p in platforms), 5)
    assert all(p.apps["svc"].epoch == epoch for p in platforms)


async def test_step_down_hands_over_with_higher_epoch(make_platform: Any) -> None:
    a, b = App("svc"), App("svc")
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 5)
    e1 = a.epoch
    t0 = time.monotonic()
    await a.step_down()
    await wait_for(lambda: b.is_leader, 5)
    handover = time.monotonic() - t0
    assert not a.is_leader
    assert b.epoch is not None and e1 is not None and b.epoch > e1
    assert handover < 2.0  # generous: it is a graceful handover, not a lease expiry
    await wait_for(lambda: a.leader == "b", 5)
    assert pa.apps["svc"].epoch == pb.apps["svc"].epoch


async def test_step_down_to_preferred_successor(make_platform: Any) -> None:
    apps = {n: App("svc") for n in ("a", "b", "c")}
    await make_platform("a", apps["a"])
    await wait_for(lambda: apps["a"].is_leader, 10)
    await make_platform("b", apps["b"])
    await make_platform("c", apps["c"])
    await wait_for(lambda: apps["c"].leader == "a" and apps["b"].leader == "a", 5)
    await apps["a"].step_down(successor="c")
    await wait_for(lambda: apps["c"].is_leader, 5)
    assert not apps["b"].is_leader


async def test_graceful_stop_hands_over_at_once(make_platform: Any) -> None:
    a, b = App("svc"), App("svc")
    pa = await make_platform("a", a, lease_ttl=10.0, heartbeat_interval=3.0)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b, lease_ttl=10.0, heartbeat_interval=3.0)
    await wait_for(lambda: b.leader == "a", 5)
    t0 = time.monotonic()
    await pa.stop()
    await wait_for(lambda: b.is_leader, 5)
    # Far below the 10 s lease: the lease was deleted, not left to expire.
    assert time.monotonic() - t0 < 3.0


async def test_hook_order_and_context(make_platform: Any) -> None:
    seen: list[tuple[str, Any]] = []
    app = App("svc")

    @app.on_start
    async def _start(ctx: Context) -> None:
        seen.append(("start", None))

    @app.on_passive
    async def _passive(ctx: Context) -> None:
        seen.append(("passive", ctx.reason))

    @app.on_active
    async def _active(ctx: Context) -> None:
        assert ctx.epoch is not None and ctx.node_id == "a"
        seen.append(("active", ctx.epoch))

    @app.on_leader_change
    async def _lc(ctx: Context) -> None:
        seen.append(("leader_change", ctx.leader))

    @app.on_stop
    async def _stop(ctx: Context) -> None:
        seen.append(("stop", None))

    p = await make_platform("a", app)
    await wait_for(lambda: app.is_leader, 10)
    await p.stop()
    kinds = [k for k, _ in seen]
    assert kinds[0:2] == ["start", "passive"]
    assert kinds.index("active") < len(kinds) - 2
    assert kinds[-2:] == ["passive", "stop"]
    assert ("leader_change", "a") in seen


@pytest.mark.slow
async def test_failing_on_active_steps_down_and_backs_off(make_platform: Any) -> None:
    calls: dict[str, int] = {"a": 0, "b": 0}

    def make(node: str, fail: bool) -> App:
        app = App("svc")

        @app.on_active
        async def act(ctx: Context) -> None:
            calls[node] += 1
            if fail:
                raise RuntimeError("backend refused to start")

        return app

    a = make("a", fail=True)
    await make_platform("a", a)
    await wait_for(lambda: calls["a"] >= 1, 10)
    b = make("b", fail=False)
    await make_platform("b", b)
    # a fails, releases and backs off; b takes over and stays.
    await wait_for(lambda: b.is_leader, 10)
    assert not a.is_leader
    assert a.role.value == "passive"


async def test_hanging_on_active_times_out(make_platform: Any) -> None:
    a = App("svc", Election(hook_timeout=0.5))
    hung = asyncio.Event()

    @a.on_active
    async def hang(ctx: Context) -> None:
        hung.set()
        await asyncio.sleep(3600)

    await make_platform("a", a)
    await asyncio.wait_for(hung.wait(), 10)
    b = App("svc")
    await make_platform("b", b)
    await wait_for(lambda: b.is_leader, 10)
    assert not a.is_leader


async def test_no_failover_node_never_leads(make_platform: Any) -> None:
    a = App("svc", Election(no_failover=True))
    await make_platform("a", a)
    await asyncio.sleep(1.0)  # a lone no-failover node stays a standby
    assert not a.is_leader and a.role.value == "passive"
    b = App("svc")
    await make_platform("b", b)
    await wait_for(lambda: b.is_leader, 10)


async def test_priority_decides_who_leads_after_handover(make_platform: Any) -> None:
    hi, lo, first = App("svc", Election(priority=10)), App("svc", Election(priority=0)), App("svc")
    await make_platform("first", first, priority=5)
    await wait_for(lambda: first.is_leader, 10)
    await make_platform("lo", lo)
    await make_platform("hi", hi)
    await wait_for(lambda: lo.leader == "first" and hi.leader == "first", 5)
    await asyncio.sleep(1.5)  # membership records carry the priorities
    await first.step_down()
    await wait_for(lambda: hi.is_leader or lo.is_leader, 10)
    assert hi.is_leader


async def test_wait_for_leadership(make_platform: Any) -> None:
    a = App("svc")
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    b = App("svc")
    await make_platform("b", b)
    assert not await b.wait_for_leadership(0.3)


async def test_replicas_hold_distinct_slots(make_platform: Any) -> None:
    from pycluster import Replicas

    apps = [App("pool", Replicas(2)) for _ in range(4)]
    platforms = [await make_platform(f"n{i}", a) for i, a in enumerate(apps)]
    await wait_for(lambda: sum(a.is_active for a in apps) == 2, 10)
    for _ in range(10):
        assert sum(a.is_active for a in apps) == 2
        await asyncio.sleep(0.05)
    # A lost replica is replaced.
    victim = next(i for i, a in enumerate(apps) if a.is_active)
    await platforms[victim].stop()
    await wait_for(lambda: sum(a.is_active for a in apps) == 2, 10)


async def test_spread_is_active_everywhere_eligible(make_platform: Any) -> None:
    from pycluster import OnLabel, Spread

    apps = [App("agent", Spread(), OnLabel("tier", "edge")) for _ in range(3)]
    await make_platform("e1", apps[0], labels={"tier": "edge"})
    await make_platform("e2", apps[1], labels={"tier": "edge"})
    await make_platform("c1", apps[2], labels={"tier": "core"})
    await wait_for(lambda: apps[0].is_active and apps[1].is_active, 10)
    assert not apps[2].is_active and apps[2].role.value == "stopped"


@pytest.mark.slow
async def test_repeated_step_downs_always_hand_over(make_platform: Any) -> None:
    """The standby takes every handover, never the node in its cooldown (a lost wake-up once
    let the old leader win again when the delete arrived during the standby's read)."""
    a, b = App("svc"), App("svc")
    await make_platform("a", a)
    await make_platform("b", b)
    await wait_for(lambda: a.is_leader or b.is_leader, 10)
    for _ in range(12):
        cur, other = (a, b) if a.is_leader else (b, a)
        epoch = cur.epoch or 0
        await cur.step_down(cooldown=0.2)
        await wait_for(lambda other=other: other.is_leader, 5)
        assert (other.epoch or 0) > epoch and not cur.is_leader
        await asyncio.sleep(0.25)  # let the old leader's cooldown pass


@pytest.mark.slow
async def test_crash_seen_through_the_poll_when_the_watch_is_silent(make_platform: Any) -> None:
    """An idle standby reads the lease only when a renewal is overdue; with its watch silent
    (the server-side consumer deleted) it still takes over a crashed leader within the
    election's worst-case bound."""
    a, b = App("svc", Singleton()), App("svc", Singleton())
    await make_platform("a", a)
    assert await a.wait_for_leadership(10)
    pb = await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 10)
    eb = b._rt().election
    assert eb is not None and eb._watch_sub is not None
    info = await eb._watch_sub.consumer_info()
    await pb.js.delete_consumer(info.stream_name, info.name)
    await asyncio.sleep(1.0)  # a couple of renewals go unseen by the watch
    assert b.leader == "a" and not b.is_leader
    ea = a._rt().election
    assert ea is not None
    await ea.stop(release=False)  # a crash: the lease stays until the server expires it
    # The bound, plus slack for a loaded machine.
    await wait_for(lambda: b.is_leader, eb.worst_case_failover() + 2.0)
