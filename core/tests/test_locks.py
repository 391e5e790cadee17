"""`pycluster.kernel.locks` against a real nats-server: exclusion across processes, FIFO, fencing,
TTL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

import pycluster
from pycluster.kernel import natsutil
from pycluster.kernel.errors import InvalidNameError, LockLostError, LockTimeoutError
from pycluster.kernel.kv import AppKV
from pycluster.kernel.locks import Lock, LockHolder, LockService
from pycluster.testing import NatsServer

SRC = str(Path(pycluster.__file__).resolve().parent.parent)


# ``nats_url``: the shared session server of pycluster.testing.pytest_plugin (it finds the
# nats-server binary and removes its temporary directory); bucket names are unique per test.


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every failed connect attempt at ERROR; tests expect some."""


@pytest.fixture
async def connect(nats_url: str) -> AsyncIterator[Callable[[], Awaitable[Client]]]:
    """Open NATS connections (one per simulated process); all closed after the test."""
    opened: list[Client] = []

    async def _open() -> Client:
        nc = await nats.connect(nats_url, error_cb=_quiet)
        opened.append(nc)
        return nc

    yield _open
    for nc in opened:
        await nc.close()


@pytest.fixture
def bucket() -> str:
    return f"locks_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def services(
    connect: Callable[[], Awaitable[Client]], bucket: str
) -> AsyncIterator[Callable[[str], Awaitable[LockService]]]:
    """LockService factory: each one has its own connection, like a separate process."""
    made: list[LockService] = []

    async def _make(owner: str) -> LockService:
        nc = await connect()
        svc = LockService(nc.jetstream(), bucket, owner, poll_interval=0.2)
        await svc.ensure()
        made.append(svc)
        return svc

    yield _make
    for svc in made:
        await svc.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def queue_of(svc: LockService, name: str) -> tuple[str, ...]:
    holder = await svc.holder(name)
    return holder.waiters if holder is not None else ()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC, env.get("PYTHONPATH")) if p)
    return env


async def spawn(code: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, stdout=asyncio.subprocess.PIPE, env=_env()
    )


def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)


# -- single process ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_acquire_release_and_fencing_tokens(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    svc = await services("node-1")
    lock = svc.lock("jobs", ttl=5)
    assert (lock.name, lock.held, lock.token) == ("jobs", False, None)
    assert await svc.holder("jobs") is None
    tokens = []
    for _ in range(5):
        token = await lock.acquire()
        assert lock.held and lock.token == token
        holder = await svc.holder("jobs")
        assert isinstance(holder, LockHolder)
        assert (holder.owner, holder.token, holder.waiting) == ("node-1", token, 0)
        await lock.release()
        assert not lock.held
        tokens.append(token)
    assert tokens == sorted(set(tokens))  # strictly increasing
    assert await svc.holder("jobs") is None
    with pytest.raises(RuntimeError):
        await lock.release()


