"""A node process for tests and the demo: ``python -m pycluster.testing.node``.

It runs a `Platform` with one app and records what it does, one JSON line per event, in
``{state_dir}/{node_id}.jsonl`` (wall-clock time, so several processes on one machine can be
compared): role changes ("active", "passive", "stopped") with epoch and reason, and — while the
app is active — an "act" line every ``--act-interval`` seconds, which is what a leader "doing
work" looks like. `NodeCluster` reads these files to find leaders and to prove that no two
nodes were ever active at once.

With ``--zone``/``--zone-role`` and ``--promote-detection`` the node is one node of a zone
running the app with `PromoteOnHubFailure`; ``--write-record DIR`` then keeps the external
record of the app's zone writes (``{DIR}/{zone}-{node}.jsonl``: zone, node, term, local epoch,
wall time, written only after ``app.zone.check()`` passed), which
`pycluster.testing.zones.single_writer_violations` checks.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import (
    App,
    Budget,
    Election,
    Platform,
    PreferLabel,
    PromoteOnHubFailure,
    PyclusterError,
    Replicas,
    Singleton,
    Spread,
)
from ..backend import HealthCheck
from ..builtin.leaf.plugin import zone_of
from ..builtin.process import Process
from ..kernel.zones import ZoneFencedError
from ..plugins import create_plugin_manager, hookimpl


class _Recorder:
    """A tiny plugin that writes role changes to the node's event file."""

    def __init__(self, path: Path, node: str) -> None:
        self.path = path
        self.node = node
        self.fh = path.open("a", buffering=1)

    def write(self, **fields: Any) -> None:
        fields.setdefault("t", time.time())
        fields.setdefault("node", self.node)
        fields.setdefault("pid", os.getpid())
        self.fh.write(json.dumps(fields) + "\n")

    @hookimpl
    def pycluster_role_changed(self, app: App, role: str, epoch: int | None,
                               leader: str | None) -> None:
        rt = app._runtime
        reason = rt.last_transition.get("reason", "") if rt else ""
        self.write(event="role", app=app.name, role=role, epoch=epoch, reason=reason)


