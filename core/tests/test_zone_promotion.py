"""Promotion on hub loss: the pure vote rules, then a hub and two leaf zones plus a witness
(every link through a TCP proxy, so a zone is cut off without root), with an external record of
every write each zone's app makes (zone, term, wall time): at most one writer per moment, the
old hub never writes after the new term began, a minority leaf never promotes, the partition
strategies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from pycluster import App, ConfigError, HubListen, LeafOf, Platform, Singleton, hookimpl
from pycluster.builtin.leaf.service import ZoneService
from pycluster.builtin.leaf.zones import AppZone
from pycluster.kernel.zones import (
    Partition,
    PromoteOnHubFailure,
    VoteRequest,
    VoterView,
    ZoneFencedError,
    candidate_term,
    grant_vote,
    lease_holds,
    promotion_wait,
    quorum_size,
)
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.cli import cli_output
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.servers import free_port
from pycluster.testing.zones import Witness, Write
from pycluster.testing.zones import assert_single_writer as single_writer

LEAF_USER, LEAF_PASSWORD = "leaf", "leaf-link-secret"
DETECTION = 2.0

# -- the pure rules ----------------------------------------------------------------------------


def _view(**kw: Any) -> VoterView:
    base: dict[str, Any] = {"zone": "z2", "votes": {}, "primary_term_seen": 1,
                            "primary_platform": "hub", "silent_for": 5.0}
    base.update(kw)
    return VoterView(**base)


@pytest.mark.timeout(10)
def test_grant_rules() -> None:
    req = VoteRequest("z1", "edge1", 2, position=10)
    assert grant_vote(_view(), req, DETECTION) == (True, "granted")
    # (a) one candidate per term; the same candidate again is granted again.
    assert not grant_vote(_view(votes={2: "z3"}), req, DETECTION)[0]
    assert grant_vote(_view(votes={2: "z1"}), req, DETECTION)[0]
    assert "later term" in grant_vote(_view(votes={3: "z3"}), req, DETECTION)[1]
    # (b) the primary still answers this voter, or this voter is the primary.
    assert "answered" in grant_vote(_view(silent_for=0.5), req, DETECTION)[1]
    assert "never votes" in grant_vote(_view(is_primary=True, silent_for=0), req,
                                       DETECTION)[1]
    # ... but the primary the voter follows may renew its term.
    renew = VoteRequest("hq", "hub", 3)
    assert grant_vote(_view(votes={2: "z1"}, silent_for=0.1), renew, DETECTION)[0]
    # (c) the candidate is at least as caught up.
    assert "behind" in grant_vote(_view(position=11), req, DETECTION)[1]
    assert grant_vote(_view(position=10), req, DETECTION)[0]
    assert not grant_vote(_view(position=3), VoteRequest("z1", "edge1", 2), DETECTION)[0]
    # (d) above every primary term seen.
    assert "not above" in grant_vote(_view(primary_term_seen=2), req, DETECTION)[1]
    pre = VoteRequest("z1", "edge1", 2, 4, pre=True)
    assert VoteRequest.from_dict(pre.as_dict()) == pre
    with pytest.raises(ValueError):
        VoteRequest.from_dict({"zone": "z1"})
    # A zone's own candidacy needs only (a) and (d).
    assert grant_vote(_view(zone="z1", silent_for=0), req, DETECTION)[0]


@pytest.mark.timeout(10)
def test_terms_quorum_lease() -> None:
    assert candidate_term(1, 0) == 2 and candidate_term(1, 5) == 6 and candidate_term(0, 0) == 2
    assert [quorum_size(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert quorum_size(4, 4) == 4 and quorum_size(5, 2) == 3  # never below a majority
    now = 100.0
    assert lease_holds({"a": 99.0, "b": 99.5}, now, 2.0, 4)  # 1 + 2 fresh of 4
    assert not lease_holds({"a": 99.0, "b": 97.0}, now, 2.0, 4)  # b expired
    assert not lease_holds({}, now, 2.0, 3)
    assert promotion_wait(2.0) > 2.0 and promotion_wait(30.0) == pytest.approx(36.0)


@pytest.mark.timeout(10)
def test_majorities_always_intersect() -> None:
    """Whatever the zone count, a promotion's grants and a lease's acknowledgements (both a
    quorum) share a zone; the primary never grants a rival, so that zone is a leaf/witness."""
    for n in range(2, 9):
        q = quorum_size(n)
        assert 2 * q > n


@pytest.mark.timeout(10)
def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"PromoteOnHubFailure\.detection"):
        PromoteOnHubFailure(detection=0)
    with pytest.raises(ConfigError, match=r"PromoteOnHubFailure\.quorum"):
        PromoteOnHubFailure(quorum="most")
    with pytest.raises(ConfigError, match=r"PromoteOnHubFailure\.quorum"):
        PromoteOnHubFailure(quorum=1)
    with pytest.raises(ConfigError, match=r"PromoteOnHubFailure\.vote_url"):
        PromoteOnHubFailure(vote_url="http://x:1")
    with pytest.raises(ConfigError, match=r"PromoteOnHubFailure\.zones"):
        PromoteOnHubFailure(zones=1)
    with pytest.raises(ConfigError, match=r"Partition\.strategy.*fail-safe"):
        Partition(strategy="yolo")
    with pytest.raises(ConfigError, match=r"Partition\.autonomous_for"):
        Partition("autonomous", autonomous_for=-1)
    p = Platform("p", plugin_manager=create_plugin_manager(load_entrypoints=False))
    with pytest.raises(ConfigError, match="needs PromoteOnHubFailure"):
        p.register(App("a", Singleton(), Partition()))
    p.register(App("b", Singleton(), PromoteOnHubFailure(detection=5), Partition("autonomous")))


@pytest.mark.timeout(20)
def test_config_file_sections(tmp_path: Path) -> None:
    from pycluster.cli.config_apps import apps_from_config
    from pycluster.kernel.settings import load_settings

    cfg = tmp_path / "node.yaml"
    cfg.write_text("name: edge\nzone: paris\nzone_vote_url: nats://127.0.0.1:4299\napps:\n"
                   "  - name: convex\n"
                   "    promote_on_hub_failure: {detection: 10, zones: 4}\n"
                   "    partition: {strategy: coordinated}\n")
    pm = create_plugin_manager(load_entrypoints=False)
    assert load_settings(cfg).zone_vote_url == "nats://127.0.0.1:4299"
    (app,) = apps_from_config(cfg, pm)
    opt = next(o for o in app.options if isinstance(o, PromoteOnHubFailure))
    assert opt.detection == 10 and opt.zones == 4
    assert any(isinstance(o, Partition) and o.strategy == "coordinated" for o in app.options)
    cfg.write_text("name: edge\napps:\n  - name: convex\n"
                   "    partition: {strategy: nope}\n")
    with pytest.raises(ConfigError, match="strategy"):
        apps_from_config(cfg, pm)


# -- zones on loopback -------------------------------------------------------------------------


@dataclass
class Zones:
    hub: Platform
    leaves: list[Platform]
    links: list[TcpProxy]  # leaf i -> hub
    votes: list[TcpProxy]  # hub, leaf1, leaf2 -> witness bus
    witness: Witness
    apps: dict[str, App]
    writes: list[Write] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    extra: list[Platform] = field(default_factory=list)  # more nodes of the hub zone

    def zone(self, p: Platform) -> AppZone:
        z = self.apps[p.node_id].zone
        assert isinstance(z, AppZone)
        return z

    def cut_hub(self) -> None:
        for proxy in (*self.links, self.votes[0]):
            proxy.cut()

    def heal(self) -> None:
        for proxy in (*self.links, *self.votes):
            proxy.restore()


class Approver:
    """A coordinator: approves promotions once told to."""

    def __init__(self) -> None:
        self.yes = False
        self.asked: list[tuple[str, int, str]] = []

    @hookimpl
    def pycluster_approve_promotion(self, app: App, term: int, zone: str) -> bool | None:
        self.asked.append((app.name, term, zone))
        return self.yes


def _platform(tmp: Path, name: str, zone: str, approver: Approver | None,
              **kw: Any) -> Platform:
    pm = create_plugin_manager(load_entrypoints=False)
    if approver is not None:
        pm.register(approver, name="approver")
    return Platform(name, node_id=f"{name}-1", zone=zone, data_dir=str(tmp / name),
                    lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=pm, **kw)


async def _writer(zones: Zones, p: Platform, stop: asyncio.Event) -> None:
    """The app's writes, recorded outside every zone: only after ``zone.check()``."""
    app = zones.apps[p.node_id]
    while not stop.is_set():
        try:
            term, _epoch = app.zone.check()
        except (ZoneFencedError, RuntimeError):
            zones.refused[p.name] = zones.refused.get(p.name, 0) + 1
        else:
            zones.writes.append(Write(p.settings.zone or p.name, term, time.time()))
        await asyncio.sleep(0.05)


