"""Consistency of app KV and locks on replicated buckets: linearizable reads, compare-and-set
writes under races (err_code 10164), fenced writes under a lock. Real NATS only: a single server
for the races, a 3-server cluster with R3 buckets and a partition for the stale-read cases."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from pycluster import (
    InvalidNameError,
    KeyExistsError,
    LockLostError,
    ReadNotConfirmedError,
    RevisionMismatchError,
)
from pycluster.kernel import natsutil as nu
from pycluster.kernel.kv import AppKV
from pycluster.kernel.locks import LockService
from pycluster.testing import NatsCluster
from pycluster.testing.wait import wait_for


async def _connect(*urls: str) -> Client:
    return await nats.connect(list(urls), connect_timeout=2, max_reconnect_attempts=-1,
                              reconnect_time_wait=0.2)


async def _leader_index(cluster: NatsCluster, js: nats.js.JetStreamContext, stream: str) -> int:
    async def leader() -> str | None:
        info = await js.stream_info(stream)
        return info.cluster.leader if info.cluster else None

    name = await wait_for(leader, 20, message=f"{stream} has a leader")
    return cluster.index_of(str(name))


@pytest.fixture
async def r3(nats_cluster: NatsCluster) -> AsyncIterator[tuple[NatsCluster, list[Client]]]:
    """The cluster and one client pinned to each server (no reconnect elsewhere)."""
    clients = [await _connect(nats_cluster.url(i)) for i in range(len(nats_cluster))]
    try:
        yield nats_cluster, clients
    finally:
        for nc in clients:
            await nc.close()


@pytest.mark.timeout(120)
@pytest.mark.slow
async def test_partitioned_reader_never_gets_a_stale_value(
    r3: tuple[NatsCluster, list[Client]], unique_name: str
) -> None:
    """A value acknowledged by the majority is never hidden by a read on the cut-off side:
    the linearizable read refuses (ReadNotConfirmedError); only stale_ok returns the old one."""
    cluster, clients = r3
    bucket = unique_name
    kvs = [AppKV(nc.jetstream(), bucket, timeout=2.0) for nc in clients]
    await kvs[0].ensure(replicas=3)
    for kv in kvs[1:]:
        await kv.ensure(replicas=3)
    await kvs[0].put("k", "old")
    lead = await _leader_index(cluster, clients[0].jetstream(), nu.kv_stream(bucket))
    # Every replica has the old value before the cut.
    for kv in kvs:
        await wait_for(lambda kv=kv: _stale_is(kv, b"old"), 10, message="replicated")
    cluster.partition(lead)
    majority = kvs[(lead + 1) % 3]
    rev = await _retry(lambda: majority.put("k", "new"), 30)
    assert rev > 0
    # The majority reads its own write; the isolated side either refuses or (with stale_ok)
    # shows the old value — but a confirmed read never returns "old".
    assert await _retry(lambda: majority.get("k"), 20) == b"new"
    isolated = kvs[lead]
    assert await isolated.get("k", stale_ok=True) == b"old"  # the documented opt-in
    with pytest.raises(ReadNotConfirmedError):
        await isolated.get("k")
    with pytest.raises(ReadNotConfirmedError):
        await isolated.keys()
    cluster.heal()
    # After the heal the formerly isolated side converges and confirms the new value.
    assert await _retry(lambda: isolated.get("k"), 30) == b"new"
    assert await _retry(isolated.keys, 30) == ["k"]


async def _stale_is(kv: AppKV, want: bytes) -> bool:
    try:
        return await kv.get("k", stale_ok=True) == want
    except nu.TRANSIENT_ERRORS:
        return False


async def _retry(fn, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await fn()
        except nu.TRANSIENT_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_racing_conditional_writes_on_r3_are_conflicts_not_errors(
    r3: tuple[NatsCluster, list[Client]], unique_name: str
) -> None:
    """Many concurrent create/update/transform on one key of an R3 bucket: the stream refuses
    racers with 10071 or 10164; pycluster reports both as conflicts, never a raw BadRequest."""
    _, clients = r3
    kvs = [AppKV(nc.jetstream(), unique_name) for nc in clients]
    for kv in kvs:
        await kv.ensure(replicas=3)

    async def create(i: int) -> str:
        try:
            await kvs[i % 3].create("once", str(i))
            return "won"
        except KeyExistsError:
            return "exists"

    results = await asyncio.gather(*(create(i) for i in range(24)))
    assert results.count("won") == 1, results

    entry = await kvs[0].get_entry("once")
    assert entry is not None

    async def update(i: int) -> str:
        try:
            await kvs[i % 3].update("once", f"u{i}", entry.revision)
            return "won"
        except RevisionMismatchError:
            return "lost"

    results = await asyncio.gather(*(update(i) for i in range(24)))
    assert results.count("won") == 1, results

    # transform: every increment lands exactly once, whatever the races.
    async def incr(i: int) -> None:
        for _ in range(15):
            await kvs[i % 3].transform("n", lambda old: str(int(old or b"0") + 1))

    await asyncio.gather(*(incr(i) for i in range(6)))
    assert await kvs[1].get("n") == b"90"


@pytest.mark.timeout(60)
async def test_reads_are_guarded_only_on_replicated_buckets(
    nats_url: str, unique_name: str
) -> None:
    """On an R1 bucket a read is one request; user keys cannot use the reserved prefix, and the
    guard key never shows in keys() or a watch."""
    nc = await _connect(nats_url)
    try:
        kv = AppKV(nc.jetstream(), unique_name)
        await kv.ensure()
        await kv.put("a", "1")
        assert await kv.get("a") == b"1"
        with pytest.raises(InvalidNameError):
            await kv.put(f"{nu.GUARD_KEY}", "x")
        # A guard written by hand (as a replicated read would) stays invisible.
        assert await nu.confirm_read(nc.jetstream(), unique_name, "a", 1)
        assert await kv.keys() == ["a"]
        async with kv.watch(">") as w:
            ev = await w.next(timeout=2)
            assert ev is not None and ev.key == "a"
            assert await nu.confirm_read(nc.jetstream(), unique_name, "a", 1)
            assert await w.next(timeout=1) is None
        # A confirmation against the wrong revision is refused.
        assert not await nu.confirm_read(nc.jetstream(), unique_name, "a", 99)
    finally:
        await nc.close()


@pytest.mark.timeout(60)
async def test_former_lock_holder_cannot_overwrite_a_later_write(
    nats_url: str, unique_name: str
) -> None:
    """The fencing pattern of docs/concepts.md: A reads under the lock and stalls past its lease;
    B takes the lock and increments; A's delayed write is refused (by the lock check and, if it
    was already sent, by the revision), so B's increment is never lost."""
    nca, ncb = await _connect(nats_url), await _connect(nats_url)
    try:
        kva, kvb = AppKV(nca.jetstream(), unique_name), AppKV(ncb.jetstream(), unique_name)
        await kva.ensure()
        la = LockService(nca.jetstream(), f"{unique_name}_locks", "a")
        lb = LockService(ncb.jetstream(), f"{unique_name}_locks", "b")
        await la.ensure()
        await kva.put("counter", "0")

        lock_a = la.lock("c", ttl=1)
        await lock_a.acquire()
        seen = await kva.get_entry("counter")
        assert seen is not None
        # A "stalls": its renewals stop (as if paused or cut off) and its lease runs out.
        await lock_a._stop_renewer()
        await wait_for(lambda: not lock_a.held, 5, message="A's lease over")

        lock_b = lb.lock("c", ttl=5)
        await lock_b.acquire(timeout=10)
        await kvb.transform("counter", lambda old: str(int(old or b"0") + 1), lock=lock_b)
        await lock_b.release()

        with pytest.raises(LockLostError):
            lock_a.check()
        with pytest.raises(LockLostError):
            await kva.update("counter", "1", seen.revision, lock=lock_a)
        # Even a write that skipped the lock check (already in flight) cannot land on top.
        with pytest.raises(RevisionMismatchError):
            await kva.update("counter", "1", seen.revision)
        assert await kvb.get("counter") == b"1"
        await la.close()
        await lb.close()
    finally:
        await nca.close()
        await ncb.close()


