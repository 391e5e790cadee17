"""Replication of an app's data between its instances: the protocol, the registry, and the
stages the kernel drives.

A replicator keeps one app's data (a SQLite database, a directory, a Postgres cluster, ...) on
every node that runs the app: the active instance replicates, standbys follow, and a node that
becomes active catches up and promotes its copy before the backend starts. Plugins register a
replicator factory per App option class (``pycluster_register_replicators``); for every option
of an app matched in that registry the kernel builds the replicator when the app starts on this
node and drives it:

* the app starts here: ``follow`` (standby); it stops here: ``stop`` (after stepping down);
* becoming active, as stages of the failover sequence (`replication_stages`):
  ``<name>-catchup`` (CATCH_UP: ``catch_up``), ``<name>-promote`` (PROMOTE: ``promote``),
  ``<name>-replicate`` (REPLICATE: ``replicate``) and, when the replicator has a snapshot
  schedule, ``<name>-snapshots`` (SNAPSHOTS, failure policy CONTINUE);
* stepping down, the reverse: ``stop_snapshots``, ``stop_replicating`` (before the backend
  stops), ``demote`` (after it stopped), ``follow`` (standby again);
* lag, position, state and status are read through the protocol (``/status``, health, metrics).

Fencing, the rule every replicator keeps: only the current lease holder replicates. The epoch
(``ctx.epoch``, the fencing token) is given to every activation call and must be written with
the replicated data so that an older holder's writes are refused; when the lease is lost the
kernel deactivates against the lease's end (``ctx.deadline`` set): replication must stop
before that instant. A returning node catches up from the shared copy before it could ever
replicate again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .registry import OptionKind, OptionKindRegistry
from .stages import FailurePolicy, Stage, StageOrder, StageRegistry

if TYPE_CHECKING:
    from .app import App
    from .context import Context
    from .platform import Platform


class ReplicationState(enum.StrEnum):
    """The role of this node's copy of an app's data."""

    STOPPED = "stopped"
    """The app does not run here (or has not started yet)."""
    STANDBY = "standby"
    """Following the primary: a near-real-time copy."""
    PROMOTING = "promoting"
    """Catching up and promoting (becoming active)."""
    ACTIVE = "active"
    """The primary copy: changes are replicated from here."""


class ReplicationStep(enum.StrEnum):
    """The stages of the failover sequence a replicator takes part in (the stage names are
    ``<replicator name>-<step>``)."""

    CATCH_UP = "catchup"
    PROMOTE = "promote"
    REPLICATE = "replicate"
    SNAPSHOTS = "snapshots"


STEP_ORDER = {
    ReplicationStep.CATCH_UP: StageOrder.CATCH_UP,
    ReplicationStep.PROMOTE: StageOrder.PROMOTE,
    ReplicationStep.REPLICATE: StageOrder.REPLICATE,
    ReplicationStep.SNAPSHOTS: StageOrder.SNAPSHOTS,
}


class SnapshotSchedule(Protocol):
    """Periodic snapshots taken by the active instance (stage SNAPSHOTS, policy CONTINUE)."""

    async def start(self, ctx: Context) -> None:
        """Active: start taking snapshots (returns at once; a failure is logged and the node
        stays active)."""

    async def stop(self, ctx: Context) -> None:
        """Stepping down: stop taking snapshots (before ``ctx.deadline`` when set)."""


class Replicator(Protocol):
    """What the kernel needs from the replicator of one option of one app on this node.

    Every async method is bounded by the kernel (``timeout(step)`` for the stages, the app's
    hook timeout otherwise) and cancelled when the lease is lost during activation: a
    replicator leaves nothing half-done behind a cancellation that the next call cannot
    handle. ``lag``, ``position``, ``state`` and ``status`` are cheap reads from memory.
    """

    @property
    def name(self) -> str:
        """Prefix of the stage names (``"sqlite"`` gives ``sqlite-catchup``, ...), also the
        name of its health check."""

    def timeout(self, step: ReplicationStep) -> float | None:
        """Seconds the stage of ``step`` may take (None: the app's hook timeout)."""

    def snapshots(self) -> SnapshotSchedule | None:
        """The snapshot schedule of the active instance, if this replicator has one."""

    async def follow(self, ctx: Context) -> None:
        """Standby: keep a near-real-time copy, returning once following runs (or is set to
        retry in the background). Called when the app starts on this node and at the end of
        every step-down (the undo of CATCH_UP). Idempotent."""

    async def catch_up(self, ctx: Context) -> None:
        """CATCH_UP, becoming active with epoch ``ctx.epoch``: claim the shared copy for this
        epoch (an older writer must be refused from now on), stop following and bring the
        local copy to the last replicated position. May refuse (raise) when a more current
        standby is alive. Must not write to the primary location yet."""

    async def promote(self, ctx: Context) -> None:
        """PROMOTE: make the caught-up copy the primary one, verified; when this returns the
        backend may start on it."""

    async def replicate(self, ctx: Context) -> None:
        """REPLICATE (after the backend started): start shipping changes from the primary
        copy, returning once replication runs. Refuse (raise) when the lease is already gone
        or a newer epoch holds the shared copy. Must stop on its own, and report through
        ``AppRuntime.report_failure``, when a newer epoch appears."""

    async def stop_replicating(self, ctx: Context) -> None:
        """Stepping down, before the backend stops (the undo of REPLICATE). When the lease was
        lost (``ctx.deadline`` set) or this node was fenced: stop shipping at once, before
        ``ctx.deadline``. On a graceful step-down it may keep shipping until `demote`, so that
        what the backend writes while it stops is not lost."""

    async def demote(self, ctx: Context) -> None:
        """Stepping down, after the backend stopped (the undo of PROMOTE): ship what is left
        (graceful step-down only), then stop shipping for good. The copy is no longer the
        primary one when this returns."""

    async def stop(self) -> None:
        """The app stops on this node (it stepped down already): stop following, release
        everything."""

    def state(self) -> ReplicationState:
        """The role of this copy now."""

    def lag(self) -> float | None:
        """Seconds this copy is behind the primary: 0.0 on the primary, ``inf`` while a
        standby's copy does not exist yet, None when unknown."""

    def position(self) -> int | None:
        """The replicated position of this copy (a transaction id, an LSN, ...), if known."""

    def status(self) -> dict[str, Any]:
        """A JSON-friendly status (``/status``)."""

    async def check(self) -> dict[str, Any]:
        """The app health check ``<name>``: details when healthy, raises when not (e.g. a
        standby too far behind, replication not running on the active instance)."""


ReplicatorFactory = Callable[[Any, "App", "Platform"], Replicator]


@dataclass(frozen=True)
class ReplicatorKind(OptionKind):
    """One registered replicator: the option class it serves and its factory."""


class ReplicatorRegistry(OptionKindRegistry[ReplicatorKind]):
    """Option classes mapped to replicator factories (``pycluster_register_replicators``)."""

    what = "replicator"

    def add(self, option_class: type, factory: ReplicatorFactory, plugin: str) -> None:
        """Register ``factory(option, app, platform)`` for options of ``option_class``."""
        self.register(ReplicatorKind(option_class, factory, plugin))

    def kinds(self) -> list[ReplicatorKind]:
        """Every registered replicator."""
        return self.all()


@dataclass(frozen=True)
class AppReplicator:
    """A replicator built for one option of an app on this node."""

    option: object
    plugin: str
    replicator: Replicator


def build_replicators(app: App, platform: Platform) -> list[AppReplicator]:
    """A replicator for every option of ``app`` matched in the platform's registry."""
    return [AppReplicator(opt, kind.plugin, rep)
            for kind, opt, rep in platform.replicators.build(app, platform)]


def replication_stages(reps: list[AppReplicator], registry: StageRegistry) -> None:
    """Add the failover stages of each replicator (see the module docstring)."""
    for ar in reps:
        rep, name = ar.replicator, ar.replicator.name
        registry.add(Stage(f"{name}-{ReplicationStep.CATCH_UP}", StageOrder.CATCH_UP,
                           rep.catch_up, rep.follow, plugin=ar.plugin,
                           timeout=rep.timeout(ReplicationStep.CATCH_UP)))
        registry.add(Stage(f"{name}-{ReplicationStep.PROMOTE}", StageOrder.PROMOTE,
                           rep.promote, rep.demote, plugin=ar.plugin,
                           timeout=rep.timeout(ReplicationStep.PROMOTE)))
        registry.add(Stage(f"{name}-{ReplicationStep.REPLICATE}", StageOrder.REPLICATE,
                           rep.replicate, rep.stop_replicating, plugin=ar.plugin,
                           timeout=rep.timeout(ReplicationStep.REPLICATE)))
        snaps = rep.snapshots()
        if snaps is not None:
            registry.add(Stage(f"{name}-{ReplicationStep.SNAPSHOTS}", StageOrder.SNAPSHOTS,
                               snaps.start, snaps.stop, plugin=ar.plugin,
                               timeout=rep.timeout(ReplicationStep.SNAPSHOTS),
                               on_failure=FailurePolicy.CONTINUE))


def replication_summary(reps: list[AppReplicator]) -> dict[str, dict[str, Any]]:
    """State, lag and position of each replicator of an app, by name (``/status``), read
    through the protocol only."""
    out: dict[str, dict[str, Any]] = {}
    for ar in reps:
        rep = ar.replicator
        lag = rep.lag()
        out[rep.name] = {"plugin": ar.plugin, "state": str(rep.state()),
                         "lag": None if lag is None or lag == float("inf") else round(lag, 3),
                         "position": rep.position()}
    return out
