"""OpenTelemetry spans: transitions, hooks, stages, lock waits, RPC/API calls and events; W3C
trace context across processes (in-memory exporters on both sides)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pycluster import App, Singleton
from pycluster.builtin.api.bus import ToLeader
from pycluster.builtin.tracing.spans import extract, get_tracer, inject
from pycluster.kernel.context import current_trace_id
from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = pytest.mark.timeout(120)

_EXPORTER = InMemorySpanExporter()


class _Gate(SimpleSpanProcessor):
    """Exports only while a test of this module runs (the provider outlives the module)."""

    active = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.active:
            super().on_end(span)


_GATE = _Gate(_EXPORTER)


@pytest.fixture(autouse=True, scope="module")
def _restore_tracer_provider() -> Iterator[None]:
    """Leave no SDK provider behind: later test modules run as without OpenTelemetry SDK."""
    yield
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's SDK tracer provider (set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another tracer provider is installed"
    if not getattr(provider, "_pycluster_test_gate", False):
        provider.add_span_processor(_GATE)
        provider._pycluster_test_gate = True  # type: ignore[attr-defined]
    _EXPORTER.clear()
    _GATE.active = True
    try:
        yield _EXPORTER
    finally:
        _GATE.active = False
        _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_inject_extract_round_trip(spans: InMemorySpanExporter) -> None:
    with get_tracer().start_as_current_span("outer") as sp:
        headers = inject({})
        assert headers["traceparent"].split("-")[1] == format(sp.get_span_context().trace_id,
                                                               "032x")
        assert current_trace_id() == headers["traceparent"].split("-")[1]
    ctx = extract({"Traceparent": headers["traceparent"]})  # header case does not matter
    assert trace.get_current_span(ctx).get_span_context().span_id == \
        sp.get_span_context().span_id
    assert current_trace_id() is None
    assert inject({}) == {}


async def test_transition_hook_stage_and_lock_spans(make_platform: Any,
                                                    spans: InMemorySpanExporter) -> None:
    app = App("svc", Singleton())

    @app.on_active
    async def warm(ctx: Any) -> None:
        await asyncio.sleep(0.01)

    p = await make_platform("n1", app)
    assert await app.wait_for_leadership(15)
    await wait_for(lambda: named(spans, "pycluster.activate"), 10)
    act = named(spans, "pycluster.activate")[0]
    assert act.attributes is not None and act.attributes["pycluster.app"] == "svc"
    assert act.attributes["pycluster.outcome"] == "active"
    assert act.attributes["pycluster.node"] == "n1"
    hook = named(spans, "pycluster.hook.on_active")[0]
    stage = named(spans, "pycluster.stage.activate")[0]
    for child in (hook, stage):
        assert child.parent is not None and child.parent.span_id == act.context.span_id
        assert child.context.trace_id == act.context.trace_id
    assert stage.attributes is not None and stage.attributes["pycluster.stage"] == "app-hooks"

    # An audit entry written inside a span carries its trace id.
    with get_tracer().start_as_current_span("work") as work:
        entry = p.audit.log("deploy", "started")
    assert entry.trace_id == format(work.get_span_context().trace_id, "032x")

    # Lock waits: a span from the start of acquire to the grant.
    async with app.lock("job", ttl=2):
        pass
    wait = named(spans, "pycluster.lock.wait")
    assert wait and wait[0].attributes is not None
    assert wait[0].attributes["pycluster.lock.name"] == "job"
    assert wait[0].attributes["pycluster.lock.scope"] == "svc"

    await app.step_down()
    await wait_for(lambda: named(spans, "pycluster.deactivate"), 10)
    assert named(spans, "pycluster.deactivate")[0].attributes["pycluster.outcome"] == "passive"  # type: ignore[index]


async def test_rpc_and_events_continue_the_trace(make_platform: Any,
                                                 spans: InMemorySpanExporter) -> None:
    server_app = App("svc", Singleton())

    @server_app.handle("echo")
    async def echo(payload: Any) -> dict[str, Any]:
        return {"payload": payload, "trace_id": current_trace_id()}

    await make_platform("n1", server_app)
    assert await server_app.wait_for_leadership(15)
    client = await make_platform("n2")
    got: list[Any] = []

    async def on_event(ev: Any) -> None:
        got.append((ev, current_trace_id()))

    sub = await client.events.subscribe("order.*", on_event)
    try:
        with get_tracer().start_as_current_span("request") as root:
            res = await client.api("svc").call("echo", {"x": 1}, route=ToLeader(), timeout=10)
            await client.events.publish("order.created", {"id": 7})
        trace_id = format(root.get_span_context().trace_id, "032x")
        assert res["trace_id"] == trace_id  # the handler ran inside the caller's trace
        await wait_for(lambda: got, 10)
    finally:
        await sub.unsubscribe()

    client_span = next(s for s in named(spans, "svc/echo") if s.kind is SpanKind.CLIENT)
    server_span = next(s for s in named(spans, "svc/echo") if s.kind is SpanKind.SERVER)
    assert client_span.parent is not None and client_span.parent.span_id == \
        root.get_span_context().span_id
    assert server_span.parent is not None
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.attributes is not None and server_span.attributes["rpc.method"] == "echo"

    await wait_for(lambda: named(spans, "order.created process"), 10)
    pub = named(spans, "order.created publish")[0]
    con = named(spans, "order.created process")[0]
    assert pub.kind is SpanKind.PRODUCER and con.kind is SpanKind.CONSUMER
    assert con.parent is not None and con.parent.span_id == pub.context.span_id
    assert got[0][1] == trace_id


async def test_tracing_off(make_platform: Any, spans: InMemorySpanExporter) -> None:
    app = App("svc", Singleton())
    await make_platform("n1", app, tracing=False)
    assert await app.wait_for_leadership(15)
    async with app.lock("job", ttl=2):
        pass
    assert [s for s in spans.get_finished_spans() if s.name.startswith("pycluster.")] == []


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_trace_crosses_processes(make_platform: Any, nats_url: str, unique_name: str,
                                       tmp_path: Path, spans: InMemorySpanExporter) -> None:
    """A trace started here continues in the node process that handles the call: the server
    span, recorded by that process's own in-memory exporter, has the client span as parent."""
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=1, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--setup", "pycluster.testing.obs_node:setup",
                                "--setup-arg", "trace=1"])
    try:
        await c.start()
        await c.wait_for_leader(30)
        client = await make_platform("client", name=unique_name)
        api = client.api("svc")
        with get_tracer().start_as_current_span("job") as root:
            res = await api.call("echo", "hi", route=ToLeader(), timeout=15)
        trace_id = format(root.get_span_context().trace_id, "032x")
        assert res["node"] == "n1" and res["trace_id"] == trace_id

        client_span = next(s for s in named(spans, "svc/echo") if s.kind is SpanKind.CLIENT)
        remote = await api.call("spans", route=ToLeader(), timeout=15)
        server = [s for s in remote if s["name"] == "svc/echo" and s["kind"] == "SERVER"]
        assert len(server) == 1, json.dumps(remote, indent=1)
        assert server[0]["trace_id"] == trace_id
        assert server[0]["parent_span_id"] == format(client_span.context.span_id, "016x")
        assert server[0]["attributes"]["pycluster.node"] == "n1"
        # The node's own transition spans were recorded there too.
        assert any(s["name"] == "pycluster.activate" for s in remote)
        await c.stop()
    finally:
        c.stop_sync()
