"""Placement: which nodes may run an app (filters) and which one should lead it (scores).

The kernel asks the placement hooks; the default plugin ``placement`` implements the hard
constraints (`OnNodes`, `OnLabel`, `AvoidLabel`) as a filter and a node's ``priority`` for the
app as its score. Other plugins add filters (any False excludes a node) and scores (summed).

A standby defers its campaign for a vacant lease by its *rank*: the number of distinct higher
scores among the live standbys of the app (capped at `Placement.MAX_RANK`; the election also
caps the whole deferral below half a lease, since membership records can be forged). With only
the default scorer this is the priority deferral: the highest-priority standby takes over first.

Placement is re-evaluated while the node runs (`Placement.reevaluate`): at once after a change
(``platform.set_labels``, a member joining, leaving or changing its record, the operations
state), every poll interval while an app rebalances automatically, and otherwise every
`Placement.RECONCILE` seconds: an app whose filters now exclude this node has its
``on_placement_invalid`` hooks run and hands its active instance over to the best eligible
standby (if there is one); an app whose filters now admit this node is started here.

Operations state (`Operations`: maintenance mode, cordoned nodes) is one JSON object in the
platform bucket under `OPS_KEY`, written by compare-and-set (`update_operations`) by any node or
the CLI; every node watches its key and reads it when it changed (and at each slow
reconciliation). A cordoned node takes no new leadership and
starts no new Spread instance (what runs there stays); in maintenance mode (platform-wide or
per app) no standby campaigns, so a leader that dies is not replaced until maintenance ends.
The lease rules are untouched: maintenance only withholds campaigns, it never grants a lease.

Migrations (`Placement.migrate`) take a platform-wide slot first (`MigrationSlots`: per-app
cooldown, concurrent and per-minute limits, in NATS). Automatic rebalancing (opt-in, `Rebalance`
or the ``auto_rebalance`` setting) is decided by each active instance for itself, at each
re-evaluation: when a live eligible standby scores clearly better (the hysteresis threshold)
for a settling time, inside the maintenance windows and outside maintenance mode, it migrates
there (reason ``auto``).

Size: placement decisions, re-evaluation, migrations and automatic rebalancing share the
view, the operations state and the hooks; split, they would pass all of it around.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import natsutil as nu
from .context import Context
from .errors import ConfigError, PyclusterError
from .migrations import MigrationSlots, MigrationWaiting, clearly_better, in_windows, parse_windows
from .operations import (
    MAX_LABELS,
    OPS_KEY,
    Operations,
    merge_labels,
    read_operations,
    update_operations,
    validate_label,
)
from .types import NodeInfo, Role

if TYPE_CHECKING:
    from .app import App
    from .platform import Platform

log = logging.getLogger("pycluster.placement")

__all__ = ["MAX_LABELS", "OPS_KEY", "BudgetBlocked", "MigrationVetoed", "MigrationWaiting",
           "Operations",
           "Placement", "PlacementStrategy", "PlacementView", "merge_labels",
           "read_operations", "update_operations", "validate_label"]

class BudgetBlocked(PyclusterError):
    """A planned move would take an app below its disruption budget (it waits)."""

    code = "budget"


class MigrationVetoed(PyclusterError):
    """An ``on_migration_start`` hook refused a migration (nothing changed)."""

    code = "vetoed"

    def __init__(self, app: str, to: str, cause: BaseException) -> None:
        self.app, self.to, self.cause = app, to, cause
        super().__init__(f"migration of app {app!r} to {to!r} vetoed by on_migration_start: "
                         f"{type(cause).__name__}: {cause}")


@dataclass(frozen=True)
class PlacementView:
    """What this node knows of the platform's nodes when it scores them (a snapshot).

    :ivar node_id: this node's id.
    """

    node_id: str
    _records: Mapping[str, dict[str, Any]]
    _alive: Callable[[str], bool]
    # Derived counts, computed once per snapshot (scores read them for every candidate).
    _derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def _active_index(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        index = self._derived.get("active")
        if index is None:
            per_node: dict[str, int] = {}
            per_app: dict[str, list[str]] = {}
            for node, rec in self._records.items():
                apps = rec.get("apps")
                if not isinstance(apps, Mapping):
                    continue
                for name, a in apps.items():
                    if isinstance(a, Mapping) and a.get("role") == Role.ACTIVE.value:
                        per_node[node] = per_node.get(node, 0) + 1
                        per_app.setdefault(name, []).append(node)
            index = self._derived["active"] = (per_node, per_app)
        return index  # type: ignore[no-any-return]

    def active_count(self, node: str) -> int:
        """How many apps ``node``'s record shows active there."""
        return self._active_index()[0].get(node, 0)

    def active_on(self, app: str) -> list[str]:
        """The nodes whose record shows ``app`` active (alive or not)."""
        return list(self._active_index()[1].get(app, ()))

    def nodes(self) -> Iterator[str]:
        """Every node with a membership record (this one included)."""
        return iter(self._records)

    def record(self, node: str) -> dict[str, Any] | None:
        """The validated membership record of ``node`` (labels, version, plugins, apps)."""
        return self._records.get(node)

    def app_record(self, node: str, app: str) -> dict[str, Any] | None:
        """What ``node``'s record says of ``app`` (role, eligible, priority, no_failover,
        epoch, leader), if it runs it."""
        rec = self._records.get(node)
        apps = rec.get("apps") if rec is not None else None
        entry = apps.get(app) if isinstance(apps, Mapping) else None
        return entry if isinstance(entry, dict) else None

    def alive(self, node: str) -> bool:
        """Whether ``node``'s record was refreshed within its TTL (this node: always)."""
        return node == self.node_id or self._alive(node)

    def node_info(self, node: str) -> NodeInfo:
        """``node`` as the placement hooks see it (id and labels)."""
        rec = self._records.get(node) or {}
        labels = rec.get("labels")
        return NodeInfo(node, dict(labels) if isinstance(labels, Mapping) else {})


