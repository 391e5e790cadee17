"""OpenTelemetry tracing of pycluster: spans for transitions, hooks, stages, lock waits, RPC,
API calls and events, and W3C trace context carried in NATS message headers.

pycluster uses only the OpenTelemetry *API* (a core dependency). Without an SDK configured by
the application every span is a no-op and costs a function call; install the ``otel`` extra
(``opentelemetry-sdk``) and set a tracer provider to export them::

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)

Cross-process traces: a caller injects the current context into the headers of the NATS
message it sends (`inject`, ``traceparent``/``tracestate``/``baggage``), the receiver extracts it
(`extract`) and opens its server/consumer span as a child, so a trace started in one process
continues in the process that handles the call. Tracing never touches NATS by itself, so it is
unaffected by connection loss. ``Platform(..., tracing=False)`` turns pycluster's spans off.

Span names (all prefixed ``pycluster.``) and attributes are listed in docs/observability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.types import Role

__all__ = [
    "SpanKind",
    "current_trace_id",
    "extract",
    "get_tracer",
    "inject",
    "span",
    "tracing_enabled",
]

TRACER_NAME = "pycluster"


_TRACER: tuple[object, trace.Tracer] | None = None


def get_tracer() -> trace.Tracer:
    """pycluster's tracer from the current global provider (cached per provider)."""
    global _TRACER
    provider = trace.get_tracer_provider()
    if _TRACER is None or _TRACER[0] is not provider:
        from ... import __version__

        _TRACER = (provider, provider.get_tracer(TRACER_NAME, __version__))
    return _TRACER[1]


_NON_RECORDING = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def recording() -> bool:
    """Whether an SDK tracer provider is installed (without one, spans are skipped outright:
    the API's no-op spans would cost time and record nothing)."""
    return not isinstance(trace.get_tracer_provider(), _NON_RECORDING)


def tracing_enabled(platform: Platform | None) -> bool:
    """Whether ``platform`` records spans (the ``tracing`` setting; True without a platform)."""
    if platform is None:
        return True
    return bool(getattr(platform.settings, "tracing", True))


def inject(headers: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Write the current trace context into ``headers`` (W3C ``traceparent``, ``tracestate``,
    ``baggage``) and return them; a no-op without an active recording span."""
    out: dict[str, str] = dict(headers or {})
    if otel_context.get_current():  # an empty context carries nothing to inject
        propagate.inject(out)
        if headers is not None:
            headers.update(out)
    return out


def extract(headers: Mapping[str, str] | None) -> OtelContext:
    """The trace context carried in message ``headers`` (an empty context when there is none)."""
    carrier = {k.lower(): v for k, v in (headers or {}).items()}
    return propagate.extract(carrier)


def current_trace_id() -> str | None:
    """Hex trace id of the current span, or None when there is no valid trace."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x")


@contextlib.contextmanager
def span(
    name: str,
    *,
    platform: Platform | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    context: OtelContext | None = None,
) -> Iterator[trace.Span]:
    """A span made current for the block; an exception marks it as an error (and is re-raised);
    a cancellation is recorded as an attribute, not an error.

    :param name: span name (``pycluster.`` prefix by convention).
    :param platform: adds ``pycluster.platform``/``pycluster.node`` and honours ``tracing=False``.
    :param kind: INTERNAL, CLIENT, SERVER, PRODUCER or CONSUMER.
    :param attributes: initial attributes (None values are dropped).
    :param context: parent context (e.g. from `extract`); default: the current one.
    """
    if not tracing_enabled(platform):
        yield trace.INVALID_SPAN
        return
    if not recording():
        # No SDK: no span, but a caller's context still passes through to the calls made
        # inside (as the API's non-recording spans would do).
        token = otel_context.attach(context) if context is not None else None
        try:
            yield trace.INVALID_SPAN
        finally:
            if token is not None:
                otel_context.detach(token)
        return
    attrs: dict[str, Any] = {}
    if platform is not None:
        attrs["pycluster.platform"] = platform.name
        attrs["pycluster.node"] = platform.node_id
    for k, v in (attributes or {}).items():
        if v is not None:
            attrs[k] = v if isinstance(v, str | bool | int | float) else str(v)
    with get_tracer().start_as_current_span(
        name, context=context, kind=kind, attributes=attrs, record_exception=False,
        set_status_on_exception=False,
    ) as sp:
        try:
            yield sp
        except asyncio.CancelledError:
            sp.set_attribute("pycluster.cancelled", True)
            raise
        except BaseException as exc:
            sp.record_exception(exc)
            sp.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise


_CORRELATION: ContextVar[str | None] | None = None


def _correlation_var() -> ContextVar[str | None]:
    """The audit module's correlation-id variable (imported on first use, as before)."""
    global _CORRELATION
    if _CORRELATION is None:
        from ..audit.log import _correlation

        _CORRELATION = _correlation
    return _CORRELATION


_OPEN_SPAN = "_pycluster_transition_span"


