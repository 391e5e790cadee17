"""HTTP exports (Prometheus HTTP SD, the Consul read subset, JSON) and file SD, checked
against the shapes Prometheus and Consul document; real nats-server, in-process nodes."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pycluster import App, Platform, Spread
from pycluster.testing.wait import wait_for
from pycluster_discovery import PyCheck, Service
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(60)

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def disc(p: Any) -> Any:
    d = discovery_of(p)
    assert d is not None
    return d


async def get(url: str) -> tuple[int, dict[str, str], Any]:
    def fetch() -> tuple[int, dict[str, str], Any]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, dict(resp.headers), json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), None
    return await asyncio.to_thread(fetch)


def check_prometheus_groups(groups: Any) -> None:
    """http_sd_configs: a list of {"targets": [<host:port>], "labels": {<name>: <string>}}."""
    assert isinstance(groups, list)
    for g in groups:
        assert set(g) == {"targets", "labels"}
        assert all(isinstance(t, str) and re.match(r"^[^:/]+:\d+$", t) for t in g["targets"])
        assert all(LABEL_NAME.match(k) and isinstance(v, str) for k, v in g["labels"].items())


def check_catalog_entries(entries: Any) -> None:
    """Consul's /v1/catalog/service/<name> entries."""
    assert isinstance(entries, list)
    for e in entries:
        for key, kind in (("Node", str), ("Address", str), ("Datacenter", str),
                          ("ServiceID", str), ("ServiceName", str), ("ServiceTags", list),
                          ("ServiceAddress", str), ("ServicePort", int), ("ServiceMeta", dict),
                          ("CreateIndex", int), ("ModifyIndex", int)):
            assert isinstance(e[key], kind), key


def check_health_entries(entries: Any) -> None:
    """Consul's /v1/health/service/<name> entries."""
    assert isinstance(entries, list)
    for e in entries:
        assert set(e) == {"Node", "Service", "Checks"}
        assert {"Node", "Address", "Datacenter"} <= set(e["Node"])
        assert {"ID", "Service", "Tags", "Address", "Port", "Meta"} <= set(e["Service"])
        for c in e["Checks"]:
            assert {"Node", "CheckID", "Name", "Status", "ServiceID", "ServiceName"} <= set(c)


async def test_prometheus_consul_json_and_file_sd(make_node: Callable[..., Any],
                                                  tmp_path: Path) -> None:
    ok = {"n2": True}

    def app(node: str) -> App:
        return App("cache", Spread(), Service(
            "redis", port=6379, host=f"127.0.0.{node[1]}", tags=["v2", "primary"],
            metadata={"zone-id": "a"}, health=PyCheck(lambda: ok.get(node, True), interval=0.2)))

    p1: Platform = await make_node("n1", app("n1"), start=False)
    disc(p1).http_addr = "127.0.0.1:0"
    sd_file = tmp_path / "targets.json"
    disc(p1).file_sd_path = str(sd_file)
    await p1.start()
    await make_node("n2", app("n2"))
    base = disc(p1).http.url

    async def targets() -> list[str]:
        _, _, body = await get(base + "/v1/sd/prometheus")
        return sorted(t for g in body for t in g["targets"])

    async def targets_are(want: list[str]) -> bool:
        return await targets() == want

    await wait_for(lambda: targets_are(["127.0.0.1:6379", "127.0.0.2:6379"]), 10)
    status, _, groups = await get(base + "/v1/sd/prometheus")
    assert status == 200
    check_prometheus_groups(groups)
    labels = {g["targets"][0]: g["labels"] for g in groups}["127.0.0.1:6379"]
    assert labels["__meta_pycluster_service"] == "redis"
    assert labels["__meta_pycluster_node"] == "n1"
    assert labels["__meta_pycluster_tags"] == ",v2,primary,"
    assert labels["__meta_pycluster_metadata_zone_id"] == "a"

    # Consul: /v1/catalog/services maps names to tags
    status, headers, services = await get(base + "/v1/catalog/services")
    assert status == 200 and services == {"redis": ["primary", "v2"]}
    assert int(headers["X-Consul-Index"]) > 0
    # /v1/catalog/service/<name>
    await wait_for(lambda: _ok(base + "/v1/catalog/service/redis"), 5)
    _, _, entries = await get(base + "/v1/catalog/service/redis?tag=v2")
    assert sorted(e["Node"] for e in entries) == ["n1", "n2"]
    check_catalog_entries(entries)
    for e in entries:
        assert e["ServiceMeta"]["app"] == "cache" and e["ServicePort"] == 6379
    _, _, none = await get(base + "/v1/catalog/service/redis?tag=v9")
    assert none == []

    # /v1/health/service/<name>?passing drops a failing instance
    ok["n2"] = False

    async def passing_nodes() -> list[str]:
        _, _, body = await get(base + "/v1/health/service/redis?passing")
        return sorted(e["Node"]["Node"] for e in body)

    async def passing_are(want: list[str]) -> bool:
        return await passing_nodes() == want

    await wait_for(lambda: passing_are(["n1"]), 5)
    _, _, every = await get(base + "/v1/health/service/redis")
    by_node = {e["Node"]["Node"]: e for e in every}
    assert set(by_node) == {"n1", "n2"}
    check_health_entries(every)
    assert by_node["n2"]["Checks"][0]["Status"] == "critical"
    assert by_node["n1"]["Checks"][0]["Status"] == "passing"

    # JSON
    _, _, doc = await get(base + "/v1/services/redis?passing")
    assert [i["node"] for i in doc["instances"]] == ["n1"]
    _, _, doc = await get(base + "/v1/services")
    assert {i["status"] for i in doc["services"]} == {"passing", "critical"}

    # file SD: the same target groups, rewritten on change
    def file_targets() -> list[str]:
        try:
            return sorted(t for g in json.loads(sd_file.read_text()) for t in g["targets"])
        except (OSError, ValueError):
            return []

    await wait_for(lambda: file_targets() == ["127.0.0.1:6379"] or None, 5)
    ok["n2"] = True
    await wait_for(lambda: file_targets() == ["127.0.0.1:6379", "127.0.0.2:6379"] or None, 5)


