"""Benchmark: what observability costs, next to baselines measured in the same run.

Run from the repository root (starts its own nats-server on loopback)::

    python bench/bench_observability.py [--calls 2000] [--entries 5000]

It prints:

1. request/reply round trips: raw nats-py (the floor), a pycluster API call with the core's
   observability middleware removed, the same call with it (no OpenTelemetry SDK: the default),
   and with an SDK tracer provider recording every span (to a no-op exporter): p50/p99 each;
2. audit: the caller's cost of ``audit.log()`` (it only queues), and the publishing throughput
   of the queue (entries/s until flushed) next to raw ``js.publish`` awaited one by one;
3. ``/metrics``: the time to render the exposition of a node with one app.

Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

import nats  # noqa: E402

from pycluster import App, Platform, Singleton, ToLeader  # noqa: E402
from pycluster.builtin.metrics.middleware import MetricsMiddleware  # noqa: E402
from pycluster.builtin.tracing.middleware import TracingMiddleware  # noqa: E402
from pycluster.plugins import create_plugin_manager  # noqa: E402
from pycluster.testing.servers import NatsServer  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def line(label: str, xs: list[float], base: float | None = None) -> None:
    p50, p99 = pct(xs, 50) * 1e3, pct(xs, 99) * 1e3
    ratio = f"  ({p50 / (base * 1e3):.2f}x the floor)" if base else ""
    print(f"  {label:<44} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms{ratio}")


async def timed(n: int, fn: Any) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def main(calls: int, entries: int) -> None:
    async with NatsServer() as server:
        # -- 1. round trips ------------------------------------------------------------------
        nc = await nats.connect(server.url)

        async def echo(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("bench.echo", cb=echo)
        raw = await timed(calls, lambda: nc.request("bench.echo", b'{"x":1}', timeout=5))

        app = App("svc", Singleton())

        @app.handle("echo")
        async def handler(payload: Any) -> Any:
            return payload

        pm = create_plugin_manager(load_entrypoints=False)
        p = Platform("bench", node_id="n1", nats_url=server.url, plugin_manager=pm)
        p.register(app)
        await p.start()
        assert await app.wait_for_leadership(15)
        api = p.api("svc")

        async def call() -> Any:
            return await api.call("echo", {"x": 1}, route=ToLeader(), timeout=5)

        for _ in range(200):
            await call()  # warm up
        chain = p.middleware
        mine = [m for m in chain if isinstance(m, TracingMiddleware | MetricsMiddleware)]
        for m in mine:
            chain.remove(m)
        without = await timed(calls, call)
        for m in mine:
            chain.add(m)
        with_noop = await timed(calls, call)

        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

        class Drop(SpanExporter):
            def export(self, spans: Any) -> Any:
                from opentelemetry.sdk.trace.export import SpanExportResult

                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)
        with_sdk = await timed(calls, call)

        floor = pct(raw, 50)
        print(f"1. request/reply round trips ({calls} each, loopback)")
        line("raw nats-py request (floor)", raw)
        line("API call, observability middleware removed", without, floor)
        line("API call, with it, no OpenTelemetry SDK", with_noop, floor)
        line("API call, with it, SDK recording spans", with_sdk, floor)

        # -- 2. audit ------------------------------------------------------------------------
        js = nc.jetstream()
        await js.add_stream(name="bench_raw", subjects=["bench.raw.>"])
        body = b'{"v":1,"time":1.0,"platform":"bench","node":"n1","category":"bench",' \
               b'"action":"tick","data":{"i":1}}'
        t0 = time.perf_counter()
        for _ in range(entries):
            await js.publish("bench.raw.x", body)
        raw_rate = entries / (time.perf_counter() - t0)

        await p.audit.flush()
        t0 = time.perf_counter()
        for i in range(entries):
            p.audit.log("bench", "tick", {"i": i})
        log_cost = (time.perf_counter() - t0) / entries
        assert await p.audit.flush(120)
        audit_rate = entries / (time.perf_counter() - t0)
        print(f"\n2. audit ({entries} entries)")
        print(f"  {'audit.log() cost to the caller':<44} {log_cost * 1e6:7.1f} us per entry")
        print(f"  {'raw js.publish, awaited one by one':<44} {raw_rate:9.0f} msgs/s (baseline)")
        print(f"  {'audit queue published until flushed':<44} {audit_rate:9.0f} entries/s "
              f"({audit_rate / raw_rate:.2f}x the baseline)")

        # -- 3. /metrics ---------------------------------------------------------------------
        renders = []
        for _ in range(200):
            t0 = time.perf_counter()
            p.metrics.render()
            renders.append(time.perf_counter() - t0)
        size = len(p.metrics.render())
        print(f"\n3. /metrics exposition ({size} bytes)")
        line("render", renders)
        print(f"  {'(baseline: one raw request round trip)':<44} p50 {floor * 1e3:7.3f} ms")
        print("  state gauges are computed per scrape only: nothing runs when nobody scrapes")

        await p.stop()
        await nc.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--entries", type=int, default=5000)
    a = ap.parse_args()
    asyncio.run(main(a.calls, a.entries))
