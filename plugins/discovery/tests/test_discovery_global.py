"""Lookups across platforms: a hub platform and two leaf platforms, each on its own embedded
nats-server with its own JetStream domain (its own services bucket), the leaf links through TCP
proxies so that a zone can be cut off and healed. ``lookup(..., scope="global")`` and
``pycluster services show --scope global`` return every zone's instances with their platform
and zone; a cut zone is left out and named, without waiting for it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import pycluster_discovery.plugin as discovery_plugin
from pycluster import App, Platform, Singleton
from pycluster.builtin.leaf.service import ZoneService
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.cli import cli_output, cli_result
from pycluster.testing.proxy import TcpProxy
from pycluster.testing.zones import LeafZones
from pycluster_discovery import Service
from pycluster_discovery.federation import GlobalInstances, parse_request

LEAF_USER, LEAF_PASSWORD = "leaf", "leaf-link-secret"


# -- pure logic ---------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_lookup_requests_are_validated() -> None:
    req = parse_request(b'{"service": "http", "tags": ["a"], "healthy_only": false}')
    assert req == {"service": "http", "app": None, "tags": ("a",), "healthy_only": False}
    for bad in (b"[]", b'{"tags": "a"}', b'{"service": 3}', b"not json"):
        with pytest.raises(ValueError):
            parse_request(bad)


@pytest.mark.timeout(60)
async def test_global_lookup_on_one_nats(make_node: Callable[..., Any],
                                         unique_name: str) -> None:
    """Two platforms on the same NATS (no zones): each sees the other's instances with the
    platform named and no zone; nobody is unreachable."""
    a = await make_node("a1", name=f"{unique_name}a")
    b = await make_node("b1", App("web", Singleton(), Service("http", port=9090,
                                                             host="127.0.0.1")),
                        name=f"{unique_name}b")
    found = await wait_for(lambda: _complete(a, {(a.name, None), (b.name, None)}), 15,
                           message="both platforms' instances")
    assert {(i.platform, i.app, i.port) for i in found} >= {(a.name, "orders", 8080),
                                                             (b.name, "web", 9090)}
    assert found.unreachable == () and {a.name, b.name} <= set(found.platforms)
    assert all(i.platform is None for i in await b.services.lookup("http"))


# -- three zones on loopback -------------------------------------------------------------------


@dataclass
class Zones:
    hub: Platform
    leaves: list[Platform]
    proxies: list[TcpProxy]


def _platform(tmp: Path, name: str, zone: str, port: int, **kw: Any) -> Platform:
    app = App("web", Singleton(), Service("http", port=port, host="127.0.0.1", tags=[zone]))
    pm = create_plugin_manager(load_entrypoints=False, extra=[("discovery", discovery_plugin)])
    p = Platform(name, node_id=f"{name}-1", zone=zone, data_dir=str(tmp / name),
                 lease_ttl=2.0, heartbeat_interval=0.5, plugin_manager=pm, **kw)
    p.register(app)
    return p


@pytest.fixture
async def zones(tmp_path: Path, unique_name: str) -> AsyncIterator[Zones]:
    ports = iter((8080, 8081, 8082))

    def make(name: str, zone: str, **kw: Any) -> Platform:
        return _platform(tmp_path, name, zone, next(ports), **kw)

    async with LeafZones(make, unique_name) as lz:
        assert lz.hub is not None
        yield Zones(lz.hub, lz.leaves, lz.proxies)


def _zone(p: Platform) -> ZoneService:
    svc: ZoneService = LeafZones.zone_service(p)
    return svc


def _places(found: list[Any]) -> set[tuple[str | None, str | None]]:
    return {(i.platform, i.zone) for i in found}


async def _global(p: Platform, **kw: Any) -> GlobalInstances:
    found = await p.services.lookup("http", scope="global", **kw)
    assert isinstance(found, GlobalInstances)
    return found


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_global_lookup_across_leaf_links_and_a_cut_zone(zones: Zones) -> None:
    hub, (leaf1, leaf2) = zones.hub, zones.leaves
    everyone = {(hub.name, "hq"), (leaf1.name, "z1"), (leaf2.name, "z2")}
    await wait_for(lambda: sum(v["up"] for v in _zone(hub).leaves_view()) == 2, 20)

    # Every zone's instance, from every zone, each with its platform and zone.
    for asker in (hub, leaf1, leaf2):
        found = await wait_for(
            lambda asker=asker: _complete(asker, everyone), 30,
            message=f"{asker.name}: every zone's instance")
        assert found.complete and set(found.platforms) == {p for p, _ in everyone}
        by_platform = {i.platform: i for i in found}
        assert by_platform[leaf2.name].port == 8082 and by_platform[leaf2.name].tags == ("z2",)
    # The local scope is unchanged: this platform's own registry.
    local = await leaf1.services.lookup("http")
    assert [(i.app, i.port, i.platform) for i in local] == [("web", 8081, None)]
    # Filters travel with the request.
    tagged = await _global(leaf1, tags=["z2"])
    assert _places(tagged) == {(leaf2.name, "z2")}

    # The command line, through leaf 1's embedded server.
    out = await asyncio.to_thread(_cli, leaf1, "services", "show", "http", "-p", leaf1.name,
                                  "--scope", "global", "-o", "json")
    doc = json.loads(out)
    assert {(i["platform"], i["zone"]) for i in doc["instances"]} == everyone
    assert doc["unreachable"] == []

    # Cut zone 2 off: it is left out and named, by the hub and by the other leaf.
    zones.proxies[1].cut()
    for asker in (hub, leaf1):
        found = await wait_for(lambda asker=asker: _cut(asker, leaf2.name), 20,
                               message=f"{asker.name}: zone 2 left out")
        assert _places(found) == everyone - {(leaf2.name, "z2")}
        assert [(u.platform, u.zone) for u in found.unreachable] == [(leaf2.name, "z2")]
        assert "unreachable" in found.unreachable[0].reason
    # The cut zone itself sees its own instance and names the hub it cannot reach.
    alone = await wait_for(lambda: _cut(leaf2, hub.name), 20, message="zone 2 alone")
    assert _places(alone) == {(leaf2.name, "z2")}
    # The command line says so too (stderr), and still lists what answered.
    res = await asyncio.to_thread(_cli_result, leaf1, "services", "show", "http", "-p",
                                  leaf1.name, "--scope", "global")
    assert res.exit_code == 0, res.output
    assert f"platform {leaf2.name} (zone z2) did not answer" in res.stderr
    assert leaf1.name in res.stdout and leaf2.name not in res.stdout

    # Heal: complete again.
    zones.proxies[1].restore()
    for asker in (hub, leaf1, leaf2):
        await wait_for(lambda asker=asker: _complete(asker, everyone), 30,
                       message=f"{asker.name}: complete after the heal")


async def _complete(p: Platform,
                    places: set[tuple[str, str | None]]) -> GlobalInstances | None:
    found = await _global(p)
    return found if places <= _places(found) and found.complete else None


async def _cut(p: Platform, missing: str) -> GlobalInstances | None:
    found = await _global(p)
    named = [u.platform for u in found.unreachable]
    return found if named == [missing] and all(i.platform != missing for i in found) else None


def _plugins() -> Any:
    return create_plugin_manager(load_entrypoints=False, extra=[("discovery", discovery_plugin)])


def _cli_result(p: Platform, *args: str) -> Any:
    return cli_result(p, *args, plugins=_plugins())


def _cli(p: Platform, *args: str) -> str:
    return str(cli_output(p, *args, plugins=_plugins()))
