"""Zones joined by NATS leaf nodes: a hub platform and two leaf platforms, each with its own
embedded nats-server, the leaf links going through TCP proxies (a zone is cut off and healed
without root). Leaf config, JetStream domains, cross-zone API calls and events, the hub link."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from click.testing import CliRunner

from pycluster import App, CircuitOpenError, ConfigError, HubListen, LeafOf, Platform, Singleton
from pycluster.builtin.leaf.remote import ZoneUnreachableError
from pycluster.builtin.leaf.service import ZoneService
from pycluster.kernel.errors import NoInstanceError
from pycluster.kernel.leaf import leafnode_config
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.cli import cli_output
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.servers import free_port
from pycluster.testing.zones import LeafZones

LEAF_USER, LEAF_PASSWORD = "leaf", "leaf-link-secret"


# -- configuration (no servers) ----------------------------------------------------------------


@pytest.mark.timeout(10)
def test_hub_and_leaf_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"HubListen\.port"):
        Platform("p", hub={"port": 70000, "user": "a", "password": "b"})
    with pytest.raises(ConfigError, match="scheme must be one of nats-leaf://"):
        LeafOf("http://hub:7422")
    with pytest.raises(ConfigError, match=r"HubListen.*give both tls_cert and tls_key"):
        HubListen(user="a", password="b", tls_key="k.pem")
    with pytest.raises(ConfigError, match=r"LeafOf\.url") as info:
        Platform("p", leaf={"url": "nats-leaf://u:topsecret@hub:7422"})
    assert "topsecret" not in str(info.value)
    with pytest.raises(ConfigError, match="credentials"):
        Platform("p", hub={"port": 7422})
    with pytest.raises(ConfigError, match="zone"):
        Platform("p", zone="eu.west")
    with pytest.raises(ConfigError, match="nats-config --hub/--leaf"):
        Platform("p", nats_url="nats://127.0.0.1:4222",
                 leaf=LeafOf("nats-leaf://hub:7422", user="a", password="b"))


@pytest.mark.timeout(10)
def test_leafnode_config_text() -> None:
    hub = leafnode_config("eu", hub=HubListen(port=7422, host="127.0.0.1", user="leaf",
                                              password="p w", tls_cert="c.pem",
                                              tls_key="k.pem"))
    assert 'domain: "eu"' in hub and "port: 7422" in hub and 'password: "p w"' in hub
    assert 'cert_file: "c.pem"' in hub
    leaf = leafnode_config("paris", leaf=LeafOf("nats-leaf://hub.example:7422", user="leaf",
                                                password="p@ss", reconnect=0.5))
    assert 'domain: "paris"' in leaf
    assert '"nats-leaf://leaf:p%40ss@hub.example:7422"' in leaf
    assert 'reconnect: "0.5s"' in leaf


@pytest.mark.timeout(30)
def test_nats_config_writes_hub_and_leaf_blocks(tmp_path: Path) -> None:
    from pycluster.cli.main import cli

    pm = create_plugin_manager(load_entrypoints=False)
    hub_dir, leaf_dir = tmp_path / "hub", tmp_path / "leaf"
    r = CliRunner().invoke(cli, ["nats-config", "-p", "prod", "--app", "convex", "--auth",
                                 "password", "--hub", "7422", "--zone", "eu",
                                 "--out", str(hub_dir)], obj=pm)
    assert r.exit_code == 0, r.output
    text = (hub_dir / "nats-server.conf").read_text()
    assert "leafnodes {" in text and "port: 7422" in text and 'domain: "eu"' in text
    assert '"_pycluster.zones"' in text  # nodes may answer zone listings
    link = json.loads((hub_dir / "leaf-link.json").read_text())
    assert link["user"] and link["password"]
    r = CliRunner().invoke(cli, ["nats-config", "-p", "edge", "--app", "shop", "--auth",
                                 "password", "--leaf", "nats-leaf://hub.example:7422",
                                 "--leaf-credentials", str(hub_dir / "leaf-link.json"),
                                 "--zone", "paris", "--out", str(leaf_dir)], obj=pm)
    assert r.exit_code == 0, r.output
    text = (leaf_dir / "nats-server.conf").read_text()
    assert "remotes" in text and link["password"] in text and 'domain: "paris"' in text
    r = CliRunner().invoke(cli, ["nats-config", "-p", "edge", "--app", "shop",
                                 "--leaf", "http://x:1", "--out", str(tmp_path / "x")], obj=pm)
    assert r.exit_code != 0 and "scheme" in r.output


# -- three zones on loopback -------------------------------------------------------------------


@dataclass
class Zones:
    hub: Platform
    leaves: list[Platform]
    proxies: list[TcpProxy]
    convex: App


def _platform(tmp: Path, name: str, zone: str, **kw: Any) -> Platform:
    return Platform(name, node_id=f"{name}-1", zone=zone, data_dir=str(tmp / name),
                    lease_ttl=2.0, heartbeat_interval=0.5,
                    plugin_manager=create_plugin_manager(load_entrypoints=False), **kw)


@pytest.fixture
async def zones(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
    convex = App("convex", Singleton())

    @convex.handle("where")
    async def where(x: int) -> dict[str, Any]:
        assert convex.platform is not None
        return {"x": x, "platform": convex.platform.name}

    def make(name: str, zone: str, **kw: Any) -> Platform:
        p = _platform(tmp_path, name, zone, **kw)
        if "hub" in kw:
            p.register(convex)
        return p

    async with LeafZones(make, unique_name) as lz:
        assert lz.hub is not None
        assert await convex.wait_for_leadership(15)
        yield Zones(lz.hub, lz.leaves, lz.proxies, convex)


def _zone(p: Platform) -> ZoneService:
    svc: ZoneService = LeafZones.zone_service(p)
    return svc


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_zones_leaf_links_domains_calls_events_and_a_cut(zones: Zones) -> None:
    hub, (leaf1, leaf2) = zones.hub, zones.leaves
    # The leaf links formed: each leaf sees its hub, the hub sees both leaves.
    for leaf in (leaf1, leaf2):
        await wait_for(lambda leaf=leaf: _zone(leaf).hub.up, 20)
        assert _zone(leaf).hub.platform == hub.name and _zone(leaf).hub.zone == "hq"
    await wait_for(lambda: sum(v["up"] for v in _zone(hub).leaves_view()) == 2, 10)
    assert {v["zone"] for v in _zone(hub).leaves_view()} == {"z1", "z2"}

    # Each zone's JetStream is its own domain: the same bucket name holds different data.
    for p in (hub, leaf1, leaf2):
        assert p.js is not None
        kv = await p.js.create_key_value(bucket="shared")
        await kv.put("who", p.name.encode())
    for p in (hub, leaf1, leaf2):
        assert p.js is not None
        assert (await (await p.js.key_value("shared")).get("who")).value == p.name.encode()
    # ... and the hub's domain stays readable from a leaf, by name.
    assert leaf1.nc is not None
    hub_js = leaf1.nc.jetstream(domain="hq")
    assert (await (await hub_js.key_value("shared")).get("who")).value == hub.name.encode()

    # A cross-zone API call, with where it was answered.
    convex = leaf1.remote(hub.name).api("convex", timeout=5.0)
    reply = await wait_for(lambda: convex.call_detailed("where", 7), 15,
                           ignore=(NoInstanceError, TimeoutError))
    assert reply.value == {"x": 7, "platform": hub.name}
    assert reply.platform == hub.name and reply.node == f"{hub.name}-1"
    assert reply.zone == "hq"
    assert await leaf2.remote(hub.name).api("convex").call("where", 8) == {
        "x": 8, "platform": hub.name}

    # Events: a leaf publishes into the hub's stream; a leaf hears the hub's events live.
    got_hub: asyncio.Queue[Any] = asyncio.Queue()
    got_leaf: asyncio.Queue[Any] = asyncio.Queue()

    async def on_hub(ev: Any) -> None:
        got_hub.put_nowait(ev)

    async def on_leaf(ev: Any) -> None:
        got_leaf.put_nowait(ev)

    await hub.events.subscribe("order.*", cb=on_hub)
    await leaf2.remote(hub.name).events.subscribe("price.>", cb=on_leaf)
    ev = await leaf1.remote(hub.name).events.publish("order.created", {"id": 1},
                                                      source_app="shop")
    assert ev.seq is not None and ev.seq >= 1
    seen = await asyncio.wait_for(got_hub.get(), 10)
    assert seen.type == "order.created" and seen.data == {"id": 1}
    assert seen.source_app == "shop"
    assert seen.headers["Pycluster-Source-Platform"] == leaf1.name
    assert seen.headers["Pycluster-Source-Zone"] == "z1"
    await hub.events.publish("price.changed", {"sku": "a"})
    seen = await asyncio.wait_for(got_leaf.get(), 10)
    assert seen.type == "price.changed" and seen.data == {"sku": "a"}

    # Cut zone 1 off: a clear error at once, the link reported down; zone 2 unaffected.
    zones.proxies[0].cut()
    err = await wait_for(lambda: _unreachable(convex), 20)
    assert err.platform == hub.name and "leaf link down" in str(err)
    await wait_for(lambda: not _zone(leaf1).hub.up, 10)
    with pytest.raises(ZoneUnreachableError):
        await leaf1.remote(hub.name).events.publish("order.created", {"id": 2})
    assert (await leaf2.remote(hub.name).api("convex").call("where", 9))["x"] == 9
    await wait_for(lambda: _down(hub) == [leaf1.name], 15)
    # The cut zone's own JetStream keeps working.
    assert leaf1.js is not None
    assert (await (await leaf1.js.key_value("shared")).get("who")).value == leaf1.name.encode()

    # Heal: calls and the link come back (once the breaker, opened by the failures, probes).
    zones.proxies[0].restore()
    reply = await wait_for(lambda: convex.call_detailed("where", 10), 30,
                           ignore=(NoInstanceError, TimeoutError, CircuitOpenError))
    assert reply.value["x"] == 10
    await wait_for(lambda: _zone(leaf1).hub.up, 10)
    await wait_for(lambda: all(v["up"] for v in _zone(hub).leaves_view()), 10)


def _down(hub: Platform) -> list[str]:
    return [v["platform"] for v in _zone(hub).leaves_view() if not v["up"]]


async def _unreachable(client: Any) -> ZoneUnreachableError | None:
    try:
        await client.call("where", 0, timeout=2.0)
    except ZoneUnreachableError as exc:
        return exc
    except (NoInstanceError, TimeoutError):
        return None
    return None


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_leaf_cli_status_and_metrics(zones: Zones) -> None:

    hub, (leaf1, leaf2) = zones.hub, zones.leaves
    await wait_for(lambda: _zone(leaf1).hub.up and _zone(leaf2).hub.up, 20)
    await wait_for(lambda: sum(v["up"] for v in _zone(hub).leaves_view()) == 2, 10)
    # /status through the hook the health plugin collects.
    status = hub.pm.hook.pycluster_status(platform=hub)
    mine = next(s for s in status if s and s.get("role") == "hub")
    assert mine["zone"] == "hq" and len(mine["leaves"]) == 2
    leaf_status = next(s for s in leaf1.pm.hook.pycluster_status(platform=leaf1)
                       if s and s.get("role") == "leaf")
    assert leaf_status["hub"]["up"] and leaf_status["domain"] == "z1"
    # Metrics.
    text = leaf1.metrics.render().decode()
    assert "pycluster_leaf_link_up 1.0" in text
    assert f'pycluster_leaf_rtt_seconds_count{{remote="{hub.name}"}}' in text

    # The CLI, through the hub's embedded server (its URL and credentials from the data dir).
    def run(*args: str) -> Any:
        return cli_output(hub, *args)

    rows = json.loads(await asyncio.to_thread(run, "leaf", "list", "-p", hub.name, "-o",
                                              "json", "--wait", "1"))
    assert {r["platform"]: r["zone"] for r in rows} == {hub.name: "hq", leaf1.name: "z1",
                                                        leaf2.name: "z2"}
    assert all(r["link"] == "up" for r in rows)
    doc = json.loads(await asyncio.to_thread(run, "leaf", "status", "-p", leaf1.name, "-o",
                                             "json"))
    assert doc["role"] == "leaf" and doc["hub"]["up"]
    ping = json.loads(await asyncio.to_thread(run, "leaf", "ping", leaf2.name, "-p", hub.name,
                                              "-n", "2", "-o", "json"))
    assert ping["answered"] == 2 and ping["pings"][0]["zone"] == "z2"

    # A cut leaf shows as down in the hub's list.
    zones.proxies[1].cut()
    await wait_for(lambda: _down(hub) == [leaf2.name], 15)
    rows = json.loads(await asyncio.to_thread(run, "leaf", "list", "-p", hub.name, "-o",
                                              "json", "--wait", "0.5"))
    assert {r["platform"]: r["link"] for r in rows}[leaf2.name] == "down"
    zones.proxies[1].restore()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_operator_run_servers_with_the_generated_leaf_config(tmp_path: Path,
                                                                    unique_name: str) -> None:
    """Servers run by an operator with `leafnode_config` text (what `nats-config --hub/--leaf`
    writes): the link forms (the hub's /leafz lists the leaf), and platforms on them, told
    their zone and role, call across."""
    import urllib.request

    from pycluster.testing.servers import NatsServer

    leaf_port, monitor = free_port(), free_port()
    hub_conf = tmp_path / "hub.conf"
    hub_conf.write_text(leafnode_config("hq", hub=HubListen(
        host="127.0.0.1", port=leaf_port, allow_anonymous=True, no_advertise=True)))
    proxy = TcpProxy("127.0.0.1", leaf_port)
    await proxy.start()
    leaf_conf = tmp_path / "leaf.conf"
    leaf_conf.write_text(leafnode_config("z1", leaf=LeafOf(
        f"nats-leaf://127.0.0.1:{proxy.port}", reconnect=0.25)))
    hub_server = NatsServer(config_file=hub_conf, extra_args=["-m", str(monitor)])
    leaf_server = NatsServer(config_file=leaf_conf)
    started: list[Any] = []
    try:
        for server in (hub_server, leaf_server):
            await server.start()
            started.append(server)

        def leafz() -> dict[str, Any]:
            with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/leafz", timeout=2) as r:
                doc: dict[str, Any] = json.load(r)
            return doc

        doc = await wait_for(_leafz_with_one(leafz), 15)
        assert doc["leafs"][0]["account"] == "$G"

        hub = Platform(f"hub{unique_name}"[:30], node_id="h1", nats_url=hub_server.url,
                       zone="hq", zone_role="hub", lease_ttl=2.0, heartbeat_interval=0.5,
                       plugin_manager=create_plugin_manager(load_entrypoints=False))
        convex = App("convex", Singleton())

        @convex.handle("ping")
        async def ping() -> str:
            return "pong"

        hub.register(convex)
        leaf = Platform(f"edge{unique_name}"[:30], node_id="e1", nats_url=leaf_server.url,
                        zone="z1", zone_role="leaf", lease_ttl=2.0, heartbeat_interval=0.5,
                        plugin_manager=create_plugin_manager(load_entrypoints=False))
        _zone(leaf).interval = 0.25
        for p in (hub, leaf):
            await p.start()
            started.append(p)
        assert await convex.wait_for_leadership(15)
        api = leaf.remote(hub.name).api("convex")
        assert await wait_for(lambda: api.call("ping"), 15,
                              ignore=(NoInstanceError, TimeoutError)) == "pong"
        await wait_for(lambda: _zone(leaf).hub.up, 10)
        assert _zone(leaf).hub.zone == "hq" and _zone(hub).leaves_view()[0]["zone"] == "z1"
        proxy.cut()
        await wait_for(lambda: not _zone(leaf).hub.up, 15)
        assert isinstance(await wait_for(lambda: _unreachable_ping(api), 15),
                          ZoneUnreachableError)
    finally:
        for item in reversed(started):
            await item.stop()
        await proxy.close()


def _leafz_with_one(leafz: Any) -> Any:
    async def check() -> dict[str, Any] | None:
        doc: dict[str, Any] = await asyncio.to_thread(leafz)
        return doc if doc.get("leafnodes") == 1 else None

    return check


async def _unreachable_ping(client: Any) -> ZoneUnreachableError | None:
    try:
        await client.call("ping", timeout=2.0)
    except ZoneUnreachableError as exc:
        return exc
    except (NoInstanceError, TimeoutError):
        return None
    return None


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_leaf_zone_of_a_three_server_hub_with_r3_streams(tmp_path: Path,
                                                                  unique_name: str) -> None:
    """The hub zone is a 3-server cluster (R3 streams), each server listening for leaves; a
    leaf zone's server connects to all three. Events published from the leaf land in the hub
    platform's R3 stream; when the hub server the link uses is killed, the link moves to
    another and calls and publishes work again."""
    from pycluster.testing.servers import NatsCluster, NatsServer

    leaf_ports = [free_port() for _ in range(3)]
    cluster = NatsCluster(3, server_config=lambda i: leafnode_config("hq", hub=HubListen(
        host="127.0.0.1", port=leaf_ports[i], allow_anonymous=True)))
    leaf_server = NatsServer(config_file=_write(tmp_path / "leaf.conf", leafnode_config(
        "z1", leaf=LeafOf([f"nats-leaf://127.0.0.1:{p}" for p in leaf_ports], reconnect=0.25))))
    started: list[Any] = []
    try:
        await cluster.start()
        started.append(cluster)
        await leaf_server.start()
        started.append(leaf_server)

        async def linked_server() -> list[int]:  # a list: server 0 must not read as falsy
            docs = await asyncio.gather(*(cluster.monitor(i, "leafz") for i in range(3)))
            return [i for i, doc in enumerate(docs) if doc.get("leafnodes")]

        (linked,) = await wait_for(linked_server, 20)
        # The hub platform's nodes use the other servers: the kill below moves only the link.
        others = [cluster.url(i) for i in range(3) if i != linked]
        hub = Platform(f"hub{unique_name}"[:30], node_id="h1", nats_url=others,
                       zone="hq", zone_role="hub", stream_replicas=3, lease_ttl=2.0,
                       heartbeat_interval=0.5,
                       plugin_manager=create_plugin_manager(load_entrypoints=False))
        convex = App("convex", Singleton())

        @convex.handle("ping")
        async def ping() -> str:
            return "pong"

        hub.register(convex)
        leaf = Platform(f"edge{unique_name}"[:30], node_id="e1", nats_url=leaf_server.url,
                        zone="z1", zone_role="leaf", lease_ttl=2.0, heartbeat_interval=0.5,
                        plugin_manager=create_plugin_manager(load_entrypoints=False))
        for p in (hub, leaf):
            await p.start()
            started.append(p)
        assert await convex.wait_for_leadership(20)
        api = leaf.remote(hub.name).api("convex", timeout=5.0)
        assert await wait_for(lambda: api.call("ping"), 20,
                              ignore=(NoInstanceError, TimeoutError)) == "pong"
        events = leaf.remote(hub.name).events
        first = await events.publish("order.created", {"n": 1}, source_app="shop")
        assert hub.js is not None
        info = await hub.js.stream_info(f"{hub.name}_events")
        assert info.config.num_replicas == 3 and info.state.last_seq >= (first.seq or 0) >= 1

        # Kill the hub server the leaf link uses: the link moves to another hub server.
        assert await linked_server() == [linked]
        cluster.kill(linked)
        assert await wait_for(lambda: api.call("ping", timeout=2.0), 60,
                              ignore=(NoInstanceError, TimeoutError, CircuitOpenError)) == "pong"
        later = await wait_for(
            lambda: events.publish("order.created", {"n": 2}, source_app="shop", timeout=2.0),
            60, ignore=(ZoneUnreachableError, TimeoutError, nats.errors.Error))
        assert later.seq is not None and later.seq > (first.seq or 0)
    finally:
        for item in reversed(started):
            await item.stop()


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
