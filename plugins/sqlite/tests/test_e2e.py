"""End-to-end: real node processes (``python -m pycluster.testing.node`` with
``pycluster_sqlite.testing_node``), real NATS, real litestream.

* Rows written and ``sync()``ed on the active node are all on the new leader after a SIGKILL
  failover (count and digest), over several failovers back and forth.
* The measured Litestream failure: the old primary's Litestream holds unsent
  commits, the old primary is paused past its lease, a new primary writes, the old one resumes.
  With the fence guard, no row of the new primary is lost from the bucket.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster.testing.nodes import NodeCluster
from pycluster.testing.wait import wait_for
from pycluster_sqlite.litestream import find_litestream
from pycluster_sqlite.testing_node import digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SETUP = ["--setup", "pycluster_sqlite.testing_node:options",
         "--setup-arg", "batch=5", "--setup-arg", "write_interval=0.02"]


def sqlite_events(cluster: NodeCluster, node: str) -> list[dict[str, Any]]:
    """The SQLite test writer's events of one node (all its incarnations)."""
    path = cluster.state_dir / f"{node}.sqlite.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def synced_batches(cluster: NodeCluster, before: float | None = None) -> list[dict[str, Any]]:
    """Every batch any node confirmed with ``sync()`` (before a time, if given)."""
    out = []
    for node in cluster.nodes:
        for e in sqlite_events(cluster, node):
            if e.get("event") == "synced" and (before is None or e["t"] < before):
                out.append(e)
    return out


def db_path(cluster: NodeCluster, node: str) -> Path:
    return cluster.state_dir / "sqlite" / node / "data.db"


def read_rows(path: Path) -> dict[int, str]:
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        return {int(r[0]): str(r[1]) for r in con.execute("SELECT id, payload FROM t")}
    finally:
        con.close()


def check_batches(found: dict[int, str], batches: list[dict[str, Any]]) -> tuple[int, str]:
    """Every synced batch is present with the same content; returns (row count, digest)."""
    missing = []
    all_rows: list[tuple[int, str]] = []
    for b in batches:
        got = [(i, found[i]) for i in range(b["first"], b["last"] + 1) if i in found]
        if len(got) != b["last"] - b["first"] + 1 or digest(got) != b["digest"]:
            missing.append((b["node"], b["epoch"], b["first"], b["last"]))
        all_rows.extend(got)
    assert not missing, f"synced batches lost or changed: {missing[:10]} (of {len(missing)})"
    return len(all_rows), digest(all_rows)


def count_synced(cluster: NodeCluster, node: str, epoch: int) -> int:
    return sum(1 for e in sqlite_events(cluster, node)
               if e.get("event") == "synced" and e.get("epoch") == epoch)


