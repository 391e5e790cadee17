"""Snapshots with real NATS and litestream: create / list / latest / restore, the CLI, a fresh
node bootstrapping from the latest snapshot plus the WAL after it, retention, and a promotion
from a snapshot when the WAL bucket is gone."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlite_testlib import insert, rows

from pycluster.testing.wait import wait_for
from pycluster_sqlite import SQLiteError
from pycluster_sqlite.runtime import runtime_of

pytestmark = pytest.mark.timeout(240)


async def test_create_list_latest_restore_round_trip(make_node: Any, tmp_path: Path) -> None:
    _pa, app_a, db_a = await make_node("n1")
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    _pb, _app_b, db_b = await make_node("n2")
    await asyncio.to_thread(insert, db_a.path, 30, "snap")
    await db_a.wal.sync()
    expected = await asyncio.to_thread(rows, db_a.path)
    snap = await db_a.snapshots.create()
    assert snap.txid >= 1 and snap.size > 0 and snap.node == "n1"
    assert snap.epoch == app_a.epoch
    assert [s.id for s in await db_a.snapshots.list()] == [snap.id]
    latest = await db_b.snapshots.latest()  # any node sees it
    assert latest is not None and latest.id == snap.id
    dest = await db_b.snapshots.restore(snap.id, tmp_path / "out" / "restored.db")
    assert await asyncio.to_thread(rows, dest) == expected
    with pytest.raises(SQLiteError, match="exists"):
        await db_b.snapshots.restore(snap.id, dest)
    with pytest.raises(SQLiteError, match="live database"):
        await db_a.snapshots.restore(snap.id, db_a.path, overwrite=True)
    # A standby can make one too (from the bucket, not from a live file).
    await asyncio.to_thread(insert, db_a.path, 5, "more")
    pos = await db_a.wal.sync()
    snap2 = await db_b.snapshots.create()
    assert snap2.txid >= (pos.txid or 0) and snap2.node == "n2"
    assert [s.id for s in await db_b.snapshots.list()] == [snap.id, snap2.id]


async def _cli(*args: str) -> Any:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from pycluster.cli.main import main; main()", *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.slow
async def test_cli_snapshot_create_list_restore(make_node: Any, nats_url: str, tmp_path: Path,
                                                unique_name: str) -> None:
    _pa, app_a, db_a = await make_node("n1")
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    await asyncio.to_thread(insert, db_a.path, 12, "cli")
    await db_a.wal.sync()
    expected = await asyncio.to_thread(rows, db_a.path)
    common = ["--app", "db", "--platform", unique_name, "--nats-url", nats_url]
    created = json.loads(await _cli("snapshot", "create", *common, "-o", "json"))
    listed = json.loads(await _cli("snapshot", "list", *common, "-o", "json"))
    assert [s["id"] for s in listed] == [created["id"]]
    text = await _cli("snapshot", "list", *common)
    assert created["id"] in text and "TXID" in text
    dest = tmp_path / "cli.db"
    out = json.loads(await _cli("snapshot", "restore", "latest", str(dest), *common, "-o",
                                "json"))
    assert out["id"] == created["id"]
    assert await asyncio.to_thread(rows, dest) == expected


@pytest.mark.slow  # several nodes with litestream: end-to-end
async def test_fresh_node_bootstraps_from_latest_snapshot_plus_wal(make_node: Any) -> None:
    kw = {"snapshot_interval": 1.0, "retention": 4.0}
    _pa, app_a, db_a = await make_node("n1", **kw)
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    await asyncio.to_thread(insert, db_a.path, 40, "before")
    pos = await db_a.wal.sync()

    async def snapshot_covers() -> bool:
        snap = await db_a.snapshots.latest()
        return snap is not None and snap.txid >= (pos.txid or 0)

    await wait_for(snapshot_covers, 60, message="a periodic snapshot after the rows")
    await asyncio.to_thread(insert, db_a.path, 25, "after")  # only in the WAL after it
    last = await db_a.wal.sync()
    expected = await asyncio.to_thread(rows, db_a.path)

    _pb, _app_b, db_b = await make_node("n2", **kw)
    await wait_for(lambda: (db_b.wal.position().txid or 0) >= (last.txid or 0), 60,
                   message="fresh node caught up")
    st = db_b.wal.status()
    assert (st["follower"]["bootstrapped_from"] or "").startswith("snapshot"), st["follower"]
    assert await asyncio.to_thread(rows, db_b.replica_path) == expected

    # Retention: old snapshots go, the newest stays.
    snaps = await db_a.snapshots.list()
    await asyncio.sleep(6.0)
    later = await db_a.snapshots.list()
    assert later and snaps[0].id not in {s.id for s in later}


@pytest.mark.slow
async def test_promotion_from_a_snapshot_when_the_wal_bucket_is_gone(make_node: Any) -> None:
    pa, app_a, db_a = await make_node("n1")
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    await asyncio.to_thread(insert, db_a.path, 20, "keep")
    await db_a.wal.sync()
    expected = await asyncio.to_thread(rows, db_a.path)
    snap = await db_a.snapshots.create()
    rt = runtime_of(db_a)
    assert rt is not None and pa.js is not None
    wal_bucket = rt.wal_bucket
    await pa.stop()
    js = pa.js
    # The WAL bucket is lost (purged); a new node with no data comes up.
    import nats

    nc = await nats.connect(pa.settings.nats_url or [])
    try:
        await nc.jetstream().purge_stream(f"OBJ_{wal_bucket}")
    finally:
        await nc.close()
    del js
    _pb, app_b, db_b = await make_node("n2")
    await wait_for(lambda: app_b.is_active, 60, message="n2 active")
    promo = db_b.wal.status()["last_promotion"]
    assert promo["source"] == "snapshot" and promo["txid"] == snap.txid, promo
    assert await asyncio.to_thread(rows, db_b.path) == expected
