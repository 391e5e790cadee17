"""Promotion on hub loss with real node processes: a hub zone and two leaf zones, each its own
nats-server (the leaf links through TCP proxies), a witness bus every zone's nodes reach through
their own proxy, and two node processes per zone running one app with `PromoteOnHubFailure`.
Every write the app makes (after ``app.zone.check()``) goes to an external record, one file per
process; the checker reads only that record."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pycluster.testing import wait_for
from pycluster.testing.zones import (
    ZoneNodes,
    ZoneWrite,
    read_zone_writes,
    single_writer_violations,
)

DETECTION = 5.0  # above a local failover (lease 2 s): a killed active node is not a lost zone
ZONES = ("hq", "z1", "z2")


def _w(zone: str, node: str, term: int, epoch: int, t: float) -> ZoneWrite:
    return ZoneWrite(zone, node, term, epoch, t)


@pytest.mark.timeout(10)
def test_the_checker_finds_overlapping_writers(tmp_path: Path) -> None:
    good = [_w("hq", "n1", 1, 3, 1.0), _w("hq", "n2", 1, 4, 2.0), _w("z1", "n1", 2, 1, 3.0),
            _w("z1", "n2", 2, 2, 4.0)]
    assert single_writer_violations(good) == []
    # The old hub writes once more after the new term's first write.
    late = [*good, _w("hq", "n2", 1, 4, 3.5)]
    (msg,) = single_writer_violations(late)
    assert "hq/n2 wrote with token (1, 4)" in msg and "z1/n1 began token (2, 1)" in msg
    # Two zones with the same term, and two nodes of a zone with the same token.
    twice = [*good, _w("z2", "n1", 2, 1, 5.0)]
    assert any("term 2 written by zones z1 and z2" in m for m in
               single_writer_violations(twice))
    assert any("token (2, 1)" in m for m in single_writer_violations(twice))
    # An old active node of a zone writing after its local failover.
    stale = [*good, _w("z1", "n1", 2, 1, 4.5)]
    assert single_writer_violations(stale)
    # Read back from the files the node program writes; a torn last line is skipped.
    (tmp_path / "hq-n1.jsonl").write_text(
        json.dumps({"zone": "hq", "node": "n1", "term": 1, "epoch": 3, "t": 2.0}) + "\n"
        + '{"zone": "hq", "no')
    (tmp_path / "z1-n1.jsonl").write_text(
        json.dumps({"zone": "z1", "node": "n1", "term": 1, "epoch": 1, "t": 1.0}) + "\n")
    writes = read_zone_writes(tmp_path)
    assert [w.zone for w in writes] == ["z1", "hq"]
    assert single_writer_violations(writes)  # term 1 by two zones


@pytest.fixture
async def proc_zones(tmp_path: Path, unique_name: str) -> AsyncIterator[ZoneNodes]:
    async with ZoneNodes(tmp_path, unique_name, zones=ZONES, detection=DETECTION) as zones:
        # The hub zone writes; give the leaves a detection time to follow it.
        await wait_for(lambda: any(w.zone == "hq" for w in zones.writes()), 60)
        await asyncio.sleep(DETECTION)
        yield zones


def _after(writes: list[ZoneWrite], t: float) -> list[ZoneWrite]:
    return [w for w in writes if w.t > t]


async def _partition_status(zones: ZoneNodes, zone: str) -> dict[str, Any]:
    from click.testing import CliRunner

    from pycluster.cli.main import cli
    from pycluster.plugins import create_plugin_manager

    pm = create_plugin_manager(load_entrypoints=False)
    pm.hook.pycluster_add_cli_commands(cli=cli)
    env = {"PYCLUSTER_NATS_URL": zones.servers[zone].url}

    def run() -> str:
        r = CliRunner().invoke(cli, ["partition", "status", "-p", zones.clusters[zone].platform,
                                     "-o", "json"], obj=pm, env=env)
        assert r.exit_code == 0, r.output
        return r.output

    doc: dict[str, Any] = json.loads(await asyncio.to_thread(run))
    return doc


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_node_processes_hub_loss_local_failover_heal_and_a_minority_leaf(
        proc_zones: ZoneNodes) -> None:
    zones = proc_zones
    assert {w.term for w in zones.writes()} == {1}

    # 1. The hub zone is cut off: exactly one leaf zone writes with a higher term, and the hub
    # stopped before that term's first write (the checker).
    cut = time.time()
    zones.cut_zone("hq")

    def promoted() -> ZoneWrite | None:
        return next((w for w in zones.writes() if w.term > 1), None)

    first = await wait_for(promoted, 90)
    winner, term = first.zone, first.term
    assert winner in ("z1", "z2")
    loser = "z2" if winner == "z1" else "z1"
    await asyncio.sleep(DETECTION)
    writes = zones.writes()
    assert {w.zone for w in writes if w.term > 1} == {winner}
    assert {w.term for w in writes if w.term > 1} == {term}
    hub_writes = [w.t for w in writes if w.zone == "hq"]
    assert max(hub_writes) < first.t and max(hub_writes) > cut - 1.0
    assert single_writer_violations(writes) == []
    print(f"cut -> hub's last write {max(hub_writes) - cut:.2f}s, -> term {term} in {winner} "
          f"{first.t - cut:.2f}s")

    # 2. The new primary zone's active node is killed: the zone's other node takes over with
    # the same term (a local failover, a higher local epoch); no other zone promotes.
    active = [w for w in writes if w.zone == winner][-1]
    killed = time.time()
    zones.clusters[winner].kill(active.node)
    other = "n2" if active.node == "n1" else "n1"

    def taken_over() -> ZoneWrite | None:
        return next((w for w in _after(zones.writes(), killed)
                     if w.zone == winner and w.node == other), None)

    took = await wait_for(taken_over, 60)
    last = max(w.t for w in zones.writes() if w.node == active.node and w.zone == winner)
    print(f"local failover in {winner}: {active.node}'s last write -> {other}'s first "
          f"{took.t - last:.2f}s")
    assert took.term == term and took.epoch > active.epoch
    await asyncio.sleep(DETECTION)
    writes = zones.writes()
    assert {w.term for w in writes} == {1, term}
    assert {w.zone for w in _after(writes, killed)} == {winner}
    assert single_writer_violations(writes) == []

    # 3. Heal: the old hub hears the higher term and demotes; it never writes again.
    healed = time.time()
    zones.heal()
    status = await wait_for(lambda: _hub_replica(zones), 60)
    assert status["term"] == term and status["primary_zone"] == winner
    await asyncio.sleep(DETECTION)
    writes = zones.writes()
    assert not [w for w in _after(writes, first.t) if w.zone == "hq"]
    assert any(w.zone == winner for w in _after(writes, healed + DETECTION / 2))

    # 4. The other leaf is cut from everything: a minority, it never writes; the primary keeps
    # its lease with the hub zone and the witness.
    alone = time.time()
    zones.cut_zone(loser)
    await asyncio.sleep(3 * DETECTION)
    writes = zones.writes()
    assert not [w for w in writes if w.zone == loser]
    assert any(w.zone == winner for w in _after(writes, alone + 2 * DETECTION))
    assert {w.term for w in writes} == {1, term}
    # Its candidacies stopped at the pre-vote: its term and votes did not grow (asked on its
    # own server, which the cut leaves reachable from here).
    doc = (await _partition_status(zones, loser))["convex"]
    assert doc["role"] == "replica" and doc["term"] == term and doc["voted"] <= term
    zones.heal()
    assert single_writer_violations(zones.writes()) == []


async def _hub_replica(zones: ZoneNodes) -> dict[str, Any] | None:
    doc = (await _partition_status(zones, "hq")).get("convex")
    return doc if doc and doc.get("role") == "replica" else None
