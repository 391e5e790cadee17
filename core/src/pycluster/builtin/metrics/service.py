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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...httpserver import HttpServer, Request, Response
from ...kernel.backends import BackendCollector
from ...kernel.stages import StageAction, StageOutcome
from .collectors import BatchFlusher, HistogramBatch, PlatformRegistry, StateCollector

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform
    from ...kernel.stages import StageEvent

log = logging.getLogger("pycluster.metrics")

FAILOVER_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
                    120.0)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0)
LOCK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class PlatformMetrics:
    """The platform's metrics service (``platform.metrics``).

    :ivar registry: the platform's own `CollectorRegistry` (add custom metrics to it).
    """

    name = "metrics"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        self.enabled: bool = platform.settings.metrics
        self.registry: PlatformRegistry = PlatformRegistry()
        r = self.registry
        # First in the registry: batched observations are flushed before anything is read.
        self.batches = BatchFlusher()
        r.register(self.batches)
        self.failover_seconds = Histogram(
            "pycluster_failover_seconds",
            "From the previous leader's last sign of life seen by this node to this node "
            "becoming active.", ["app"], buckets=FAILOVER_BUCKETS, registry=r)
        self.transitions = Counter(
            "pycluster_transitions_total", "Completed role changes of an app on this node.",
            ["app", "role"], registry=r)
        self.migrations = Counter(
            "pycluster_migrations_total",
            "Migrations of an app this node led, by outcome (completed, failed, vetoed).",
            ["app", "outcome"], registry=r)
        self.migration_seconds = Histogram(
            "pycluster_migration_seconds",
            "From the start of a migration to the target leading (completed ones).", ["app"],
            buckets=FAILOVER_BUCKETS, registry=r)
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
        self.audit_dropped_total = Counter(
            "pycluster_audit_dropped_total",
            "Audit entries this node could not store, by reason: buffer full (NATS unreachable "
            "for long), refused (by the server), not stored before leaving (the stop budget "
            "ran out).", ["reason"], registry=r)
        self._audit_children: dict[str, Any] = {}
        self._lock_children: dict[tuple[int, str], Any] = {}
        r.register(StateCollector(platform))
        r.register(BackendCollector(platform))  # the backend registry's kinds
        platform.pm.hook.pycluster_register_metrics(registry=r, platform=platform)
        self._server: HttpServer | None = None
        # app -> node -> monotonic time of that node's last lease write seen (renewal, win or
        # release), and app -> the last leader other than this node that was observed.
        self._life: dict[str, dict[str, float]] = {}
        self._prev_leader: dict[str, str] = {}

    def rpc_timer(self, server: bool, app: str, method: str) -> HistogramBatch:
        """The batched child of ``pycluster_rpc_duration_seconds`` (``server``) or
        ``pycluster_rpc_client_duration_seconds`` for ``(app, method)``: observed on every
        call, added to the histogram when the registry is collected."""
        metric = self.rpc_duration if server else self.rpc_client_duration
        return self.batches.batch((server, app, method), metric.labels(app, method))

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

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Forget the app's leaders."""
        self._life.pop(rt.app.name, None)
        self._prev_leader.pop(rt.app.name, None)

    async def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            await self._server.stop()
            self._server = None

    # -- event recording (from the plugin's hooks; other plugins use the public metrics) ------

    def role_changed(self, app: App, role: str) -> None:
        """Count a transition; time a failover when this node became active."""
        self.transitions.labels(app.name, role).inc()
        if role == "active":
            prev = self._prev_leader.get(app.name)
            since = self._life.get(app.name, {}).pop(prev, None) if prev else None
            if since is not None:
                took = time.monotonic() - since
                self.failover_seconds.labels(app.name).observe(took)
                log.info("app %s: failover took %.3fs (from the previous leader's last sign "
                         "of life)", app.name, took)

    def activation_failed(self, app: App) -> None:
        """Count a failed activation."""
        self.activation_failures.labels(app.name).inc()

    def stage_event(self, ev: StageEvent) -> None:
        """A failover stage ran (`pycluster.kernel.stages.StageEvent`): its duration and
        failures."""
        if ev.action is StageAction.RUNNING:
            hook = f"stage:{ev.stage}"
        else:
            hook = f"stage:{ev.stage}" + (
                ":deactivate" if ev.action is StageAction.DEACTIVATE else "")
            self.hook_duration.labels(ev.app, hook).observe(ev.duration)
        if ev.outcome in (StageOutcome.FAILED, StageOutcome.TIMEOUT):
            self.hook_failures.labels(
                ev.app, hook, "timeout" if ev.outcome is StageOutcome.TIMEOUT else "error").inc()

    @contextlib.contextmanager
    def hook_timer(self, app: App, hook: str) -> Iterator[None]:
        """Around one app hook run: its duration, and a failure count when it raises (a
        cancellation is not a failure)."""
        started = time.monotonic()
        try:
            yield
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.hook_failures.labels(
                app.name, hook, "timeout" if isinstance(exc, TimeoutError) else "error").inc()
            raise
        finally:
            self.hook_duration.labels(app.name, hook).observe(time.monotonic() - started)

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
        child = self._audit_children.get(category)
        if child is None:
            child = self._audit_children[category] = self.audit_entries.labels(category)
        child.inc()

    def audit_dropped(self, reason: str, n: int = 1) -> None:
        """Count ``n`` audit entries that could not be stored."""
        self.audit_dropped_total.labels(reason).inc(n)

    def _lock_child(self, histogram: Histogram, scope: str) -> Any:
        # Every acquire and release observes: resolve the labelled child once per scope.
        key = (id(histogram), scope)
        child = self._lock_children.get(key)
        if child is None:
            child = self._lock_children[key] = histogram.labels(scope)
        return child

    def lock_event(self, scope: str, event: str, fields: dict[str, Any]) -> None:
        """Record lock wait and hold times."""
        if event == "acquired" and fields.get("waited") is not None:
            self._lock_child(self.lock_wait, scope).observe(float(fields["waited"]))
        elif event in ("released", "expired") and fields.get("held") is not None:
            self._lock_child(self.lock_held, scope).observe(float(fields["held"]))
            if event == "expired":
                self.locks_lost.labels(scope).inc()
