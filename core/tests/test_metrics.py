"""Prometheus metrics: scraped over real HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from pycluster import App, Singleton, hookimpl
from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = pytest.mark.timeout(120)


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return str(resp.read().decode())


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and parse it: (sample name, sorted labels) -> value."""
    text = await asyncio.to_thread(_fetch, url)
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_metrics_endpoint_and_values(make_platform: Any) -> None:
    app1, app2 = App("svc", Singleton()), App("svc", Singleton())
    app1.health.register("db", lambda: True, interval=0.2)

    class Extra:
        @hookimpl
        def pycluster_register_metrics(self, registry: Any, platform: Any) -> None:
            Counter("pycluster_test_plugin_total", "A plugin's metric.", registry=registry).inc(3)

    p1 = await make_platform("n1", app1, metrics_addr="127.0.0.1:0",
                             extra_plugins=[("extra", Extra())])
    assert await app1.wait_for_leadership(15)
    p2 = await make_platform("n2", app2, metrics_addr="127.0.0.1:0")
    await wait_for(lambda: len(p1.membership.members) == 2, 10)
    url1, url2 = p1.metrics.url, p2.metrics.url
    assert url1 and url2 and url1 != url2
    await wait_for(lambda: "svc.db" in p1.health.checks and p1.health.checks["svc.db"].runs, 10)

    m = await scrape(url1)
    epoch1 = app1.epoch
    assert value(m, "pycluster_leader", app="svc") == 1
    assert value(m, "pycluster_election_epoch", app="svc") == epoch1
    assert value(m, "pycluster_members") == 2
    assert value(m, "pycluster_nats_connected") == 1
    assert value(m, "pycluster_role", app="svc", role="active") == 1
    assert value(m, "pycluster_health", check="svc.db") == 1
    assert value(m, "pycluster_health", check="nats") == 1
    assert (value(m, "pycluster_lease_remaining_seconds", app="svc") or 0) > 0
    assert value(m, "pycluster_transitions_total", app="svc", role="active") == 1
    assert value(m, "pycluster_test_plugin_total") == 3
    assert value(m, "pycluster_info", platform=p1.name, node="n1", version="0.1.0") == 1
    assert value(m, "pycluster_failover_seconds_count", app="svc") is None  # no failover yet
    assert (await scrape(url2)).get(("pycluster_leader", (("app", "svc"),))) == 0

    # A lock: wait and hold times.
    async with app1.lock("job", ttl=2):
        await asyncio.sleep(0.05)
    m = await scrape(url1)
    assert value(m, "pycluster_lock_held_seconds_count", scope="svc") == 1
    assert (value(m, "pycluster_lock_held_seconds_sum", scope="svc") or 0) >= 0.05
    assert value(m, "pycluster_lock_wait_seconds_count", scope="svc") == 1

    # A graceful failover: n2 times it and counts it.
    await app1.step_down()
    await wait_for(lambda: app2.is_active, 15)
    m2 = await scrape(url2)
    assert value(m2, "pycluster_leader", app="svc") == 1
    assert (value(m2, "pycluster_election_epoch", app="svc") or 0) > (epoch1 or 0)
    assert value(m2, "pycluster_failover_seconds_count", app="svc") == 1
    took = value(m2, "pycluster_failover_seconds_sum", app="svc")
    assert took is not None and 0 < took < 10
    m1 = await scrape(url1)
    assert value(m1, "pycluster_leader", app="svc") == 0
    assert value(m1, "pycluster_transitions_total", app="svc", role="passive") == 2


async def test_hook_duration_and_failures(make_platform: Any) -> None:
    app = App("svc", Singleton())

    @app.on_active
    async def warm(ctx: Any) -> None:
        await asyncio.sleep(0.05)

    @app.on_leader_change
    async def broken(ctx: Any) -> None:
        raise RuntimeError("nope")

    p = await make_platform("n1", app, metrics_addr="127.0.0.1:0")
    assert await app.wait_for_leadership(15)
    await wait_for(lambda: p.metrics.hook_failures.labels("svc", "on_leader_change",
                                                          "error")._value.get() >= 1, 10)
    m = await scrape(p.metrics.url)  # type: ignore[arg-type]
    assert value(m, "pycluster_hook_duration_seconds_count", app="svc", hook="on_active") == 1
    assert (value(m, "pycluster_hook_duration_seconds_sum", app="svc",
                  hook="on_active") or 0) >= 0.05
    assert value(m, "pycluster_hook_duration_seconds_count", app="svc",
                 hook="stage:app-hooks") == 1
    assert (value(m, "pycluster_hook_failures_total", app="svc", hook="on_leader_change",
                  reason="error") or 0) >= 1


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_metrics_after_sigkill_failover(nats_url: str, unique_name: str,
                                              tmp_path: Path) -> None:
    """Three node processes; SIGKILL the leader; the new leader's /metrics shows the failover
    (including the lease the cluster waited for) and the higher epoch."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=1.0, heartbeat=0.25,
                    extra_args=["--setup", "pycluster.testing.obs_node:setup",
                                "--setup-arg", "http=1"])
    try:
        await c.start()
        leader = await c.wait_for_leader(30)
        epoch = c.role(leader)[1] or 0

        def url(node: str) -> str | None:
            path = c.state_dir / f"{node}.obs.json"
            return str(json.loads(path.read_text())["health"]) if path.exists() else None

        for n in c.nodes:
            await wait_for(lambda n=n: url(n), 20, message=f"{n} endpoints")
        before = await scrape(f"{url(leader)}/metrics")
        assert value(before, "pycluster_leader", app="svc") == 1
        assert value(before, "pycluster_members") == 3

        async def all_see_leader() -> bool:
            for n in c.nodes:
                m = await scrape(f"{url(n)}/metrics")
                if value(m, "pycluster_election_epoch", app="svc") != epoch:
                    return False
            return True

        await wait_for(all_see_leader, 20, message="standbys never saw the leader")
        c.kill(leader)
        new = await c.wait_for_leader(30, exclude=[leader], min_epoch=epoch + 1)

        async def counted() -> dict[Any, float] | None:
            m = await scrape(f"{url(new)}/metrics")
            return m if value(m, "pycluster_failover_seconds_count", app="svc") == 1 else None

        m = await wait_for(counted, 20, message="failover not counted")
        took = value(m, "pycluster_failover_seconds_sum", app="svc")
        assert took is not None and 0.5 < took < 30  # at least most of the 1 s lease
        assert value(m, "pycluster_leader", app="svc") == 1
        assert (value(m, "pycluster_election_epoch", app="svc") or 0) > epoch
        await wait_for(lambda: _members_is(url(new), 2), 20, message="members not 2")
        other = next(n for n in c.nodes if n not in (leader, new))
        mo = await scrape(f"{url(other)}/metrics")
        assert value(mo, "pycluster_leader", app="svc") == 0
        assert value(mo, "pycluster_failover_seconds_count", app="svc") is None
        await c.stop()
    finally:
        c.stop_sync()


async def _members_is(url: str | None, n: int) -> bool:
    return url is not None and value(await scrape(f"{url}/metrics"), "pycluster_members") == n
