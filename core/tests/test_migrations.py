"""Migration safety and automatic rebalancing: maintenance windows, hysteresis, the
platform-wide migration slots (cooldowns, concurrent and per-minute limits) on a real
nats-server and a 3-server R3 cluster, automatic moves and operator moves in maintenance mode
with platforms in this process."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import pytest

from pycluster import App, ConfigError, Context, PreferLabel, Rebalance
from pycluster.kernel import natsutil as nu
from pycluster.kernel.migrations import (
    MIGRATIONS_KEY,
    MigrationSlots,
    MigrationWaiting,
    SlotState,
    Window,
    clearly_better,
    in_windows,
    parse_windows,
)
from pycluster.kernel.settings import load_settings
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


def at(day: int, hh: int, mm: int) -> datetime:
    """``day`` days after Monday 2026-11-30, at ``hh:mm`` UTC."""
    return datetime(2026, 11, 30, hh, mm, tzinfo=UTC) + timedelta(days=day)


def test_window_parsing_and_membership() -> None:
    w = Window.parse("mon-fri 02:00-04:30")
    assert w.days == frozenset(range(5)) and (w.start, w.end) == (120, 270)
    assert w.contains(at(0, 2, 0)) and w.contains(at(4, 4, 29))  # Monday, Friday
    assert not w.contains(at(4, 4, 30)) and not w.contains(at(5, 3, 0))  # end; Saturday
    night = Window.parse("sat,sun 22:00-06:00")
    assert night.contains(at(5, 23, 0)) and night.contains(at(6, 5, 59))
    assert night.contains(at(7, 1, 0))  # Monday morning: the Sunday window
    assert not night.contains(at(5, 5, 0))  # Saturday morning: Friday has none
    daily = Window.parse("01:00-03:00 UTC")
    assert daily.days == frozenset(range(7)) and daily.contains(at(3, 1, 0))
    assert Window.parse("fri-mon 00:00-24:00").days == frozenset({4, 5, 6, 0})
    assert in_windows((), at(0, 12, 0))
    assert in_windows(parse_windows(["mon 11:00-13:00", "tue 00:00-01:00"]), at(0, 12, 0))
    assert not in_windows(parse_windows(["mon 13:00-14:00"]), at(0, 12, 0))
    for bad in ("", "2-4", "mon 25:00-26:00", "xyz 01:00-02:00", "01:00-01:00",
                "01:60-02:00", "mon-fri"):
        with pytest.raises(ConfigError):
            Window.parse(bad)
    with pytest.raises(ConfigError):
        load_settings(None, maintenance_windows=["sometimes"])
    assert load_settings(None, maintenance_windows=["mon 01:00-02:00"]).maintenance_windows


def test_hysteresis_and_rebalance_option() -> None:
    assert clearly_better(0, 10, 10) and not clearly_better(0, 9.5, 10)
    assert not clearly_better(5, 5, 0) and clearly_better(5, 5.5, 0)
    assert not clearly_better(10, 0, 10)
    r = Rebalance(auto=True, threshold=3, cooldown=0, windows=["mon 01:00-02:00"])  # type: ignore[arg-type]
    assert r.windows == ("mon 01:00-02:00",)
    for bad in ({"threshold": -1}, {"cooldown": float("nan")}, {"auto": "yes"},
                {"windows": ("never",)}):
        with pytest.raises(ConfigError):
            Rebalance(**bad)  # type: ignore[arg-type]
    app = App("x", r)
    assert app.rebalance is r


def test_slot_state_of_the_wrong_shape_counts_as_empty() -> None:
    for data in (b"", b"[]", b"{", b'{"leases": 3, "last": [], "starts": {}}'):
        s = SlotState.parse(data)
        assert (s.leases, s.last, s.starts) == ({}, {}, [])
    s = SlotState.parse(b'{"leases": {"a": {"expires": 5}, "b": 1}, "last": {"x": 2, "y": "z"}}')
    assert list(s.leases) == ["a"] and s.last == {"x": 2.0}


async def _bucket(url: str | list[str], name: str, replicas: int = 1) -> Any:
    nc = await nats.connect(servers=url if isinstance(url, list) else [url])
    await nu.ensure_kv(nc.jetstream(), f"{name}_platform", replicas=replicas)
    return nc


async def test_slots_cooldown_rate_and_expiry(nats_url: str, unique_name: str) -> None:
    nc = await _bucket(nats_url, unique_name)
    now = [1000.0]
    try:
        slots = MigrationSlots(nc.jetstream, unique_name, max_concurrent=1, per_minute=2,
                               clock=lambda: now[0])
        lease = await slots.acquire("a", "n1", ttl=30, cooldown=60, reason="drain")
        with pytest.raises(MigrationWaiting, match="is running"):
            await slots.acquire("a", "n2", ttl=30, cooldown=0, reason="move")
        with pytest.raises(MigrationWaiting, match="at most 1 at once"):
            await slots.acquire("b", "n2", ttl=30, cooldown=60, reason="move")
        await slots.release(lease, "a", moved=True)
        now[0] += 10
        with pytest.raises(MigrationWaiting, match="cooldown 60s: 50s left"):
            await slots.acquire("a", "n2", ttl=30, cooldown=60, reason="auto")
        # A crashed migrator: its lease expires and frees the slot.
        await slots.acquire("b", "n2", ttl=5, cooldown=60, reason="move")
        now[0] += 6
        with pytest.raises(MigrationWaiting, match="2 migrations started in the last minute"):
            await slots.acquire("c", "n3", ttl=5, cooldown=60, reason="move")
        now[0] += 60
        lease = await slots.acquire("a", "n2", ttl=30, cooldown=60, reason="auto")
        state, _ = await slots.read()
        assert list(state.leases) == [lease] and state.leases[lease]["node"] == "n2"
    finally:
        await nc.close()


async def _race_for_slots(urls: list[list[str]], name: str, replicas: int) -> None:
    """Contenders on their own connections (and servers) race for 2 slots while a witness
    (a plain client) samples the stored leases; each contender also records when it held
    one. Never more than 2 at once, by either account."""
    setup = await _bucket(urls[0], name, replicas)
    conns = [await nats.connect(servers=u) for u in urls]
    witness = await nats.connect(servers=urls[-1])
    held: list[tuple[float, float]] = []
    seen: list[int] = []
    stop = asyncio.Event()

    async def contender(i: int, nc: Any) -> None:
        slots = MigrationSlots(nc.jetstream, name, max_concurrent=2, per_minute=10_000)
        done = 0
        while done < 4:
            try:
                lease = await slots.acquire(f"app{i}", f"n{i}", ttl=30, cooldown=0,
                                            reason="test")
            except MigrationWaiting:
                await asyncio.sleep(0.01)
                continue
            t0 = time.monotonic()
            await asyncio.sleep(0.05)
            t1 = time.monotonic()
            await slots.release(lease, f"app{i}", moved=True)
            held.append((t0, t1))
            done += 1

    async def watch() -> None:
        js = witness.jetstream()
        while not stop.is_set():
            msg = await nu.last_msg(js, f"{name}_platform", MIGRATIONS_KEY, direct=False)
            if msg is not None:
                seen.append(len(json.loads(msg.data)["leases"]))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(asyncio.gather(
            *(contender(i, nc) for i, nc in enumerate(conns * 2))), 60)
    finally:
        stop.set()
        await task
        for c in (*conns, witness, setup):
            await c.close()
    assert len(held) == 4 * 2 * len(conns)
    points = sorted([(t0, 1) for t0, _ in held] + [(t1, -1) for _, t1 in held])
    level = peak = 0
    for _, d in points:
        level += d
        peak = max(peak, level)
    assert peak <= 2, f"{peak} migrations held a slot at once"
    assert seen and max(seen) <= 2 and max(seen) >= 1


@pytest.mark.slow
async def test_slots_hold_under_contention(nats_url: str, unique_name: str) -> None:
    await _race_for_slots([[nats_url]] * 3, unique_name, 1)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_slots_hold_under_contention_on_an_r3_cluster(nats_cluster: Any,
                                                            unique_name: str) -> None:
    await _race_for_slots([[u] for u in nats_cluster.urls], unique_name, 3)


def record_of(p: Any, node: str, app: str) -> dict[str, Any]:
    assert p.membership is not None
    rec = p.membership.members.get(node) or {}
    entry: dict[str, Any] = (rec.get("apps") or {}).get(app) or {}
    return entry


@pytest.mark.slow
async def test_auto_rebalance_moves_once_after_a_label_change(make_platform: Any) -> None:
    """A label change makes b clearly better: the leader migrates there by itself, once, with
    one graceful hand-over; in maintenance mode the same change moves nothing."""
    moves: list[dict[str, Any]] = []

    def app() -> App:
        a = App("svc", PreferLabel("disk", "ssd", weight=20),
                Rebalance(auto=True, threshold=10, cooldown=0))

        @a.on_migration_complete
        async def done(ctx: Context) -> None:
            moves.append(dict(ctx.extra))

        return a

    a, b, c = app(), app(), app()
    pa = await make_platform("a", a, labels={"disk": "ssd"})
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b, labels={"disk": "hdd"})
    await make_platform("c", c, labels={"disk": "hdd"})
    await wait_for(lambda: {record_of(pa, n, "svc").get("role") for n in "bc"} == {"passive"},
                   10)
    await asyncio.sleep(2)
    assert a.is_leader and moves == []  # balanced: nothing moves
    # Maintenance mode: b becomes preferred, but automation waits.
    await pa.set_maintenance(True, "svc")
    await pa.set_labels({"disk": "hdd"})
    await pb.set_labels({"disk": "ssd"})
    await wait_for(lambda: pa.membership.members["b"]["labels"] == {"disk": "ssd"}, 10)
    await asyncio.sleep(3)
    assert a.is_leader and moves == []
    await pa.set_maintenance(False, "svc")
    await wait_for(lambda: b.is_leader, 15)
    await asyncio.sleep(3)  # no ping-pong, no second move
    assert b.is_leader and moves == [{"from": "a", "to": "b", "reason": "auto"}]
    metrics = pa.metrics.render().decode()
    assert 'pycluster_migrations_total{app="svc",outcome="completed"} 1.0' in metrics


@pytest.mark.slow
async def test_auto_rebalance_waits_outside_the_windows_and_for_the_cooldown(
        make_platform: Any, caplog: pytest.LogCaptureFixture) -> None:
    now = datetime.now(UTC)
    other_day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[(now.weekday() + 3) % 7]
    a = App("svc", PreferLabel("disk", "ssd", weight=20),
            Rebalance(auto=True, windows=(f"{other_day} 00:00-00:01",), cooldown=0))
    b = App("svc", PreferLabel("disk", "ssd", weight=20),
            Rebalance(auto=True, windows=(f"{other_day} 00:00-00:01",), cooldown=0))
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b, labels={"disk": "ssd"})
    caplog.set_level("INFO", "pycluster.placement")
    await wait_for(lambda: "outside the maintenance windows" in caplog.text, 15)
    assert a.is_leader
    # The operator's move is not bound to the windows; its cooldown then holds automatic
    # moves back (b now prefers a again, with no windows).
    res = await pa.move("svc", to="b")
    assert res["outcome"] == "completed" and b.is_leader
    b.rebalance = Rebalance(auto=True, cooldown=60)
    await pa.set_labels({"disk": "ssd"})
    await pb_labels(b, {"disk": None})
    await wait_for(lambda: "cooldown 60s" in caplog.text, 15)
    assert b.is_leader
    with pytest.raises(ConfigError, match="cooldown"):
        await pa.move("svc", to="a")
    res = await pa.move("svc", to="a", force=True)
    assert res["outcome"] == "completed" and a.is_leader


async def pb_labels(app: App, labels: dict[str, str | None]) -> None:
    assert app.platform is not None
    await app.platform.set_labels(labels)


@pytest.mark.slow
async def test_operator_moves_in_maintenance_mode(make_platform: Any) -> None:
    """Maintenance mode: the operator moves a led app (graceful hand-over) and places a
    leaderless one (the named node takes the vacant lease); nobody else campaigns."""
    a, b, c = App("svc"), App("svc"), App("svc")
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b, migration_cooldown=0)
    pc = await make_platform("c", c)
    await wait_for(lambda: {record_of(pa, n, "svc").get("role") for n in "bc"} == {"passive"},
                   10)
    await pa.set_maintenance(True)
    await wait_for(lambda: pb.placement.ops.maintenance and pc.placement.ops.maintenance, 10)
    with pytest.raises(ConfigError, match="maintenance"):
        await pa.placement.migrate(a, "b")  # not named by an operator
    res = await pb.move("svc", to="c", force=True)
    assert res["outcome"] == "completed" and c.is_leader and not a.is_active
    assert pb.placement.ops.operator_moves == {}
    await pc.stop()  # the leader leaves: nobody takes over in maintenance mode
    await asyncio.sleep(3 * 2.0)
    assert not a.is_active and not b.is_active
    res = await pb.move("svc", to="b")
    assert res["outcome"] == "completed" and res["from"] is None and b.is_leader
    assert not a.is_active
    await wait_for(lambda: pa.placement.ops.operator_moves == {}, 5)


async def test_replicas_slot_hands_over_to_a_chosen_node(make_platform: Any) -> None:
    """Replicas(2): the slot on a named node moves to a chosen standby (`source`, `to`),
    taking a migration slot like any move; the other slot stays where it is."""
    from pycluster import Replicas

    apps = [App("r", Replicas(2)) for _ in range(3)]
    pa = await make_platform("a", apps[0])
    await wait_for(lambda: apps[0].is_active, 10)
    await make_platform("b", apps[1])
    await wait_for(lambda: apps[1].is_active, 10)
    await make_platform("c", apps[2])
    await wait_for(lambda: record_of(pa, "c", "r").get("role") == "passive", 10)
    res = await pa.move("r", to="c", source="b")
    assert res["outcome"] == "completed" and res["from"] == "b" and res["to"] == "c"
    await wait_for(lambda: apps[2].is_active and not apps[1].is_active, 10)
    assert apps[0].is_active
    state, _ = await pa.placement.slots.read()
    assert state.leases == {} and "r" in state.last


@pytest.mark.slow
async def test_spread_instance_leaves_a_cordoned_node_after_the_target_runs(
        make_platform: Any) -> None:
    """A Spread instance moves only off a cordoned node, once the named target's instance is
    active (start before stop), within the budget; a cordoned target is refused."""
    from pycluster import Budget, Spread

    def app() -> App:
        return App("sp", Spread(), Budget(min_available=2))

    a, b, c = app(), app(), app()
    pa = await make_platform("a", a, migration_cooldown=0)
    await make_platform("b", b)
    await make_platform("c", c)
    await wait_for(lambda: a.is_active and b.is_active and c.is_active, 10)
    await wait_for(lambda: all(record_of(pa, n, "sp").get("role") == "active" for n in "bc"),
                   10)
    with pytest.raises(ConfigError, match="cordoned node only"):
        await pa.move("sp", source="a", to="b")
    await pa.cordon("a")
    await pa.cordon("c")
    with pytest.raises(ConfigError, match="cordoned"):
        await pa.move("sp", source="a", to="c")
    res = await pa.move("sp", source="a", to="b")
    assert res["outcome"] == "completed" and res["to"] == "b"
    assert not a.is_active and b.is_active and c.is_active
    await asyncio.sleep(1.5)  # re-evaluations: a cordoned node does not start it again
    assert not a.is_active
    # Two left, the budget needs two: the next one waits.
    await wait_for(lambda: record_of(pa, "b", "sp").get("role") == "active", 5)
    pc = c.platform
    assert pc is not None
    from pycluster.kernel.placement import BudgetBlocked

    with pytest.raises(BudgetBlocked, match="budget needs 2"):
        await pc.placement.vacate(c)
