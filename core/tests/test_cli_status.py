"""``pycluster status`` and ``pycluster health`` as real processes against real nodes: each node
answers over NATS with its ``/status`` document (no ``health_addr``), so the CLI shows backend
state, lease age and checks that only the nodes know."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pycluster import App, Process, Singleton
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(120)

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    env["XDG_DATA_HOME"] = str(home)
    return subprocess.run([*PYCLUSTER, *args], capture_output=True, text=True, timeout=60,
                          env=env)


async def arun(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # The platforms live in this event loop: the CLI runs in a thread so they keep renewing.
    return await asyncio.to_thread(run, *args, home=home)


def sleeper() -> Process:
    return Process([sys.executable, "-c", "import time; time.sleep(120)"], grace=1)


@pytest.mark.slow
async def test_status_shows_what_only_the_nodes_know(make_platform: Any, nats_url: str,
                                                     unique_name: str, tmp_path: Path) -> None:
    a_app, b_app = App("orders", Singleton(), sleeper()), App("orders", Singleton(), sleeper())
    a = await make_platform("a", a_app, labels={"zone": "x"})
    await wait_for(lambda: a_app.is_leader, 10)
    await make_platform("b", b_app)
    await make_platform("c", App("orders", Singleton(), sleeper()), disabled_plugins=("health",))
    await wait_for(lambda: b_app.leader == "a", 10)
    await a.cordon("b")
    c = ["--nats-url", nats_url, "-p", unique_name, "--timeout", "2"]

    async def backend_running() -> dict[str, Any] | None:
        out = await arun("status", *c, "-o", "json", home=tmp_path)
        assert out.returncode == 0, out.stderr
        st: dict[str, Any] = json.loads(out.stdout)
        (orders,) = st["apps"]
        running = [b for b in orders["backends"].get("a", []) if b["state"] == "running"]
        return st if running else None

    st = await wait_for(backend_running, 30)
    nodes = {n["node_id"]: n for n in st["nodes"]}
    assert nodes["b"]["cordoned"] and not nodes["a"]["cordoned"]
    assert nodes["a"]["labels"] == {"zone": "x"}
    assert nodes["a"]["detail"]["healthy"] is True and nodes["a"]["detail"]["ready"] is True
    assert "no answer" in nodes["c"]["status_error"]  # health plugin disabled there
    (orders,) = st["apps"]
    assert orders["leader"] == "a" and orders["epoch"] == a_app.epoch
    assert isinstance(orders["lease_age"], int | float) and orders["lease_age"] >= 0
    assert orders["backends"]["a"][0]["kind"] == "process"
    assert orders["backends"]["b"][0]["state"] == "stopped"  # a standby runs nothing
    text = await arun("status", *c, home=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "LEASE AGE" in text.stdout and "process=running" in text.stdout
    assert "orders:active" in text.stdout and "cordoned" in text.stdout
    assert "node c: no answer" in text.stdout
    quick = await arun("status", *c, "--no-detail", "-o", "json", home=tmp_path)
    assert "lease_age" not in json.loads(quick.stdout)["apps"][0]


@pytest.mark.slow
async def test_health_exits_non_zero_on_a_critical_check(make_platform: Any, nats_url: str,
                                                         unique_name: str,
                                                         tmp_path: Path) -> None:
    a = await make_platform("a", App("orders"))
    b = await make_platform("b", App("orders"))

    def disk() -> None:
        raise RuntimeError("disk full")

    # A long interval: the breaker (open after 5 failures) would replace the last error.
    b.health.register("disk", disk, interval=5, critical=True)
    a.health.register("cache", disk, interval=5)  # not critical: shown, not fatal
    await wait_for(lambda: b.health.checks["disk"].status.value == "unhealthy", 10)
    await wait_for(lambda: a.health.checks["cache"].status.value == "unhealthy", 10)
    c = ["--nats-url", nats_url, "-p", unique_name]
    every = await arun("health", *c, "-o", "json", home=tmp_path)
    assert every.returncode == 1, every.stderr
    doc = json.loads(every.stdout)
    assert not doc["ok"] and sorted(doc["nodes"]) == ["a", "b"]
    assert any("critical check disk is unhealthy (RuntimeError: disk full)" in p
               for p in doc["problems"])
    disk_b = doc["nodes"]["b"]["checks"]["disk"]
    assert disk_b["status"] == "unhealthy" and disk_b["latency"] is not None
    only_a = await arun("health", "a", *c, home=tmp_path)
    assert only_a.returncode == 0, only_a.stdout + only_a.stderr
    assert "cache" in only_a.stdout and "disk full" in only_a.stdout
    assert "LATENCY" in only_a.stdout and "CRITICAL" not in only_a.stdout
    text_b = await arun("health", "b", *c, home=tmp_path)
    assert text_b.returncode == 1 and "CRITICAL b: critical check disk" in text_b.stdout
    missing = await arun("health", "zz", *c, home=tmp_path)
    assert missing.returncode == 2 and "not a live node" in missing.stderr
