"""The cheap parts of the RPC hot path: the deadline wheel, batched duration histograms, and the
tracing check (pure logic, no NATS)."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from prometheus_client import CollectorRegistry, Histogram

from pycluster.builtin.metrics.collectors import BatchFlusher, HistogramBatch
from pycluster.builtin.rpc.server import DeadlineWheel
from pycluster.builtin.tracing.spans import recording

BUCKETS = (0.001, 0.01, 0.1, 1.0)


@pytest.mark.timeout(10)
async def test_deadline_wheel_cancels_late_tasks_only() -> None:
    wheel = DeadlineWheel()
    started = time.monotonic()

    async def sleeper(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    slow = asyncio.create_task(sleeper(5))
    quick = asyncio.create_task(sleeper(0.01))
    slow_expired: list[bool] = []
    quick_expired: list[bool] = []
    wheel.add(time.monotonic() + 0.1, slow, slow_expired)
    slot = wheel.add(time.monotonic() + 0.1, quick, quick_expired)
    assert await quick == "done"
    slot.pop(quick, None)  # ended in time: what _serve does
    with pytest.raises(asyncio.CancelledError):
        await slow
    waited = time.monotonic() - started
    assert slow_expired == [True]
    assert quick_expired == []
    # Cancelled after its deadline, at most one slot later (plus scheduling).
    assert waited >= 0.1
    assert not wheel._slots  # fired slots are forgotten


@pytest.mark.timeout(10)
async def test_deadline_wheel_shares_one_timer_per_slot() -> None:
    wheel = DeadlineWheel()
    loop = asyncio.get_running_loop()
    before = len(loop._scheduled)  # type: ignore[attr-defined]
    deadline = (int(time.monotonic() * 20) + 40) / 20 + 0.001  # inside one slot
    tasks = [asyncio.create_task(asyncio.sleep(10)) for _ in range(50)]
    for t in tasks:
        wheel.add(deadline, t, [])
    assert len(loop._scheduled) - before == 1  # type: ignore[attr-defined]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.timeout(10)
def test_batched_histogram_matches_direct_observations() -> None:
    registry = CollectorRegistry()
    flusher = BatchFlusher()
    registry.register(flusher)  # first: flushed before the histograms are read
    batched = Histogram("batched_seconds", "b", ["app"], buckets=BUCKETS, registry=registry)
    direct = Histogram("direct_seconds", "d", ["app"], buckets=BUCKETS, registry=registry)
    batch = flusher.batch(("x",), batched.labels("svc"))
    values = [0.0005, 0.001, 0.002, 0.05, 0.5, 2.0, 30.0, 0.0]
    for v in values:
        batch.observe(v)
        direct.labels("svc").observe(v)
    for le in ("0.001", "0.01", "0.1", "1.0", "+Inf"):
        got = registry.get_sample_value("batched_seconds_bucket", {"app": "svc", "le": le})
        want = registry.get_sample_value("direct_seconds_bucket", {"app": "svc", "le": le})
        assert got == want, le
    assert registry.get_sample_value("batched_seconds_count", {"app": "svc"}) == len(values)
    assert registry.get_sample_value("batched_seconds_sum", {"app": "svc"}) == pytest.approx(
        sum(values))
    # Flushed once: collecting again adds nothing.
    assert registry.get_sample_value("batched_seconds_count", {"app": "svc"}) == len(values)
    batch.observe(0.003)
    assert registry.get_sample_value("batched_seconds_count", {"app": "svc"}) == len(values) + 1


@pytest.mark.timeout(10)
def test_batch_of_an_unknown_child_observes_directly() -> None:
    class Child:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    child = Child()
    batch = HistogramBatch(child)
    batch.observe(0.25)
    batch.flush()
    assert child.seen == [0.25]


@pytest.mark.timeout(10)
def test_recording_follows_the_global_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    assert recording() is False
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider(sampler=ALWAYS_OFF))
    assert recording() is False  # nothing would ever be recorded
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", TracerProvider())
    assert recording() is True
