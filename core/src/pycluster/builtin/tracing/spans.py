"""OpenTelemetry tracing of pycluster (default plugin ``tracing``): span helpers, and W3C trace
context carried in NATS message headers.

The plugin (`pycluster.builtin.tracing.plugin`) makes spans for transitions, hooks, stages and
lock waits through hooks, and for RPC, API calls and events through its middleware
(`pycluster.builtin.tracing.middleware`).

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
import os
import time
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context as OtelContext
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import SpanKind, Status, StatusCode

if TYPE_CHECKING:
    from ...kernel.platform import Platform

__all__ = [
    "SpanKind",
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
# The API reads os.environ on every get_tracer_provider() while no provider is set (to look for
# one named by OTEL_PYTHON_TRACER_PROVIDER); the hot paths ask on every call, so the global is
# read directly and the environment once, at import. Without that global (another API version)
# the public call is used.
_HAS_GLOBAL = hasattr(trace, "_TRACER_PROVIDER")
_ENV_PROVIDER = OTEL_PYTHON_TRACER_PROVIDER in os.environ
# Per provider: whether its sampler can ever record (an always-off sampler never does).
_SAMPLES: tuple[object, bool] | None = None


def _samples(provider: object) -> bool:
    global _SAMPLES
    if _SAMPLES is None or _SAMPLES[0] is not provider:
        sampler = getattr(provider, "sampler", None)
        describe = getattr(sampler, "get_description", None)
        off = callable(describe) and describe() == "AlwaysOffSampler"
        _SAMPLES = (provider, not off)
    return _SAMPLES[1]


def recording() -> bool:
    """Whether spans would be recorded: an SDK tracer provider is installed and its sampler is
    not always-off (otherwise spans are skipped outright: the API's no-op spans would cost time
    and record nothing). Cheap: called on every RPC, API call and event."""
    if _HAS_GLOBAL:
        provider = trace._TRACER_PROVIDER  # type: ignore[attr-defined]
        if provider is None:
            if not _ENV_PROVIDER:
                return False
            provider = trace.get_tracer_provider()
    else:
        provider = trace.get_tracer_provider()
    return not isinstance(provider, _NON_RECORDING) and _samples(provider)


def tracing_enabled(platform: Platform | None) -> bool:
    """Whether ``platform`` records spans (the ``tracing`` setting; True without a platform)."""
    if platform is None:
        return True
    return platform.settings.tracing


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