@pytest.mark.timeout(60)
async def test_observers_get_only_the_events_they_asked_for(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    # ``observers``: per event, only the functions that asked for it (a failing one is logged
    # and the lock goes on); ``on_event`` gets every event.
    svc = await services("node-1")
    released: list[dict[str, object]] = []
    every: list[str] = []

    def broken(_lock: Lock, _fields: dict[str, object]) -> None:
        raise RuntimeError("observer bug")

    svc.observers = {"released": (broken, lambda _lock, fields: released.append(fields))}
    svc.on_event = lambda event, _lock, _fields: every.append(event)
    lock = svc.lock("jobs", ttl=5)
    token = await lock.acquire()
    await lock.release()
    assert every == ["wait", "acquired", "released"]
    assert len(released) == 1 and released[0]["token"] == token
    assert isinstance(released[0]["held"], float)
    svc.on_event = None
    svc.observers = {}
    await lock.acquire()  # nobody listens: nothing is called
    await lock.release()
    assert len(released) == 1 and every == ["wait", "acquired", "released"]


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_platform_lock_observers_and_lock_event_hooks(make_platform: Any) -> None:
    # A plugin's ``pycluster_lock_observers`` is asked once per lock service and gets the
    # events it listed; ``pycluster_lock_event`` still gets every event.
    from pycluster import App, Spread
    from pycluster.plugins import hookimpl

    seen: list[tuple[str, str]] = []
    asked: list[str] = []

    class Observers:
        @hookimpl
        def pycluster_lock_observers(self, platform: Any, scope: str) -> Any:
            asked.append(scope)
            return {"acquired": lambda lock, fields: seen.append(("acquired", lock.name))}

    class Every:
        @hookimpl
        def pycluster_lock_event(self, scope: str, event: str, lock: Any) -> None:
            seen.append((f"every:{event}", scope))

    app = App("svc", Spread())
    await make_platform("n1", app, extra_plugins=[("observers", Observers()),
                                                  ("every", Every())])
    assert sorted(asked) == ["_platform", "svc"]
    async with app.lock("jobs"):
        pass
    assert seen == [("every:wait", "svc"), ("acquired", "jobs"), ("every:acquired", "svc"),
                    ("every:released", "svc")]


@pytest.mark.timeout(60)
async def test_tasks_of_one_process_contend(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    svc = await services("node-1")
    inside = 0
    counter = 0
    tokens: list[int] = []

    async def worker() -> None:
        nonlocal inside, counter
        for _ in range(10):
            async with svc.lock("shared", ttl=5) as lock:
                inside += 1
                assert inside == 1
                value = counter
                await asyncio.sleep(0.001)
                counter = value + 1
                assert lock.token is not None
                tokens.append(lock.token)
                inside -= 1

    await asyncio.gather(*(worker() for _ in range(4)))
    assert counter == 40
    assert tokens == sorted(set(tokens))


@pytest.mark.timeout(60)
async def test_fifo_order(services: Callable[[str], Awaitable[LockService]]) -> None:
    first = await services("holder")
    held = first.lock("fifo")
    await held.acquire()
    served: list[int] = []
    tokens: list[int] = []

    async def waiter(i: int, svc: LockService) -> None:
        lock = svc.lock("fifo")
        tokens.append(await lock.acquire())
        served.append(i)
        await lock.release()

    tasks = []
    for i in range(5):
        svc = await services(f"waiter-{i}")
        tasks.append(asyncio.create_task(waiter(i, svc)))

        async def enqueued(n: int = i + 1) -> bool:
            return len(await queue_of(first, "fifo")) == n

        await wait_until(enqueued, what=f"waiter {i} in the queue")
    queue = await queue_of(first, "fifo")
    assert [w.rsplit("#", 1)[0] for w in queue] == [f"waiter-{i}" for i in range(5)]
    await held.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert served == [0, 1, 2, 3, 4]
    assert tokens == sorted(set(tokens)) and tokens[0] > (held.token or 0)


@pytest.mark.timeout(60)
async def test_timeout_removes_waiter(services: Callable[[str], Awaitable[LockService]]) -> None:
    a, b = await services("a"), await services("b")
    held = a.lock("t", ttl=5)
    await held.acquire()
    started = time.monotonic()
    with pytest.raises(LockTimeoutError) as info:
        await b.lock("t").acquire(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert info.value.holder == "a"
    assert await queue_of(a, "t") == ()
    await held.release()
    assert await a.holder("t") is None  # not handed to the waiter that left
    assert await b.lock("t").acquire(timeout=0)  # free: succeeds at once


@pytest.mark.timeout(60)
async def test_cancelled_waiter_leaves_queue(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    a, b = await services("a"), await services("b")
    held = a.lock("c")
    await held.acquire()
    task = asyncio.create_task(b.lock("c").acquire())

    async def queued() -> bool:
        return len(await queue_of(a, "c")) == 1

    await wait_until(queued, what="waiter queued")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await queue_of(a, "c") == ()
    await held.release()
    assert await a.holder("c") is None


@pytest.mark.timeout(60)
@pytest.mark.slow
async def test_renewed_lock_outlives_its_ttl(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    a, b = await services("a"), await services("b")
    lock = a.lock("renew", ttl=1)
    token = await lock.acquire()
    other = b.lock("renew", ttl=1)
    with pytest.raises(LockTimeoutError):
        await other.acquire(timeout=3.5)  # > 3 ttls: only renewals keep it held
    assert lock.held
    holder = await b.holder("renew")
    assert holder is not None and (holder.owner, holder.token) == ("a", token)
    await lock.release()


@pytest.mark.timeout(60)
async def test_async_with_releases_on_exception(
    services: Callable[[str], Awaitable[LockService]],
) -> None:
    svc = await services("a")
    lock = svc.lock("ctx")
    with pytest.raises(ZeroDivisionError):
        async with lock:
            assert lock.held
            1 / 0  # noqa: B018
    assert not lock.held
    assert await svc.holder("ctx") is None


@pytest.mark.timeout(60)
async def test_lost_lock_is_reported(
    services: Callable[[str], Awaitable[LockService]], connect: Callable[[], Awaitable[Client]]
) -> None:
    svc = await services("a")
    lock = svc.lock("lost", ttl=1)
    await lock.acquire()
    # Someone overwrites the lock state behind our back (an operator, a partitioned peer):
    # the next renewal finds a different holder and gives the lock up.
    js: JetStreamContext = (await connect()).jetstream()
    await natsutil.cas_publish(
        js, svc.bucket, "lost", b'{"holder":"x#1","claimed":true}', expected_seq=None, ttl=5
    )

    async def lost() -> bool:
        return not lock.held

    await wait_until(lost, timeout=5, what="lock lost")
    assert lock.lost
    with pytest.raises(LockLostError):
        await lock.release()


@pytest.mark.timeout(60)
async def test_invalid_names(services: Callable[[str], Awaitable[LockService]]) -> None:
    svc = await services("a")
    for name in ("", "a b", "a.*", "x.>", "a..b"):
        with pytest.raises(InvalidNameError):
            svc.lock(name)
    with pytest.raises(ValueError):
        svc.lock("ok", ttl=0)


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_lock_and_waiter_survive_a_server_restart() -> None:
    """A restart shorter than the lease: the holder keeps the lock, the waiter gets it next."""
    server = NatsServer()  # its own server: this test restarts it
    await server.start()
    url = server.url
    conns = [
        await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, error_cb=_quiet)
        for _ in range(2)
    ]
    a = LockService(conns[0].jetstream(), "restart_locks", "a", poll_interval=0.2)
    b = LockService(conns[1].jetstream(), "restart_locks", "b", poll_interval=0.2)
    try:
        await a.ensure()
        held = a.lock("job", ttl=5)
        token = await held.acquire()
        waiting = asyncio.create_task(b.lock("job", ttl=8).acquire(timeout=30))

        async def queued() -> bool:
            return len(await queue_of(a, "job")) == 1

        await wait_until(queued, what="waiter queued")
        server.kill()
        killed = time.monotonic()
        await server.restart()  # same port and data: the lock state survives
        # Still held a whole lease after the outage began: renewals got through again.
        while time.monotonic() < killed + held.ttl + 0.5:
            assert held.held, "lock lost across a restart shorter than its lease"
            assert not waiting.done()
            await asyncio.sleep(0.1)
        holder = await b.holder("job")
        assert holder is not None and holder.token == token
        await held.release()
        assert await asyncio.wait_for(waiting, 15) > token
    finally:
        await a.close()
        await b.close()
        for nc in conns:
            await nc.close()
        await server.stop()  # also removes its temporary directory


# -- several processes -------------------------------------------------------------------------

COUNTER_WORKER = r"""
import asyncio, sys
import nats
from pycluster.kernel.kv import AppKV
from pycluster.kernel.locks import LockService

async def main(url, locks, data, n, ident):
    nc = await nats.connect(url)
    js = nc.jetstream()
    svc = LockService(js, locks, f"proc-{ident}")
    kv = AppKV(js, data)
    for _ in range(int(n)):
        lock = svc.lock("counter", ttl=5)
        async with lock:
            value = int(await kv.get("n") or b"0")
            await asyncio.sleep(0)
            await kv.put("n", str(value + 1))
            print(value + 1, lock.token, flush=True)
    await svc.close()
    await nc.close()

asyncio.run(main(*sys.argv[1:]))
"""

HOLDER = r"""
import asyncio, sys
import nats
from pycluster.kernel.locks import LockService

async def main(url, locks, name, owner, ttl):
    nc = await nats.connect(url)
    svc = LockService(nc.jetstream(), locks, owner)
    token = await svc.lock(name, ttl=float(ttl)).acquire()
    print("acquired", token, flush=True)
    await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_mutual_exclusion_across_processes(
    nats_url: str,
    services: Callable[[str], Awaitable[LockService]],
    bucket: str,
    connect: Callable[[], Awaitable[Client]],
) -> None:
    await (await services("setup")).ensure()
    data = AppKV((await connect()).jetstream(), f"data_{uuid.uuid4().hex[:8]}")
    await data.ensure()
    per_process = 25
    procs = [
        await spawn(COUNTER_WORKER, nats_url, bucket, data.bucket, str(per_process), str(i))
        for i in range(4)
    ]
    try:
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
    finally:
        for p in procs:
            kill(p)
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    pairs = sorted(
        (int(n), int(token))
        for out, _ in outputs
        for n, token in (line.split() for line in out.decode().splitlines())
    )
    total = 4 * per_process
    assert await data.get("n") == str(total).encode()  # no lost update
    assert [n for n, _ in pairs] == list(range(1, total + 1))  # every value written once
    tokens = [t for _, t in pairs]
    assert tokens == sorted(set(tokens))  # fencing tokens strictly increase with each holder


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_holder_death_expires_and_waiters_keep_order(
    nats_url: str, services: Callable[[str], Awaitable[LockService]], bucket: str
) -> None:
    watcher = await services("observer")
    proc = await spawn(HOLDER, nats_url, bucket, "job", "doomed", "1")
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        dead_token = int(line.split()[1])
        served: list[int] = []
        tokens: list[int] = []

        async def waiter(i: int, lock: Lock) -> None:
            tokens.append(await lock.acquire(timeout=20))
            served.append(i)
            await lock.release()

        tasks = []
        for i in range(3):
            svc = await services(f"w{i}")
            tasks.append(asyncio.create_task(waiter(i, svc.lock("job", ttl=5))))

            async def enqueued(n: int = i + 1) -> bool:
                return len(await queue_of(watcher, "job")) == n

            await wait_until(enqueued, what=f"waiter {i} queued")
        kill(proc)
        killed = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        takeover = time.monotonic() - killed
    finally:
        kill(proc)
        await proc.wait()
    assert served == [0, 1, 2]  # relative order survives the holder's death
    assert tokens[0] > dead_token and tokens == sorted(set(tokens))
    assert takeover < 5  # lease 1 s (server TTL) + takeover margin, not the waiters' ttl


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_dead_waiter_is_skipped(
    nats_url: str, services: Callable[[str], Awaitable[LockService]], bucket: str
) -> None:
    a, c = await services("a"), await services("c")
    held = a.lock("job", ttl=5)
    await held.acquire()
    # A waiter in another process queues (with ttl=1), then dies before it is served.
    proc = await spawn(HOLDER, nats_url, bucket, "job", "doomed", "1")
    try:

        async def first_queued() -> bool:
            return len(await queue_of(a, "job")) == 1

        await wait_until(first_queued, timeout=20, what="doomed waiter queued")
        late = asyncio.create_task(c.lock("job", ttl=5).acquire(timeout=20))

        async def second_queued() -> bool:
            return len(await queue_of(a, "job")) == 2

        await wait_until(second_queued, what="second waiter queued")
        kill(proc)
        await proc.wait()
        await held.release()  # handed to the dead waiter, which never claims it
        released = time.monotonic()
        token = await asyncio.wait_for(late, 20)
        assert token > (held.token or 0)
        assert 0.9 < time.monotonic() - released < 5  # skipped after the dead waiter's ttl
        holder = await a.holder("job")
        assert holder is not None and holder.owner == "c"
    finally:
        kill(proc)
        await proc.wait()