def make_zones(strategy: Callable[[str], Partition | None] = lambda role: None,
               approver: Approver | None = None, detection: float = DETECTION,
               hub_nodes: int = 1) -> Callable[..., Any]:
    async def build(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
        witness = Witness("convex", tmp_path / "witness", detection=detection, zones=4,
                          tick=0.2)
        await witness.server.start()
        port = free_port()
        links = [TcpProxy("127.0.0.1", port, name=f"link{i}") for i in (1, 2)]
        votes = [TcpProxy("127.0.0.1", witness.server.port, name=f"vote{i}")
                 for i in (0, 1, 2)]
        started: list[Platform] = []
        writers: list[asyncio.Task[None]] = []
        stop = asyncio.Event()
        try:
            for proxy in (*links, *votes):
                await proxy.start()
            await witness.start_voter()

            def app(role: str, vote: TcpProxy) -> App:
                opts: list[Any] = [PromoteOnHubFailure(
                    detection=detection, zones=4, vote_url=f"nats://127.0.0.1:{vote.port}")]
                part = strategy(role)
                if part is not None:
                    opts.append(part)
                return App("convex", Singleton(), *opts)

            hub = _platform(tmp_path, f"hub{unique_name}"[:30], "hq", None,
                            hub=HubListen(host="127.0.0.1", port=port, user=LEAF_USER,
                                          password=LEAF_PASSWORD, no_advertise=True))
            leaves = [_platform(tmp_path, f"edge{i}{unique_name}"[:30], f"z{i}", approver,
                                leaf=LeafOf(f"nats-leaf://127.0.0.1:{proxy.port}",
                                            user=LEAF_USER, password=LEAF_PASSWORD,
                                            reconnect=0.25))
                      for i, proxy in zip((1, 2), links, strict=True)]
            apps = {}
            for p, role, vote in zip((hub, *leaves), ("hub", "leaf", "leaf"), votes,
                                     strict=True):
                a = app(role, vote)
                p.register(a)
                apps[p.node_id] = a
                svc = p.service("leaf")
                assert isinstance(svc, ZoneService)
                svc.interval = 0.25
            zones = Zones(hub, leaves, links, votes, witness, apps)
            for p in (hub, *leaves):
                await p.start()
                started.append(p)
            for i in range(2, hub_nodes + 1):  # more nodes of the hub zone, on its server
                assert hub.embedded is not None
                s = hub.settings
                more = Platform(hub.name, node_id=f"{hub.name}-{i}", zone="hq",
                                zone_role="hub", nats_url=hub.embedded.url,
                                nats_user=s.nats_user,
                                nats_password=s.nats_password.get_secret_value()
                                if s.nats_password else None,
                                data_dir=str(tmp_path / f"hub-{i}"), lease_ttl=2.0,
                                heartbeat_interval=0.5,
                                plugin_manager=create_plugin_manager(load_entrypoints=False))
                a = app("hub", votes[0])
                more.register(a)
                apps[more.node_id] = a
                await more.start()
                started.append(more)
                zones.extra.append(more)
            for p in (hub, *leaves):
                assert await zones.apps[p.node_id].wait_for_leadership(20)
            for z in (zones.zone(p) for p in started):
                z.tick = 0.2
            # Every zone knows the hub as primary and the hub holds its lease.
            await wait_for(lambda: zones.zone(hub).writable, 30)
            for leaf in leaves:
                await wait_for(lambda leaf=leaf: zones.zone(leaf).primary_platform == hub.name
                               and zones.zone(leaf).silent_for() < 1.0, 20)
            writers = [asyncio.get_running_loop().create_task(_writer(zones, p, stop))
                       for p in started]
            yield zones
        finally:
            stop.set()
            for t in writers:
                await t
            for p in reversed(started):
                await p.stop()
            await witness.stop()
            for proxy in (*links, *votes):
                await proxy.close()

    return build


@pytest.fixture
async def zones(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
    async for z in make_zones()(tmp_path, unique_name):
        yield z


async def _having(actions: Any, action: str) -> list[str] | None:
    got: list[str] = await actions
    return got if action in got else None


def _primaries(zones: Zones) -> list[Platform]:
    return [p for p in (zones.hub, *zones.extra, *zones.leaves) if zones.zone(p).writable]


def assert_single_writer(zones: Zones) -> None:
    """The external record: one writer per term, terms only grew over time."""
    single_writer(zones.writes)


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_hub_loss_promotes_exactly_one_leaf_and_the_hub_demotes_on_heal(
        zones: Zones) -> None:
    hub, (leaf1, leaf2) = zones.hub, zones.leaves
    await asyncio.sleep(1.0)
    assert [p.name for p in _primaries(zones)] == [hub.name]
    assert zones.zone(hub).epoch == 1 and zones.zone(hub).token == (1, zones.apps[
        hub.node_id].epoch)
    with pytest.raises(ZoneFencedError, match="replica"):
        zones.zone(leaf1).check()

    zones.cut_hub()
    # The hub fences itself (fail-safe) ...
    await wait_for(lambda: not zones.zone(hub).writable, 3 * DETECTION + 5)
    assert zones.zone(hub).status()["state"] == "fenced"
    # ... and exactly one leaf is promoted, with a term above the hub's.
    winner = await wait_for(lambda: next(iter(_primaries(zones)), None), 60)
    assert winner in (leaf1, leaf2)
    other = leaf2 if winner is leaf1 else leaf1
    term = zones.zone(winner).epoch
    assert term is not None and term >= 2
    await wait_for(lambda: zones.zone(other).primary_platform == winner.name, 15)
    await asyncio.sleep(2 * DETECTION)
    assert _primaries(zones) == [winner]
    assert zones.zone(other).role == "replica"
    assert any(w.term == term for w in zones.writes)
    assert_single_writer(zones)

    # Heal: the old hub hears the higher term and demotes.
    zones.heal()
    await wait_for(lambda: zones.zone(hub).role == "replica", 30)
    assert zones.zone(hub).term == term and zones.zone(hub).primary_platform == winner.name
    await asyncio.sleep(DETECTION)
    assert _primaries(zones) == [winner]
    assert_single_writer(zones)
    assert [h["event"] for h in zones.zone(hub).history][-1] == "demoted"
    assert "fenced" in [h["event"] for h in zones.zone(hub).history]
    # The audit trail tells the story on each side.
    async def actions(p: Platform) -> list[str]:
        audit = p.service("audit")
        await audit.flush()
        return [e.action for e in await audit.query(category="zone", app="convex")]

    assert {"fenced", "demoted"} <= set(await wait_for(lambda: _having(actions(hub), "demoted"),
                                                       20))
    won = await wait_for(lambda: _having(actions(winner), "promoted"), 20)
    assert {"won", "promoted"} <= set(won)
    # The votes are durable in each zone's own bucket.
    assert winner.js is not None
    kv = await winner.js.key_value(f"{winner.name}_zone_votes")
    assert (await kv.get(f"convex.vote.{term}")).value is not None
    state = await kv.get("convex.state")
    assert b'"primary"' in (state.value or b"")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_minority_leaf_never_promotes(zones: Zones) -> None:
    hub, (leaf1, _leaf2) = zones.hub, zones.leaves
    zones.links[0].cut()
    zones.votes[1].cut()
    await wait_for(lambda: zones.zone(leaf1).silent_for() > DETECTION, 20)
    await asyncio.sleep(3 * DETECTION)
    assert _primaries(zones) == [hub]
    assert zones.zone(leaf1).role == "replica"
    assert zones.zone(hub).lease_valid
    # Its candidacies failed at the pre-vote: no vote recorded, its term did not grow.
    assert zones.zone(leaf1).max_voted == 0 and zones.zone(leaf1).term == 1
    zones.links[0].restore()
    zones.votes[1].restore()
    await wait_for(lambda: zones.zone(leaf1).silent_for() < 1.0, 20)
    assert _primaries(zones) == [hub]
    assert_single_writer(zones)


@pytest.fixture
async def coordinated(tmp_path: Path, unique_name: str) -> AsyncIterator[tuple[Zones, Approver]]:
    approver = Approver()
    build = make_zones(lambda role: Partition("coordinated"), approver)
    async for z in build(tmp_path, unique_name):
        yield z, approver


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_coordinated_promotion_needs_approval(
        coordinated: tuple[Zones, Approver]) -> None:
    zones, approver = coordinated
    zones.cut_hub()
    await wait_for(lambda: approver.asked, 60)
    await asyncio.sleep(2 * DETECTION)
    assert _primaries(zones) == []  # won votes, but nobody approved
    approver.yes = True
    winner = await wait_for(lambda: next(iter(_primaries(zones)), None), 60)
    assert winner in zones.leaves
    assert_single_writer(zones)


@pytest.fixture
async def autonomous(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
    build = make_zones(lambda role: Partition("autonomous", autonomous_for=1.5))
    async for z in build(tmp_path, unique_name):
        yield z


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_autonomous_hub_writes_on_for_a_while_and_records_the_conflict(
        autonomous: Zones) -> None:
    zones = autonomous
    hub = zones.hub
    zones.cut_hub()
    await wait_for(lambda: zones.zone(hub).lease_lost_at is not None, 3 * DETECTION + 5)
    assert zones.zone(hub).writable  # autonomous: still writing without the majority
    assert zones.zone(hub).status()["state"] == "autonomous"
    await wait_for(lambda: not zones.zone(hub).writable, 10)
    lost = zones.zone(hub).lease_lost_at
    assert lost is not None
    hub_writes = [w.at for w in zones.writes if w.zone == "hq"]
    await wait_for(lambda: zones.zone(hub).conflicts, 10)
    conflict = zones.zone(hub).conflicts[0]
    assert conflict["zone"] == "hq" and conflict["epoch"] == 1
    assert conflict["to"] - conflict["from"] <= 1.5 + 1.0
    assert max(hub_writes) <= conflict["to"] + 0.5, (zones.zone(hub).conflicts,
                                                     zones.zone(hub).history)
    winner = await wait_for(lambda: next(iter(_primaries(zones)), None), 60)
    zones.heal()
    await wait_for(lambda: zones.zone(hub).role == "replica", 30)
    assert zones.zone(hub).conflicts[0]["rival_term"] == zones.zone(winner).epoch
    # The CLI lists it.
    import json

    def run(*args: str) -> str:
        return str(cli_output(hub, *args))

    rows = json.loads(await asyncio.to_thread(run, "partition", "conflicts", "-p", hub.name,
                                              "-o", "json"))
    assert rows and rows[0]["zone"] == "hq"
    status = json.loads(await asyncio.to_thread(run, "partition", "status", "-p", hub.name,
                                                "-o", "json"))
    assert status["convex"]["role"] == "replica"
    text = hub.metrics.render().decode()
    assert 'pycluster_partition_conflicts{app="convex"} 1.0' in text


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_votes_are_durable_on_a_three_server_zone_with_r3(tmp_path: Path,
                                                                 unique_name: str) -> None:
    """A zone of three servers (R3 votes bucket): one vote per term (compare-and-set) across
    the zone's nodes, kept when the server holding the bucket's leader is killed, and read
    back by a restarted node."""
    from pycluster.testing.servers import NatsCluster

    cluster = NatsCluster(3)
    await cluster.start()
    platforms: list[Platform] = []
    try:
        for i in range(2):
            pm = create_plugin_manager(load_entrypoints=False)
            p = Platform(unique_name, node_id=f"n{i}", nats_url=[cluster.url(j) for j in
                                                                 range(3)],
                         zone="z1", zone_role="leaf", stream_replicas=3, lease_ttl=2.0,
                         heartbeat_interval=0.5, plugin_manager=pm)
            p.register(App("convex", Singleton(), PromoteOnHubFailure(detection=1.0,
                                                                      zones=3)))
            await p.start()
            platforms.append(p)
        z0, z1 = (p.apps["convex"].zone for p in platforms)
        assert isinstance(z0, AppZone) and isinstance(z1, AppZone)
        assert platforms[0].js is not None
        info = await platforms[0].js.stream_info(f"KV_{unique_name}_zone_votes")
        assert info.config.num_replicas == 3
        await asyncio.sleep(1.5)  # the hub (none here) silent for the detection time
        granted, _ = await z0.decide(VoteRequest("z2", "edge2", 5))
        assert granted
        # The other node of the zone shares the record: no second candidate in term 5.
        granted, reason = await z1.decide(VoteRequest("z3", "edge3", 5))
        assert not granted and "z2" in reason
        cluster.kill(0)
        nc = await nats.connect([cluster.url(1), cluster.url(2)])
        try:  # the two servers left elect a JetStream meta leader first
            await wait_for(lambda: nc.jetstream().account_info(), 60, interval=0.5,
                           ignore=(nats.errors.Error, TimeoutError))
        finally:
            await nc.close()
        await platforms[1].stop()
        platforms.pop()
        pm = create_plugin_manager(load_entrypoints=False)
        again = Platform(unique_name, node_id="n1", nats_url=[cluster.url(j) for j in (1, 2)],
                         zone="z1", zone_role="leaf", stream_replicas=3, lease_ttl=2.0,
                         heartbeat_interval=0.5, plugin_manager=pm)
        again.register(App("convex", Singleton(), PromoteOnHubFailure(detection=1.0, zones=3)))
        await again.start()
        platforms.append(again)
        z = again.apps["convex"].zone
        assert isinstance(z, AppZone)
        await wait_for(lambda: z.loaded, 30)  # read once the bucket answers again
        assert z.votes.get(5) == "z2"
    finally:
        for p in reversed(platforms):
            await p.stop()
        await cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_operator_demote_and_forced_promote_from_the_cli(zones: Zones) -> None:
    import json

    hub, (leaf1, leaf2) = zones.hub, zones.leaves

    def run(p: Platform, *args: str) -> str:
        return str(cli_output(p, *args))

    status = json.loads(await asyncio.to_thread(run, leaf1, "partition", "status", "-p",
                                                leaf1.name, "-o", "json"))
    assert status["convex"]["role"] == "replica" and status["convex"]["primary"] == hub.name
    # The operator demotes the hub: it stops writing at once; the zones elect a leaf.
    doc = json.loads(await asyncio.to_thread(run, hub, "leaf", "demote", "convex", "-p",
                                             hub.name, "--yes", "-o", "json"))
    assert doc["role"] == "replica" and not doc["writable"]
    first = await wait_for(lambda: next(iter(_primaries(zones)), None), 60)
    assert first in (leaf1, leaf2)
    other = leaf2 if first is leaf1 else leaf1
    # A forced promotion of the other leaf: a higher term, the first leaf demotes.
    doc = json.loads(await asyncio.to_thread(run, other, "leaf", "promote", "convex", "-p",
                                             other.name, "--force", "--yes", "-o", "json"))
    assert doc["promoted"] and doc["term"] > (zones.zone(first).term or 0) - 1
    await wait_for(lambda: _primaries(zones) == [other], 30)
    await wait_for(lambda: zones.zone(first).role == "replica", 30)
    assert_single_writer(zones)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_witness_command_votes_and_keeps_its_vote(tmp_path: Path) -> None:
    """`pycluster witness` as its own process: it answers vote requests with the grant rules,
    and a restarted witness still refuses a second candidate of the same term."""
    import json
    import subprocess
    import sys

    from pycluster.testing.servers import NatsServer

    async with NatsServer() as bus:
        nc = await nats.connect(bus.url)

        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [sys.executable, "-c", "from pycluster.cli.main import main; main()",
                 "witness", "--vote-url", bus.url, "--group", "convex", "--state-dir",
                 str(tmp_path), "--detection", "0.5", "--zones", "3"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def ask(zone: str, term: int) -> dict[str, Any]:
            msg = await nc.request("_pycluster.zv.convex.vote", json.dumps(
                {"zone": zone, "platform": f"p-{zone}", "term": term}).encode(), timeout=1.0)
            doc: dict[str, Any] = json.loads(msg.data)
            return doc

        proc = spawn()
        try:
            first = await wait_for(lambda: ask("z1", 2), 30,
                                   ignore=(nats.errors.Error, TimeoutError))
            assert first["zone"] == "witness"
            # It has followed no primary for the detection time since it started: it grants.
            doc = await wait_for(lambda: _granted(ask("z1", 2)), 10)
            assert doc["granted"]
            proc.terminate()
            proc.wait(10)
            proc = spawn()
            doc = await wait_for(lambda: ask("z2", 2), 30,
                                 ignore=(nats.errors.Error, TimeoutError))
            assert not doc["granted"] and "z1" in doc["reason"]
            assert json.loads((tmp_path / "convex.json").read_text())["votes"] == {"2": "z1"}
        finally:
            proc.terminate()
            proc.wait(10)
            await nc.close()


async def _granted(answer: Any) -> dict[str, Any] | None:
    doc: dict[str, Any] = await answer
    return doc if doc.get("granted") else None


@pytest.fixture
async def two_node_hub(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
    async for z in make_zones(detection=6.0, hub_nodes=2)(tmp_path, unique_name):
        yield z


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_local_failover_in_the_hub_zone_keeps_its_term(two_node_hub: Zones) -> None:
    """Two nodes in the hub zone: only the active one answers the leaves' pings and writes;
    when it steps down, the other takes over locally with the same zone term and no leaf is
    promoted (a local failover is faster than the detection time)."""
    zones = two_node_hub
    hub, (hub2,) = zones.hub, zones.extra
    active, standby = (hub, hub2) if zones.apps[hub.node_id].is_active else (hub2, hub)
    await wait_for(lambda: zones.zone(active).writable, 20)
    assert not zones.zone(standby).writable and zones.zone(standby).role == "primary"
    assert zones.zone(standby).hello()["role"] == "primary-standby"
    await zones.apps[active.node_id].step_down()  # a local failover inside the hub zone
    await wait_for(lambda: zones.zone(standby).writable, 30)
    assert not zones.zone(active).writable
    assert zones.zone(standby).epoch == 1
    await asyncio.sleep(6.0)
    assert _primaries(zones) == [standby]
    assert all(zones.zone(leaf).role == "replica" and zones.zone(leaf).term == 1
               for leaf in zones.leaves)
    assert_single_writer(zones)
