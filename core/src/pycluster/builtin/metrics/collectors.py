"""The metrics plugin's registry (rendered off the event loop) and its state gauges, computed
at scrape time from the platform's in-process state."""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ...kernel.platform import Platform


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


class HistogramBatch:
    """Observations of one histogram child, aggregated here (a count per bucket and a sum) and
    added to the child when the registry is collected (`BatchFlusher`).

    For the hot path of RPC: prometheus-client's ``observe`` takes two locks and walks the
    buckets in Python; this is one C bisection and two additions. A child whose internals are
    not the expected ones is observed directly.
    """

    __slots__ = ("_bounds", "child", "counts", "n", "total")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        if not (isinstance(bounds, list) and hasattr(child, "_sum")
                and len(getattr(child, "_buckets", ())) == len(bounds)):
            bounds = None
        self._bounds: list[float] | None = bounds
        self.counts = [0] * len(bounds) if bounds is not None else []
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        if self._bounds is None:
            self.child.observe(value)
            return
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.total += value
        self.n += 1

    def flush(self) -> None:
        """Add what was recorded to the histogram child."""
        if not self.n:
            return
        counts, self.counts = self.counts, [0] * len(self.counts)
        total, self.total, self.n = self.total, 0.0, 0
        buckets = self.child._buckets
        for i, c in enumerate(counts):
            if c:
                buckets[i].inc(c)
        self.child._sum.inc(total)


class BatchFlusher(Collector):
    """Flushes the `HistogramBatch` objects when the registry is collected (registered before
    the histograms, so a collection reads them complete)."""

    def __init__(self) -> None:
        self.batches: dict[tuple[Any, ...], HistogramBatch] = {}

    def batch(self, key: tuple[Any, ...], child: Any) -> HistogramBatch:
        """The batch of ``child`` (``key`` names it: metric and labels), created on first use;
        bounded (a flood of new names flushes and forgets the old batches)."""
        b = self.batches.get(key)
        if b is None:
            if len(self.batches) >= 8192:
                self.collect()
                self.batches.clear()
            b = self.batches[key] = HistogramBatch(child)
        return b

    def collect(self) -> Iterator[Metric]:
        """Flush every batch; yields nothing."""
        for b in list(self.batches.values()):
            b.flush()
        return iter(())


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


def _replication(p: Platform) -> Iterator[Metric]:
    """Lag and position of every replicator (`pycluster.kernel.replication.Replicator`)."""
    lag = GaugeMetricFamily("pycluster_replication_lag_seconds",
                            "Seconds this node's copy of the app's data is behind the primary "
                            "(0 on the active instance; absent when unknown).",
                            labels=["app", "replicator"])
    position = GaugeMetricFamily("pycluster_replication_position",
                                 "Replicated position (transaction id, sequence, ...) of this "
                                 "node's copy of the app's data.", labels=["app", "replicator"])
    for name, rt in list(p.runtimes.items()):
        for ar in rt.replicators:
            rep = ar.replicator
            value = rep.lag()
            if value is not None and value != float("inf"):
                lag.add_metric([name, rep.name], value)
            pos = rep.position()
            if pos is not None:
                position.add_metric([name, rep.name], pos)
    yield lag
    yield position


class StateCollector(Collector):
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
        nc_control = p.nc_control
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
        pending = GaugeMetricFamily("pycluster_placement_pending",
                                    "1 while no live node may run the app (placement filters, "
                                    "cordons), else 0.", labels=["app"])
        maintenance = GaugeMetricFamily("pycluster_maintenance",
                                        "1 while the app is in maintenance mode (no automatic "
                                        "failover), else 0.", labels=["app"])
        cordoned = GaugeMetricFamily("pycluster_node_cordoned",
                                     "1 while this node is cordoned, else 0.")
        cordoned.add_metric([], 1 if p.placement.cordoned else 0)
        for name in p.apps:
            pending.add_metric([name], 1 if name in p.placement.pending else 0)
            maintenance.add_metric([name], 1 if p.placement.ops.in_maintenance(name) else 0)
        yield pending
        yield maintenance
        yield cordoned
        yield from _replication(p)
        health = GaugeMetricFamily("pycluster_health",
                                   "1 if the health check passes, 0 if it fails (absent until "
                                   "its first result).", labels=["check"])
        hs = p.services.get("health")  # the health plugin's public state, when enabled
        if hs is not None:
            for check, ok in hs.gauge_values():
                health.add_metric([check], ok)
        yield health
