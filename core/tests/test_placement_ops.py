"""Runtime labels, placement re-evaluation, cordons, maintenance mode and pending apps, on a
real nats-server (platforms in this process; the CLI as real processes)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pytest

from pycluster import App, ConfigError, Context, OnLabel, Singleton, Spread
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
