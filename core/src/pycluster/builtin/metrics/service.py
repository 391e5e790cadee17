"""Prometheus metrics of a platform (``platform.metrics``), served on ``metrics_addr``/``/metrics``.

Each platform has its own `prometheus_client.CollectorRegistry` (several platforms in one
process never mix). State that can be read at any time (leader, epoch, role, members, health,
NATS connection, lease time left) is computed when ``/metrics`` is scraped, so it costs nothing
when nobody looks; events (failovers, transitions, hook and lock durations, RPC durations) are
counted as they happen. Plugins add their own metrics to the same registry through
`pycluster.hookspecs.pycluster_register_metrics`.

Every metric, with its labels and meaning, is listed in docs/observability.md.

Failover time (``pycluster_failover_seconds``) is measured by the node that becomes active: from
the last sign of life of the previous leader this node saw (its last lease renewal, or its
release on a graceful step-down, as the election reports them to standbys) to the end of this
node's activation. For a crash that includes the lease TTL the cluster had to wait, which is
what a user of the app experiences.

Under connection loss the endpoint keeps answering (from in-process state);
``pycluster_nats_connected`` turns 0.

Bounded and non-blocking: labels taken from the network (RPC method names, event sources) are
kept only for names this node knows (registered handlers, known apps); anything else counts
under ``unknown``, so a client sending random names cannot grow the registry. ``/metrics`` is
rendered in a worker thread (`PlatformMetrics.render_async`): prometheus-client's metric types
are thread-safe, and collectors that read the platform's in-process state (the built-in state
gauges, plugins' collectors) are collected on the event loop first, so a scrape never stalls
lease renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from ...httpserver import HttpServer, Request, Response
from ..tracing.spans import LockSpans, install_middleware, past_span, span

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime, StageEvent
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.metrics")

FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
                    120.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
LOCK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
PLATFORM_SCOPE = "_platform"


class PlatformRegistry(CollectorRegistry):
    """A `CollectorRegistry` that can be rendered off the event loop (`snapshot`).

    Metrics of prometheus-client's own types (Counter, Histogram, Gauge, ...) are thread-safe
    and are read by the rendering thread; every other collector (they read in-process state
    that only the event loop may touch) is collected by `snapshot` on the loop, at the
    position it was registered in.
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self._order: list[Collector] = []

    def register(self, collector: Collector) -> None:
        """Add a collector (as `CollectorRegistry.register`)."""
        super().register(collector)
        self._order.append(collector)

    def unregister(self, collector: Collector) -> None:
        """Remove a collector (as `CollectorRegistry.unregister`)."""
        super().unregister(collector)
        with contextlib.suppress(ValueError):
            self._order.remove(collector)

    def snapshot(self) -> _Frozen:
        """On the event loop: collect the state collectors now; the returned object renders
        the rest (thread-safe metrics) wherever its ``collect`` runs."""
        parts: list[Collector | list[Metric]] = []
        for c in list(self._order):
            parts.append(c if isinstance(c, MetricWrapperBase) else list(c.collect()))
        return _Frozen(parts)


