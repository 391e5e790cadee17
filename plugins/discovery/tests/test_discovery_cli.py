"""``pycluster services list|show|watch|export`` against a running in-process node."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pycluster.testing.wait import wait_for
from pycluster_discovery.plugin import discovery_of

pytestmark = pytest.mark.timeout(90)


async def cli(nats_url: str, platform: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from pycluster.cli.main import main; main()", "services",
        *args, "--nats-url", nats_url, "--platform", platform,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode()


@pytest.mark.slow
async def test_list_show_watch_export(make_node: Callable[..., Any], nats_url: str,
                                      tmp_path: Path) -> None:
    p = await make_node("n1")
    await wait_for(lambda: p.apps["orders"].is_active, 10)
    d = discovery_of(p)
    assert d is not None
    await wait_for(lambda: d.instances("http"), 5)
    name = p.name

    rc, out = await cli(nats_url, name, "list")
    assert rc == 0 and "http" in out and "n1" in out and "primary" in out, out
    rc, out = await cli(nats_url, name, "list", "--output", "json")
    [inst] = json.loads(out)
    assert (inst["service"], inst["node"], inst["port"]) == ("http", "n1", 8080)
    rc, out = await cli(nats_url, name, "show", "http", "--output", "json", "--healthy")
    assert rc == 0 and json.loads(out)[0]["status"] == "passing"
    rc, out = await cli(nats_url, name, "show", "nope")
    assert rc == 1
    # The node's config file gives platform and URL, as for every command.
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"name": name, "node_id": "n1", "nats_url": nats_url}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pycluster.cli", "services", "list", "--config", str(cfg),
        "-o", "json", stdout=asyncio.subprocess.PIPE, env=env)
    out_b, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0 and json.loads(out_b)[0]["service"] == "http"
    # No URL anywhere: an error, never a query of whatever listens on a well-known port.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pycluster.cli", "services", "list", "-p", name,
        stderr=asyncio.subprocess.PIPE, env={**env, "XDG_DATA_HOME": str(tmp_path)})
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"no NATS to ask" in err
    rc, out = await cli(nats_url, name, "export", "--format", "prometheus")
    assert json.loads(out)[0]["targets"] == ["127.0.0.1:8080"]
    rc, out = await cli(nats_url, name, "export", "--format", "consul")
    doc = json.loads(out)
    assert doc["catalog"] == {"http": ["v2"]} and doc["health"]["http"][0]["Node"]["Node"] == "n1"

    # the current instance comes first; the deregistration after it is seen
    await d.register("pg", 5432, host="10.0.0.9")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from pycluster.cli.main import main; main()", "services",
        "watch", "pg", "--output", "json", "--count", "2", "--nats-url", nats_url,
        "--platform", name, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    await d.deregister("pg")
    second = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert [(x["change"], x["instance"]["address"]) for x in (first, second)] == [
        ("register", "10.0.0.9"), ("deregister", "10.0.0.9")]
