"""Replication with real NATS and real litestream, nodes in one process: an active node
replicates, a standby follows (lag), handover loses nothing, a stale writer is fenced, a
corrupt replica is rejected at promotion."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Any

import pytest
from sqlite_testlib import Node, insert, rows

from pycluster.kernel.errors import NotLeaderError
from pycluster.testing.wait import wait_for
from pycluster_sqlite import open_replica
from pycluster_sqlite.runtime import runtime_of
from pycluster_sqlite.walindex import WalIndex

pytestmark = pytest.mark.timeout(240)


async def leader_of(*nodes: Node, timeout: float = 30.0) -> tuple[Node, list[Node]]:
    """Wait until exactly one node is active; return it and the others."""

    def one() -> Node | None:
        act = [n for n in nodes if n[1].is_active]
        return act[0] if len(act) == 1 else None

    active = await wait_for(one, timeout, message="one active node")
    return active, [n for n in nodes if n is not active]


async def test_active_replicates_and_standby_follows(make_node: Any) -> None:
    n1 = await make_node("n1")
    n2 = await make_node("n2")
    (_pa, _app_a, db_a), [(_pb, _app_b, db_b)] = await leader_of(n1, n2)
    ids = await asyncio.to_thread(insert, db_a.path, 50, "a")
    pos = await db_a.wal.sync()
    assert pos.replicated_txid is not None and pos.replicated_txid >= 1
    assert db_a.wal.lag() == 0.0
    with pytest.raises(NotLeaderError):
        await db_b.wal.sync()

    await wait_for(lambda: (db_b.wal.position().txid or 0) >= pos.replicated_txid, 30,
                   message="standby caught up")
    await wait_for(lambda: db_b.wal.lag() == 0.0, 10, message="standby lag 0")

    def replica_ids() -> list[int]:
        con = open_replica(db_b)
        try:
            return [r[0] for r in con.execute("SELECT id FROM t ORDER BY id")]
        finally:
            con.close()

    assert await asyncio.to_thread(replica_ids) == ids
    st = db_b.wal.status()
    assert st["role"] == "standby" and st["follower"]["state"] == "following"
    assert db_a.wal.status()["replicate"]["pid"] is not None


@pytest.mark.slow  # several nodes with litestream: end-to-end
async def test_lag_is_observed_while_the_follower_is_held(make_node: Any) -> None:
    n1 = await make_node("n1")
    n2 = await make_node("n2")
    (_pa, _app_a, db_a), [(_pb, _app_b, db_b)] = await leader_of(n1, n2)
    await asyncio.to_thread(insert, db_a.path, 5, "warm")
    first = await db_a.wal.sync()
    await wait_for(lambda: (db_b.wal.position().txid or 0) >= (first.replicated_txid or 0), 30,
                   message="standby caught up")
    follower_pid = db_b.wal.status()["follower"]["pid"]
    assert follower_pid
    os.kill(follower_pid, signal.SIGSTOP)  # the standby falls behind while writes go on
    try:
        for i in range(8):
            await asyncio.to_thread(insert, db_a.path, 3, f"w{i}")
            await db_a.wal.sync()
            await asyncio.sleep(0.2)
        lag = await wait_for(lambda: db_b.wal.lag() if db_b.wal.lag() >= 1.0 else None, 10,
                             message="lag grows while the follower is held")
        assert lag >= 1.0
    finally:
        os.kill(follower_pid, signal.SIGCONT)
    last = await db_a.wal.sync()
    await wait_for(lambda: db_b.wal.lag() < 1.0, 30, message="lag back near zero")
    await wait_for(lambda: (db_b.wal.position().txid or 0) >= (last.txid or 0), 30,
                   message="standby caught up again")


async def test_graceful_handover_loses_nothing(make_node: Any) -> None:
    n1 = await make_node("n1")
    n2 = await make_node("n2")
    (_pa, app_a, db_a), [(pb, app_b, db_b)] = await leader_of(n1, n2)
    await asyncio.to_thread(insert, db_a.path, 20, "synced")
    pos = await db_a.wal.sync()
    await wait_for(lambda: (db_b.wal.position().txid or 0) >= (pos.txid or 0), 30,
                   message="standby following")
    # Committed but never synced explicitly: the step-down's final sync must carry it over.
    await asyncio.to_thread(insert, db_a.path, 7, "unsynced")
    before = await asyncio.to_thread(rows, db_a.path)
    await app_a.step_down()
    await wait_for(lambda: app_b.is_active, 30, message="standby took over")
    assert await asyncio.to_thread(rows, db_b.path) == before
    promo = db_b.wal.status()["last_promotion"]
    assert promo["source"] == "replica", promo
    # Observability: the promotion is measured and audited.
    text = pb.metrics.render().decode()
    assert 'pycluster_sqlite_promotion_seconds_count{app="db"} 1.0' in text
    assert 'pycluster_sqlite_txid{app="db",copy="remote"}' in text
    assert await pb.audit.flush(10.0)
    actions = {e.action for e in await pb.audit.query(category="sqlite", node=pb.node_id)}
    assert {"promotion_started", "promotion_completed"} <= actions
    assert pb.health.status()["db.sqlite"]["status"] in ("healthy", "unknown")
    # The old leader follows the new one.
    await asyncio.to_thread(insert, db_b.path, 3, "after")
    pos = await db_b.wal.sync()
    await wait_for(lambda: (db_a.wal.position().txid or 0) >= (pos.txid or 0), 30,
                   message="old leader follows")
    assert db_a.wal.status()["role"] == "standby"


async def test_a_newer_writer_epoch_fences_the_active_node(make_node: Any) -> None:
    n1 = await make_node("n1")
    (pa, app_a, db_a) = n1
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    rt = runtime_of(db_a)
    assert rt is not None and rt.replicate_pid() is not None
    assert pa.js is not None
    # Another node records a newer epoch in the bucket (as a new leader would).
    other = WalIndex(pa.js, rt.wal_bucket)
    await other.claim_writer((app_a.epoch or 0) + 1, "intruder")
    await wait_for(lambda: rt.replicate_pid() is None, 15, message="replication stopped")
    assert rt.fenced_by is not None and rt.fenced_by.node == "intruder"
    await wait_for(lambda: not app_a.is_active, 15, message="stepped down")


async def test_promotion_rejects_a_corrupt_replica(make_node: Any) -> None:
    n1 = await make_node("n1")
    n2 = await make_node("n2")
    (_pa, app_a, db_a), [(_pb, app_b, db_b)] = await leader_of(n1, n2)
    await asyncio.to_thread(insert, db_a.path, 400, "x" * 40)
    pos = await db_a.wal.sync()
    await wait_for(lambda: (db_b.wal.position().txid or 0) >= (pos.txid or 0), 30,
                   message="standby caught up")
    expected = await asyncio.to_thread(rows, db_a.path)

    def corrupt() -> None:  # garbage over a b-tree page of the replica
        with open(db_b.replica_path, "r+b") as fh:
            fh.seek(4096 * 3)
            fh.write(os.urandom(4096))

    await asyncio.to_thread(corrupt)
    await app_a.step_down()
    await wait_for(lambda: app_b.is_active, 60, message="standby took over")
    promo = db_b.wal.status()["last_promotion"]
    assert promo["source"] == "restore (replica rejected)", promo
    assert await asyncio.to_thread(rows, db_b.path) == expected


@pytest.mark.slow  # several nodes with litestream: end-to-end
async def test_a_lagging_standby_leaves_the_promotion_to_a_current_one(make_node: Any) -> None:
    n1 = await make_node("n1", max_promotion_lag=1.0)
    (_pa, app_a, db_a) = n1
    await wait_for(lambda: app_a.is_active, 30, message="n1 active")
    n2 = await make_node("n2", max_promotion_lag=1.0)
    n3 = await make_node("n3", max_promotion_lag=1.0)
    (pb, app_b, db_b), (_pc, app_c, db_c) = n2, n3
    await asyncio.to_thread(insert, db_a.path, 5, "warm")
    first = await db_a.wal.sync()
    for db in (db_b, db_c):
        await wait_for(lambda d=db: (d.wal.position().txid or 0) >= (first.txid or 0), 30,
                       message="standbys caught up")
    pid = db_b.wal.status()["follower"]["pid"]
    os.kill(pid, signal.SIGSTOP)  # n2 falls behind
    try:
        for i in range(6):
            await asyncio.to_thread(insert, db_a.path, 3, f"w{i}")
            await db_a.wal.sync()
            await asyncio.sleep(0.3)
        await wait_for(lambda: db_b.wal.lag() > 1.5 and db_c.wal.lag() < 0.5, 20,
                       message="n2 behind, n3 current")
        await asyncio.sleep(2.5)  # both statuses published
        expected = await asyncio.to_thread(rows, db_a.path)
        await app_a.step_down(successor="n2", cooldown=30.0)
        await wait_for(lambda: app_c.is_active, 60, message="the current standby took over")
        assert not app_b.is_active
        refused = [e for e in pb.runtimes["db"].stage_events
                   if e.stage == "sqlite-catchup" and "behind" in e.error]
        assert refused, [(e.stage, e.outcome, e.error) for e in pb.runtimes["db"].stage_events]
        assert await asyncio.to_thread(rows, db_c.path) == expected
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def test_wal_index_head_writer_record_and_purge(nats_url: str, unique_name: str) -> None:
    import nats

    from pycluster_sqlite import FencedError
    from pycluster_sqlite.litestream import ltx_name
    from pycluster_sqlite.walindex import ensure_object_store, meta_subject, stream_name

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        bucket = f"{unique_name}_wal"
        await ensure_object_store(js, bucket)
        obs = await js.object_store(bucket)
        index = WalIndex(js, bucket, refresh_interval=0.2)
        await index.start()
        await asyncio.wait_for(index.loaded.wait(), 10)
        assert index.max_txid() == 0 and not index.has_data()
        for t in (1, 2, 3):
            await obs.put(ltx_name(0, t, t), b"x" * 10)
        await obs.put("ltx/9/0000000000000001-0000000000000002.ltx", b"snap")
        assert await index.head() == 3  # authoritative, whatever the watch has seen
        await wait_for(lambda: index.latest_snapshot() is not None, 10, message="snapshot seen")
        assert index.latest_snapshot().max_txid == 2  # type: ignore[union-attr]
        assert index.oldest_after(1).max_txid == 2  # type: ignore[union-attr]
        # The writer record: compare-and-set, newer epochs only.
        rec = await index.claim_writer(5, "n1")
        assert (await index.read_writer()).epoch == 5  # type: ignore[union-attr]
        assert (await index.claim_writer(5, "n1")).seq == rec.seq  # idempotent
        await index.claim_writer(7, "n2")
        with pytest.raises(FencedError, match="epoch 7"):
            await index.claim_writer(6, "n3")
        seen: list[int] = []
        index.on_writer(lambda r: seen.append(r.epoch))
        await WalIndex(js, bucket).claim_writer(9, "n4")
        await wait_for(lambda: 9 in seen, 10, message="writer change observed")
        # Deleted LTX files leave meta markers until the janitor purges them.
        await obs.delete(ltx_name(0, 1, 1))
        await wait_for(lambda: index.entries[ltx_name(0, 1, 1)].deleted, 10,
                       message="delete seen")
        assert await index.purge_deleted(older_than=0.0) == 1
        info = await js.stream_info(stream_name(bucket),
                                    subjects_filter=meta_subject(bucket, ltx_name(0, 1, 1)))
        assert not info.state.subjects
        assert index.max_txid() == 3
        # A standby forgets deleted files after a while (memory stays bounded).
        await obs.delete(ltx_name(0, 2, 2))
        await wait_for(lambda: index.entries[ltx_name(0, 2, 2)].deleted, 10,
                       message="delete seen")
        assert index.forget_deleted(0.0) == 1 and index.max_txid() == 3
        await index.stop()
    finally:
        await nc.close()