def role_span(rt: AppRuntime, role: Role, epoch: int | None, reason: str) -> None:
    """Open or close the span of a transition as ``rt`` changes role (from the coordinator).

    Entering ``activating``/``deactivating`` starts ``pycluster.activate``/
    ``pycluster.deactivate`` and makes it current in the task that runs the transition, so the
    stages and hooks that follow are its children; the next role change ends it (attribute
    ``pycluster.outcome``: the role reached). Never raises.
    """
    try:
        opened = rt.__dict__.pop(_OPEN_SPAN, None)
        if opened is not None:
            sp, token, task = opened
            sp.set_attribute("pycluster.outcome", role.value)
            sp.end()
            if token is not None and _current_task() is task:
                otel_context.detach(token)
        if role.value not in ("activating", "deactivating") or not tracing_enabled(rt.platform) \
                or not recording():
            return
        what = "activate" if role.value == "activating" else "deactivate"
        sp = get_tracer().start_span(
            f"pycluster.{what}",
            attributes={"pycluster.platform": rt.platform.name,
                        "pycluster.node": rt.platform.node_id, "pycluster.app": rt.app.name,
                        "pycluster.reason": reason, "pycluster.epoch": epoch or 0},
        )
        token = otel_context.attach(trace.set_span_in_context(sp))
        rt.__dict__[_OPEN_SPAN] = (sp, token, _current_task())
    except Exception:  # tracing never breaks a transition
        logging.getLogger("pycluster.tracing").debug("role span failed", exc_info=True)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


def past_span(platform: Platform | None, name: str, duration: float,
              attributes: Mapping[str, Any], error: str | None = None) -> None:
    """Record a span that just ended after ``duration`` seconds (e.g. a stage reported by the
    coordinator), as a child of the current span."""
    if not tracing_enabled(platform) or not recording():
        return
    end = time.time_ns()
    attrs: dict[str, Any] = {}
    if platform is not None:
        attrs["pycluster.platform"] = platform.name
        attrs["pycluster.node"] = platform.node_id
    attrs.update({k: v for k, v in attributes.items() if v is not None})
    sp = get_tracer().start_span(name, attributes=attrs, start_time=end - int(duration * 1e9))
    if error:
        sp.set_status(Status(StatusCode.ERROR, error))
    sp.end(end_time=end)


class LockSpans:
    """Turns lock events (`pycluster.kernel.locks.LockService.on_event`) into
    ``pycluster.lock.wait``
    spans: from the start of an acquisition to the grant, a timeout or a cancellation.

    The span's parent is the context current when the acquisition started.
    """

    def __init__(self, platform: Platform, scope: str) -> None:
        self.platform = platform
        self.scope = scope
        self._open: dict[int, tuple[trace.Span, float]] = {}

    def event(self, event: str, lock: Any, fields: Mapping[str, Any]) -> None:
        """Handle one lock event (``wait``, ``acquired``, ``wait_failed``)."""
        if not tracing_enabled(self.platform) or (event == "wait" and not recording()):
            return
        key = id(lock)
        if event == "wait":
            sp = get_tracer().start_span(
                "pycluster.lock.wait",
                attributes={"pycluster.platform": self.platform.name,
                            "pycluster.node": self.platform.node_id,
                            "pycluster.lock.scope": self.scope,
                            "pycluster.lock.name": str(getattr(lock, "name", "?"))},
            )
            old = self._open.pop(key, None)
            if old is not None:
                old[0].end()
            self._open[key] = (sp, time.monotonic())
            return
        opened = self._open.pop(key, None)
        if opened is None:
            return
        sp = opened[0]
        if event == "acquired":
            sp.set_attribute("pycluster.lock.token", int(fields.get("token") or 0))
        else:
            sp.set_attribute("pycluster.lock.outcome", str(fields.get("reason", event)))
            if fields.get("reason") == "timeout":
                sp.set_status(Status(StatusCode.ERROR, "lock wait timed out"))
        sp.end()


_UNKNOWN = "unknown"


def _method_label(request: Any) -> str:
    """A served request's method as a metric label: only methods with a handler keep their
    name (the method comes from the subject, before any auth), and the control requests
    (``control.stepdown``, ...: names fixed by the code); the rest share ``unknown``."""
    if request.handler is not None or request.route == "control":
        return str(request.method)
    return _UNKNOWN