@pytest.mark.timeout(30)
async def test_transform_deletes_and_passes_absent_as_none(nats_url: str, unique_name: str) -> None:
    nc = await _connect(nats_url)
    try:
        kv = AppKV(nc.jetstream(), unique_name)
        await kv.ensure()
        seen: list[bytes | None] = []

        async def fn(old: bytes | None) -> str:
            seen.append(old)
            return "v1"

        entry = await kv.transform("k", fn)
        assert entry is not None and entry.value == b"v1" and seen == [None]
        assert await kv.transform("k", lambda old: None) is None
        assert await kv.get("k") is None
        assert await kv.transform("k", lambda old: None) is None  # deleting nothing: a no-op
        entry = await kv.transform("k", lambda old: "again")  # recreated over the tombstone
        assert entry is not None and await kv.get("k") == b"again"
    finally:
        await nc.close()


@pytest.mark.timeout(30)
async def test_lock_ttl_lower_bound(nats_url: str, unique_name: str) -> None:
    """A lease shorter than the renewal cadence allows is refused with a clear error."""
    from pycluster import ConfigError

    nc = await _connect(nats_url)
    try:
        svc = LockService(nc.jetstream(), unique_name, "a")
        for bad in (0.001, 0.5, 0, -1, float("nan"), float("inf")):
            with pytest.raises(ConfigError, match="lock ttl"):
                svc.lock("x", ttl=bad)
        assert svc.lock("x", ttl=1).ttl == 1.0
    finally:
        await nc.close()
