"""``/status`` lists the node's registrations; metrics ``pycluster_services`` and
``pycluster_service_checks_total``; audit category ``discovery``; the ``discovery:`` config
section; option validation."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from pycluster import App, Singleton
from pycluster.kernel.errors import ConfigError
from pycluster.testing.wait import wait_for
from pycluster_discovery import PyCheck, Service
from pycluster_discovery.options import DiscoverySection, HttpCheck, service_from_section
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(60)


async def test_status_metrics_and_audit(make_node: Callable[..., Any]) -> None:
    app = App("orders", Singleton(), Service("http", port=8080, host="127.0.0.1",
                                             health=PyCheck(lambda: True, interval=0.2)))
    p = await make_node("n1", app, health_addr="127.0.0.1:0")
    await wait_for(lambda: app.is_active, 10)
    d = discovery_of(p)
    assert d is not None
    await wait_for(lambda: d.checks_total.get(("http", "passing"), 0) >= 2, 5)

    def status() -> Any:
        with urllib.request.urlopen(p.health.url + "/status", timeout=5) as r:
            return json.loads(r.read())

    doc = await asyncio.to_thread(status)
    [reg] = doc["plugins_status"]["discovery"]["registrations"]
    assert (reg["service"], reg["role"], reg["status"], reg["node"]) == (
        "http", "primary", "passing", "n1")
    assert reg["check"] == "ok" and reg["port"] == 8080
    # what the node registers by hand is listed too (it renews those records), until withdrawn
    await d.register("pg", 5432, app="db", host="10.0.0.5")
    doc = await asyncio.to_thread(status)
    regs = doc["plugins_status"]["discovery"]["registrations"]
    assert [(r["app"], r["service"], r["role"], r["node"]) for r in regs] == [
        ("db", "pg", "external", "n1"), ("orders", "http", "primary", "n1")]
    await d.deregister("pg", app="db")
    doc = await asyncio.to_thread(status)
    assert [r["service"] for r in doc["plugins_status"]["discovery"]["registrations"]] == [
        "http"]

    text = (await p.service("metrics").render_async()).decode()
    assert 'pycluster_services{service="http",status="passing"} 1.0' in text
    assert 'pycluster_service_checks_total{result="passing",service="http"}' in text

    async def audited() -> list[str]:
        return [e.action for e in await p.audit.query(category="discovery")]

    await wait_for(lambda: _has(audited, "registered"), 10)


async def _has(fn: Callable[[], Any], action: str) -> bool:
    return action in await fn()


def test_options_and_config_section() -> None:
    with pytest.raises(ConfigError):
        Service("bad.name", port=80)
    with pytest.raises(ConfigError):
        Service("http", port=0)
    with pytest.raises(ConfigError):
        Service("http", port=80, protocol="sctp")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        HttpCheck(interval=0)
    svc = service_from_section(DiscoverySection.model_validate({
        "name": "http", "port": 8080, "tags": ["v2"],
        "health": {"type": "http", "path": "/healthz", "interval": 5}}))
    assert svc.name == "http" and isinstance(svc.health, HttpCheck)
    assert svc.health.path == "/healthz" and svc.tags == ["v2"]
