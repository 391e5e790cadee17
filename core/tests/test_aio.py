"""`pycluster.kernel.aio.sleep_aligned`: periodic tasks of one process wake together (pure
asyncio, no NATS)."""

from __future__ import annotations

import asyncio

import pytest

from pycluster.kernel import aio


@pytest.mark.slow
@pytest.mark.timeout(30)
async def test_periodic_sleeps_of_one_process_share_their_wake_ups() -> None:
    loop = asyncio.get_running_loop()
    woke: dict[float, list[float]] = {1.0: [], 2.0: [], 3.0: []}

    async def periodic(interval: float) -> None:
        while True:
            before = loop.time()
            await aio.sleep_aligned(interval)
            slept = loop.time() - before
            assert interval - 0.5 - 0.01 <= slept <= interval + 0.5 + 0.1
            woke[interval].append(loop.time())

    tasks = [asyncio.create_task(periodic(i)) for i in woke]
    await asyncio.sleep(6.6)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    # Every wake-up is on the process's grid: whole seconds plus its offset.
    for times in woke.values():
        assert times
        for t in times:
            frac = (t - aio._GRID_PHASE) % 1.0
            assert min(frac, 1 - frac) < 0.05, (t, aio._GRID_PHASE)
    # So the 2 s and 3 s tasks wake at instants when the 1 s task wakes too.
    ones = woke[1.0]
    for t in woke[2.0] + woke[3.0]:
        assert min(abs(t - o) for o in ones) < 0.05


@pytest.mark.timeout(10)
async def test_short_intervals_sleep_exactly() -> None:
    loop = asyncio.get_running_loop()
    before = loop.time()
    await aio.sleep_aligned(0.2)
    assert 0.2 <= loop.time() - before < 0.4
