"""The metrics plugin's middleware on RPC, API-bus calls and events.

* client side: ``pycluster_rpc_client_duration_seconds`` and client errors;
* server side: ``pycluster_rpc_duration_seconds`` and server errors, the method label kept only
  for methods with a handler (and the fixed control methods): a client sending random names
  cannot grow the registry;
* events: ``pycluster_events_total`` (published, consumed), the source app label kept only for
  apps this node knows.

Errors are counted in ``pycluster_rpc_errors_total`` and re-raised unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from ...middleware import Middleware

if TYPE_CHECKING:
    from ...kernel.platform import Platform
    from .service import PlatformMetrics

_UNKNOWN = "unknown"
_now = time.monotonic


def _method_label(request: Any) -> str:
    """A served request's method as a metric label: only methods with a handler keep their
    name (the method comes from the subject, before any auth), and the control requests
    (``control.stepdown``, ...: names fixed by the code); the rest share ``unknown``."""
    if request.handler is not None or request.route == "control":
        return str(request.method)
    return _UNKNOWN


class MetricsMiddleware(Middleware):
    """Durations, errors and event counts of one platform's calls, handlers and events."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        # Histogram children per (app, method), so a call does not pay prometheus' labels()
        # lookup; they belong to one metrics service (reset when it is replaced).
        self._metrics_of: Any = None
        self._client_hist: dict[tuple[str, str], Any] = {}
        self._server_hist: dict[tuple[str, str], Any] = {}
        self._known_apps: set[str] = set()
        self._known_at = -1e9

    def _metrics(self) -> PlatformMetrics | None:
        m: PlatformMetrics | None = self.platform.services.get("metrics")
        return m

    def _hist(self, m: PlatformMetrics, server: bool, app: str, method: str) -> Any:
        """The duration histogram's batched child of ``(app, method)`` (cached)."""
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
            child = cache[key] = m.rpc_timer(server, app, method)
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

    async def on_call(self, call: Any, call_next: Any) -> Any:
        """Around an outgoing call."""
        m = self.platform.services.get("metrics")
        if m is None:
            return await call_next(call)
        started = _now()
        try:
            return await call_next(call)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                m.rpc_errors.labels(call.app, call.method, "client").inc()
            raise
        finally:
            self._hist(m, False, call.app, call.method).observe(_now() - started)

    async def on_request(self, request: Any, call_next: Any) -> Any:
        """Around a served request."""
        m = self.platform.services.get("metrics")
        if m is None:
            return await call_next(request)
        started = _now()
        try:
            return await call_next(request)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                m.rpc_errors.labels(request.app, _method_label(request), "server").inc()
            raise
        finally:
            self._hist(m, True, request.app, _method_label(request)).observe(_now() - started)

    async def on_publish(self, event: Any, call_next: Any) -> Any:
        """Around publishing an event."""
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
        return await call_next(event)
