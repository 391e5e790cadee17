"""The tracing plugin's middleware on RPC, API-bus calls and events (outermost of the chain).

* client side (``on_call``): a CLIENT span ``{app}/{method}`` and the trace context injected
  into the request's NATS headers;
* server side (``on_request``): a SERVER span whose parent is extracted from the request's
  headers, so the trace continues across processes;
* events: a PRODUCER span ``{type} publish`` injecting the context into the event's headers, and
  a CONSUMER span ``{type} process`` continuing it.

Without an OpenTelemetry SDK (or with ``tracing=False``) no span is made; a caller's trace
context still passes through. Errors are re-raised unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

from ...middleware import Middleware
from .spans import SpanKind, extract, inject, recording, span, tracing_enabled

if TYPE_CHECKING:
    from ...kernel.platform import Platform


class TracingMiddleware(Middleware):
    """Spans and trace-context propagation for one platform's calls, handlers and events."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def _tracing(self) -> bool:
        return tracing_enabled(self.platform) and recording()

    @staticmethod
    def _rpc_attrs(kind: str, app: str, method: str) -> dict[str, Any]:
        return {"rpc.system": "pycluster", "rpc.service": app, "rpc.method": method,
                "pycluster.kind": kind, "pycluster.app": app}

    async def on_call(self, call: Any, call_next: Any) -> Any:
        """Around an outgoing call."""
        if not (recording() and self.platform.settings.tracing):  # the common case: cheap
            if otel_context.get_current():  # an upstream context passes through
                inject(call.headers)
            return await call_next(call)
        attrs = self._rpc_attrs(call.kind, call.app, call.method)
        attrs["pycluster.route"] = call.route
        with span(f"{call.app}/{call.method}", platform=self.platform,
                  kind=SpanKind.CLIENT, attributes=attrs) as sp:
            inject(call.headers)
            try:
                return await call_next(call)
            finally:
                if call.node:
                    sp.set_attribute("pycluster.server_node", call.node)
                sp.set_attribute("pycluster.attempts", call.attempts)

    async def on_request(self, request: Any, call_next: Any) -> Any:
        """Around a served request."""
        if not (recording() and self.platform.settings.tracing):
            headers = request.headers
            if headers and "traceparent" in headers:
                ctx_token = otel_context.attach(extract(headers))
                try:
                    return await call_next(request)
                finally:
                    otel_context.detach(ctx_token)
            return await call_next(request)
        attrs = self._rpc_attrs(request.kind, request.app, request.method)
        attrs["pycluster.client_node"] = request.source_node
        attrs["pycluster.request_id"] = request.request_id
        with span(f"{request.app}/{request.method}", platform=self.platform,
                  kind=SpanKind.SERVER, attributes=attrs, context=extract(request.headers)):
            return await call_next(request)

    @staticmethod
    def _event_attrs(event: Any) -> dict[str, Any]:
        return {"messaging.system": "nats", "messaging.destination.name": event.subject,
                "pycluster.event.type": event.type, "pycluster.event.id": event.id,
                "pycluster.app": event.source_app}

    async def on_publish(self, event: Any, call_next: Any) -> Any:
        """Around publishing an event."""
        if self._tracing():
            with span(f"{event.type} publish", platform=self.platform, kind=SpanKind.PRODUCER,
                      attributes=self._event_attrs(event)):
                inject(event.headers)
                return await call_next(event)
        inject(event.headers)
        return await call_next(event)

    async def on_event(self, event: Any, call_next: Any) -> Any:
        """Around delivering an event to a subscriber."""
        if not self._tracing():
            return await call_next(event)
        with span(f"{event.type} process", platform=self.platform, kind=SpanKind.CONSUMER,
                  context=extract(event.headers), attributes=self._event_attrs(event)):
            return await call_next(event)
