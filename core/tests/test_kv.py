"""`pycluster.kernel.kv.AppKV` against a real nats-server (no mocks)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from pycluster.kernel.errors import (
    InvalidNameError,
    KeyExistsError,
    PayloadTooLargeError,
    RevisionMismatchError,
)
from pycluster.kernel.kv import AppKV, KVWatcher, WatchEvent
from pycluster.testing import NatsServer

# ``nats_url``: the shared session server of pycluster.testing.pytest_plugin (it finds the
# nats-server binary and removes its temporary directory); buckets here have unique names.


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every failed connect attempt at ERROR; tests expect some."""


async def _connect(url: str) -> Client:
    return await nats.connect(
        url,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
        connect_timeout=1,
        error_cb=_quiet,
    )


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    nc = await _connect(nats_url)
    yield nc.jetstream()
    await nc.close()


@pytest.fixture
async def kv(js: JetStreamContext) -> AppKV:
    store = AppKV(js, f"test_{uuid.uuid4().hex[:10]}")
    await store.ensure()
    return store


async def _events(watcher: KVWatcher, count: int, timeout: float = 10.0) -> list[WatchEvent]:
    """Collect ``count`` events, failing after ``timeout`` seconds."""
    out: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        event = await watcher.next(timeout=max(0.0, deadline - time.monotonic()))
        assert event is not None, f"only {out} within {timeout}s"
        out.append(event)
    return out


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_put_get_and_entry(kv: AppKV) -> None:
    assert await kv.get("missing") is None
    rev = await kv.put("a.b", b"one")
    assert await kv.get("a.b") == b"one"
    rev2 = await kv.put("a.b", "twö")  # str is stored as UTF-8
    assert rev2 > rev
    entry = await kv.get_entry("a.b")
    assert entry is not None
    assert (entry.value, entry.revision) == ("twö".encode(), rev2)
    assert entry.created is not None
    with pytest.raises(TypeError):
        await kv.put("a.b", 42)  # type: ignore[arg-type]


@pytest.mark.timeout(60)
async def test_create_conflict_and_create_after_delete(kv: AppKV) -> None:
    rev = await kv.create("k", b"1")
    with pytest.raises(KeyExistsError) as info:
        await kv.create("k", b"2")
    assert info.value.key == "k"
    await kv.delete("k")
    assert await kv.get("k") is None
    rev2 = await kv.create("k", b"3")  # a tombstone does not block create
    assert rev2 > rev
    assert await kv.get("k") == b"3"


@pytest.mark.timeout(60)
async def test_update_conflict(kv: AppKV) -> None:
    rev = await kv.put("k", b"1")
    rev2 = await kv.update("k", b"2", rev)
    assert await kv.get("k") == b"2"
    with pytest.raises(RevisionMismatchError) as info:
        await kv.update("k", b"3", rev)  # stale revision
    assert info.value.expected == rev
    assert await kv.get("k") == b"2"
    assert await kv.update("k", b"4", rev2) > rev2


@pytest.mark.timeout(60)
async def test_conditional_delete(kv: AppKV) -> None:
    rev = await kv.put("k", b"1")
    await kv.put("k", b"2")
    with pytest.raises(RevisionMismatchError):
        await kv.delete("k", revision=rev)
    assert await kv.get("k") == b"2"
    entry = await kv.get_entry("k")
    assert entry is not None
    await kv.delete("k", revision=entry.revision)
    assert await kv.get("k") is None
    assert await kv.get_entry("k") is None


@pytest.mark.timeout(60)
async def test_keys(kv: AppKV) -> None:
    assert await kv.keys() == []
    for key in ("cfg.a", "cfg.b", "other", "cfg.sub.c"):
        await kv.put(key, b"x")
    await kv.delete("cfg.b")
    assert await kv.keys() == ["cfg.a", "cfg.sub.c", "other"]
    assert await kv.keys("cfg.*") == ["cfg.a"]
    assert await kv.keys("cfg.>") == ["cfg.a", "cfg.sub.c"]


@pytest.mark.timeout(60)
async def test_watch_delivers_put_and_delete(kv: AppKV) -> None:
    await kv.put("before", b"0")
    async with kv.watch("w.>", initial=False) as watcher:
        rev1 = await kv.put("w.a", b"1")
        await kv.put("not.watched", b"x")
        rev2 = await kv.delete("w.a")
        events = await _events(watcher, 2)
    assert [(e.key, e.value, e.revision, e.op) for e in events] == [
        ("w.a", b"1", rev1, "PUT"),
        ("w.a", None, rev2, "DEL"),
    ]


@pytest.mark.timeout(60)
async def test_watch_initial_values(kv: AppKV) -> None:
    await kv.put("i.a", b"1")
    await kv.put("i.gone", b"1")
    await kv.delete("i.gone")
    async with kv.watch("i.>") as watcher:
        (first,) = await _events(watcher, 1)
        assert (first.key, first.value, first.op) == ("i.a", b"1", "PUT")
        await kv.put("i.b", b"2")
        (second,) = await _events(watcher, 1)
        assert (second.key, second.value) == ("i.b", b"2")


