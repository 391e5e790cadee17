"""Runtime labels, placement re-evaluation, cordons, maintenance mode and pending apps, on a
real nats-server (platforms in this process; the CLI as real processes)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest

from pycluster import (
    App,
    AwayFromApp,
    Budget,
    ConfigError,
    Context,
    OnLabel,
    PreferLabel,
    PreferNode,
    Replicas,
    Singleton,
    Spread,
    Strategy,
    WithApp,
)
from pycluster.kernel.placement import Operations, merge_labels, read_operations
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


async def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI as a process (the platforms keep running in this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        *PYCLUSTER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def record_of(p: Any, node: str, app: str) -> dict[str, Any]:
    assert p.membership is not None
    rec = p.membership.members.get(node) or {}
    entry: dict[str, Any] = (rec.get("apps") or {}).get(app) or {}
    return entry


def test_label_validation() -> None:
    assert merge_labels({"a": "1", "b": "2"}, {"b": None, "c": "x"}) == {"a": "1", "c": "x"}
    for bad in ({"": "x"}, {"-a": "x"}, {"a b": "x"}, {"a": "\n"}, {"a": "x" * 300}):
        with pytest.raises(ConfigError):
            merge_labels({}, bad)  # type: ignore[arg-type]
    assert Operations.parse(json.dumps(Operations(True, frozenset({"x"}), {"n": {}})
                                       .as_dict()).encode()).in_maintenance("y")
    with pytest.raises(ValueError):
        Operations.parse(b'{"maintenance": "yes"}')


async def test_label_removed_hands_over_and_fires_placement_invalid(make_platform: Any) -> None:
    fired: list[tuple[str, str | None]] = []
    a = App("db", Singleton(), OnLabel("tier", "db"))
    b = App("db", Singleton(), OnLabel("tier", "db"))

    @a.on_placement_invalid
    async def invalid(ctx: Context) -> None:
        fired.append((ctx.node_id, ctx.reason))

    pa = await make_platform("a", a, labels={"tier": "db"})
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b, labels={"tier": "db"})
    await wait_for(lambda: record_of(pa, "b", "db").get("role") == "passive", 10)
    epoch = a.epoch

    labels = await pa.set_labels({"tier": None, "zone": "z1"})
    assert labels == {"zone": "z1"}
    assert fired == [("a", "placement_invalid")]
    await wait_for(lambda: b.is_leader, 10)
    assert b.epoch is not None and epoch is not None and b.epoch > epoch
    assert not a.is_active
    # Everyone sees a's new labels and that a may no longer run it.
    await wait_for(lambda: (pb.membership.members["a"]["labels"] == {"zone": "z1"}
                            and record_of(pb, "a", "db").get("eligible") is False), 10)
    assert pa.status()["apps"]["db"]["placement_invalid"] is True
    # a does not campaign while invalid: b stepping down goes nowhere but back to b.
    await pa.set_labels({"tier": "db"})
    assert pa.status()["apps"]["db"]["placement_invalid"] is False
    await wait_for(lambda: record_of(pb, "a", "db").get("eligible") is True, 10)
    await b.step_down(successor="a")
    await wait_for(lambda: a.is_leader, 10)
    assert fired == [("a", "placement_invalid")]


async def test_label_added_starts_app_and_clears_pending(make_platform: Any) -> None:
    app = App("gpu-job", Singleton(), OnLabel("gpu"))
    p = await make_platform("a", app)
    await wait_for(lambda: p.status()["apps"]["gpu-job"]["pending"], 10)
    assert app.role.value == "stopped"
    metrics = p.metrics.render().decode()
    assert 'pycluster_placement_pending{app="gpu-job"} 1.0' in metrics
    await p.set_labels({"gpu": "a100"})
    await wait_for(lambda: app.is_leader, 10)
    assert p.status()["apps"]["gpu-job"]["pending"] is False
    assert 'pycluster_placement_pending{app="gpu-job"} 0.0' in p.metrics.render().decode()


async def test_pending_app_starts_when_an_eligible_node_joins(make_platform: Any,
                                                              caplog: Any) -> None:
    a = App("gpu-job", Singleton(), OnLabel("gpu"))
    b = App("gpu-job", Singleton(), OnLabel("gpu"))
    pa = await make_platform("a", a)
    await wait_for(lambda: pa.status()["apps"]["gpu-job"]["pending"], 10)
    assert any("pending" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    await make_platform("b", b, labels={"gpu": "1"})
    await wait_for(lambda: b.is_leader, 10)
    await wait_for(lambda: not pa.status()["apps"]["gpu-job"]["pending"], 10)


@pytest.mark.slow
async def test_label_request_through_the_cli(make_platform: Any, nats_url: str,
                                             unique_name: str) -> None:
    pa = await make_platform("a", App("svc"), labels={"zone": "z1", "disk": "ssd"})
    pb = await make_platform("b", App("svc"))
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    rc, out, err = await cli("node", "label", "a", "zone=z2", "disk-", "rack=r7", *common)
    assert rc == 0, err
    assert json.loads(out) == {"node": "a", "labels": {"zone": "z2", "rack": "r7"}}
    assert pa.labels == {"zone": "z2", "rack": "r7"}
    await wait_for(lambda: pb.membership.members["a"]["labels"] == pa.labels, 10)
    # Refused before anything changes: a bad label, an unknown node.
    rc, out, err = await cli("node", "label", "a", "bad key=x", *common)
    assert rc != 0 and "label" in err
    rc, out, err = await cli("node", "label", "nope", "x=y", *common)
    assert rc != 0 and "not a live node" in err
    assert pa.labels == {"zone": "z2", "rack": "r7"}
    # A raw request with a bad body is refused by the node itself, with the reason.
    assert pa.nc is not None
    reply = await pa.nc.request(f"{unique_name}._.node.a.labels",
                                json.dumps({"set": {"ok": "1", "x y": "2"}}).encode(),
                                timeout=5)
    assert "error" in json.loads(reply.data)
    assert pa.labels == {"zone": "z2", "rack": "r7"}
    rc, out, err = await cli("node", "list", *common)
    assert rc == 0, err
    nodes = {n["node_id"]: n for n in json.loads(out)["nodes"]}
    assert nodes["a"]["labels"] == {"zone": "z2", "rack": "r7"} and not nodes["a"]["cordoned"]


@pytest.mark.slow
async def test_cordoned_node_takes_no_new_leadership(make_platform: Any, nats_url: str,
                                                     unique_name: str) -> None:
    a, b, c = App("svc"), App("svc"), App("svc")
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    # b has the highest priority: without the cordon it would take over first.
    pb = await make_platform("b", b, priority=10)
    await make_platform("c", c)
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    rc, out, err = await cli("node", "cordon", "b", *common)
    assert rc == 0, err
    assert json.loads(out) == {"node": "b", "cordoned": True}
    await wait_for(lambda: pb.placement.cordoned and record_of(pa, "b", "svc").get(
        "eligible") is False, 10)
    assert pb.status()["cordoned"] is True
    await pa.stop()
    await wait_for(lambda: c.is_leader, 10)
    assert not b.is_active
    rc, out, err = await cli("node", "uncordon", "b", *common)
    assert rc == 0, err
    await wait_for(lambda: not pb.placement.cordoned, 10)
    await c.step_down(successor="b")
    await wait_for(lambda: b.is_leader, 10)


async def test_cordon_keeps_running_spread_but_starts_none(make_platform: Any) -> None:
    a, b = App("web", Spread()), App("web", Spread())
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_active, 10)
    await pa.cordon("a")
    await pa.cordon("b")
    pb = await make_platform("b", b)
    await wait_for(lambda: pb.placement.cordoned, 10)
    await asyncio.sleep(1.0)  # several re-evaluations: b must not start its instance
    assert a.is_active and not b.is_active
    await pa.uncordon("b")
    await wait_for(lambda: b.is_active, 10)
    ops, _ = await read_operations(pa.js, pa.name)  # type: ignore[arg-type]
    assert set(ops.cordoned) == {"a"}


@pytest.mark.slow
async def test_changes_are_evaluated_at_once_without_the_slow_pass(
        make_platform: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # No periodic pass (reconcile after an hour, no automatic rebalancing): a cordon written by
    # another node reaches b through the watch of the operations key, and a pending app
    # starts as soon as a member's changed record (new labels) shows an eligible node.
    from pycluster.kernel.placement import Placement

    monkeypatch.setattr(Placement, "RECONCILE", 3600.0)
    a, b = App("web", Spread()), App("web", Spread())
    pa = await make_platform("a", a)
    pb = await make_platform("b", b)
    await wait_for(lambda: a.is_active and b.is_active, 10)
    await pa.cordon("b")
    await wait_for(lambda: pb.placement.cordoned, 5)
    await pa.uncordon("b")
    await wait_for(lambda: not pb.placement.cordoned, 5)
    jobs = [App("gpu-job", Singleton(), OnLabel("gpu", "yes")) for _ in range(2)]
    pc = await make_platform("c", jobs[0])
    pd = await make_platform("d", jobs[1])
    await wait_for(lambda: pc.status()["apps"]["gpu-job"]["pending"], 10)
    await pd.set_labels({"gpu": "yes"})  # d starts it; c learns it from d's changed record
    await wait_for(lambda: not pc.status()["apps"]["gpu-job"]["pending"], 5)
    await wait_for(lambda: jobs[1].is_leader, 10)


@pytest.mark.slow
async def test_maintenance_withholds_failover_until_off(make_platform: Any, nats_url: str,
                                                        unique_name: str) -> None:
    a, b = App("svc"), App("svc")
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 10)
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    rc, out, err = await cli("maintenance", "on", "svc", *common)
    assert rc == 0, err
    assert json.loads(out) == {"maintenance": False, "maintenance_apps": ["svc"]}
    await wait_for(lambda: pb.status()["apps"]["svc"]["maintenance"], 10)
    assert 'pycluster_maintenance{app="svc"} 1.0' in pb.metrics.render().decode()
    await pa.stop()  # the lease is released: any standby could take it at once
    until = time.monotonic() + 3 * 2.0  # three leases
    while time.monotonic() < until:
        assert not b.is_active
        await asyncio.sleep(0.1)
    assert b.leader is None
    rc, out, err = await cli("maintenance", "off", "svc", *common)
    assert rc == 0, err
    await wait_for(lambda: b.is_leader, 10)


async def test_soft_preferences_choose_the_next_leader(make_platform: Any) -> None:
    def app() -> App:
        return App("svc", PreferLabel("disk", "ssd", weight=5), PreferNode("c", weight=1))

    a, b, c = app(), app(), app()
    # A 4 s lease: b defers 1 s behind c (the rank step), a margin that holds under load.
    timing = {"lease_ttl": 4.0, "heartbeat_interval": 1.0}
    pa = await make_platform("a", a, labels={"disk": "hdd"}, **timing)
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b, labels={"disk": "ssd"}, **timing)
    pc = await make_platform("c", c, labels={"disk": "ssd"}, **timing)
    await wait_for(lambda: {"b", "c"} <= set(pa.placement.standbys(a, pa.placement.view())), 10)
    # b and c both have ssd (+5); c is also the preferred node (+1); a has neither.
    assert [n for n, _ in pa.placement.candidates(a)] == ["c", "b", "a"]
    await wait_for(lambda: pb.placement.rank(b) == 1 and pc.placement.rank(c) == 0, 10)
    await pa.stop()
    await wait_for(lambda: c.is_leader, 10)
    assert not b.is_active
    await pc.set_labels({"disk": "hdd"})  # now b scores best
    await asyncio.sleep(0.5)
    assert c.is_leader  # preferences rank standbys; they never move a healthy leader
    await wait_for(lambda: pc.placement.rank(c) == 1, 10)


async def test_hard_anti_affinity_moves_an_instance_away(make_platform: Any) -> None:
    fired: list[str] = []

    def node_apps() -> tuple[App, App]:
        db = App("db")
        cache = App("cache", AwayFromApp("db"))

        @cache.on_placement_invalid
        async def invalid(ctx: Context) -> None:
            fired.append(ctx.node_id)

        return db, cache

    db_a, cache_a = node_apps()
    db_b, cache_b = node_apps()
    pa = await make_platform("a", db_a, cache_a)
    await wait_for(lambda: db_a.is_leader, 10)
    await make_platform("b", db_b, cache_b)
    # Wherever cache first went, it ends up away from db (on b), by one hand-over at most.
    await wait_for(lambda: cache_b.is_leader and db_a.is_leader, 15)
    assert not cache_a.is_active
    assert set(fired) <= {"a"}
    assert pa.status()["apps"]["cache"]["placement_invalid"] is True


async def test_hard_affinity_runs_only_with_the_other_app(make_platform: Any) -> None:
    db_a, side_a = App("db"), App("sidecar", WithApp("db"))
    db_b, side_b = App("db"), App("sidecar", WithApp("db"))
    await make_platform("a", db_a, side_a)
    await wait_for(lambda: db_a.is_leader and side_a.is_leader, 15)
    pb = await make_platform("b", db_b, side_b)
    # db is not active on b: its sidecar does not even start there.
    await wait_for(lambda: record_of(pb, "a", "sidecar").get("role") == "active", 10)
    assert side_b.role.value == "stopped" and not pb.status()["apps"]["sidecar"]["pending"]
    await db_a.step_down(successor="b")
    # db moved to b: the sidecar follows it (a's placement is invalid now: it hands over).
    await wait_for(lambda: db_b.is_leader and side_b.is_leader, 15)
    assert not side_a.is_active


async def test_strategies_weigh_candidates(make_platform: Any) -> None:
    busy = App("busy")
    x_a = App("x")
    await make_platform("a", busy, x_a)
    await wait_for(lambda: busy.is_leader, 10)
    x_b = App("x")
    pb = await make_platform("b", x_b)
    await wait_for(lambda: "a" in (pb.membership.members if pb.membership else {}), 10)
    await wait_for(lambda: record_of(pb, "a", "busy").get("role") == "active", 10)
    view = pb.placement.view()
    node_a, node_b = view.node_info("a"), view.node_info("b")
    # spread (default): a runs another active instance, b none.
    assert pb.placement.score(x_b, node_b, view) > pb.placement.score(x_b, node_a, view)
    packed = App("packed", Strategy("binpack"))
    assert (pb.placement.score(packed, node_a, view)
            > pb.placement.score(packed, node_b, view))
    zoned = App("busy", Strategy("zone", label="zone"))
    # zone: busy is active on a; b is in the same (unlabelled) zone, a's own instance does
    # not count against a.
    assert pb.placement.score(zoned, node_b, view) == -1.0
    assert pb.placement.score(zoned, node_a, view) == 0.0
    with pytest.raises(ConfigError):
        PreferLabel("disk", weight=float("nan"))


@pytest.mark.slow
async def test_app_list_and_show(make_platform: Any, nats_url: str, unique_name: str) -> None:
    a = App("db", OnLabel("tier", "db"), PreferLabel("disk", "ssd"))
    pa = await make_platform("a", a, labels={"tier": "db"})
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", App("db", OnLabel("tier", "db"), PreferLabel("disk", "ssd")),
                        App("gpu", OnLabel("gpu")))
    await pa.cordon("b")
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")

    async def apps() -> dict[str, Any]:
        rc, out, err = await cli("app", "list", *common)
        assert rc == 0, err
        return {x["app"]: x for x in json.loads(out)}

    await wait_for(lambda: pa.membership is not None and "b" in pa.membership.members, 10)
    listed = await apps()
    assert listed["db"]["leader"] == "a" and listed["db"]["active_on"] == ["a"]
    assert listed["db"]["placement"] == ["OnLabel(key='tier', value='db')",
                                         "PreferLabel(key='disk', value='ssd', weight=10.0)"]
    assert listed["gpu"]["pending"] is True and listed["db"]["pending"] is False
    rc, out, err = await cli("app", "show", "db", *common)
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["nodes"]["a"]["role"] == "active" and shown["nodes"]["b"]["cordoned"] is True
    assert shown["nodes"]["b"]["eligible"] is False  # not labelled tier=db
    rc, out, err = await cli("app", "show", "nope", "--nats-url", nats_url, "--platform",
                             unique_name)
    assert rc != 0 and "nope" in err
    rc, out, err = await cli("app", "list", "--nats-url", nats_url, "--platform", unique_name)
    assert rc == 0 and "pending" in out and "OnLabel" in out


@pytest.mark.slow
async def test_move_to_a_named_node_with_veto(make_platform: Any, nats_url: str,
                                              unique_name: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []
    veto = {"on": True}

    def app() -> App:
        a = App("svc")

        @a.on_migration_start
        async def start(ctx: Context) -> None:
            seen.append(("start", dict(ctx.extra)))
            if veto["on"]:
                raise RuntimeError("not now")

        @a.on_migration_complete
        async def done(ctx: Context) -> None:
            seen.append(("complete", dict(ctx.extra)))

        return a

    a, b, c = app(), app(), app()
    pa = await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b)
    pc = await make_platform("c", c)
    await wait_for(lambda: record_of(pa, "c", "svc").get("role") == "passive", 10)
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    rc, out, err = await cli("app", "move", "svc", "--to", "c", *common)
    assert rc != 0 and "vetoed" in err and "not now" in err
    assert a.is_leader
    veto["on"] = False
    rc, out, err = await cli("app", "move", "svc", "--to", "c", "--reason", "kernel upgrade",
                             *common)
    assert rc == 0, err
    res = json.loads(out)
    assert res["outcome"] == "completed" and res["from"] == "a" and res["to"] == "c"
    assert c.is_leader
    moved = {"from": "a", "to": "c", "reason": "kernel upgrade"}
    assert ("start", moved) in seen and ("complete", moved) in seen
    metrics = pa.metrics.render().decode()
    assert 'pycluster_migrations_total{app="svc",outcome="completed"} 1.0' in metrics
    assert 'pycluster_migrations_total{app="svc",outcome="vetoed"} 1.0' in metrics
    assert 'pycluster_migration_seconds_count{app="svc"} 1.0' in metrics
    # Refused: a cordoned target; the API asks the leader over NATS from any node.
    await pa.cordon("b")
    with pytest.raises(ConfigError, match="cordoned"):
        await pa.move("svc", to="b")
    await pa.uncordon("b")
    # The app migrated a moment ago: its cooldown holds a second move, unless forced.
    with pytest.raises(ConfigError, match="cooldown"):
        await pa.move("svc", to="b")
    res = await pa.move("svc", to="b", force=True)
    assert res["outcome"] == "completed" and b.is_leader
    assert pc.audit is not None and await pc.audit.flush()
    await pa.audit.flush()
    entries = await pa.audit.query(category="placement")
    actions = {e.action for e in entries}
    assert {"migration_vetoed", "migration_started", "migration_completed", "cordoned",
            "uncordoned"} <= actions


async def test_drain_moves_instances_one_at_a_time_within_the_budget(
        make_platform: Any, nats_url: str, unique_name: str) -> None:
    from pycluster.cli.placement_cmd import drain

    def apps() -> tuple[App, App]:
        return App("r", Replicas(2), Budget(min_available=1)), App("s")

    ra, sa = apps()
    pa = await make_platform("a", ra, sa)
    await wait_for(lambda: ra.is_active and sa.is_leader, 10)
    rb, sb = apps()
    await make_platform("b", rb, sb)
    await wait_for(lambda: rb.is_active, 10)
    rc, sc = apps()
    await make_platform("c", rc, sc)
    await wait_for(lambda: all(record_of(pa, n, a).get("role") == "passive"
                               for n, a in (("c", "r"), ("c", "s"), ("b", "s"))), 10)

    # An outside witness: a plain NATS client reading the membership records of r.
    import nats as nats_client

    witness = await nats_client.connect(nats_url)
    low: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        js = witness.jetstream()
        from pycluster.kernel import natsutil as nu

        while not stop.is_set():
            recs = await nu.live_values(js, f"{unique_name}_platform", "nodes.")
            active = sum(1 for rec in recs.values()
                         if (rec.get("apps") or {}).get("r", {}).get("role") == "active")
            low.append(active)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(watch())
    events: list[dict[str, Any]] = []
    try:
        res = await drain(nats_url, unique_name, "a", 30, progress=events.append)
    finally:
        stop.set()
        await task
        await witness.close()
    assert res["drained"] is True and res["remaining"] == []
    assert sorted(m["app"] for m in res["moved"]) == ["r", "s"]
    assert not ra.is_active and not sa.is_active
    await wait_for(lambda: rc.is_active and (sb.is_leader or sc.is_leader), 10)
    assert low and min(low) >= 1, f"the budget broke: {min(low)} active"
    assert pa.status()["cordoned"] or "a" in pa.placement.ops.cordoned


@pytest.mark.slow
async def test_drain_waits_for_the_budget_and_says_why(make_platform: Any, nats_url: str,
                                                       unique_name: str) -> None:
    from pycluster.cli.placement_cmd import drain

    ra = App("r", Replicas(2), Budget(min_available=2))
    await make_platform("a", ra)
    await wait_for(lambda: ra.is_active, 10)
    rb = App("r", Replicas(2), Budget(min_available=2))
    pb = await make_platform("b", rb)
    await wait_for(lambda: rb.is_active, 10)
    await make_platform("c", App("r", Replicas(2), Budget(min_available=2)))
    await wait_for(lambda: record_of(pb, "c", "r").get("role") == "passive", 10)
    events: list[dict[str, Any]] = []
    res = await drain(nats_url, unique_name, "a", 3, progress=events.append)
    assert res["drained"] is False and res["remaining"] == ["r"] and res["moved"] == []
    assert events and "budget needs 2" in events[0]["waiting"]
    assert ra.is_active and rb.is_active
    rc, out, _ = await cli("node", "drain", "b", "--timeout", "2", "--nats-url", nats_url,
                             "--platform", unique_name)
    assert rc == 1 and "waiting" in out and "budget" in out


@pytest.mark.slow
async def test_rebalance_moves_to_the_newly_preferred_node(make_platform: Any, nats_url: str,
                                                           unique_name: str) -> None:
    moves: list[dict[str, Any]] = []

    def app() -> App:
        a = App("svc", PreferLabel("disk", "ssd", weight=5))

        @a.on_migration_complete
        async def done(ctx: Context) -> None:
            moves.append(dict(ctx.extra))

        return a

    a, b = app(), app()
    pa = await make_platform("a", a, labels={"disk": "ssd"})
    await wait_for(lambda: a.is_leader, 10)
    pb = await make_platform("b", b, labels={"disk": "hdd"})
    await wait_for(lambda: record_of(pa, "b", "svc").get("role") == "passive", 10)
    common = ("--nats-url", nats_url, "--platform", unique_name, "--output", "json")
    rc, out, err = await cli("app", "rebalance", "--dry-run", *common)
    assert rc == 0, err
    assert [r["outcome"] for r in json.loads(out)] == ["balanced"]
    # The labels change: b is now preferred. Nothing moves by itself ...
    await pa.set_labels({"disk": "hdd"})
    await pb.set_labels({"disk": "ssd"})
    await wait_for(lambda: pa.membership.members["b"]["labels"] == {"disk": "ssd"}, 10)
    assert a.is_leader
    rc, out, err = await cli("app", "rebalance", "svc", "--dry-run", *common)
    assert rc == 0, err
    (plan,) = json.loads(out)
    assert plan["outcome"] == "planned" and plan["to"] == "b"
    assert plan["scores"]["b"] > plan["scores"]["a"] and a.is_leader
    # ... until the operator asks: one graceful hand-over, a migration like any other.
    rc, out, err = await cli("app", "rebalance", "svc", *common)
    assert rc == 0, err
    (done,) = json.loads(out)
    assert done["outcome"] == "completed" and b.is_leader
    assert moves == [{"from": "a", "to": "b", "reason": "rebalance"}]