async def _ok(url: str) -> bool:
    return (await get(url))[0] == 200


async def test_a_consul_client_reads_catalog_health_and_blocks(
        make_node: Callable[..., Any]) -> None:
    """py-consul, a Consul client library, against the Consul-compatible endpoints."""
    consul = pytest.importorskip("consul")
    p: Platform = await make_node("n1", App("cache", Spread(), Service(
        "redis", port=6379, host="127.0.0.1", tags=["v2"])), start=False)
    d = disc(p)
    d.http_addr = "127.0.0.1:0"
    await p.start()
    await wait_for(lambda: d.instances("redis"), 10)
    await wait_for(lambda: _ok(d.http.url + "/v1/catalog/service/redis"), 5)
    host, port = d.http.server.address
    c = consul.Consul(host=host, port=port)

    index, services = await asyncio.to_thread(c.catalog.services)
    assert services == {"redis": ["v2"]} and int(index) > 0
    _, nodes = await asyncio.to_thread(c.catalog.service, "redis")
    assert [(n["Node"], n["ServicePort"], n["ServiceAddress"]) for n in nodes] == [
        ("n1", 6379, "127.0.0.1")]
    _, healthy = await asyncio.to_thread(lambda: c.health.service("redis", passing=True))
    assert [(e["Node"]["Node"], e["Checks"][0]["Status"]) for e in healthy] == [
        ("n1", "passing")]

    # a blocking query returns when the registry changes
    blocked = asyncio.create_task(asyncio.to_thread(
        lambda: c.health.service("redis", index=index, wait="20s")))
    await asyncio.sleep(0.5)
    assert not blocked.done()
    await d.register("redis", 6380, app="cache", host="127.0.0.1", node="ext1")
    new_index, entries = await asyncio.wait_for(blocked, 15)
    assert int(new_index) > int(index)
    assert sorted(e["Node"]["Node"] for e in entries) == ["ext1", "n1"]


async def test_exports_on_the_health_address(make_node: Callable[..., Any]) -> None:
    """Without a discovery address of their own, the exports are on the node's health address
    beside /health and /status; a node with no services of its own starts discovery on the
    first request and answers the others' instances."""
    consul = pytest.importorskip("consul")

    def app(node: str) -> App:
        return App("cache", Spread(), Service("redis", port=6379, host=f"127.0.0.{node[1]}",
                                              tags=["v2"], metadata={"zone": "a"}))

    p1: Platform = await make_node("n1", app("n1"), health_addr="127.0.0.1:0")
    await make_node("n2", app("n2"))
    p3: Platform = await make_node("n3", App("idle", Spread()), health_addr="127.0.0.1:0")
    assert disc(p1).http is None and not disc(p3).running
    base1, base3 = p1.health.url, p3.health.url
    assert base1 is not None and base3 is not None

    async def targets(base: str) -> list[str]:
        status, _, body = await get(base + "/v1/sd/prometheus")
        assert status == 200
        check_prometheus_groups(body)
        return sorted(t for g in body for t in g["targets"])

    async def both(base: str) -> bool:
        return await targets(base) == ["127.0.0.1:6379", "127.0.0.2:6379"]

    await wait_for(lambda: both(base1), 10)
    await wait_for(lambda: both(base3), 10)  # the first request started discovery on n3
    assert disc(p3).running

    for base in (base1, base3):
        status, headers, entries = await get(base + "/v1/catalog/service/redis?tag=v2")
        assert status == 200 and int(headers["X-Consul-Index"]) > 0
        check_catalog_entries(entries)
        assert sorted(e["Node"] for e in entries) == ["n1", "n2"]
        status, _, health = await get(base + "/v1/health/service/redis?passing")
        assert status == 200
        check_health_entries(health)
        assert {c["Status"] for e in health for c in e["Checks"]} == {"passing"}
        status, _, doc = await get(base + "/v1/services/redis")
        assert status == 200 and len(doc["instances"]) == 2
        assert (await get(base + "/v1/catalog/service/nope"))[0] == 404
        # the health plugin's own endpoints are still there
        status, _, body = await get(base + "/health")
        assert status == 200 and body["status"] == "ok"

    u = urlsplit(base3)  # a Consul client library against it
    c = consul.Consul(host=u.hostname, port=u.port)
    _, services = await asyncio.to_thread(c.catalog.services)
    assert services == {"redis": ["v2"]}
