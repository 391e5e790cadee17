"""The ring on a real nats-server, nodes in one process: exactly-once ownership, minimal moves
on join and leave, fenced epochs, a hanging on_release losing its partitions at its deadline,
Singleton refused, key-routed calls reaching the owner."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from ring_helpers import Witness, ring_app

from pycluster import App, ForKey, Platform, Singleton, Spread
from pycluster.kernel.errors import ConfigError
from pycluster.testing.wait import wait_for
from pycluster_ring import Ring, RingMember, key_partition, moves, ring_of

P = 32


def owners(members: list[RingMember]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for m in members:
        for p in m.partitions():
            out.setdefault(p, []).append(m.node)
    return out


async def all_stable(apps: list[App], timeout: float) -> list[RingMember]:
    """Wait until every node's view is stable and every partition is held exactly once."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        try:
            ms = [ring_of(a) for a in apps]
        except RuntimeError:
            await asyncio.sleep(0.1)
            continue
        held = owners(ms)
        if all(m.stable() for m in ms) and sorted(held) == list(range(ms[0].partitions_count)) \
                and all(len(v) == 1 for v in held.values()):
            return ms
        await asyncio.sleep(0.1)
    raise AssertionError(f"ring not stable within {timeout}s: "
                         f"{[ring_of(a).stats() for a in apps]}")


