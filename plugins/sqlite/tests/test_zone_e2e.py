"""Promotion on hub loss with the SQLite zone standby, end to end: a hub platform whose SQLite
app writes, a leaf platform keeping a zone standby of it (`StandbyOf`), both with
`PromoteOnHubFailure`, and a witness voter (three zones: the leaf and the witness are a
majority without the hub). The leaf link and every witness connection go through TCP proxies.
Each zone's app writes real rows, only after ``app.zone.check()``, and every write is recorded
outside the zones (zone, term, wall time)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlite_testlib import rows

import pycluster_sqlite.plugin as sqlite_plugin
from pycluster import (
    App,
    HubListen,
    LeafOf,
    Platform,
    PromoteOnHubFailure,
    Singleton,
    hookimpl,
)
from pycluster.builtin.leaf.service import ZoneService
from pycluster.builtin.leaf.zones import AppZone
from pycluster.kernel.leaf import leafnode_config
from pycluster.kernel.settings import secret_value
from pycluster.kernel.zones import ZoneFencedError
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.servers import NatsCluster, NatsServer, free_port
from pycluster.testing.zones import Witness, Write, assert_single_writer
from pycluster_sqlite import SQLite, StandbyOf
from pycluster_sqlite.runtime import runtime_of

USER, PASSWORD = "leaf", "zone-e2e-secret"
DETECTION = 2.0


def _pm() -> Any:
    return create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])


def _write_row(path: Path, value: str) -> None:
    con = sqlite3.connect(str(path), timeout=5.0, isolation_level=None)
    try:
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        con.execute("INSERT INTO t(v) VALUES (?)", (value,))
    finally:
        con.close()


class PromoteProbe:
    """A second replica plugin's promote hook: is the app writable while the hooks run?"""

    def __init__(self, fail: bool = False) -> None:
        self.writable: list[bool] = []
        self.fail = fail

    @hookimpl
    async def pycluster_zone_promote(self, app: App, term: int) -> None:
        await asyncio.sleep(0.3)
        self.writable.append(app.zone.writable)
        if self.fail:
            raise RuntimeError("this replica could not be promoted")


@dataclass
class Zone:
    """One zone's platform, app and database, and its writer's switch."""

    name: str
    platform: Platform
    app: App
    db: SQLite
    vote: TcpProxy
    paused: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def zone(self) -> AppZone:
        z = self.app.zone
        assert isinstance(z, AppZone)
        return z


@dataclass
class Setup:
    hub: Zone
    leaf: Zone
    link: TcpProxy
    witness: Witness
    probe: PromoteProbe
    leaf2: Zone | None = None  # a second node of the leaf zone
    hub2: Zone | None = None  # a second node of the hub zone
    writes: list[Write] = field(default_factory=list)
    values: dict[str, list[str]] = field(default_factory=dict)  # node -> values it wrote
    errors: list[str] = field(default_factory=list)  # writes allowed by check() that failed

    def zones(self) -> list[Zone]:
        return [z for z in (self.hub, self.hub2, self.leaf, self.leaf2) if z is not None]

    def cut_hub(self) -> None:
        self.link.cut()
        self.hub.vote.cut()

    def heal(self) -> None:
        self.link.restore()
        self.hub.vote.restore()


