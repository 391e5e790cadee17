"""Observability extras for test nodes: ``--setup pycluster.testing.obs_node:setup``.

``--setup-arg`` keys:

* ``http=1``: serve the health endpoints (and ``/metrics``) on ``127.0.0.1`` at a free port.
  Once started, the node writes ``{state_dir}/{node_id}.obs.json`` with ``{"health": url}``.
* ``trace=1``: install an OpenTelemetry SDK tracer provider with an in-memory exporter; the
  app's API method ``spans`` returns the finished spans (name, ids, parent, kind, attributes).

Always: the app's API method ``echo`` returns the payload with this node's id and the trace id
current in the handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..kernel.app import App
from ..kernel.context import current_trace_id
from ..kernel.platform import Platform
from ..plugins import hookimpl


def setup(ns: argparse.Namespace) -> list[Any]:
    """No extra App options."""
    return []


def _span_dict(sp: Any) -> dict[str, Any]:
    ctx = sp.get_span_context()
    parent = sp.parent
    return {
        "name": sp.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": sp.kind.name,
        "attributes": {k: v for k, v in (sp.attributes or {}).items()
                       if isinstance(v, str | int | float | bool)},
    }


class _Announce:
    def __init__(self, path: Path) -> None:
        self.path = path

    @hookimpl
    def pycluster_platform_started(self, platform: Platform) -> None:
        """Write where the endpoints are."""
        self.path.write_text(json.dumps({"health": platform.health.url,
                                         "metrics": platform.metrics.url}))


def attach(app: App, platform: Platform, ns: argparse.Namespace) -> None:
    """Configure endpoints, tracing and the test API methods."""
    args: dict[str, str] = getattr(ns, "setup_args", {})
    if args.get("http"):
        platform.settings.health_addr = "127.0.0.1:0"
    exporter: Any = None
    if args.get("trace"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)

    @app.handle("echo")
    async def echo(payload: Any) -> dict[str, Any]:
        return {"payload": payload, "node": platform.node_id, "trace_id": current_trace_id()}

    @app.handle("spans")
    async def spans() -> list[dict[str, Any]]:
        if exporter is None:
            return []
        return [_span_dict(s) for s in exporter.get_finished_spans()]

    path = Path(ns.state_dir) / f"{ns.node_id}.obs.json"
    platform.pm.register(_Announce(path), name=f"obs-announce-{ns.node_id}")