@pytest.mark.timeout(60)
async def test_watch_survives_server_restart() -> None:
    server = NatsServer()  # its own server: this test restarts it
    await server.start()
    nc = await _connect(server.url)
    try:
        kv = AppKV(nc.jetstream(), "restart_kv")
        await kv.ensure()
        async with kv.watch("r.>", initial=False, poll_interval=0.2) as watcher:
            await kv.put("r.before", b"1")
            assert (await _events(watcher, 1))[0].key == "r.before"

            server.kill()
            await server.restart()  # same port and data directory: the bucket survives
            deadline = time.monotonic() + 20
            while True:  # writes fail until the client has reconnected
                try:
                    rev = await kv.put("r.after", b"2")
                    break
                except Exception:
                    assert time.monotonic() < deadline, "client did not reconnect"
                    await asyncio.sleep(0.1)
            await kv.delete("r.before")
            events = await _events(watcher, 2, timeout=20)
            assert watcher.recreations >= 1  # the watcher was re-created after the reconnect
        assert [(e.key, e.op) for e in events] == [("r.after", "PUT"), ("r.before", "DEL")]
        assert events[0].revision == rev
    finally:
        await nc.close()
        await server.stop()  # also removes its temporary directory


@pytest.mark.timeout(60)
async def test_watch_recovers_from_a_silent_watcher(kv: AppKV, js: JetStreamContext) -> None:
    # Delete the watch's consumer behind its back: no more pushes arrive (like a watcher on a
    # server that died); the poll notices and re-creates it without repeating old events.
    async with kv.watch("s.>", initial=False, poll_interval=0.1) as watcher:
        await kv.put("s.a", b"1")
        await _events(watcher, 1)
        await js.delete_consumer(watcher._stream, watcher._sub._consumer)
        await kv.put("s.b", b"2")
        await kv.put("s.a", b"3")
        events = await _events(watcher, 2)
        assert watcher.recreations >= 1
        assert await watcher.next(timeout=0.5) is None  # nothing repeated
    assert sorted((e.key, e.value) for e in events) == [("s.a", b"3"), ("s.b", b"2")]


@pytest.mark.timeout(60)
async def test_watch_reports_expiry(js: JetStreamContext) -> None:
    # Expiry markers exist only with limit_marker_ttl: use a lease-style bucket.
    from pycluster.kernel import natsutil

    bucket = f"exp_{uuid.uuid4().hex[:8]}"
    await natsutil.ensure_kv(js, bucket, marker_ttl=1)
    kv = AppKV(js, bucket)
    async with kv.watch(initial=False) as watcher:
        await natsutil.cas_publish(js, bucket, "lease", b"x", expected_seq=0, ttl=1)
        put, expired = await _events(watcher, 2)
    assert (put.op, expired.op, expired.value) == ("PUT", "EXPIRED", None)
    assert await kv.get("lease") is None  # a marker is not a value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("key", ["", "a b", "a.*", "a.>", ".a", "a.", "a..b", "ä"])
async def test_invalid_keys_rejected_before_sending(kv: AppKV, key: str) -> None:
    nc = kv._js._nc
    sent = nc.stats["out_msgs"]
    for call in (
        kv.get(key),
        kv.put(key, b"x"),
        kv.create(key, b"x"),
        kv.update(key, b"x", 1),
        kv.delete(key),
    ):
        with pytest.raises(InvalidNameError):
            await call
    assert nc.stats["out_msgs"] == sent


@pytest.mark.timeout(60)
async def test_invalid_patterns_rejected(kv: AppKV) -> None:
    for pattern in ("", "a.>.b", "a b", "a..b"):
        with pytest.raises(InvalidNameError):
            await kv.keys(pattern)
        with pytest.raises(InvalidNameError):
            kv.watch(pattern)


@pytest.mark.timeout(60)
async def test_oversized_values_rejected_before_sending(js: JetStreamContext) -> None:
    small = AppKV(js, f"small_{uuid.uuid4().hex[:8]}", max_value_size=100)
    big = AppKV(js, f"big_{uuid.uuid4().hex[:8]}")
    await small.ensure()
    await big.ensure()
    await small.put("ok", b"x" * 100)
    nc = js._nc
    sent = nc.stats["out_msgs"]
    with pytest.raises(PayloadTooLargeError) as info:
        await small.put("big", b"x" * 101)
    assert (info.value.size, info.value.limit) == (101, 100)
    with pytest.raises(PayloadTooLargeError):
        await small.create("big", "x" * 101)
    # Without max_value_size the limit is the server's max_payload.
    with pytest.raises(PayloadTooLargeError):
        await big.put("big", b"x" * (nc.max_payload + 1))
    with pytest.raises(PayloadTooLargeError):
        await big.update("big", b"x" * nc.max_payload, 1)  # leaves no room for the CAS header
    assert nc.stats["out_msgs"] == sent
    assert nc.is_connected  # the server never saw (and never rejected) an oversized message
    assert await big.keys() == []


@pytest.mark.timeout(60)
async def test_buckets_are_isolated(js: JetStreamContext) -> None:
    one = AppKV(js, f"iso1_{uuid.uuid4().hex[:8]}")
    two = AppKV(js, f"iso2_{uuid.uuid4().hex[:8]}")
    await one.ensure()
    await two.ensure()
    await one.put("shared", b"one")
    await one.put("only.one", b"1")
    assert await two.get("shared") is None
    assert await two.keys() == []
    await two.put("shared", b"two")
    assert await one.get("shared") == b"one"
    assert await one.keys() == ["only.one", "shared"]
    async with two.watch(initial=False) as watcher:
        await one.put("shared", b"again")
        await two.put("mine", b"2")
        (event,) = await _events(watcher, 1)
    assert event.key == "mine"