async def _writer(s: Setup, z: Zone, stop: asyncio.Event) -> None:
    """Write one row every 50 ms while ``app.zone.check()`` allows it; record each write."""
    n = 0
    while not stop.is_set():
        if not z.paused.is_set():
            try:
                term, _epoch = z.app.zone.check()
            except (ZoneFencedError, RuntimeError):
                pass
            else:
                value = f"{z.platform.node_id}-{term}-{n}"
                n += 1
                try:
                    await asyncio.to_thread(_write_row, z.db.path, value)
                except sqlite3.Error as exc:
                    s.errors.append(f"{z.platform.node_id} term {term}: {exc}")
                else:
                    s.writes.append(Write(z.name, term, time.time()))
                    s.values.setdefault(z.platform.node_id, []).append(value)
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _zones(tmp_path: Path, unique_name: str, leaf_nodes: int = 1,
                 probe_fails: bool = False, r3: bool = False,
                 hub_nodes: int = 1) -> AsyncIterator[Setup]:
    """The zones; ``r3``: each zone on servers of its own, the leaf zone a 3-server cluster
    whose streams (the mirror, later its own bucket) have three replicas."""
    witness = Witness("convex", tmp_path / "witness", detection=DETECTION, zones=3, tick=0.2)
    await witness.server.start()
    port = free_port()
    link = TcpProxy("127.0.0.1", port, name="link")
    votes = [TcpProxy("127.0.0.1", witness.server.port, name=f"vote-{z}") for z in ("hq", "z1")]
    started: list[Platform] = []
    servers: list[NatsServer | NatsCluster] = []
    writers: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    try:
        for proxy in (link, *votes):
            await proxy.start()
        await witness.start_voter()
        hub_kw: dict[str, Any]
        leaf_kw: dict[str, Any]
        if r3:
            conf = tmp_path / "hub.conf"
            conf.write_text(leafnode_config("hq", hub=HubListen(
                host="127.0.0.1", port=port, allow_anonymous=True, no_advertise=True)))
            servers.append(NatsServer(config_file=conf))
            servers.append(NatsCluster(3, server_config=lambda i: leafnode_config(
                "z1", leaf=LeafOf(f"nats-leaf://127.0.0.1:{link.port}", reconnect=0.25))))
            for srv in servers:
                await srv.start()
            hub_srv, leaf_cluster = servers
            assert isinstance(hub_srv, NatsServer) and isinstance(leaf_cluster, NatsCluster)
            hub_kw = {"nats_url": hub_srv.url, "zone_role": "hub"}
            leaf_kw = {"nats_url": leaf_cluster.urls, "zone_role": "leaf",
                       "stream_replicas": 3}
        else:
            hub_kw = {"hub": HubListen(host="127.0.0.1", port=port, user=USER,
                                       password=PASSWORD, no_advertise=True)}
            leaf_kw = {"leaf": LeafOf(f"nats-leaf://127.0.0.1:{link.port}", user=USER,
                                      password=PASSWORD, reconnect=0.25)}

        def promote(vote: TcpProxy) -> PromoteOnHubFailure:
            return PromoteOnHubFailure(detection=DETECTION, zones=3,
                                       vote_url=f"nats://127.0.0.1:{vote.port}")

        hub_name, leaf_name = f"hub{unique_name}"[:24], f"edge{unique_name}"[:24]
        hub = Platform(hub_name, node_id="hub-1", zone="hq", data_dir=str(tmp_path / "hub"),
                       lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=_pm(), **hub_kw)
        hub_db = SQLite(tmp_path / "hubdb" / "data.db")
        hub_app = App("convex", Singleton(), hub_db, promote(votes[0]))
        hub.register(hub_app)
        probe = PromoteProbe(fail=probe_fails)
        leaf_pm = _pm()
        leaf_pm.register(probe, name="promote-probe")
        leaf = Platform(leaf_name, node_id="edge-1", zone="z1", data_dir=str(tmp_path / "leaf"),
                        lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=leaf_pm,
                        **leaf_kw)
        leaf_db = SQLite(tmp_path / "leafdb" / "data.db")
        leaf_app = App("convex", Singleton(), leaf_db, StandbyOf(hub_name, "convex"),
                       promote(votes[1]))
        leaf.register(leaf_app)
        for p in (hub, leaf):
            svc = p.service("leaf")
            assert isinstance(svc, ZoneService)
            svc.interval = 0.25
        s = Setup(Zone("hq", hub, hub_app, hub_db, votes[0]),
                  Zone("z1", leaf, leaf_app, leaf_db, votes[1]), link, witness, probe)
        for p in (hub, leaf):
            await p.start()
            started.append(p)
        if leaf_nodes == 2:  # on the leaf zone's server, after the first node (it leads)
            assert await leaf_app.wait_for_leadership(30)
            assert leaf.embedded is not None
            db2 = SQLite(tmp_path / "leafdb2" / "data.db")
            app2 = App("convex", Singleton(), db2, StandbyOf(hub_name, "convex"),
                       promote(votes[1]))
            node2 = Platform(leaf_name, node_id="edge-2", zone="z1", zone_role="leaf",
                             nats_url=leaf.embedded.url, nats_user=leaf.settings.nats_user,
                             nats_password=secret_value(leaf.settings.nats_password),
                             data_dir=str(tmp_path / "leaf2"), lease_ttl=2.0,
                             heartbeat_interval=0.5, plugin_manager=_pm())
            node2.register(app2)
            await node2.start()
            started.append(node2)
            s.leaf2 = Zone("z1", node2, app2, db2, votes[1])
        if hub_nodes == 2:  # on the hub zone's server, after the first node (it leads)
            assert await hub_app.wait_for_leadership(30)
            assert hub.embedded is not None
            hdb2 = SQLite(tmp_path / "hubdb2" / "data.db")
            happ2 = App("convex", Singleton(), hdb2, promote(votes[0]))
            hnode2 = Platform(hub_name, node_id="hub-2", zone="hq", zone_role="hub",
                              nats_url=hub.embedded.url, nats_user=hub.settings.nats_user,
                              nats_password=secret_value(hub.settings.nats_password),
                              data_dir=str(tmp_path / "hub2"), lease_ttl=2.0,
                              heartbeat_interval=0.5, plugin_manager=_pm())
            hnode2.register(happ2)
            await hnode2.start()
            started.append(hnode2)
            s.hub2 = Zone("hq", hnode2, happ2, hdb2, votes[0])
        for z in (s.hub, s.leaf):
            assert await z.app.wait_for_leadership(30)
        for z in s.zones():
            z.zone.tick = 0.2
        await wait_for(lambda: s.hub.zone.writable, 30, message="the hub holds its zone lease")
        await wait_for(lambda: s.leaf.zone.primary_platform == hub.name
                       and s.leaf.zone.silent_for() < 1.0, 20, message="the leaf follows")
        writers = [asyncio.get_running_loop().create_task(_writer(s, z, stop))
                   for z in s.zones()]
        yield s
    finally:
        stop.set()
        for t in writers:
            await t
        for p in reversed(started):
            await p.stop()
        for srv in reversed(servers):
            await srv.stop()
        await witness.stop()
        for proxy in (link, *votes):
            await proxy.close()