async def test_synced_rows_survive_repeated_sigkill_failovers(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    find_litestream()
    cluster = NodeCluster(unique_name, [nats_url], tmp_path, size=3, app="db",
                          lease_ttl=2.0, heartbeat=0.5, extra_args=SETUP)
    try:
        await cluster.start(timeout=60)
        leader = await cluster.wait_for_leader(60)
        leaders = [leader]
        verified = 0
        for _ in range(4):
            epoch = cluster.role(leader)[1] or 0
            await wait_for(lambda n=leader, e=epoch: count_synced(cluster, n, e) >= 10, 60,
                           message=f"{leader} synced 10 batches")
            killed_at = time.time()
            cluster.kill(leader)
            new = await cluster.wait_for_leader(60, exclude=[leader], min_epoch=epoch + 1)
            batches = synced_batches(cluster, before=killed_at)
            found = await asyncio.to_thread(read_rows, db_path(cluster, new))
            n, _ = check_batches(found, batches)
            assert n == sum(b["last"] - b["first"] + 1 for b in batches)
            verified = n
            await cluster.start_node(leader, timeout=60)
            leader = new
            leaders.append(new)
        assert verified > 100
        assert len(set(leaders)) < len(leaders), f"leadership never came back: {leaders}"
        assert not cluster.overlaps(), cluster.overlaps()
    finally:
        await cluster.stop()


async def test_paused_old_primary_cannot_overwrite_the_new_primary(
        nats_url: str, unique_name: str, tmp_path: Path) -> None:
    binary = find_litestream()
    cluster = NodeCluster(unique_name, [nats_url], tmp_path, size=2, app="db",
                          lease_ttl=2.0, heartbeat=0.5, extra_args=SETUP)
    try:
        await cluster.start(timeout=60)
        old = await cluster.wait_for_leader(60)
        old_epoch = cluster.role(old)[1] or 0
        await wait_for(lambda: count_synced(cluster, old, old_epoch) >= 5, 60,
                       message="old primary synced")

        def replicate_pid() -> int | None:
            for e in reversed(sqlite_events(cluster, old)):
                if e.get("event") == "status" and e.get("replicate_pid"):
                    return int(e["replicate_pid"])
            return None

        pid = await wait_for(replicate_pid, 30, message="litestream replicate pid")
        # The old primary's Litestream stops uploading; the node keeps committing rows that
        # only this Litestream could ever send (the hazard: it resumes later and uploads them).
        os.kill(pid, signal.SIGSTOP)
        mark = len(sqlite_events(cluster, old))
        await wait_for(lambda: any(e.get("event") == "written"
                                   for e in sqlite_events(cluster, old)[mark:]), 30,
                       message="old primary committed rows Litestream could not send")
        cluster.pause(old)  # past its lease
        new = await cluster.wait_for_leader(60, exclude=[old], min_epoch=old_epoch + 1)
        new_epoch = cluster.role(new)[1] or 0
        # The fence guard killed the paused node's Litestream at the lease deadline.
        await wait_for(lambda: not Path(f"/proc/{pid}").exists(), 30,
                       message="old litestream killed by its fence guard")
        await wait_for(lambda: count_synced(cluster, new, new_epoch) >= 10, 60,
                       message="new primary synced")
        # The old Litestream "comes back" while its node is still paused (nothing of the node
        # could stop it now): it must already be gone.
        with pytest.raises(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(3.0)
        cluster.resume(old)
        await wait_for(lambda: cluster.role(old)[0] == "passive", 30,
                       message="old primary stepped down")
        mark_new = count_synced(cluster, new, new_epoch)
        await wait_for(lambda: count_synced(cluster, new, new_epoch) >= mark_new + 10, 60,
                       message="new primary kept writing after the old one came back")

        # Every row any node confirmed is in a fresh restore of the bucket, on the new primary,
        # and in the old primary's replica once it follows.
        batches = synced_batches(cluster)
        assert any(b["epoch"] == new_epoch for b in batches)
        cfg = db_path(cluster, new).parent / ".data.db.pycluster" / "restore.yml"
        fresh = tmp_path / "fresh.db"
        restore_at = time.time()
        proc = await asyncio.create_subprocess_exec(
            binary, "restore", "-config", str(cfg), "-no-expand-env", "-o", str(fresh),
            str(db_path(cluster, new)), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
        restored = await asyncio.to_thread(read_rows, fresh)
        check_batches(restored, [b for b in batches if b["t"] < restore_at])
        check_batches(await asyncio.to_thread(read_rows, db_path(cluster, new)), batches)
        replica = db_path(cluster, old).parent / "replica.db"
        await wait_for(lambda: replica.exists() and check_batches(
            read_rows(replica), batches) is not None, 60, message="old primary's replica",
            ignore=(AssertionError, sqlite3.Error))
        # The paused node's last record says "active" until it resumes, so its interval
        # overlaps; what matters is that it never acted as leader after the new one started.
        new_since = min(e["t"] for e in cluster.events(new)
                        if e.get("event") == "role" and e.get("role") == "active")
        assert not [t for t in cluster.acts(old) if t > new_since]
    finally:
        await cluster.stop()
