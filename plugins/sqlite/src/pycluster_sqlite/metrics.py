"""Prometheus metrics of the SQLite plugin (added to each platform's registry).

Computed at scrape time from the runtimes of the platform's apps (``app.state("sqlite")``;
nothing is counted when nobody looks); the promotion-duration histogram from the durations each
runtime recorded:

* ``pycluster_sqlite_replication_lag_seconds{app}``: seconds this node's copy is behind the
  WAL bucket (0 on the active instance; absent while a standby has no replica yet);
* ``pycluster_sqlite_txid{app,copy}``: positions, ``copy`` = ``remote`` (the bucket's head),
  ``local`` (Litestream's on the active instance) or ``replica`` (the standby's replica);
* ``pycluster_sqlite_wal_bytes{app}``: size of the database's ``-wal`` file (active instance);
* ``pycluster_sqlite_snapshot_bytes{app}``: size of the newest snapshot this node knows;
* ``pycluster_sqlite_litestream_restarts{app,process}``: restarts of ``replicate``/``follow``;
* ``pycluster_sqlite_promotion_seconds{app}``: histogram, catch-up start to promoted database;
* ``pycluster_sqlite_zone_link_up{app}``: a zone standby (``StandbyOf``): 1 while its mirror of
  the followed platform's bucket is in contact with the source, 0 while cut off.
"""

from __future__ import annotations

import bisect
import os
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pycluster.kernel.platform import Platform

PROMOTION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class PromotionHistogram:
    """Promotion durations of one app on this node (kept by its runtime, exported by the
    collector as ``pycluster_sqlite_promotion_seconds``)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(PROMOTION_BUCKETS) + 1)  # the last one: +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Record one promotion."""
        self.counts[bisect.bisect_left(PROMOTION_BUCKETS, seconds)] += 1
        self.total += seconds

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative buckets, Prometheus style."""
        out, acc = [], 0
        for bound, n in zip((*PROMOTION_BUCKETS, float("inf")), self.counts, strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(acc)))
        return out


class SQLiteCollector(Collector):
    """Gauges computed from the platform's SQLite runtimes at scrape time."""

    def __init__(self, platform: Platform) -> None:
        self._platform = weakref.ref(platform)

    def describe(self) -> list[Metric]:
        """Nothing up front (the gauges depend on the apps)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The gauges."""
        from .runtime import runtimes_of

        lag = GaugeMetricFamily("pycluster_sqlite_replication_lag_seconds",
                                "Seconds this node's copy is behind the WAL bucket", labels=["app"])
        txid = GaugeMetricFamily("pycluster_sqlite_txid", "Litestream transaction ids",
                                 labels=["app", "copy"])
        wal = GaugeMetricFamily("pycluster_sqlite_wal_bytes",
                                "Size of the database's -wal file on the active instance",
                                labels=["app"])
        snap = GaugeMetricFamily("pycluster_sqlite_snapshot_bytes",
                                 "Size of the newest snapshot known here", labels=["app"])
        restarts = GaugeMetricFamily("pycluster_sqlite_litestream_restarts",
                                     "Restarts of litestream processes",
                                     labels=["app", "process"])
        promotion = HistogramMetricFamily(
            "pycluster_sqlite_promotion_seconds",
            "Seconds from the start of catch-up to the promoted database (SQLite plugin)",
            labels=["app"])
        zone_link = GaugeMetricFamily(
            "pycluster_sqlite_zone_link_up",
            "Zone standby: 1 while the mirror of the followed platform's bucket is in contact",
            labels=["app"])
        platform = self._platform()
        if platform is not None:
            for name, rt in list(runtimes_of(platform).items()):
                value = rt.lag()
                if value != float("inf"):
                    lag.add_metric([name], value)
                txid.add_metric([name, "remote"], rt.remote_txid())
                if rt.local_txid is not None and rt.role == "active":
                    txid.add_metric([name, "local"], rt.local_txid)
                r = rt.replica_txid()
                if r is not None and rt.role == "standby":
                    txid.add_metric([name, "replica"], r)
                if rt.role == "active":
                    try:
                        wal.add_metric([name], os.stat(f"{rt.db_path}-wal").st_size)
                    except OSError:
                        wal.add_metric([name], 0)
                last = rt.last_snapshot or (rt.store.last if rt.store else None)
                if last is not None:
                    snap.add_metric([name], last.size)
                if rt.follower is not None:
                    restarts.add_metric([name, "follow"], rt.follower.restarts)
                if rt.replicator is not None:
                    restarts.add_metric([name, "replicate"], rt.replicator.restarts)
                h = rt.promotions
                if any(h.counts):
                    promotion.add_metric([name], h.buckets(), h.total)
                if rt.zone_mode:
                    zone_link.add_metric([name], 1.0 if rt.zone.up else 0.0)
        return [lag, txid, wal, snap, restarts, promotion, zone_link]


def register(registry: CollectorRegistry, platform: Platform) -> None:
    """Add the plugin's metrics to a platform's registry."""
    registry.register(SQLiteCollector(platform))