class PlacementStrategy(Protocol):
    """A named way of weighing candidates (``pycluster_placement_strategy``): its score of a
    node is added to the placement scores (an app names its strategy with `Strategy`)."""

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """What the strategy adds to ``node``'s score for ``app`` (higher: preferred)."""


class Placement:
    """The kernel's placement decisions for one platform (``platform.placement``)."""

    MAX_RANK = 3
    """At most this many distinct higher scores defer a campaign (records can be forged)."""
    RECONCILE = 15.0
    """Seconds between two re-evaluations when nothing changed and nothing waits for time
    (changes are evaluated at once; see `run`)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        #: The operations state as last read from NATS (maintenance, cordons).
        self.ops = Operations()
        #: Apps registered here that no live node may run now (app name -> since, wall time).
        self.pending: dict[str, float] = {}
        #: Apps whose filters exclude this node now although it runs them (hooks fired).
        self.invalid: set[str] = set()
        #: What this node's membership record publishes as ``eligible`` per app (updated at
        #: each re-evaluation: filters may read the view, which contains that record).
        self.published: dict[str, bool] = {}
        self._unknown: set[str] = set()
        self._kick = asyncio.Event()
        self._busy = asyncio.Lock()
        self._ops_sub: Any = None  # the watch of the operations key (`run`)
        self._ops_stale = True  # the operations state changed since it was read
        settings = platform.settings
        #: The platform-wide migration limits (cooldowns, concurrent, per minute), in NATS.
        self.slots = MigrationSlots(lambda: platform.js_control or platform.js, platform.name,
                                    settings.max_concurrent_migrations,
                                    settings.migrations_per_minute)
        #: Automatic rebalancing: app -> (wanted target, since when, monotonic).
        self._wanted: dict[str, tuple[str, float]] = {}
        #: Automatic rebalancing: app -> the running migration task.
        self._auto_tasks: dict[str, asyncio.Task[Any]] = {}
        #: Automatic rebalancing: app -> why it last waited (logged once per reason).
        self._auto_waits: dict[str, str] = {}
        #: Automatic rebalancing: app -> no new attempt before (monotonic; a cooldown's end).
        self._auto_retry: dict[str, float] = {}

    def eligible(self, app: App, node: NodeInfo | None = None) -> bool:
        """Whether every placement filter admits ``node`` (default: this node) for ``app``."""
        p = self.platform
        results = p.pm.hook.pycluster_placement_filter(app=app, node=node or p.node_info())
        return all(r is not False for r in results)

    @property
    def cordoned(self) -> bool:
        """Whether this node is cordoned (no new instances are placed here)."""
        return self.platform.node_id in self.ops.cordoned

    def placeable(self, app: App) -> bool:
        """Whether new instances of ``app`` may be placed on this node: the filters admit it
        and it is not cordoned (what its membership record publishes as ``eligible``)."""
        return not self.cordoned and self.eligible(app)

    def may_campaign(self, app: App) -> bool:
        """Whether this node may campaign for a vacant lease of ``app`` now: not in
        maintenance mode, not cordoned, admitted by the filters (the election asks before
        every campaign)."""
        return self.ops.may_campaign(app.name, self.platform.node_id) and self.placeable(app)

    def may_run_spread(self, app: App) -> bool:
        """Whether this node's Spread instance of ``app`` should be active: the filters admit
        it, and (for an instance not running yet) the node is not cordoned."""
        if not self.eligible(app):
            return False
        return app.is_active or not self.cordoned

    def kick(self) -> None:
        """Re-evaluate placement soon (labels, cordons or members changed)."""
        self._kick.set()

    async def load(self) -> None:
        """Read the operations state once (before the apps start: a cordoned node starts no
        Spread instance, a node in maintenance mode does not campaign)."""
        p = self.platform
        js = p.js_control or p.js
        if js is not None:
            try:
                self.ops, _ = await read_operations(js, p.name)
            except nu.TRANSIENT_ERRORS as exc:  # read again each poll interval
                log.warning("placement: reading the operations state failed: %s", exc)

    async def run(self, interval: float, reconcile: float | None = None) -> None:
        """Re-evaluate placement until cancelled: at once after `kick` (labels changed, a
        member joined, left or changed its record) and after the operations state changed (a
        watch of its key; the state is read then), every ``interval`` seconds while something
        depends on time (automatic rebalancing waits for a settling time, a failed
        evaluation or read is retried, no watch), and otherwise every ``reconcile`` seconds
        (default `RECONCILE`): a slow pass that also reads the operations state again."""
        reconcile = self.RECONCILE if reconcile is None else max(interval, reconcile)
        last_read = -math.inf
        try:
            while True:
                self._kick.clear()  # a kick from here on triggers another pass
                failed = False
                if self._ops_sub is None:
                    await self._watch_ops()
                now = time.monotonic()
                if self._ops_stale or self._ops_sub is None or now - last_read >= reconcile:
                    told = self._ops_stale
                    before = self.ops
                    if await self._read_ops():
                        last_read = now
                        if not told and self.ops != before and self._ops_sub is not None:
                            # A change the watch did not deliver (its consumer was lost,
                            # e.g. with the bucket): watch again.
                            log.info("placement: the operations watch missed a change; "
                                     "re-creating it")
                            await self._unwatch_ops()
                    else:
                        failed = True
                try:
                    await self.reevaluate()
                except Exception:
                    failed = True
                    log.exception("placement: re-evaluation failed")
                ticking = failed or self._ops_sub is None or any(
                    self.policy(app)[0] for app in self.platform.apps.values())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval if ticking else reconcile):
                        await self._kick.wait()
        finally:
            await self._unwatch_ops()

    async def _read_ops(self) -> bool:
        """Read the operations state (True: read)."""
        p = self.platform
        js = p.js_control or p.js
        if js is None:
            return False
        self._ops_stale = False  # a change from now on is read at the next pass
        try:
            ops, _ = await read_operations(js, p.name)
        except nu.TRANSIENT_ERRORS as exc:
            self._ops_stale = True
            log.debug("placement: reading the operations state failed: %s", exc)
            return False
        if ops != self.ops:
            log.info("node %s: operations state is now %s", p.node_id, ops.as_dict())
            self.ops = ops
        return True

    async def _watch_ops(self) -> None:
        """Watch the operations key (headers only: a change is read in full once)."""
        p = self.platform
        js = p.js_control or p.js
        if js is None:
            return

        async def changed(_msg: Any) -> None:
            self._ops_stale = True
            self._kick.set()

        try:
            self._ops_sub = await nu.light_watch(
                js, nu.kv_subject(f"{p.name}_platform", OPS_KEY), changed, headers_only=True)
        except Exception as exc:  # polled every interval meanwhile
            log.debug("placement: watching the operations state failed: %s", exc)
        self._ops_stale = True  # whatever changed before the watch started

    async def _unwatch_ops(self) -> None:
        sub, self._ops_sub = self._ops_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def reconnected(self) -> None:
        """Re-create the operations watch after a reconnect (the run loop reads the state)."""
        await self._unwatch_ops()
        self._kick.set()

    async def reevaluate(self) -> None:
        """Apply the current labels, filters, cordons and maintenance to this node's apps:
        start apps that may now run here, hand over those that may not, deactivate Spread
        instances whose filters fail, and update which apps are pending."""
        async with self._busy:
            p = self.platform
            if not p.running:
                return
            published = {app.name: self.placeable(app) for app in p.apps.values()}
            if published != self.published:  # "eligible" in our record changed: publish now
                self.published = published
                if p.membership is not None:
                    await p.membership.publish_now()
            view = self.view()
            for app in list(p.apps.values()):
                rt = p.runtimes.get(app.name)
                if rt is None:
                    if self.eligible(app):
                        log.info("app %s: node %s is eligible now (placement); starting it",
                                 app.name, p.node_id)
                        await p._start_app(app)
                    continue
                if rt.election is None:  # Spread: each eligible node runs an instance
                    rt.want_spread(self.may_run_spread(app), "placement")
                    continue
                if self.eligible(app):
                    if app.name in self.invalid:
                        self.invalid.discard(app.name)
                        log.info("app %s: placement on %s is valid again", app.name, p.node_id)
                    continue
                if app.name not in self.invalid:
                    self.invalid.add(app.name)
                    log.warning("app %s: placement on %s is invalid now (labels %s)", app.name,
                                p.node_id, p.labels)
                    self.event(app, "placement_invalid", {"labels": dict(p.labels)})
                    ctx = Context(app=app, platform=p, node_id=p.node_id, epoch=app.epoch,
                                  leader=app.leader, reason="placement_invalid")
                    from .coordinator import run_hooks

                    await run_hooks(app.hooks("placement_invalid"), ctx, rt.hook_timeout,
                                    "on_placement_invalid", False)
                if app.is_active:
                    await self._hand_over(app, view)
            for app in list(p.apps.values()):
                rt = p.runtimes.get(app.name)
                if rt is not None and rt.election is not None and app.name not in self.invalid:
                    self._consider_auto(app, view)
            self._update_pending(self.view())  # after the starts above

    def event(self, app: App | None, event: str, data: dict[str, Any]) -> None:
        """Report a placement operation (``pycluster_placement_event``: audit, metrics)."""
        from ..plugins import call_each

        p = self.platform
        call_each(p.pm.hook.pycluster_placement_event, f"placement {event}", platform=p,
                  app=app, event=event, data=data)

    def budget_problem(self, app: App, view: PlacementView) -> str | None:
        """Why taking one active instance of ``app`` away now would break its `Budget`
        (None: it would not, or the app has none). Counted from the live records."""
        budget = app.budget
        if budget is None:
            return None
        active = [n for n in view.active_on(app.name) if view.alive(n)]
        slots = app.mode.slots() or len(active)
        required = budget.required(slots)
        if len(active) - 1 < required:
            return (f"app {app.name}: {len(active)} active instance(s) "
                    f"({', '.join(sorted(active))}), the budget needs {required} to remain "
                    "during a move; waiting")
        return None

    def policy(self, app: App) -> tuple[bool, float, float, tuple[str, ...]]:
        """``app``'s automatic rebalancing and limits: (auto, threshold, cooldown, windows),
        its `Rebalance` option over the platform's settings."""
        r, s = app.rebalance, self.platform.settings
        return (r.auto if r.auto is not None else s.auto_rebalance,
                r.threshold if r.threshold is not None else s.rebalance_threshold,
                r.cooldown if r.cooldown is not None else s.migration_cooldown,
                r.windows if r.windows is not None else tuple(s.maintenance_windows))

    async def migrate(self, app: App, to: str | None = None, reason: str = "move",
                      force: bool = False) -> dict[str, Any]:
        """Move the active instance of ``app`` from this node to node ``to``: a planned,
        graceful hand-over (step down naming ``to`` as the successor).

        ``to`` None: the best eligible live standby. A move that would break the app's
        `Budget` is refused (`BudgetBlocked`, with the counts); so is one the platform-wide
        limits hold back (`MigrationWaiting`: the app's cooldown, unless ``force``; the
        concurrent and per-minute limits). ``on_migration_start`` hooks run first
        (``ctx.extra``: ``from``, ``to``, ``reason``); one that raises vetoes the move
        (`MigrationVetoed`, nothing changed). Once ``to`` leads, ``on_migration_complete``
        hooks run here. Refused (`ConfigError`) when this node is not the active instance,
        the app has no election (Spread), ``to`` is cordoned, not live, or not eligible, or
        maintenance mode is on and no operator named ``to`` (``operator_moves``).

        Returns ``{"app", "from", "to", "reason", "outcome", "leader", "epoch", "seconds"}``;
        ``outcome`` is ``completed``, or ``failed`` when another node (or none) leads after
        a lease and the hooks' time.
        """
        p = self.platform
        rt = p.runtimes.get(app.name)
        if rt is None or rt.election is None:
            raise ConfigError("app", app.name, "only an app with a leader (Singleton, "
                              "Replicas) can be moved")
        if not app.is_active:
            raise ConfigError("app", app.name, f"node {p.node_id} is not its active instance")
        await self.load()  # the latest cordons and maintenance, not the last poll's
        if self.ops.in_maintenance(app.name) and (
                reason == "auto" or to is None or self.ops.operator_moves.get(app.name) != to):
            raise ConfigError("app", app.name, "maintenance mode is on: automation and moves "
                              "wait until it is off (pycluster maintenance off), except an "
                              "operator's move to a named node (pycluster app move --to)")
        if to is None:
            best = [n for n, _ in self.candidates(app) if n != p.node_id]
            if not best:
                raise ConfigError("to", None, f"no eligible live standby of app {app.name!r} "
                                  "to move to")
            to = best[0]
        if to in self.ops.cordoned:
            raise ConfigError("to", to, "is cordoned: no new instances are placed there")
        problem = self.budget_problem(app, self.view())
        if problem is not None:
            raise BudgetBlocked(problem)
        if not isinstance(reason, str) or len(reason) > 200:
            raise ConfigError("reason", str(reason)[:64], "a string of at most 200 characters")
        from .coordinator import check_step_down

        m = p.membership
        try:
            check_step_down(app.name, p.node_id, m.members if m else {}, to, None)
        except ConfigError:
            if m is None:
                raise
            await m.refresh_view()  # the view may lag a node that has just started
            check_step_down(app.name, p.node_id, m.members, to, None)
        cooldown = 0.0 if force else self.policy(app)[2]
        ttl = 2 * rt.election.lease_ttl + 2 * rt.hook_timeout + 10
        lease = await self.slots.acquire(app.name, p.node_id, ttl, cooldown, reason)
        handed_over = False
        try:
            result = await self._hand_over_to(app, to, reason, rt)
            handed_over = True
            return result
        finally:
            try:
                await self.slots.release(lease, app.name, handed_over)
            except Exception as exc:  # the lease expires by itself
                log.warning("app %s: freeing the migration slot failed: %s", app.name, exc)

    async def vacate(self, app: App, to: str | None = None,
                     reason: str = "drain") -> dict[str, Any]:
        """Stop this cordoned node's Spread instance of ``app`` (a drain), keeping the app's
        `Budget` (counted over the live active instances) and the migration limits (slot,
        cooldown), with ``on_migration_start`` (may veto) and ``on_migration_complete``.

        ``to``: a node whose instance must be active first (the new one starts before the old
        stops; waited for up to two leases, else ``failed`` and nothing stops). Only a
        cordoned node's instance leaves: elsewhere it would start again at once. Returns the
        same shape as `migrate`."""
        p = self.platform
        rt = p.runtimes.get(app.name)
        if rt is None or rt.election is not None:
            raise ConfigError("app", app.name, "not a Spread app (move it instead)")
        if not app.is_active:
            raise ConfigError("app", app.name, f"node {p.node_id} runs no active instance")
        await self.load()
        if self.ops.in_maintenance(app.name):
            raise ConfigError("app", app.name, "maintenance mode is on: moves wait")
        if not self.cordoned:
            raise ConfigError("from", p.node_id, "a Spread instance leaves a cordoned node only "
                              "(pycluster node drain cordons it first)")
        if to is not None and (to in self.ops.cordoned or not self.view().alive(to)):
            raise ConfigError("to", to, "is cordoned or not live")
        problem = self.budget_problem(app, self.view())
        if problem is not None:
            raise BudgetBlocked(problem)
        ttl = 2 * p.settings.lease_ttl + 2 * rt.hook_timeout + 10
        lease = await self.slots.acquire(app.name, p.node_id, ttl, self.policy(app)[2], reason)
        stopped = False
        try:
            data: dict[str, Any] = {"from": p.node_id, "to": to, "reason": reason}
            ctx = Context(app=app, platform=p, node_id=p.node_id, epoch=app.epoch,
                          leader=app.leader, reason=f"migration: {reason}", extra=dict(data))
            from .coordinator import StageFailed, run_hooks

            try:
                await run_hooks(app.hooks("migration_start"), ctx, rt.hook_timeout,
                                "on_migration_start", True)
            except StageFailed as exc:
                self.event(app, "migration_vetoed", {**data, "error": str(exc.cause)[:300]})
                raise MigrationVetoed(app.name, str(to), exc.cause) from None
            started = time.monotonic()
            self.event(app, "migration_started", data)
            bound = started + 2 * p.settings.lease_ttl
            m = p.membership

            def target_active() -> bool:
                rec = self.view().app_record(to, app.name) if to else None
                return to is None or (rec or {}).get("role") == Role.ACTIVE.value

            while not target_active() and time.monotonic() < bound:
                await asyncio.sleep(0.05)
                if m is not None:
                    await m.refresh_view()
            outcome = "completed" if target_active() else "failed"
            if outcome == "completed":
                problem = self.budget_problem(app, self.view())  # it may have changed since
                if problem is not None:
                    raise BudgetBlocked(problem)
                rt.want_spread(False, reason)
                stopped = True
                while app.is_active and time.monotonic() < bound + rt.hook_timeout:
                    await asyncio.sleep(0.05)
            seconds = time.monotonic() - started
            log.info("app %s: Spread instance on %s %s (%s)", app.name, p.node_id,
                     "stopped" if stopped else "kept: the target is not active", reason)
            self.event(app, f"migration_{outcome}", {**data, "seconds": seconds})
            if outcome == "completed":
                await run_hooks(app.hooks("migration_complete"), ctx, rt.hook_timeout,
                                "on_migration_complete", False)
            return {"app": app.name, **data, "outcome": outcome, "leader": None,
                    "epoch": None, "seconds": round(seconds, 3)}
        finally:
            try:
                await self.slots.release(lease, app.name, stopped)
            except Exception as exc:  # the lease expires by itself
                log.warning("app %s: freeing the migration slot failed: %s", app.name, exc)

    async def _hand_over_to(self, app: App, to: str, reason: str, rt: Any) -> dict[str, Any]:
        """The migration itself (see `migrate`): hooks, step-down naming ``to``, wait."""
        from .coordinator import StageFailed, run_hooks

        p = self.platform
        m = p.membership
        data: dict[str, Any] = {"from": p.node_id, "to": to, "reason": reason}
        ctx = Context(app=app, platform=p, node_id=p.node_id, epoch=app.epoch,
                      leader=app.leader, reason=f"migration: {reason}", extra=dict(data))
        started = time.monotonic()
        try:
            await run_hooks(app.hooks("migration_start"), ctx, rt.hook_timeout,
                            "on_migration_start", True)
        except StageFailed as exc:
            log.warning("app %s: migration to %s vetoed: %s", app.name, to, exc.cause)
            self.event(app, "migration_vetoed", {**data, "error": str(exc.cause)[:300]})
            raise MigrationVetoed(app.name, to, exc.cause) from None
        log.info("app %s: migrating from %s to %s (%s)", app.name, p.node_id, to, reason)
        self.event(app, "migration_started", data)
        await app.step_down(successor=to)
        bound = time.monotonic() + 2 * rt.election.lease_ttl + rt.hook_timeout

        def arrived() -> bool:  # a Singleton's observed leader, or the target's record
            if app.mode.slots() == 1 and app.leader == to:
                return True
            rec = self.view().app_record(to, app.name) or {}
            return rec.get("role") == Role.ACTIVE.value

        while not arrived() and time.monotonic() < bound:
            await asyncio.sleep(0.05)
            if app.mode.slots() != 1 and m is not None:
                await m.refresh_view()
        seconds = time.monotonic() - started
        outcome = "completed" if arrived() else "failed"
        result = {"app": app.name, **data, "outcome": outcome, "leader": app.leader,
                  "epoch": app.epoch, "seconds": round(seconds, 3)}
        if outcome == "completed":
            log.info("app %s: migrated to %s in %.3fs", app.name, to, seconds)
            self.event(app, "migration_completed", {**data, "seconds": seconds})
            ctx.leader, ctx.epoch = app.leader, app.epoch
            await run_hooks(app.hooks("migration_complete"), ctx, rt.hook_timeout,
                            "on_migration_complete", False)
        else:
            log.warning("app %s: migration to %s failed: the leader is %s", app.name, to,
                        app.leader)
            self.event(app, "migration_failed", {**data, "seconds": seconds,
                                                 "error": f"leader is {app.leader}"})
        return result

    def _consider_auto(self, app: App, view: PlacementView) -> None:
        """Automatic rebalancing of this node's active instance of ``app`` (called at each
        re-evaluation; only the active instance decides for its own slot, so two nodes never
        start competing moves of one instance). Starts a migration (reason ``auto``) once a
        live eligible standby has scored at least the threshold more than this node for a
        settling time (two heartbeats: the records have caught up), outside maintenance mode
        and inside the maintenance windows; the slots and the budget may still make it
        wait (logged once per reason)."""
        auto, threshold, _, windows = self.policy(app)
        name = app.name
        task = self._auto_tasks.get(name)
        if task is not None and not task.done():
            return
        if not auto or not app.is_active or self.ops.in_maintenance(name):
            self._wanted.pop(name, None)
            return
        ranked = self.candidates(app, view)
        own = next(s for n, s in ranked if n == view.node_id)
        best, best_score = ranked[0]
        if best == view.node_id or not clearly_better(own, best_score, threshold):
            self._wanted.pop(name, None)
            self._auto_waits.pop(name, None)
            return
        now = time.monotonic()
        target, since = self._wanted.get(name, (None, now))
        if target != best:
            self._wanted[name] = (best, now)
            return
        if (now - since < 2 * self.platform.settings.heartbeat_interval
                or now < self._auto_retry.get(name, 0.0)):
            return
        if not in_windows(parse_windows(windows)):
            self._auto_wait(app, f"app {name}: {best} scores {best_score:g} (here "
                                 f"{own:g}): outside the maintenance windows "
                                 f"({', '.join(windows)}); waiting")
            return
        self._auto_tasks[name] = self.platform.spawn(self._auto_move(app, best),
                                                     f"auto-rebalance {name}")

    def _auto_wait(self, app: App, why: str) -> None:
        kind = re.sub(r"\d+", "#", why)  # "48s left", "47s left": one reason
        if self._auto_waits.get(app.name) != kind:
            self._auto_waits[app.name] = kind
            log.info("%s", why)
            self.event(app, "rebalance_waiting", {"reason": why})

    async def _auto_move(self, app: App, to: str) -> None:
        try:
            res = await self.migrate(app, to, "auto")
            self._auto_waits.pop(app.name, None)
            self._wanted.pop(app.name, None)
            log.info("app %s: automatic rebalancing to %s: %s", app.name, to, res["outcome"])
        except MigrationWaiting as exc:
            self._auto_retry[app.name] = time.monotonic() + exc.retry_after
            self._auto_wait(app, str(exc))
        except BudgetBlocked as exc:
            self._auto_wait(app, str(exc))
        except PyclusterError as exc:
            self._auto_wait(app, f"app {app.name}: automatic move to {to} refused: {exc}")
        except Exception as exc:  # NATS unavailable, ...: tried again at the next evaluation
            self._auto_wait(app, f"app {app.name}: automatic move to {to} failed: {exc}")

    async def rebalance(self, app: App, dry_run: bool = False) -> dict[str, Any]:
        """What placement wants for the active instance of ``app`` on this node: the best
        scored live eligible candidate. When that is another node with a higher score, move
        there (a migration, reason ``rebalance``) unless ``dry_run``. Returns ``{"app",
        "from", "to", "scores", "outcome"}`` with outcome ``balanced``, ``planned`` (dry
        run) or the migration's outcome."""
        p = self.platform
        if not app.is_active:
            raise ConfigError("app", app.name, f"node {p.node_id} is not its active instance")
        ranked = self.candidates(app)
        scores = {n: s for n, s in ranked}
        best, best_score = ranked[0]
        plan: dict[str, Any] = {"app": app.name, "from": p.node_id, "to": best,
                                "scores": scores}
        if best == p.node_id or best_score <= scores.get(p.node_id, 0.0):
            return {**plan, "to": p.node_id, "outcome": "balanced"}
        if dry_run:
            return {**plan, "outcome": "planned"}
        result = await self.migrate(app, best, "rebalance")
        return {**plan, **result}

    async def _hand_over(self, app: App, view: PlacementView) -> None:
        """The active instance of ``app`` may not run here: step down to the best eligible
        standby, unless maintenance mode pauses automation or no node could take over."""
        p = self.platform
        if self.ops.in_maintenance(app.name):
            log.warning("app %s: placement on %s is invalid, but maintenance mode is on: "
                        "staying", app.name, p.node_id)
            return
        standbys = [n for n, _ in self.candidates(app, view) if n != p.node_id]
        if not standbys:
            log.warning("app %s: placement on %s is invalid, but no eligible live standby "
                        "can take over: staying until one can", app.name, p.node_id)
            return
        log.warning("app %s: placement on %s is invalid: handing over to %s", app.name,
                    p.node_id, standbys[0])
        try:
            await app.step_down(successor=standbys[0])
        except Exception as exc:
            log.warning("app %s: hand-over to %s failed: %s", app.name, standbys[0], exc)

    def _update_pending(self, view: PlacementView) -> None:
        """An app is pending when no live node (this one included) may place it or runs it
        actively."""
        now = time.time()
        for app in self.platform.apps.values():
            placeable = any(
                (a := view.app_record(n, app.name)) is not None
                and (a.get("eligible") is True or a.get("role") == Role.ACTIVE.value)
                for n in view.nodes() if view.alive(n))
            if placeable:
                if self.pending.pop(app.name, None) is not None:
                    log.info("app %s: no longer pending (a node may run it)", app.name)
            elif app.name not in self.pending:
                self.pending[app.name] = now
                log.warning("app %s: pending: no live node may run it (placement filters, "
                            "cordons)", app.name)

    def view(self) -> PlacementView:
        """A snapshot of the live membership, with this node's current record."""
        p = self.platform
        m = p.membership
        records: dict[str, dict[str, Any]] = dict(m.members) if m is not None else {}
        records[p.node_id] = p.membership_record()
        return PlacementView(p.node_id, records,
                             m.alive if m is not None else (lambda _node: False))

    def strategy(self, app: App) -> PlacementStrategy | None:
        """The strategy ``app`` names (`Strategy`), from ``pycluster_placement_strategy``
        (None, logged once, when no plugin provides it)."""
        name = app.strategy.name
        found: PlacementStrategy | None = self.platform.pm.hook.pycluster_placement_strategy(
            name=name)
        if found is None and name not in self._unknown:
            self._unknown.add(name)
            log.warning("app %s: no plugin provides placement strategy %r; ignored",
                        app.name, name)
        return found

    def score(self, app: App, node: NodeInfo, view: PlacementView) -> float:
        """The sum of every placement score of ``node`` for ``app`` (abstentions count 0),
        plus the app's strategy's."""
        total = 0.0
        for s in self.platform.pm.hook.pycluster_placement_score(app=app, node=node, view=view):
            if isinstance(s, int | float) and not isinstance(s, bool):
                total += s
        strategy = self.strategy(app)
        if strategy is not None:
            total += strategy.score(app, node, view)
        return total

    def standbys(self, app: App, view: PlacementView) -> list[str]:
        """Live nodes other than this one whose record says they run ``app`` as a standby
        that may lead it."""
        out = []
        for node in view.nodes():
            if node == view.node_id or not view.alive(node):
                continue
            a = view.app_record(node, app.name)
            if (a is not None and a.get("eligible") is True and a.get("no_failover") is False
                    and a.get("role") == Role.PASSIVE.value):
                out.append(node)
        return out

    def candidates(self, app: App, view: PlacementView | None = None) -> list[tuple[str, float]]:
        """This node and the live standbys of ``app`` with their scores, best first (ties by
        node id)."""
        view = view or self.view()
        nodes: Sequence[str] = [view.node_id, *self.standbys(app, view)]
        scored = [(n, self.score(app, view.node_info(n), view)) for n in nodes]
        return sorted(scored, key=lambda ns: (-ns[1], ns[0]))

    def rank(self, app: App) -> int:
        """How many distinct higher scores live standbys of ``app`` have than this node (at
        most `MAX_RANK`): the election defers a campaign by it."""
        view = self.view()
        mine = self.score(app, view.node_info(view.node_id), view)
        higher = set()
        for node in self.standbys(app, view):
            s = self.score(app, view.node_info(node), view)
            if s > mine:
                higher.add(s)
        return min(len(higher), self.MAX_RANK)