@pytest.mark.timeout(90)
@pytest.mark.slow
async def test_exactly_once_join_leave_minimal_moves(make_node: Any) -> None:
    w = Witness()
    ring = Ring(partitions=P, settle=0.5)
    apps = [ring_app(w, ring) for _ in range(3)]
    plats = [await make_node(f"n{i}", a) for i, a in enumerate(apps)]
    ms = await all_stable(apps, 30)
    assert all(a.ring is m for a, m in zip(apps, ms, strict=True))  # the app's handle
    per = Counter(len(m.partitions()) for m in ms)
    assert sorted(per.elements()) == [10, 11, 11]
    before = ms[0].assignment()
    epoch0 = ms[0].epoch

    # A 4th node joins: about P/4 partitions move, to it only.
    apps.append(ring_app(w, ring))
    plats.append(await make_node("n3", apps[3]))
    ms = await all_stable(apps, 30)
    after = ms[0].assignment()
    assert ms[0].epoch > epoch0
    moved = moves(before, after)
    assert moved == P // 4, (moved, P // 4)
    assert all(after[p] == "n3" for p in after if before[p] != after[p])
    assert len(ms[3].partitions()) == P // 4

    # n1 leaves gracefully: only its partitions move.
    before = after
    gone = set(ms[1].partitions())
    await plats[1].stop()
    rest = [apps[0], apps[2], apps[3]]
    ms = await all_stable(rest, 30)
    after = ms[0].assignment()
    assert {p for p in after if before[p] != after[p]} == gone
    assert "n1" not in after.values()

    w.check()
    parts = {r[0] for r in w.records}
    assert parts == set(range(P))
    # Epochs: every move got a higher epoch (checked per partition by the witness); the
    # current epochs are those the owners hold.
    for m in ms:
        for p in m.partitions():
            assert m.holds(p, m.owned[p])


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_hanging_release_loses_partitions_at_its_deadline(
        make_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pycluster.ring")
    w = Witness()
    hang = Ring(partitions=8, settle=0.2, release_timeout=1.0)
    a = ring_app(w, hang, release_hang=True)
    await make_node("a", a)
    await all_stable([a], 20)
    b = ring_app(w, Ring(partitions=8, settle=0.2, release_timeout=1.0))
    await make_node("b", b)
    ms = await all_stable([a, b], 30)
    assert len(ms[0].partitions()) == 4 and len(ms[1].partitions()) == 4
    w.check()
    assert any("on_release of" in r.message and "timed out" in r.message
               for r in caplog.records), "the log says the release timed out"


@pytest.mark.timeout(30)
async def test_ring_with_singleton_is_refused(make_node: Any) -> None:
    with pytest.raises(AttributeError, match="once it is registered"):
        _ = App("cache", Spread(), Ring(partitions=4)).ring
    app = App("cache", Singleton(), Ring(partitions=4))
    with pytest.raises(ConfigError, match="Spread"):
        await make_node("x", app)
    with pytest.raises(ConfigError):
        Ring(partitions=0)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_for_key_reaches_the_owner_during_churn(make_node: Any) -> None:
    w = Witness()
    ring = Ring(partitions=P, settle=0.3)
    apps = [ring_app(w, ring) for _ in range(2)]
    for i, a in enumerate(apps):
        await make_node(f"n{i}", a)
    await all_stable(apps, 30)
    caller: Platform = await make_node("caller")
    await caller.service("ring").follow("cache")
    api = caller.api("cache", timeout=10.0)
    keys = [f"key-{i}" for i in range(40)]

    async def calls(n: int) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for i in range(n):
            k = keys[i % len(keys)]
            out.append((k, await api.call("whoami", k, route=ForKey(k), idempotent=True)))
        return out

    task = asyncio.create_task(calls(200))
    apps.append(ring_app(w, ring))
    await make_node("n2", apps[2])
    results = await task
    ms = await all_stable(apps, 30)
    assert len(results) == 200
    # Every answer came from a node that owned the key's partition at that epoch (the
    # handler refuses otherwise), and the final owners answer now.
    for k in keys[:10]:
        r = await api.call("whoami", k, route=ForKey(k), idempotent=True)
        p = key_partition(k, P)
        owner = next(m.node for m in ms if p in m.partitions())
        assert r["node"] == owner
    w.check()


@pytest.mark.timeout(60)
async def test_weights_status_metrics_and_cli(make_node: Any, nats_url: str,
                                              unique_name: str) -> None:
    import json
    import urllib.request

    from click.testing import CliRunner

    from pycluster_ring.cli import ring_group

    w = Witness()
    ring = Ring(partitions=16, settle=0.2)
    a, b = ring_app(w, ring), ring_app(w, ring)
    pa = await make_node("light", a, health_addr="127.0.0.1:0", metrics_addr="127.0.0.1:0")
    await make_node("heavy", b, labels={"ring.weight": "3"})
    ms = await all_stable([a, b], 30)
    assert (len(ms[0].partitions()), len(ms[1].partitions())) == (4, 12)
    assert ms[0].stats()["per_node"] == {"light": 4, "heavy": 12}

    def get(url: str) -> bytes:
        with urllib.request.urlopen(url, timeout=5) as r:
            return bytes(r.read())

    doc = json.loads(await asyncio.to_thread(get, pa.health.url + "/status"))
    assert doc["plugins_status"]["ring"]["cache"]["partitions"] == sorted(ms[0].partitions())
    text = pa.metrics.render().decode()
    assert 'pycluster_ring_partitions{app="cache",node="light"} 4.0' in text
    assert "pycluster_ring_moves_total" in text and "pycluster_ring_rebalance_seconds" in text

    res = await asyncio.to_thread(
        CliRunner().invoke, ring_group,
        ["show", "cache", "-p", unique_name, "--nats-url", nats_url, "--output", "json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert {n: len(ps) for n, ps in shown["owned"].items()} == {"heavy": 12, "light": 4}
    assert shown["unowned"] == [] and shown["misplaced"] == []
    res = await asyncio.to_thread(
        CliRunner().invoke, ring_group,
        ["show", "cache", "-p", unique_name, "--nats-url", nats_url])
    assert res.exit_code == 0 and "heavy" in res.output and "12" in res.output


@pytest.mark.timeout(10)
def test_config_section_builds_the_option(tmp_path: Any) -> None:
    import pycluster_ring.plugin as ring_plugin
    from pycluster.cli.config_apps import apps_from_config
    from pycluster.plugins import create_plugin_manager

    cfg = tmp_path / "node.yaml"
    cfg.write_text("name: prod\nnode_id: n1\napps:\n  - name: cache\n    mode: spread\n"
                   "    ring: {partitions: 128, settle: 2.0}\n")
    pm = create_plugin_manager(load_entrypoints=False, extra=[("ring", ring_plugin)])
    (app,) = apps_from_config(cfg, pm)
    assert app.options == [Ring(partitions=128, settle=2.0)]
    cfg.write_text("name: prod\nnode_id: n1\napps:\n  - name: cache\n    mode: spread\n"
                   "    ring: {partitions: 8, replicas: 2}\n")
    with pytest.raises(Exception, match="replicas"):
        apps_from_config(cfg, pm)


@pytest.mark.timeout(60)
@pytest.mark.slow
async def test_flapping_node_does_not_churn_label_changes_and_drain_rebalance(
        make_node: Any) -> None:
    w = Witness()
    ring = Ring(partitions=16, settle=3.0, min_interval=0.2)
    a, b = ring_app(w, ring), ring_app(w, ring)
    pa = await make_node("a", a)
    await make_node("b", b)
    ms = await all_stable([a, b], 30)
    epoch = ms[0].epoch
    # A node that comes and goes within the settle time never gets partitions.
    flap = await make_node("flap", ring_app(w, ring))
    await asyncio.sleep(0.5)
    await flap.stop()
    await asyncio.sleep(3.5)
    ms = await all_stable([a, b], 10)
    assert ms[0].epoch == epoch and ms[0].stats()["moves_total"] == 0
    # A label change (weight 0: owns nothing) moves a's partitions to b, and back.
    pa.labels["ring.weight"] = "0"
    await wait_for(lambda: len(ring_of(b).partitions()) == 16, 20)
    assert ring_of(a).partitions() == set()
    pa.labels["ring.weight"] = "1"
    await wait_for(lambda: len(ring_of(a).partitions()) == 8, 20)
    await all_stable([a, b], 20)
    # A drain moves a's partitions away while it stays an instance; undrain brings them back.
    assert await ring_of(a).drain(timeout=20)
    await wait_for(lambda: len(ring_of(b).partitions()) == 16, 20)
    await ring_of(a).undrain()
    await wait_for(lambda: len(ring_of(a).partitions()) == 8, 20)
    w.check()


@pytest.mark.timeout(60)
async def test_replicas_mode_only_active_instances_own(make_node: Any) -> None:
    from pycluster import Replicas

    apps = [App("cache", Replicas(2), Ring(partitions=8, settle=0.2)) for _ in range(3)]
    for i, a in enumerate(apps):
        await make_node(f"n{i}", a)
    await wait_for(lambda: sum(a.is_active for a in apps) == 2, 20)
    active = [a for a in apps if a.is_active]
    ms = await all_stable(active, 30)
    assert sorted(len(m.partitions()) for m in ms) == [4, 4]
    standby = next(a for a in apps if not a.is_active)
    with pytest.raises(RuntimeError, match="not an active ring member"):
        ring_of(standby)


@pytest.mark.timeout(60)
@pytest.mark.slow
async def test_failing_on_own_gives_partitions_back_and_retries(
        make_node: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pycluster.ring")
    app = App("cache", Spread(), Ring(partitions=4, settle=0.2, own_timeout=0.5))
    calls: list[frozenset[int]] = []

    @app.on_own
    async def own(ctx: Any) -> None:
        calls.append(ctx.partitions)
        if len(calls) == 1:
            raise RuntimeError("not ready yet")
        if len(calls) == 2:
            await asyncio.sleep(10)  # overruns own_timeout

    await make_node("a", app)
    await wait_for(lambda: len(calls) == 3, 30)  # failed, overran, then succeeded
    (m,) = await all_stable([app], 30)
    assert m.partitions() == {0, 1, 2, 3} and len(calls) == 3
    assert sum("on_own failed" in r.message for r in caplog.records) == 2
