"""Default plugin "tracing": OpenTelemetry spans of transitions, hooks, stages, lock waits, RPC,
API calls and events, and the trace context across processes.

Spans are recorded only when the application installed an OpenTelemetry SDK and the
``tracing`` setting is on; the trace context of a caller passes through either way. State:
the span of a transition in progress is kept in ``runtime.state("tracing")``, lock-wait spans
in the plugin's service.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from ...kernel.stages import StageAction, StageOutcome
from ...kernel.types import Role
from ...plugins import hookimpl
from .middleware import TracingMiddleware
from .spans import LockSpans, get_tracer, past_span, recording, span, tracing_enabled

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.services import PlatformServices
    from ...kernel.stages import StageEvent

log = logging.getLogger("pycluster.tracing")

PLUGIN = "tracing"


class TracingService:
    """Per-platform state of the tracing plugin (open lock-wait spans by scope)."""

    name = PLUGIN

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.lock_spans: dict[str, LockSpans] = {}

    def locks(self, scope: str) -> LockSpans:
        """The lock-wait spans of ``scope`` (an app, or ``_platform``)."""
        spans = self.lock_spans.get(scope)
        if spans is None:
            spans = self.lock_spans[scope] = LockSpans(self.platform, scope)
        return spans

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to release."""


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The plugin's per-platform state."""
    registry.add(PLUGIN, lambda: TracingService(platform))


@hookimpl(tryfirst=True)
def pycluster_middleware(platform: Platform) -> Any:
    """Spans and trace-context propagation, outermost in the chain."""
    return TracingMiddleware(platform)


@hookimpl
def pycluster_role_transition(app: App, runtime: AppRuntime, role: Role, epoch: int | None,
                              reason: str) -> None:
    """Open or close the span of a transition.

    Entering ``activating``/``deactivating`` starts ``pycluster.activate``/
    ``pycluster.deactivate`` and makes it current in the task that runs the transition, so the
    stages and hooks that follow are its children; the next role change ends it (attribute
    ``pycluster.outcome``: the role reached). Never raises.
    """
    try:
        state = runtime.state(PLUGIN)
        opened = state.pop("transition", None)
        if opened is not None:
            sp, token, task = opened
            sp.set_attribute("pycluster.outcome", role.value)
            sp.end()
            if token is not None and _current_task() is task:
                otel_context.detach(token)
        platform = runtime.platform
        if role not in (Role.ACTIVATING, Role.DEACTIVATING) or not tracing_enabled(platform) \
                or not recording():
            return
        what = "activate" if role is Role.ACTIVATING else "deactivate"
        sp = get_tracer().start_span(
            f"pycluster.{what}",
            attributes={"pycluster.platform": platform.name,
                        "pycluster.node": platform.node_id, "pycluster.app": app.name,
                        "pycluster.reason": reason, "pycluster.epoch": epoch or 0},
        )
        token = otel_context.attach(trace.set_span_in_context(sp))
        state["transition"] = (sp, token, _current_task())
    except Exception:  # tracing never breaks a transition
        log.debug("role span failed", exc_info=True)


@hookimpl
def pycluster_app_hook_call(app: App, hook: str, function: str
                            ) -> contextlib.AbstractContextManager[Any] | None:
    """A span ``pycluster.hook.<hook>`` around the hook (current inside it)."""
    if not tracing_enabled(app.platform) or not recording():
        return None
    return span(f"pycluster.hook.{hook}", platform=app.platform,
                attributes={"pycluster.app": app.name, "pycluster.hook": hook,
                            "pycluster.function": function})


@hookimpl
def pycluster_stage_event(app: App, event: StageEvent) -> None:
    """A span ``pycluster.stage.activate`` / ``.deactivate`` per stage call (a child of the
    transition's span)."""
    if event.action is StageAction.RUNNING:
        return
    failed = event.outcome in (StageOutcome.FAILED, StageOutcome.TIMEOUT)
    past_span(app.platform, f"pycluster.stage.{event.action.value}", event.duration,
              {"pycluster.app": event.app, "pycluster.stage": event.stage,
               "pycluster.plugin": event.plugin, "pycluster.outcome": event.outcome.value,
               "pycluster.attempt": event.attempt, "pycluster.epoch": event.epoch},
              error=event.error if failed else None)


@hookimpl
def pycluster_lock_observers(platform: Platform, scope: str
                             ) -> dict[str, Callable[[Any, dict[str, Any]], None]] | None:
    """``pycluster.lock.wait`` spans: from the start of an acquisition to its end."""
    svc = platform.services.get(PLUGIN)
    if not isinstance(svc, TracingService):
        return None
    spans = svc.locks(scope)
    return {event: functools.partial(spans.event, event)
            for event in ("wait", "acquired", "wait_failed")}
