"""App data through the public API: isolation, locks across apps and platforms."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pycluster import App, InvalidNameError, KeyExistsError, RevisionMismatchError
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(60)


async def test_apps_are_isolated(make_platform: Any) -> None:
    a, b = App("alpha"), App("beta")
    await make_platform("n1", a, b)
    await a.kv.put("shared-name", b"alpha's")
    assert await b.kv.get("shared-name") is None
    await b.kv.put("shared-name", b"beta's")
    assert await a.kv.get("shared-name") == b"alpha's"
    assert await a.kv.keys() == ["shared-name"]
    # No key can address another bucket: wildcards and subject tricks are refused.
    for bad in ("*", ">", "a..b", "$KV.x", "a b"):
        with pytest.raises(InvalidNameError):
            await a.kv.put(bad, b"x")


async def test_kv_conflicts_through_app(make_platform: Any) -> None:
    a = App("svc")
    await make_platform("n1", a)
    rev = await a.kv.create("k", b"1")
    with pytest.raises(KeyExistsError):
        await a.kv.create("k", b"2")
    rev2 = await a.kv.update("k", b"2", rev)
    with pytest.raises(RevisionMismatchError):
        await a.kv.update("k", b"3", rev)
    assert rev2 > rev and await a.kv.get("k") == b"2"


async def test_app_lock_mutual_exclusion_across_platforms(make_platform: Any) -> None:
    apps = [App("svc") for _ in range(3)]
    for i, app in enumerate(apps):
        await make_platform(f"n{i}", app)
    inside = 0
    max_inside = 0
    tokens: list[int] = []

    async def worker(app: App) -> None:
        nonlocal inside, max_inside
        for _ in range(5):
            async with app.lock("critical", ttl=5) as lock:
                inside += 1
                max_inside = max(max_inside, inside)
                tokens.append(lock.token or 0)
                await asyncio.sleep(0.01)
                inside -= 1

    await asyncio.gather(*(worker(a) for a in apps))
    assert max_inside == 1
    assert tokens == sorted(tokens) and len(set(tokens)) == 15


async def test_platform_lock_holder_visible(make_platform: Any) -> None:
    p1 = await make_platform("n1")
    p2 = await make_platform("n2")
    lock = p1.lock("deploy", ttl=5)
    await lock.acquire(timeout=5)
    holder = await p2.lock_holder("deploy")
    assert holder is not None and holder.owner == "n1"
    waiter = asyncio.create_task(p2.lock("deploy", ttl=5).acquire(timeout=10))
    await wait_for(lambda: p2.lock_holder("deploy"), 5)
    await lock.release()
    await asyncio.wait_for(waiter, 10)
    holder = await p1.lock_holder("deploy")
    assert holder is not None and holder.owner == "n2"