class _ZoneWrites:
    """The external record of an app's zone writes: one line per write, only after
    ``app.zone.check()`` passed (nothing else in the node decides it)."""

    def __init__(self, directory: Path, zone: str, node: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.zone, self.node = zone, node
        self.fh = (directory / f"{zone}-{node}.jsonl").open("a", buffering=1)

    def attempt(self, app: App) -> None:
        try:
            term, epoch = zone_of(app).check()
        except (ZoneFencedError, RuntimeError):  # fenced, or the platform not started yet
            return
        # No await between the check and the line: the record's time is the write's.
        self.fh.write(json.dumps({"zone": self.zone, "node": self.node, "term": term,
                                  "epoch": epoch, "t": time.time()}) + "\n")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m pycluster.testing.node")
    p.add_argument("--platform", required=True)
    p.add_argument("--node-id", required=True)
    p.add_argument("--nats-url", required=True, help="comma-separated URLs")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--app", default="svc")
    p.add_argument("--mode", default="singleton", help="singleton | spread | replicas:N")
    p.add_argument("--extra-app", action="append", default=[],
                   help="another app of the same mode (benchmarks; its role changes go to "
                   "the same event file, tagged with the app)")
    p.add_argument("--lease-ttl", type=float, default=2.0)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--no-failover", action="store_true")
    p.add_argument("--budget-min", type=int, default=None,
                   help="a disruption budget: Budget(min_available=N)")
    p.add_argument("--prefer-label", action="append", default=[],
                   help="key=value:weight (a PreferLabel)")
    p.add_argument("--auto-rebalance", action="store_true", help="automatic rebalancing")
    p.add_argument("--rebalance-threshold", type=float, default=10.0)
    p.add_argument("--migration-cooldown", type=float, default=60.0)
    p.add_argument("--max-migrations", type=int, default=1,
                   help="max_concurrent_migrations of the platform")
    p.add_argument("--migrations-per-minute", type=int, default=10)
    p.add_argument("--stream-replicas", type=int, default=1, help="3 on a NATS cluster")
    p.add_argument("--act-interval", type=float, default=0.05)
    p.add_argument("--backend-cmd", default=None, help="a Process backend command")
    p.add_argument("--backend-grace", type=float, default=2.0)
    p.add_argument("--backend-max-restarts", type=int, default=3)
    p.add_argument("--backend-restart-backoff", type=float, default=1.0)
    p.add_argument("--backend-health-cmd", default=None, help="a HealthCheck command")
    p.add_argument("--backend-inherit-env", action="append", default=[],
                   help="a variable of the node's environment the backend gets (inherit_env)")
    p.add_argument("--backend-start-timeout", type=float, default=60.0)
    p.add_argument("--label", action="append", default=[], help="key=value")
    p.add_argument("--setup", action="append", default=[],
                   help="module:function called as fn(ns) -> list of extra App options; if the "
                        "module has attach(app, platform, ns), it is called before the start")
    p.add_argument("--setup-arg", action="append", default=[], help="key=value for --setup")
    p.add_argument("--zone", default=None, help="the platform's zone")
    p.add_argument("--zone-role", default=None, choices=["hub", "leaf"])
    p.add_argument("--promote-detection", type=float, default=None,
                   help="PromoteOnHubFailure(detection=...) on the app")
    p.add_argument("--promote-zones", type=int, default=None, help="PromoteOnHubFailure.zones")
    p.add_argument("--vote-url", default=None, help="PromoteOnHubFailure.vote_url")
    p.add_argument("--write-record", default=None,
                   help="a directory: while `app.zone.check()` passes, every act also appends "
                        "{zone, node, term, epoch, t} to {dir}/{zone}-{node}.jsonl (the "
                        "external record of zone writes)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p.parse_args(argv)


async def amain(ns: argparse.Namespace) -> int:
    """Run the node until SIGTERM."""
    state = Path(ns.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    rec = _Recorder(state / f"{ns.node_id}.jsonl", ns.node_id)
    pm = create_plugin_manager(extra=[("recorder", rec)])
    mode: Any = Singleton()
    if ns.mode == "spread":
        mode = Spread()
    elif ns.mode.startswith("replicas:"):
        mode = Replicas(int(ns.mode.split(":", 1)[1]))
    options: list[Any] = [mode, Election(priority=ns.priority, no_failover=ns.no_failover)]
    if ns.budget_min is not None:
        options.append(Budget(min_available=ns.budget_min))
    for spec in ns.prefer_label:
        kv, _, weight = spec.rpartition(":")
        key, _, value = kv.partition("=")
        options.append(PreferLabel(key, value, weight=float(weight)))
    if ns.promote_detection is not None:
        options.append(PromoteOnHubFailure(detection=ns.promote_detection,
                                           zones=ns.promote_zones, vote_url=ns.vote_url))
    if ns.backend_cmd:
        health = None
        if ns.backend_health_cmd:
            health = HealthCheck(command=ns.backend_health_cmd, interval=0.5,
                                 start_timeout=ns.backend_start_timeout)
        options.append(Process(ns.backend_cmd, grace=ns.backend_grace, health=health,
                               max_restarts=ns.backend_max_restarts,
                               restart_backoff=ns.backend_restart_backoff,
                               inherit_env=ns.backend_inherit_env))
    ns.setup_args = dict(x.split("=", 1) for x in ns.setup_arg)
    modules = []
    for spec in ns.setup:
        mod_name, _, fn_name = spec.partition(":")
        mod = importlib.import_module(mod_name)
        modules.append(mod)
        options.extend(getattr(mod, fn_name)(ns) or [])
    app = App(ns.app, *options)
    labels = dict(x.split("=", 1) for x in ns.label)
    platform = Platform(
        ns.platform, node_id=ns.node_id, nats_url=ns.nats_url, labels=labels,
        lease_ttl=ns.lease_ttl, heartbeat_interval=ns.heartbeat, hook_timeout=10.0,
        stream_replicas=ns.stream_replicas, auto_rebalance=ns.auto_rebalance,
        rebalance_threshold=ns.rebalance_threshold, migration_cooldown=ns.migration_cooldown,
        max_concurrent_migrations=ns.max_migrations,
        migrations_per_minute=ns.migrations_per_minute,
        plugin_manager=pm, zone=ns.zone, zone_role=ns.zone_role,
    )
    platform.register(app)
    for name in ns.extra_app:
        platform.register(App(name, mode, Election(priority=ns.priority,
                                                   no_failover=ns.no_failover)))
    for mod in modules:
        if hasattr(mod, "attach"):
            mod.attach(app, platform, ns)

    writes = _ZoneWrites(Path(ns.write_record), ns.zone or ns.platform, ns.node_id) \
        if ns.write_record else None

    async def act() -> None:
        while True:
            if app.is_active:
                rec.write(event="act", app=app.name, epoch=app.epoch)
            if writes is not None:
                writes.attempt(app)
            await asyncio.sleep(ns.act_interval)

    ticker = asyncio.create_task(act())
    try:
        await platform.start()
    except Exception as exc:
        rec.write(event="error", error=f"{type(exc).__name__}: {exc}")
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if not isinstance(exc, PyclusterError):
            traceback.print_exc()
        return 3
    rec.write(event="ready")
    print("READY", flush=True)
    try:
        await platform.run()  # start() already ran: run() only waits for the signal
    except PyclusterError as exc:  # the node left on its own (replaced, failed): as `pycluster run`
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return int(getattr(exc, "exit_code", 2))
    finally:
        ticker.cancel()
        rec.write(event="exit")
    return 0


def main() -> None:
    """Entry point."""
    ns = parse()
    logging.basicConfig(
        level=getattr(logging, ns.log_level),
        format=f"%(asctime)s {ns.node_id} %(name)s %(levelname)s %(message)s",
    )
    sys.exit(asyncio.run(amain(ns)))


if __name__ == "__main__":
    main()
