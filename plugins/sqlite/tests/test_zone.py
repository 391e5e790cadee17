"""Zone standbys: a leaf platform's app keeps a read-only replica of the hub platform's SQLite
database (a JetStream mirror across the leaf link, followed by Litestream); the link is cut
and healed; the zone is promoted and the old hub demoted through the zone hooks. Each
platform has its own embedded nats-server; the leaf link goes through a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlite_testlib import insert, rows

import pycluster_sqlite.plugin as sqlite_plugin
from pycluster import App, ConfigError, HubListen, LeafOf, Platform, Singleton
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.servers import free_port
from pycluster_sqlite import SQLite, StandbyOf, open_replica
from pycluster_sqlite.runtime import runtime_of

USER, PASSWORD = "leaf", "zone-link-secret"


def _pm() -> Any:
    return create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])


# -- bad input (no servers) --------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_standby_of_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"StandbyOf\.platform"):
        StandbyOf("bad name", "convex")
    with pytest.raises(ConfigError, match=r"StandbyOf\.app"):
        StandbyOf("prod", "a.b")
    with pytest.raises(ConfigError, match=r"StandbyOf\.domain"):
        StandbyOf("prod", "convex", domain="eu.west")
    p = Platform("edge", nats_url="nats://127.0.0.1:1", plugin_manager=_pm())
    with pytest.raises(ConfigError, match="add a SQLite"):
        p.register(App("convex", Singleton(), StandbyOf("prod", "convex")))
    with pytest.raises(ConfigError, match="one StandbyOf per app"):
        p.register(App("convex2", Singleton(), SQLite(tmp_path / "a.db"),
                       StandbyOf("prod", "convex"), StandbyOf("prod2", "convex")))


@pytest.mark.timeout(10)
def test_standby_of_naming_its_own_platform_is_refused(tmp_path: Path) -> None:
    from pycluster_sqlite.runtime import SQLiteRuntime

    db = SQLite(tmp_path / "a.db")
    app = App("convex", Singleton(), db, StandbyOf("edge", "convex"))
    p = Platform("edge", nats_url="nats://127.0.0.1:1", plugin_manager=_pm())
    p.register(app)
    with pytest.raises(ConfigError, match="names this platform"):
        SQLiteRuntime(db, app, p)


@pytest.mark.timeout(10)
def test_standby_of_config_section(tmp_path: Path) -> None:
    from pycluster.cli.config_apps import build_app
    from pycluster.kernel.registry import ConfigRegistry
    from pycluster.kernel.settings import AppConfig

    reg = ConfigRegistry()
    sqlite_plugin.pycluster_config_sections(registry=reg)
    cfg = AppConfig.model_validate({
        "name": "convex", "mode": "singleton", "sqlite": {"path": str(tmp_path / "x.db")},
        "standby_of": {"platform": "prod", "app": "convex"}})
    so = [o for o in build_app(cfg, reg).options if isinstance(o, StandbyOf)]
    assert so and so[0].platform == "prod" and so[0].app == "convex"
    bad = AppConfig.model_validate({"name": "convex", "sqlite": {"path": "/x.db"},
                                    "standby_of": {"platform": "prod"}})
    with pytest.raises(ConfigError, match="standby_of"):
        build_app(bad, reg)


# -- a hub and a leaf zone -----------------------------------------------------------------------


@dataclass
class Zones:
    hub: Platform
    leaf: Platform
    proxy: TcpProxy
    hub_app: App
    hub_db: SQLite
    leaf_app: App
    leaf_db: SQLite


@contextlib.asynccontextmanager
async def _two_zones(tmp_path: Path, unique_name: str, **hub_sqlite: Any) -> AsyncIterator[Zones]:
    port = free_port()
    hub_name, leaf_name = f"hub{unique_name}"[:24], f"edge{unique_name}"[:24]
    hub = Platform(hub_name, node_id="hub-1", zone="hq", data_dir=str(tmp_path / "hub"),
                   lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=_pm(),
                   hub=HubListen(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                 no_advertise=True))
    hub_db = SQLite(tmp_path / "hubdb" / "data.db", **hub_sqlite)
    hub_app = App("convex", Singleton(), hub_db)
    hub.register(hub_app)
    proxy = TcpProxy("127.0.0.1", port, name="leaf")
    await proxy.start()
    leaf = Platform(leaf_name, node_id="edge-1", zone="z1", data_dir=str(tmp_path / "leaf"),
                    lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=_pm(),
                    leaf=LeafOf(f"nats-leaf://127.0.0.1:{proxy.port}", user=USER,
                                password=PASSWORD, reconnect=0.25))
    leaf_db = SQLite(tmp_path / "leafdb" / "data.db")
    leaf_app = App("convex", Singleton(), leaf_db, StandbyOf(hub_name, "convex"))
    leaf.register(leaf_app)
    started: list[Platform] = []
    try:
        for p in (hub, leaf):
            await p.start()
            started.append(p)
        await wait_for(lambda: hub_app.is_active and leaf_app.is_active, 30,
                       message="both apps active in their zones")
        yield Zones(hub, leaf, proxy, hub_app, hub_db, leaf_app, leaf_db)
    finally:
        for p in reversed(started):
            await p.stop()
        await proxy.close()


@pytest.fixture
async def zones(tmp_path: Path, unique_name: str, litestream_bin: str) -> AsyncIterator[Zones]:
    async with _two_zones(tmp_path, unique_name) as z:
        yield z


def _replica_rows(db: SQLite) -> list[tuple[Any, ...]]:
    try:
        con = open_replica(db)
    except sqlite3.OperationalError:
        return []  # not restored yet
    try:
        return list(con.execute("SELECT * FROM t ORDER BY 1"))
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def _replica_has(db: SQLite, expected: list[tuple[Any, ...]], timeout: float) -> None:
    async def same() -> bool:
        return await asyncio.to_thread(_replica_rows, db) == expected

    await wait_for(same, timeout, message=f"{len(expected)} rows in the zone replica")


async def _call(hook: Any, **kw: Any) -> None:
    for res in hook(**kw):
        if asyncio.iscoroutine(res):
            await res


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_zone_standby_follows_the_hub_across_a_cut_then_promotes(zones: Zones) -> None:
    hub_db, leaf_db = zones.hub_db, zones.leaf_db
    await asyncio.to_thread(insert, hub_db.path, 30, "before")
    pos = await hub_db.wal.sync()
    expected = await asyncio.to_thread(rows, hub_db.path)
    await _replica_has(leaf_db, expected, 60)
    # The leaf's copy is the database itself, read-only; its lag reaches 0.
    assert await asyncio.to_thread(rows, leaf_db.path) == expected
    await wait_for(lambda: leaf_db.wal.lag() == 0.0, 20, message="zone lag 0")
    st = leaf_db.wal.status()
    assert st["zone"]["role"] == "standby" and st["zone"]["link"] == "up", st
    assert st["zone"]["following"] == f"{zones.hub.name}/convex" and st["zone"]["platform_answers"]
    assert (st["replica_txid"] or 0) >= (pos.replicated_txid or 0)
    assert st["replicate"] is None  # a zone standby replicates nothing
    leaf_pm = zones.leaf.pm
    assert leaf_pm.hook.pycluster_zone_position(app=zones.leaf_app) == st["replica_txid"]
    with pytest.raises(sqlite3.OperationalError):
        con = open_replica(leaf_db)
        try:
            con.execute("INSERT INTO t (v) VALUES ('x')")
        finally:
            con.close()

    # Cut the link: the hub keeps writing, the leaf reports the link down and a growing lag,
    # and still serves reads at its last position.
    zones.proxy.cut()
    await asyncio.to_thread(insert, hub_db.path, 20, "during-cut")
    await hub_db.wal.sync()
    await wait_for(lambda: leaf_db.wal.status()["zone"]["link"] == "down", 20,
                   message="link reported down")
    lag = await wait_for(lambda: leaf_db.wal.lag() if leaf_db.wal.lag() >= 2.0 else None, 20,
                         message="lag grows while cut")
    assert lag >= 2.0
    assert await asyncio.to_thread(_replica_rows, leaf_db) == expected
    text = zones.leaf.metrics.render().decode()
    assert 'pycluster_sqlite_replication_lag_seconds{app="convex"}' in text
    assert 'pycluster_sqlite_zone_link_up{app="convex"} 0.0' in text

    # Heal: the mirror resumes, the replica catches up.
    zones.proxy.restore()
    await asyncio.to_thread(insert, hub_db.path, 5, "after-heal")
    synced = await hub_db.wal.sync()
    expected = await asyncio.to_thread(rows, hub_db.path)
    await _replica_has(leaf_db, expected, 90)
    await wait_for(lambda: leaf_db.wal.status()["zone"]["link"] == "up", 20)
    await wait_for(lambda: leaf_db.wal.lag() < 1.0, 30, message="lag back near 0")
    text = zones.leaf.metrics.render().decode()
    assert 'pycluster_sqlite_zone_link_up{app="convex"} 1.0' in text

    # Promote the leaf zone: every synced row is there; it writes and replicates into its own
    # bucket.
    await _call(leaf_pm.hook.pycluster_zone_promote, app=zones.leaf_app, term=7)
    rt = runtime_of(leaf_db)
    assert rt.wal_bucket == f"{zones.leaf.name}_convex_wal"
    assert rt.replicate_pid() is not None
    assert leaf_db.wal.status()["zone"]["role"] == "primary"
    promo = leaf_db.wal.status()["last_promotion"]
    assert promo["term"] == 7 and promo["txid"] >= (synced.replicated_txid or 0), promo
    assert await asyncio.to_thread(rows, leaf_db.path) == expected
    await asyncio.to_thread(insert, leaf_db.path, 10, "leaf-primary")
    leaf_pos = await leaf_db.wal.sync()
    assert (leaf_pos.replicated_txid or 0) >= 1
    leaf_rows = await asyncio.to_thread(rows, leaf_db.path)
    assert len(leaf_rows) == len(expected) + 10

    # Demote the old hub: it stops replicating first, then follows the new primary.
    hub_rt = runtime_of(hub_db)
    assert hub_rt.replicate_pid() is not None
    await _call(zones.hub.pm.hook.pycluster_zone_demote, app=zones.hub_app,
                primary_platform=zones.leaf.name, term=7)
    assert hub_rt.replicate_pid() is None and hub_rt.replicator is None
    assert hub_db.wal.status()["zone"]["following"] == f"{zones.leaf.name}/convex"
    await _replica_has(hub_db, leaf_rows, 90)
    await asyncio.to_thread(insert, leaf_db.path, 3, "leaf-more")
    await leaf_db.wal.sync()
    await _replica_has(hub_db, await asyncio.to_thread(rows, leaf_db.path), 60)
    assert Path(f"{hub_db.path}.pre-demotion").exists()

    # A restarted node of the promoted zone stays primary (the promotion is recorded in the
    # app KV), with every row.
    leaf_rows = await asyncio.to_thread(rows, leaf_db.path)
    await zones.leaf.stop()
    again_db = SQLite(leaf_db.path)
    again = App("convex", Singleton(), again_db, StandbyOf(zones.hub.name, "convex"))
    restarted = Platform(zones.leaf.name, node_id="edge-1", zone="z1",
                         data_dir=zones.leaf.settings.data_dir, lease_ttl=2.0,
                         heartbeat_interval=0.5, plugin_manager=_pm(),
                         leaf=zones.leaf.settings.leaf)
    restarted.register(again)
    await restarted.start()
    try:
        await wait_for(lambda: again.is_active, 30, message="restarted leaf active")
        rt2 = runtime_of(again_db)
        assert not rt2.zone_mode and rt2.wal_bucket == f"{zones.leaf.name}_convex_wal"
        assert again_db.wal.status()["zone"]["role"] == "primary"
        await wait_for(lambda: rt2.replicate_pid() is not None, 30, message="replicating")
        assert await asyncio.to_thread(rows, again_db.path) == leaf_rows
        await asyncio.to_thread(insert, again_db.path, 2, "after-restart")
        await again_db.wal.sync()
        await _replica_has(hub_db, await asyncio.to_thread(rows, again_db.path), 60)
    finally:
        await restarted.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_zone_standby_on_a_three_server_leaf_zone_with_r3_mirror(
        tmp_path: Path, unique_name: str, litestream_bin: str) -> None:
    """The leaf zone is a 3-server cluster: the mirror is an R3 stream; killing the server
    that leads it does not stop the zone standby (the hub's later rows arrive)."""
    from pycluster.kernel.leaf import leafnode_config
    from pycluster.testing.servers import NatsCluster, NatsServer

    hub_port = free_port()
    conf = tmp_path / "hub.conf"
    conf.write_text(leafnode_config("hq", hub=HubListen(host="127.0.0.1", port=hub_port,
                                                        allow_anonymous=True)))
    hub_server = NatsServer(config_file=conf)
    cluster = NatsCluster(3, server_config=lambda i: leafnode_config("z1", leaf=LeafOf(
        f"nats-leaf://127.0.0.1:{hub_port}", reconnect=0.25)))
    hub_name, leaf_name = f"hub{unique_name}"[:24], f"edge{unique_name}"[:24]
    started: list[Any] = []
    try:
        await hub_server.start()
        started.append(hub_server)
        await cluster.start()
        started.append(cluster)
        hub = Platform(hub_name, node_id="hub-1", nats_url=hub_server.url, zone="hq",
                       zone_role="hub", lease_ttl=2.0, heartbeat_interval=0.5,
                       plugin_manager=_pm())
        hub_db = SQLite(tmp_path / "hubdb" / "data.db")
        hub_app = App("convex", Singleton(), hub_db)
        hub.register(hub_app)
        leaf = Platform(leaf_name, node_id="edge-1", nats_url=cluster.urls, zone="z1",
                        zone_role="leaf", stream_replicas=3, lease_ttl=2.0,
                        heartbeat_interval=0.5, plugin_manager=_pm())
        leaf_db = SQLite(tmp_path / "leafdb" / "data.db")
        leaf.register(App("convex", Singleton(), leaf_db, StandbyOf(hub_name, "convex")))
        for p in (hub, leaf):
            await p.start()
            started.append(p)
        await wait_for(lambda: hub_app.is_active, 30, message="hub app active")
        await asyncio.to_thread(insert, hub_db.path, 20, "first")
        await hub_db.wal.sync()
        await _replica_has(leaf_db, await asyncio.to_thread(rows, hub_db.path), 90)
        assert leaf.js is not None
        info = await leaf.js.stream_info(f"OBJ_{hub_name}_convex_wal")
        assert info.config.num_replicas == 3 and info.config.mirror is not None
        assert info.cluster is not None and info.cluster.leader is not None
        # Kill the server leading the mirror (the platform reconnects if it used that one).
        cluster.kill(cluster.index_of(info.cluster.leader))
        await asyncio.to_thread(insert, hub_db.path, 10, "after-kill")
        await hub_db.wal.sync()
        await _replica_has(leaf_db, await asyncio.to_thread(rows, hub_db.path), 120)
    finally:
        for item in reversed(started):
            await item.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_a_promoted_zone_of_two_nodes_fails_over_locally(zones: Zones,
                                                               tmp_path: Path) -> None:
    """Both nodes of the leaf zone follow the hub; the promotion (called on both) makes the
    lease holder the writer and the other its standby; a local handover then keeps every
    row: the synced hub rows and the zone's own."""
    from pycluster.kernel.settings import secret_value

    leaf = zones.leaf
    assert leaf.embedded is not None
    db2 = SQLite(tmp_path / "leafdb2" / "data.db")
    app2 = App("convex", Singleton(), db2, StandbyOf(zones.hub.name, "convex"))
    node2 = Platform(leaf.name, node_id="edge-2", zone="z1", zone_role="leaf",
                     nats_url=leaf.embedded.url, nats_user=leaf.settings.nats_user,
                     nats_password=secret_value(leaf.settings.nats_password),
                     data_dir=str(tmp_path / "leaf2"), lease_ttl=2.0, heartbeat_interval=0.5,
                     plugin_manager=_pm())
    node2.register(app2)
    await node2.start()
    try:
        await asyncio.to_thread(insert, zones.hub_db.path, 25, "hub")
        await zones.hub_db.wal.sync()
        hub_rows = await asyncio.to_thread(rows, zones.hub_db.path)
        for db in (zones.leaf_db, db2):
            await _replica_has(db, hub_rows, 60)
        assert zones.leaf_app.is_active and not app2.is_active
        for p, app in ((node2, app2), (leaf, zones.leaf_app)):
            await _call(p.pm.hook.pycluster_zone_promote, app=app, term=3)
        rt1, rt2 = runtime_of(zones.leaf_db), runtime_of(db2)
        assert rt1.replicate_pid() is not None and rt2.replicate_pid() is None
        assert rt2.wal_bucket == rt1.wal_bucket == f"{leaf.name}_convex_wal"
        await asyncio.to_thread(insert, zones.leaf_db.path, 5, "zone")
        pos = await zones.leaf_db.wal.sync()
        await wait_for(lambda: (db2.wal.position().txid or 0) >= (pos.txid or 0), 60,
                       message="the zone's standby follows the zone's bucket")
        before = await asyncio.to_thread(rows, zones.leaf_db.path)
        assert len(before) == len(hub_rows) + 5
        await zones.leaf_app.step_down()
        await wait_for(lambda: app2.is_active, 60, message="edge-2 took over")
        await wait_for(lambda: rt2.replicate_pid() is not None, 30, message="edge-2 replicates")
        assert await asyncio.to_thread(rows, db2.path) == before
    finally:
        await node2.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_zone_leader_purges_what_the_source_deleted_from_the_mirror(
        tmp_path: Path, unique_name: str, litestream_bin: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A mirror does not copy purges: Litestream's deleted LTX files (compaction) would stay
    in the zone forever. The zone's leader purges them; the replica keeps following."""
    import pycluster_sqlite.zone as zone

    monkeypatch.setattr(zone, "JANITOR_EVERY", 1.0)
    monkeypatch.setattr(zone, "PURGE_AFTER", 0.5)
    async with _two_zones(tmp_path, unique_name, compaction_levels=(1.0,),
                          l0_retention=1.0) as z:
        assert z.hub.js is not None and z.leaf.js is not None
        stream = f"OBJ_{z.hub.name}_convex_wal"
        for i in range(15):
            await asyncio.to_thread(insert, z.hub_db.path, 5, f"batch{i}")
            await z.hub_db.wal.sync()
            await asyncio.sleep(0.2)
        await _replica_has(z.leaf_db, await asyncio.to_thread(rows, z.hub_db.path), 60)
        rt = runtime_of(z.leaf_db)
        assert rt.index is not None
        await wait_for(lambda: any(e.deleted for e in rt.index.entries.values()), 30,
                       message="compaction deleted LTX files")

        async def purged() -> bool:
            assert z.hub.js is not None and z.leaf.js is not None
            hub_info = await z.hub.js.stream_info(stream)
            mirror = await z.leaf.js.stream_info(stream)
            return mirror.state.bytes < hub_info.state.bytes

        await wait_for(purged, 60, message="the mirror holds less than the source")
        await asyncio.to_thread(insert, z.hub_db.path, 5, "after-purge")
        await z.hub_db.wal.sync()
        await _replica_has(z.leaf_db, await asyncio.to_thread(rows, z.hub_db.path), 60)