class ObservabilityMiddleware:
    """The core's middleware on RPC, API-bus calls and events (added first, so outermost):

    * client side (``on_call``): a CLIENT span ``{app}/{method}``, the trace context injected
      into the request's NATS headers, ``pycluster_rpc_client_duration_seconds``;
    * server side (``on_request``): a SERVER span whose parent is extracted from the request's
      headers (so the trace continues across processes), ``pycluster_rpc_duration_seconds``,
      and the request id as the correlation id of audit entries written by the handler;
    * events: a PRODUCER span ``{type} publish`` injecting the context into the event's
      headers, a CONSUMER span ``{type} process`` continuing it, ``pycluster_events_total``.

    Errors are counted in ``pycluster_rpc_errors_total`` and re-raised unchanged. Without an
    OpenTelemetry SDK no span is made; a caller's trace context still passes through.
    """

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        # Histogram children per (app, method), so a call does not pay prometheus' labels()
        # lookup; they belong to one metrics service (reset when it is replaced).
        self._metrics_of: Any = None
        self._client_hist: dict[tuple[str, str], Any] = {}
        self._server_hist: dict[tuple[str, str], Any] = {}
        self._known_apps: set[str] = set()
        self._known_at = -1e9

    def _metrics(self) -> Any:
        return self.platform.services.get("metrics")

    def _tracing(self) -> bool:
        return tracing_enabled(self.platform) and recording()

    def _hist(self, m: Any, server: bool, app: str, method: str) -> Any:
        """The duration histogram's child of ``(app, method)`` (cached)."""
        if m is not self._metrics_of:
            self._metrics_of = m
            self._client_hist.clear()
            self._server_hist.clear()
        cache = self._server_hist if server else self._client_hist
        key = (app, method)
        child = cache.get(key)
        if child is None:
            if len(cache) >= 4096:  # bounded: method names come from callers
                cache.clear()
            metric = m.rpc_duration if server else m.rpc_client_duration
            child = cache[key] = metric.labels(app, method)
        return child

    def _source_label(self, source: str | None) -> str:
        """An incoming event's source app as a label: apps this node knows (registered here
        or in a live member's record) by name, anything else (names come from the subject)
        as ``unknown``."""
        if source is None:
            return "_platform"
        p = self.platform
        if source in p.apps:
            return source
        now = time.monotonic()
        if now - self._known_at > 1.0:
            known: set[str] = set()
            m = p.membership
            for rec in list(m.members.values()) if m is not None else ():
                known.update(rec.get("apps") or {})
            self._known_apps, self._known_at = known, now
        return source if source in self._known_apps else _UNKNOWN

    @staticmethod
    def _rpc_attrs(kind: str, app: str, method: str) -> dict[str, Any]:
        return {"rpc.system": "pycluster", "rpc.service": app, "rpc.method": method,
                "pycluster.kind": kind, "pycluster.app": app}

    async def on_call(self, call: Any, call_next: Any) -> Any:
        """Around an outgoing call."""
        started = time.monotonic()
        try:
            if not self._tracing():
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
        except BaseException as exc:
            m = self._metrics()
            if m is not None and not isinstance(exc, asyncio.CancelledError):
                m.rpc_errors.labels(call.app, call.method, "client").inc()
            raise
        finally:
            m = self._metrics()
            if m is not None:
                self._hist(m, False, call.app, call.method).observe(time.monotonic() - started)

    async def on_request(self, request: Any, call_next: Any) -> Any:
        """Around a served request."""
        started = time.monotonic()
        # The request id is the correlation id of audit entries the handler writes (set and
        # reset directly: cheaper than the `correlation` context manager, same effect).
        var = _correlation_var()
        cid = request.request_id or None
        token = var.set(cid) if cid is not None or var.get() is not None else None
        try:
            if not self._tracing():
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
                      kind=SpanKind.SERVER, attributes=attrs,
                      context=extract(request.headers)):
                return await call_next(request)
        except BaseException as exc:
            m = self._metrics()
            if m is not None and not isinstance(exc, asyncio.CancelledError):
                m.rpc_errors.labels(request.app, _method_label(request), "server").inc()
            raise
        finally:
            if token is not None:
                var.reset(token)
            m = self._metrics()
            if m is not None:
                self._hist(m, True, request.app, _method_label(request)).observe(
                    time.monotonic() - started)

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
                result = await call_next(event)
        else:
            inject(event.headers)
            result = await call_next(event)
        m = self._metrics()
        if m is not None:
            m.events.labels(event.source_app or "_platform", "published").inc()
        return result

    async def on_event(self, event: Any, call_next: Any) -> Any:
        """Around delivering an event to a subscriber."""
        m = self._metrics()
        if m is not None:
            m.events.labels(self._source_label(event.source_app), "consumed").inc()
        if not self._tracing():
            return await call_next(event)
        with span(f"{event.type} process", platform=self.platform, kind=SpanKind.CONSUMER,
                  context=extract(event.headers), attributes=self._event_attrs(event)):
            return await call_next(event)


def install_middleware(platform: Platform) -> ObservabilityMiddleware | None:
    """Put `ObservabilityMiddleware` first (outermost) in the platform's middleware chain, using
    only the chain's public methods; None when the platform has no rpc service."""
    rpc = platform.services.get("rpc")
    chain = getattr(rpc, "middleware", None)
    if chain is None:
        return None
    existing = list(chain)
    for mw in existing:
        if isinstance(mw, ObservabilityMiddleware):
            return mw
    mine = ObservabilityMiddleware(platform)
    for mw in existing:
        chain.remove(mw)
    chain.add(mine)
    for mw in existing:
        chain.add(mw)
    return mine