class _Frozen(Collector):
    """What `generate_latest` reads in the rendering thread."""

    def __init__(self, parts: list[Collector | list[Metric]]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        """Thread-safe metrics are read now; state collectors were read on the loop."""
        for part in self.parts:
            if isinstance(part, list):
                yield from part
            else:
                yield from part.collect()


class _StateCollector(Collector):
    """Gauges computed at scrape time from the platform's in-process state."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def describe(self) -> list[Metric]:
        """Nothing up front (so registering does not call `collect` early)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The current values."""
        p = self.platform
        from ... import __version__

        info = GaugeMetricFamily("pycluster_info", "Constant 1, labelled with this node's "
                                 "platform, node id and pycluster version.",
                                 labels=["platform", "node", "version"])
        info.add_metric([p.name, p.node_id, __version__], 1)
        yield info
        connected = GaugeMetricFamily("pycluster_nats_connected",
                                      "1 while the NATS connection is up, else 0.")
        connected.add_metric([], 1 if (p.nc is not None and p.nc.is_connected) else 0)
        yield connected
        control = GaugeMetricFamily("pycluster_nats_control_connected",
                                    "1 while the control-plane NATS connection (election, "
                                    "membership) is up, else 0.")
        nc_control = getattr(p, "nc_control", None)
        control.add_metric([], 1 if (nc_control is not None and nc_control.is_connected) else 0)
        yield control
        members = GaugeMetricFamily("pycluster_members",
                                    "Live members of the platform as this node sees them.")
        members.add_metric([], len(p.membership.members) if p.membership is not None else 0)
        yield members
        leader = GaugeMetricFamily("pycluster_leader",
                                   "1 while this node is the active (leader) instance of the "
                                   "app, else 0.", labels=["app"])
        epoch = GaugeMetricFamily("pycluster_election_epoch",
                                  "Current leadership epoch (fencing token) of the app as seen "
                                  "by this node.", labels=["app"])
        role = GaugeMetricFamily("pycluster_role", "1 for the app's current role on this node.",
                                 labels=["app", "role"])
        lease = GaugeMetricFamily("pycluster_lease_remaining_seconds",
                                  "Seconds until this node's lease of the app ends locally "
                                  "(only while it holds one).", labels=["app"])
        now = time.monotonic()
        for name, app in p.apps.items():
            leader.add_metric([name], 1 if app.is_active else 0)
            if app.epoch is not None:
                epoch.add_metric([name], app.epoch)
            role.add_metric([name, app.role.value], 1)
            rt = p.runtimes.get(name)
            el = rt.election if rt is not None else None
            deadline = el.lease_deadline() if el is not None else None
            if deadline is not None and el is not None and el.is_leader:
                lease.add_metric([name], max(0.0, deadline - now))
        yield leader
        yield epoch
        yield role
        yield lease
        health = GaugeMetricFamily("pycluster_health",
                                   "1 if the health check passes, 0 if it fails (absent until "
                                   "its first result).", labels=["check"])
        hs = p.services.get("health")
        if hs is not None:
            for check, ok in hs.gauge_values():  # type: ignore[attr-defined]
                health.add_metric([check], ok)
        yield health


class PlatformMetrics:
    """The platform's metrics service (``platform.metrics``).

    :ivar registry: the platform's own `CollectorRegistry` (add custom metrics to it).
    """

    name = "metrics"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.enabled: bool = bool(getattr(platform.settings, "metrics", True))
        self.registry: PlatformRegistry = PlatformRegistry()
        r = self.registry
        self.failover_seconds = Histogram(
            "pycluster_failover_seconds",
            "From the previous leader's last sign of life seen by this node to this node "
            "becoming active.", ["app"], buckets=FAILOVER_BUCKETS, registry=r)
        self.transitions = Counter(
            "pycluster_transitions_total", "Completed role changes of an app on this node.",
            ["app", "role"], registry=r)
        self.activation_failures = Counter(
            "pycluster_activation_failures_total",
            "Activations that failed in a stage or on_active hook (the node stepped down).",
            ["app"], registry=r)
        self.hook_duration = Histogram(
            "pycluster_hook_duration_seconds",
            "Duration of app hooks (on_active, ...) and failover stages (stage:NAME, "
            "stage:NAME:deactivate).", ["app", "hook"], buckets=DURATION_BUCKETS, registry=r)
        self.hook_failures = Counter(
            "pycluster_hook_failures_total", "App hooks and stages that raised or timed out.",
            ["app", "hook", "reason"], registry=r)
        self.lock_held = Histogram(
            "pycluster_lock_held_seconds",
            "How long locks were held (observed at release or loss); scope is the app name or "
            "_platform.", ["scope"], buckets=LOCK_BUCKETS, registry=r)
        self.lock_wait = Histogram(
            "pycluster_lock_wait_seconds", "How long acquisitions waited for the lock.",
            ["scope"], buckets=LOCK_BUCKETS, registry=r)
        self.locks_lost = Counter(
            "pycluster_locks_lost_total", "Held locks whose lease ran out before release.",
            ["scope"], registry=r)
        self.rpc_duration = Histogram(
            "pycluster_rpc_duration_seconds",
            "Handler time of RPC and API calls served by this node.", ["app", "method"],
            buckets=DURATION_BUCKETS, registry=r)
        self.rpc_client_duration = Histogram(
            "pycluster_rpc_client_duration_seconds",
            "Round-trip time of RPC and API calls made by this node.", ["app", "method"],
            buckets=DURATION_BUCKETS, registry=r)
        self.rpc_errors = Counter(
            "pycluster_rpc_errors_total", "RPC and API calls that failed, by side.",
            ["app", "method", "side"], registry=r)
        self.rpc_rejected = Counter(
            "pycluster_rpc_rejected_total",
            "RPC and API requests refused before a handler ran, by reason (overloaded: the "
            "app's in-flight limit, max_inflight, was reached).", ["app", "reason"], registry=r)
        self.slow_consumer = Counter(
            "pycluster_slow_consumer_total",
            "Messages this node dropped because a subscription's pending queue was full (a "
            "flood faster than it can take them), by app and kind (rpc, api, cancel, other).",
            ["app", "kind"], registry=r)
        self.nats_reconnects = Counter(
            "pycluster_nats_reconnects_total",
            "Reconnects of this node's NATS connections (data or control), by reason: lost "
            "(the connection dropped) or jetstream_unavailable (moved away from a server whose "
            "JetStream writes kept failing).", ["connection", "reason"], registry=r)
        self.events = Counter(
            "pycluster_events_total", "Events published and consumed by this node.",
            ["app", "direction"], registry=r)
        self.health_check_duration = Histogram(
            "pycluster_health_check_duration_seconds", "Duration of health check runs.",
            ["check"], buckets=DURATION_BUCKETS, registry=r)
        self.audit_entries = Counter(
            "pycluster_audit_entries_total", "Audit entries written by this node.",
            ["category"], registry=r)
        r.register(_StateCollector(platform))
        platform.pm.hook.pycluster_register_metrics(registry=r, platform=platform)
        self._server: HttpServer | None = None
        # app -> node -> monotonic time of that node's last lease write seen (renewal, win or
        # release), and app -> the last leader other than this node that was observed.
        self._life: dict[str, dict[str, float]] = {}
        self._prev_leader: dict[str, str] = {}

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry (on the calling thread)."""
        return generate_latest(self.registry)

    async def render_async(self) -> bytes:
        """The same, rendered in a worker thread: the event loop only collects the state
        gauges (a few per app), so a large registry never stalls lease renewals."""
        frozen = self.registry.snapshot()
        return await asyncio.to_thread(generate_latest, frozen)  # type: ignore[arg-type]

    async def handle_metrics(self, request: Request) -> Response:
        """``GET /metrics``."""
        return Response(200, await self.render_async(), CONTENT_TYPE_LATEST)

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` while served on ``metrics_addr``."""
        return f"{self._server.url}/metrics" if self._server is not None else None

    # -- service lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Serve ``/metrics`` on ``metrics_addr`` (shared with the health server when equal)."""
        s = self.platform.settings
        if self.enabled and s.metrics_addr and s.metrics_addr != s.health_addr:
            self._server = HttpServer(s.metrics_addr, name="metrics")
            self._server.route("/metrics", self.handle_metrics)
            await self._server.start()
        if self.platform._locks is not None:
            self.platform._locks.on_event = lock_listener(self.platform, PLATFORM_SCOPE)
        install_middleware(self.platform)  # RPC / API / event spans and durations

    async def app_started(self, rt: AppRuntime) -> None:
        """Hook the app's locks and stages."""
        rt.locks.on_event = lock_listener(self.platform, rt.app.name)
        listeners = getattr(rt, "stage_listeners", None)
        if isinstance(listeners, list):
            listeners.append(self.stage_event)

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Forget the app's leaders."""
        self._life.pop(rt.app.name, None)
        self._prev_leader.pop(rt.app.name, None)

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            await self._server.stop()
            self._server = None

    # -- event recording (called by the platform, coordinator and other services) ---------------

    def transition(self, app: App, role: str, epoch: int | None, reason: str) -> None:
        """Count a transition; time a failover when this node became active."""
        if role == "activation_failed":
            self.activation_failures.labels(app.name).inc()
            return
        if role not in ("active", "passive", "stopped"):
            return
        self.transitions.labels(app.name, role).inc()
        if role == "active":
            prev = self._prev_leader.get(app.name)
            since = self._life.get(app.name, {}).pop(prev, None) if prev else None
            if since is not None:
                took = time.monotonic() - since
                self.failover_seconds.labels(app.name).observe(took)
                log.info("app %s: failover took %.3fs (from the previous leader's last sign "
                         "of life)", app.name, took)

    def stage_event(self, ev: StageEvent) -> None:
        """A failover stage ran (`pycluster.kernel.coordinator.StageEvent`): its duration, failures
        and a span (child of the transition's span)."""
        if ev.action == "running":
            hook = f"stage:{ev.stage}"
        else:
            hook = f"stage:{ev.stage}" + (":deactivate" if ev.action == "deactivate" else "")
            self.hook_duration.labels(ev.app, hook).observe(ev.duration)
        if ev.outcome in ("failed", "timeout"):
            self.hook_failures.labels(ev.app, hook,
                                      "timeout" if ev.outcome == "timeout" else "error").inc()
        if ev.action != "running":
            past_span(self.platform, f"pycluster.stage.{ev.action}", ev.duration,
                      {"pycluster.app": ev.app, "pycluster.stage": ev.stage,
                       "pycluster.plugin": ev.plugin, "pycluster.outcome": ev.outcome,
                       "pycluster.attempt": ev.attempt, "pycluster.epoch": ev.epoch},
                      error=ev.error if ev.outcome in ("failed", "timeout") else None)

    def leader_observed(self, app: App, leader: str | None, epoch: int | None) -> None:
        """Remember the last leader other than this node (whose loss a failover ends).

        Seeing its lease is itself a sign of life: it covers a leader that crashed before
        this node saw any of its renewals."""
        if leader is not None and leader != self.platform.node_id:
            self._prev_leader[app.name] = leader
            life = self._life.setdefault(app.name, {})
            life[leader] = max(life.get(leader, 0.0), time.monotonic())

    def leader_alive(self, app: App, leader: str, epoch: int | None) -> None:
        """A sign of life of ``app``'s leader (a renewal, or its graceful release) seen here."""
        self._life.setdefault(app.name, {})[leader] = time.monotonic()

    def last_seen(self, app: str, node: str) -> float | None:
        """Monotonic time of ``node``'s last lease write for ``app`` seen here (renewal, win or
        release), if any."""
        return self._life.get(app, {}).get(node)

    def nats_reconnect(self, connection: str, reason: str) -> None:
        """Count a reconnect of the ``data`` or ``control`` connection."""
        self.nats_reconnects.labels(connection, reason).inc()

    def audit_entry(self, category: str) -> None:
        """Count an audit entry."""
        self.audit_entries.labels(category).inc()

    def lock_event(self, scope: str, event: str, fields: dict[str, Any]) -> None:
        """Record lock wait and hold times."""
        if event == "acquired" and fields.get("waited") is not None:
            self.lock_wait.labels(scope).observe(float(fields["waited"]))
        elif event in ("released", "expired") and fields.get("held") is not None:
            self.lock_held.labels(scope).observe(float(fields["held"]))
            if event == "expired":
                self.locks_lost.labels(scope).inc()


def lock_listener(platform: Platform, scope: str) -> Any:
    """The ``on_event`` callback for a `pycluster.kernel.locks.LockService`: metrics, audit,
    spans."""
    spans = LockSpans(platform, scope)

    def on_event(event: str, lock: Any, fields: dict[str, Any]) -> None:
        try:
            spans.event(event, lock, fields)
            m = platform.services.get("metrics")
            if m is not None:
                m.lock_event(scope, event, fields)  # type: ignore[attr-defined]
            a = platform.services.get("audit")
            if a is not None:
                a.lock_event(scope, event, lock, fields)  # type: ignore[attr-defined]
        except Exception:  # observability never breaks a lock
            log.exception("lock event %s not recorded", event)

    return on_event


def _services(platform: Any) -> dict[str, Any]:
    services = getattr(platform, "services", None)
    return services if isinstance(services, dict) else {}


@contextlib.contextmanager
def observe_hook(platform: Any, app: Any, hook: str, function: str) -> Iterator[None]:
    """Around one app hook or stage: a span, its duration, and on failure an audit entry and
    a failure count. Exceptions pass through unchanged; a cancellation is not a failure."""
    app_name = getattr(app, "name", str(app))
    services = _services(platform)
    started = time.monotonic()
    try:
        with span(f"pycluster.hook.{hook}", platform=platform if services else None,
                  attributes={"pycluster.app": app_name, "pycluster.hook": hook,
                              "pycluster.function": function}):
            yield
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        record_hook_failure(platform, app, hook, function, exc)
        raise
    finally:
        m = services.get("metrics")
        if m is not None:
            m.hook_duration.labels(app_name, hook).observe(time.monotonic() - started)


def record_hook_failure(platform: Any, app: Any, hook: str, function: str,
                        exc: BaseException) -> None:
    """Count and audit a failed or timed-out hook or stage (never raises)."""
    try:
        services = _services(platform)
        timed_out = isinstance(exc, TimeoutError)
        m = services.get("metrics")
        if m is not None:
            m.hook_failures.labels(getattr(app, "name", str(app)), hook,
                                   "timeout" if timed_out else "error").inc()
        a = services.get("audit")
        if a is not None:
            a.hook_failed(app, hook, function, exc, timed_out)
    except Exception:
        log.exception("hook failure of %s not recorded", hook)