@pytest.fixture(params=["embedded", "r3"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path, unique_name: str,
                litestream_bin: str) -> AsyncIterator[Setup]:
    async with _zones(tmp_path, unique_name, r3=request.param == "r3") as s:
        yield s


@pytest.fixture
async def two_leaf_nodes(tmp_path: Path, unique_name: str,
                         litestream_bin: str) -> AsyncIterator[Setup]:
    async with _zones(tmp_path, unique_name, leaf_nodes=2) as s:
        yield s


@pytest.fixture
async def failing_promotion(tmp_path: Path, unique_name: str,
                            litestream_bin: str) -> AsyncIterator[Setup]:
    async with _zones(tmp_path, unique_name, probe_fails=True) as s:
        yield s


@pytest.fixture
async def two_hub_nodes(tmp_path: Path, unique_name: str,
                        litestream_bin: str) -> AsyncIterator[Setup]:
    async with _zones(tmp_path, unique_name, hub_nodes=2) as s:
        yield s


def _replica_rows(path: Path) -> list[tuple[Any, ...]]:
    try:
        return rows(path)
    except sqlite3.OperationalError:
        return []  # not restored yet


async def _has_rows(path: Path, expected: list[tuple[Any, ...]], timeout: float,
                    exact: bool = True) -> None:
    async def ok() -> bool:
        got = await asyncio.to_thread(_replica_rows, path)
        return got == expected if exact else set(expected) <= set(got)

    await wait_for(ok, timeout, message=f"{len(expected)} rows in {path}")


async def _synced(z: Zone) -> list[tuple[Any, ...]]:
    """Pause the zone's writer, sync its database to its bucket, return its rows."""
    z.paused.set()
    await asyncio.sleep(0.2)  # a write in flight finishes
    await z.db.wal.sync()
    got = await asyncio.to_thread(rows, z.db.path)
    return got


def _journal_mode(path: Path) -> str:
    con = sqlite3.connect(str(path))
    try:
        return str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    finally:
        con.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_hub_loss_promotes_the_sqlite_zone_standby_and_the_old_hub_follows_on_heal(
        setup: Setup) -> None:
    """Hub lost: the leaf's copy becomes the primary with every synced row, the hub fenced
    itself before the leaf's first write; heal: the hub follows the leaf. Then the way back:
    the leaf zone lost, the old hub promoted again (its bucket's Litestream history continues
    with a full image), the leaf follows it."""
    s = setup
    hub, leaf = s.hub, s.leaf
    # The hub writes; the leaf's replica has every synced row.
    await wait_for(lambda: len(s.values.get("hub-1", [])) >= 10, 30, message="hub writes")
    synced = await _synced(hub)
    await _has_rows(leaf.db.path, synced, 90)
    assert leaf.db.wal.status()["zone"]["role"] == "standby"
    assert not leaf.zone.writable

    # A slow store of the zone's state (as on a loaded zone) makes the candidate's wait end
    # well after its lease wait: the app must still wait for the replica plugins.
    store = leaf.zone._store_state

    async def slow_store() -> None:
        await asyncio.sleep(0.5)
        await store()

    leaf.zone._store_state = slow_store  # type: ignore[method-assign]
    # Cut the hub zone off (leaf link and witness connection), its writer running.
    hub.paused.clear()
    await asyncio.sleep(0.3)
    s.cut_hub()
    cut_at = time.time()
    await wait_for(lambda: leaf.zone.writable, 60, message="the leaf zone promoted")
    assert not hub.zone.writable
    with pytest.raises(ZoneFencedError):
        hub.app.zone.check()
    term = leaf.zone.epoch
    assert term is not None and term >= 2
    # Its SQLite copy is the primary now: WAL mode, replicating into the leaf's own bucket.
    rt = runtime_of(leaf.db)
    await wait_for(lambda: leaf.db.wal.status()["zone"]["role"] == "primary", 30,
                   message="the SQLite copy promoted")
    assert rt.wal_bucket == f"{leaf.platform.name}_convex_wal"
    await wait_for(lambda: rt.replicate_pid() is not None, 30, message="litestream replicates")
    assert leaf.platform.js is not None
    info = await leaf.platform.js.stream_info(f"OBJ_{rt.wal_bucket}")
    assert info.config.num_replicas == leaf.platform.settings.stream_replicas
    assert await asyncio.to_thread(_journal_mode, leaf.db.path) == "wal"
    # The app could not write while the replica plugins promoted their copies: its first
    # write came after the SQLite plugin's promotion was done.
    assert s.probe.writable == [False]
    # The leaf writes; every row synced before the cut is there.
    await wait_for(lambda: len(s.values.get("edge-1", [])) >= 10, 30, message="leaf writes")
    got = await asyncio.to_thread(rows, leaf.db.path)
    assert set(synced) <= set(got)
    # No write the zone check allowed was lost to the promotion of the copy.
    assert set(s.values["edge-1"]) <= {v for _, v in got}
    assert s.errors == []
    # The external record: the hub's last write came before the leaf's first.
    hub_last = max(w.at for w in s.writes if w.zone == "hq")
    leaf_first = min(w.at for w in s.writes if w.zone == "z1")
    assert hub_last < leaf_first, (hub_last - cut_at, leaf_first - cut_at)
    assert leaf.db.wal.status()["last_promotion"]["at"] < leaf_first
    fenced = [h["at"] for h in hub.zone.history if h["event"] == "fenced"]
    assert fenced and fenced[0] < leaf_first
    assert {w.term for w in s.writes if w.zone == "z1"} == {term}
    assert_single_writer(s.writes)

    # Heal: the old hub demotes (replication stopped first) and follows the new primary.
    s.heal()
    await wait_for(lambda: hub.zone.role == "replica", 30, message="the hub demoted")
    hub_rt = runtime_of(hub.db)
    await wait_for(lambda: (hub.db.wal.status().get("zone") or {}).get("role") == "standby",
                   30, message="the hub's SQLite copy follows")
    assert hub_rt.replicate_pid() is None
    assert hub.db.wal.status()["zone"]["following"] == f"{leaf.platform.name}/convex"
    # Its replication stopped before it followed anything, after its last write; the rows it
    # wrote after the cut that never reached the leaf are kept in the replaced database.
    audit = hub.platform.service("audit")

    async def demoted_entries() -> list[Any]:
        await audit.flush()
        return [e for e in await audit.query(category="sqlite", app="convex")
                if e.action == "zone_demoted"]

    (demoted,) = await wait_for(demoted_entries, 30, message="the demotion audited")
    assert demoted.data["was_primary"] and demoted.data["primary"] == leaf.platform.name
    assert hub_last < demoted.data["replication_stopped_at"]
    kept = Path(f"{hub.db.path}.pre-demotion")
    kept_values = {v for _, v in await asyncio.to_thread(rows, kept)}
    assert set(s.values["hub-1"]) <= kept_values
    leaf_rows = await _synced(leaf)
    await _has_rows(hub.db.path, leaf_rows, 90)
    assert set(synced) <= set(leaf_rows)
    assert set(s.values["edge-1"]) <= {v for _, v in leaf_rows}
    # The rows the hub wrote before it fenced itself are in the leaf's copy or in the hub's
    # replaced database: only the unsynced ones are missing from the leaf's.
    lost = set(s.values["hub-1"]) - {v for _, v in leaf_rows}
    assert lost <= kept_values and not lost & {v for _, v in synced}
    leaf.paused.clear()
    n = len(s.values["edge-1"])
    await wait_for(lambda: len(s.values["edge-1"]) >= n + 5, 30, message="leaf writes on")
    assert hub.zone.role == "replica" and leaf.zone.writable
    assert s.errors == []
    assert_single_writer(s.writes)

    # And back: now the leaf zone is lost. The old hub, a zone standby of the leaf, is
    # promoted with every row the leaf synced; the leaf follows it after the heal.
    synced2 = await _synced(leaf)
    await _has_rows(hub.db.path, synced2, 90)
    leaf.paused.clear()
    await asyncio.sleep(0.3)
    s.link.cut()
    leaf.vote.cut()
    await wait_for(lambda: hub.zone.writable, 60, message="the hub promoted again")
    term2 = hub.zone.term
    assert term2 > term
    await wait_for(lambda: hub.db.wal.status()["zone"]["role"] == "primary", 30,
                   message="the hub's copy promoted")
    assert hub_rt.wal_bucket == f"{hub.platform.name}_convex_wal"
    await wait_for(lambda: hub_rt.replicate_pid() is not None, 30, message="hub replicates")
    await wait_for(lambda: sum(w.zone == "hq" and w.term == term2 for w in s.writes) >= 5, 30,
                   message="the hub writes in the new term")
    assert set(synced2) <= set(await asyncio.to_thread(rows, hub.db.path))
    s.link.restore()
    leaf.vote.restore()
    await wait_for(lambda: leaf.zone.role == "replica", 30, message="the leaf demoted")
    hub_rows = await _synced(hub)
    await _has_rows(leaf.db.path, hub_rows, 90)
    hub_values = {v for _, v in hub_rows}
    assert all(v in hub_values for v in s.values["hub-1"] if v.startswith(f"hub-1-{term2}-"))
    assert s.errors == []
    assert_single_writer(s.writes)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_the_other_node_of_the_promoted_zone_follows_it_and_takes_over_locally(
        two_leaf_nodes: Setup) -> None:
    """Two nodes in the leaf zone: the non-active one learns the new term from the lease pings
    it hears, its promote hook makes its copy follow the zone's own bucket, and a local
    failover afterwards keeps every row (the hub's synced ones and the zone's own)."""
    s = two_leaf_nodes
    hub, leaf, leaf2 = s.hub, s.leaf, s.leaf2
    assert leaf2 is not None
    await wait_for(lambda: len(s.values.get("hub-1", [])) >= 5, 30, message="hub writes")
    synced = await _synced(hub)
    for z in (leaf, leaf2):
        await _has_rows(z.db.path, synced, 90)
    s.cut_hub()
    await wait_for(lambda: leaf.zone.writable, 60, message="the leaf zone promoted")
    term = leaf.zone.term
    await wait_for(lambda: leaf2.zone.role == "primary" and leaf2.zone.term == term, 30,
                   message="the other node learned the term")
    assert not leaf2.zone.writable  # not the app's active instance
    rt2 = runtime_of(leaf2.db)
    await wait_for(lambda: (leaf2.db.wal.status().get("zone") or {}).get("role") == "primary",
                   30, message="its copy turned")
    assert rt2.wal_bucket == f"{leaf.platform.name}_convex_wal"
    assert rt2.replicate_pid() is None
    await wait_for(lambda: len(s.values.get("edge-1", [])) >= 5, 30, message="leaf writes")
    leaf.paused.set()
    await asyncio.sleep(0.2)
    pos = await leaf.db.wal.sync()
    zone_rows = await asyncio.to_thread(rows, leaf.db.path)
    await wait_for(lambda: (leaf2.db.wal.position().txid or 0) >= (pos.txid or 0), 60,
                   message="the other node follows the zone's bucket")
    # A local failover inside the promoted zone: same term, every row, writes go on.
    await leaf.app.step_down()
    await wait_for(lambda: leaf2.zone.writable, 60, message="edge-2 writes")
    assert leaf2.zone.term == term
    await wait_for(lambda: rt2.replicate_pid() is not None, 30, message="edge-2 replicates")
    await wait_for(lambda: len(s.values.get("edge-2", [])) >= 5, 30, message="edge-2 writes")
    got = await asyncio.to_thread(rows, leaf2.db.path)
    assert set(zone_rows) <= set(got) and set(synced) <= set(got)
    assert set(s.values["edge-2"]) <= {v for _, v in got}
    assert {w.term for w in s.writes if w.zone == "z1"} == {term}
    assert s.errors == []
    assert_single_writer(s.writes)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_failed_replica_promotion_leaves_the_zone_unwritable(
        failing_promotion: Setup) -> None:
    """A replica plugin's promote hook fails on the winner: its copy may not be the primary's,
    so the zone holds the term but its app does not write."""
    s = failing_promotion
    leaf = s.leaf
    s.cut_hub()
    await wait_for(lambda: leaf.zone.role == "primary" and s.probe.writable, 60,
                   message="the leaf zone won")
    await wait_for(lambda: "promotion_failed" in [h["event"] for h in leaf.zone.history], 30,
                   message="the failure recorded")
    await asyncio.sleep(DETECTION)
    assert leaf.zone.role == "primary" and not leaf.zone.writable
    with pytest.raises(ZoneFencedError, match="promotion failed"):
        leaf.app.zone.check()
    assert "edge-1" not in s.values
    assert not s.hub.zone.writable


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_both_nodes_of_the_old_hub_zone_follow_the_new_primary_after_the_heal(
        two_hub_nodes: Setup) -> None:
    """Two nodes in the hub zone: after the heal both demote (the standby node too) and both
    copies follow the promoted leaf, with its rows."""
    s = two_hub_nodes
    hub, hub2, leaf = s.hub, s.hub2, s.leaf
    assert hub2 is not None
    await wait_for(lambda: len(s.values.get("hub-1", [])) >= 5, 30, message="hub writes")
    synced = await _synced(hub)
    await _has_rows(leaf.db.path, synced, 90)
    s.cut_hub()
    await wait_for(lambda: leaf.zone.writable, 60, message="the leaf zone promoted")
    await wait_for(lambda: len(s.values.get("edge-1", [])) >= 5, 30, message="leaf writes")
    s.heal()
    for z in (hub, hub2):
        await wait_for(lambda z=z: z.zone.role == "replica", 30, message="demoted")
        await wait_for(lambda z=z: (z.db.wal.status().get("zone") or {}).get("following")
                       == f"{leaf.platform.name}/convex", 30, message="follows the leaf")
        assert runtime_of(z.db).replicate_pid() is None
    leaf_rows = await _synced(leaf)
    for z in (hub, hub2):
        await _has_rows(z.db.path, leaf_rows, 90)
    assert s.errors == []
    assert_single_writer(s.writes)
