"""The third-party replicator of docs/writing-a-plugin.md ("A replicator plugin, complete"),
loaded as written into two platforms on a real NATS server: the kernel drives it through the
replicator registry (follow, catch-up, promote, replicate, and the reverse on step-down).

Guarantees checked from outside (the files on disk, the shared copy in the app's KV bucket):
the standby's directory follows the active one; after a handover the new active node has
every file and replicates from its own directory under its new epoch; a write of the older
epoch is refused; a node that takes over after the active node left has the data too.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pycluster import App, Election, Singleton
from pycluster.kernel.context import Context
from pycluster.kernel.replication import ReplicationState
from pycluster.testing import wait_for

ROOT = Path(__file__).resolve().parents[1]
MARK = "# pycluster_dirsync/plugin.py"


def load_example() -> types.ModuleType:
    """The example module, exactly as the documentation shows it."""
    text = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    start = text.index("```python\n" + MARK) + len("```python\n")
    code = text[start:text.index("\n```", start)]
    mod = types.ModuleType("pycluster_dirsync_plugin")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(code, "docs/writing-a-plugin.md", "exec"), mod.__dict__)
    return mod


def files(d: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in d.iterdir() if p.is_file() and p.name[0] != "."} \
        if d.is_dir() else {}


@pytest.mark.timeout(120)
async def test_documented_replicator_follows_and_takes_over(
        make_platform: Any, tmp_path: Path) -> None:
    plugin = load_example()
    d1, d2 = tmp_path / "n1", tmp_path / "n2"
    d1.mkdir()
    (d1 / "a.txt").write_text("first")

    def app(d: Path) -> App:
        return App("docs", Singleton(), Election(lease_ttl=2.0, heartbeat_interval=0.5),
                   plugin.SyncedDir(str(d), interval=0.1))

    app1, app2 = app(d1), app(d2)
    p1 = await make_platform("n1", app1, extra_plugins=[("dirsync", plugin)])
    assert await app1.wait_for_leadership(30)
    p2 = await make_platform("n2", app2, extra_plugins=[("dirsync", plugin)])
    rep1 = app1.state("dirsync")["replicator"]
    rep2 = app2.state("dirsync")["replicator"]
    # The kernel built the stages from the replicator registry (no pycluster_stages hook).
    stages = [s.name for s in p1.runtimes["docs"].stages]
    assert stages[:3] == ["dirsync-catchup", "dirsync-promote", "dirsync-replicate"]
    assert rep1.state() is ReplicationState.ACTIVE and rep2.state() is ReplicationState.STANDBY

    # The standby follows the active directory.
    (d1 / "b.txt").write_text("second")
    await wait_for(lambda: files(d2) == {"a.txt": "first", "b.txt": "second"}, 30,
                   message="standby follows")
    assert rep2.lag() is not None and rep2.lag() < 5.0
    # Lag, position and state reach /status and the metrics through the protocol.
    status = p2.health.node_status()["apps"]["docs"]["replication"]["dirsync"]
    assert status["state"] == "standby" and status["position"] == rep2.position() > 0
    text = (await p2.metrics.render_async()).decode()
    assert f'pycluster_replication_position{{app="docs",replicator="dirsync"}} ' \
           f'{float(rep2.position())}' in text
    assert 'pycluster_replication_lag_seconds{app="docs",replicator="dirsync"}' in text
    # ... and its check runs as the app health check "dirsync" (health plugin).
    await wait_for(lambda: p2.health.status()["docs.dirsync"]["status"] == "healthy", 30,
                   message="dirsync health check passes")

    # Handover: n2 catches up, promotes and replicates under the new epoch.
    old_epoch = app1.epoch
    (d1 / "c.txt").write_text("just before the handover")
    await app1.step_down(successor="n2")
    assert await app2.wait_for_leadership(30)
    new_epoch = app2.epoch
    assert old_epoch is not None and new_epoch is not None and new_epoch > old_epoch
    assert files(d2)["c.txt"] == "just before the handover"  # the final ship of the demotion
    assert rep2.state() is ReplicationState.ACTIVE
    (d2 / "d.txt").write_text("written on n2")
    await wait_for(lambda: "d.txt" in files(d1), 30, message="old leader follows the new one")
    await wait_for(lambda: rep1.state() is ReplicationState.STANDBY, 10, message="n1 standby")
    doc = json.loads(await app2.kv.get("dirsync") or b"{}")
    assert doc["epoch"] == new_epoch

    # Fencing: a write of the older epoch is refused, and so is a promotion with it.
    rep1.epoch = old_epoch
    (d1 / "e.txt").write_text("from the old epoch")
    assert await rep1.ship() is False
    assert json.loads(await app2.kv.get("dirsync") or b"{}")["epoch"] == new_epoch
    ctx = Context(app=app1, platform=p1, node_id="n1", epoch=old_epoch)
    with pytest.raises(RuntimeError, match="already writes"):
        await rep1.catch_up(ctx)
    await rep1.follow(ctx)  # back to following (what the kernel would do on the undo)

    # The active node leaves: n1 takes over with everything n2 wrote.
    (d2 / "f.txt").write_text("last word of n2")
    await p2.stop()
    assert await app1.wait_for_leadership(30)
    assert files(d1) == {"a.txt": "first", "b.txt": "second", "c.txt": "just before the handover",
                         "d.txt": "written on n2", "f.txt": "last word of n2"}
    assert rep1.state() is ReplicationState.ACTIVE and (app1.epoch or 0) > new_epoch
    assert rep1.status()["epoch"] == app1.epoch
