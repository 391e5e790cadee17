"""The core's own App options: modes, hard placement constraints and election timing.

Everything else passed to ``App(...)`` (``Docker``, ``VIP``, ``SQLite``, ...) is claimed by the
plugin that defines it (`pycluster.hookspecs.pycluster_claim_option`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .names import validate_ident
from .types import NodeInfo


class Mode:
    """Base of the modes: how many instances of an app are active."""

    kind: str = ""

    def slots(self) -> int | None:
        """Number of active slots (None: every eligible node)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Singleton(Mode):
    """One active instance; every other eligible node is a standby."""

    kind: str = field(default="singleton", init=False)

    def slots(self) -> int | None:
        """One slot."""
        return 1


@dataclass(frozen=True)
class Spread(Mode):
    """Active on every eligible node."""

    kind: str = field(default="spread", init=False)

    def slots(self) -> int | None:
        """No slot limit."""
        return None


@dataclass(frozen=True)
class Replicas(Mode):
    """Exactly ``n`` active instances among the eligible nodes; a lost one is replaced within
    the lease."""

    n: int
    kind: str = field(default="replicas", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or not 1 <= self.n <= 256:
            raise ConfigError("Replicas.n", self.n, "must be an integer from 1 to 256")

    def slots(self) -> int | None:
        """``n`` slots."""
        return self.n


class Constraint:
    """A placement constraint; hard constraints decide eligibility."""

    hard: bool = True

    def allows(self, node: NodeInfo) -> bool:
        """Whether ``node`` satisfies this constraint."""
        raise NotImplementedError


@dataclass(frozen=True)
class OnNodes(Constraint):
    """Run only on the listed node ids."""

    nodes: tuple[str, ...]

    def __init__(self, *nodes: str) -> None:
        if not nodes:
            raise ConfigError("OnNodes", nodes, "needs at least one node id")
        for n in nodes:
            validate_ident("node id", n)
        object.__setattr__(self, "nodes", tuple(nodes))

    def allows(self, node: NodeInfo) -> bool:
        """True when the node id is listed."""
        return node.node_id in self.nodes


@dataclass(frozen=True)
class OnLabel(Constraint):
    """Run only on nodes whose label ``key`` equals ``value`` (or exists, if value is None)."""

    key: str
    value: str | None = None

    def allows(self, node: NodeInfo) -> bool:
        """True when the label matches."""
        if self.key not in node.labels:
            return False
        return self.value is None or node.labels[self.key] == self.value


@dataclass(frozen=True)
class AvoidLabel(Constraint):
    """Never run on nodes whose label ``key`` equals ``value`` (or exists, if value is None)."""

    key: str
    value: str | None = None

    def allows(self, node: NodeInfo) -> bool:
        """True unless the label matches."""
        if self.key not in node.labels:
            return True
        return self.value is not None and node.labels[self.key] != self.value


class Preference(Constraint):
    """A placement option that needs the platform's view (soft preferences, affinities).

    Soft ones (``weight`` set) add to a node's placement score (`score`); hard ones (no
    ``weight``) decide eligibility from what the membership shows (`admits`). The default
    plugin ``placement`` evaluates both.
    """

    hard = False

    @property
    def needs_view(self) -> bool:
        """Whether `admits` can exclude a node (a hard affinity)."""
        return False

    def allows(self, node: NodeInfo) -> bool:
        """Preferences never exclude a node on their own labels alone."""
        return True

    def admits(self, node: NodeInfo, view: Any) -> bool:
        """Whether ``node`` satisfies this option as a hard constraint (``view``: a
        `pycluster.kernel.placement.PlacementView`)."""
        return True

    def score(self, node: NodeInfo, view: Any) -> float:
        """What this option adds to ``node``'s placement score."""
        return 0.0


def _weight(where: str, weight: float | None, optional: bool) -> None:
    if weight is None and optional:
        return
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(
            weight) or abs(weight) > 1_000_000:
        raise ConfigError(f"{where}.weight", weight, "must be a finite number within ±1e6")


@dataclass(frozen=True)
class PreferLabel(Preference):
    """Prefer nodes whose label ``key`` equals ``value`` (or exists, if value is None):
    ``weight`` is added to their placement score."""

    key: str
    value: str | None = None
    weight: float = 10.0

    def __post_init__(self) -> None:
        _weight("PreferLabel", self.weight, False)

    def score(self, node: NodeInfo, view: Any) -> float:
        """``weight`` when the label matches, else 0."""
        if self.key not in node.labels:
            return 0.0
        return self.weight if self.value is None or node.labels[self.key] == self.value else 0.0


@dataclass(frozen=True)
class PreferNode(Preference):
    """Prefer node ``node``: ``weight`` is added to its placement score."""

    node: str
    weight: float = 10.0

    def __post_init__(self) -> None:
        validate_ident("node id", self.node)
        _weight("PreferNode", self.weight, False)

    def score(self, node: NodeInfo, view: Any) -> float:
        """``weight`` for that node, else 0."""
        return self.weight if node.node_id == self.node else 0.0


def _runs_active(view: Any, node: str, app: str) -> bool:
    rec = view.app_record(node, app)
    return rec is not None and rec.get("role") == "active"


@dataclass(frozen=True)
class WithApp(Preference):
    """Affinity: run where app ``app`` is active. Hard without ``weight`` (only nodes where it
    is active are eligible), else soft (``weight`` is added to such nodes' score)."""

    app: str
    weight: float | None = None

    def __post_init__(self) -> None:
        validate_ident("app", self.app)
        _weight("WithApp", self.weight, True)

    @property
    def needs_view(self) -> bool:
        """Hard (no weight): eligibility depends on where the other app is active."""
        return self.weight is None

    def admits(self, node: NodeInfo, view: Any) -> bool:
        """Hard: the other app is active on ``node``."""
        return self.weight is not None or _runs_active(view, node.node_id, self.app)

    def score(self, node: NodeInfo, view: Any) -> float:
        """Soft: ``weight`` where the other app is active."""
        if self.weight is None or not _runs_active(view, node.node_id, self.app):
            return 0.0
        return self.weight


@dataclass(frozen=True)
class AwayFromApp(Preference):
    """Anti-affinity: avoid nodes where app ``app`` is active. Hard without ``weight`` (such
    nodes are not eligible), else soft (``weight`` is subtracted from their score)."""

    app: str
    weight: float | None = None

    def __post_init__(self) -> None:
        validate_ident("app", self.app)
        _weight("AwayFromApp", self.weight, True)

    @property
    def needs_view(self) -> bool:
        """Hard (no weight): eligibility depends on where the other app is active."""
        return self.weight is None

    def admits(self, node: NodeInfo, view: Any) -> bool:
        """Hard: the other app is not active on ``node``."""
        return self.weight is not None or not _runs_active(view, node.node_id, self.app)

    def score(self, node: NodeInfo, view: Any) -> float:
        """Soft: minus ``weight`` where the other app is active."""
        if self.weight is None or not _runs_active(view, node.node_id, self.app):
            return 0.0
        return -self.weight


@dataclass(frozen=True)
class Budget:
    """A disruption budget: planned moves (drains, ``app move``) never take the app below it;
    they wait and say why. Give exactly one of ``min_available`` (active instances that must
    remain during a move) and ``max_unavailable`` (instances a move may take away at once,
    counted against the mode's slots). Failures are not planned: a crash can always go below.
    """

    min_available: int | None = None
    max_unavailable: int | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.min_available, self.max_unavailable) if v is not None]
        if len(given) != 1:
            raise ConfigError("Budget", (self.min_available, self.max_unavailable),
                              "give exactly one of min_available, max_unavailable")
        v = given[0]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError("Budget", v, "must be an int >= 0")

    def required(self, slots: int) -> int:
        """Active instances that must remain, for an app with ``slots`` instances wanted."""
        if self.min_available is not None:
            return self.min_available
        return max(0, slots - (self.max_unavailable or 0))


@dataclass(frozen=True)
class Rebalance:
    """An app's automatic rebalancing and migration limits, each overriding the platform's
    setting of the same meaning (None: the platform's).

    :ivar auto: move the active instance by itself when a live eligible node scores at least
        ``threshold`` more than this one (``auto_rebalance``; off by default).
    :ivar threshold: the hysteresis of automatic moves, in score points
        (``rebalance_threshold``).
    :ivar cooldown: seconds between two migrations of the app, whatever started them
        (``migration_cooldown``; an operator's ``app move --force`` skips it).
    :ivar windows: when automatic moves may run, e.g. ``("mon-fri 02:00-04:00",)`` in UTC
        (``maintenance_windows``; empty: any time).
    """

    auto: bool | None = None
    threshold: float | None = None
    cooldown: float | None = None
    windows: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "cooldown"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not math.isfinite(v) or v < 0):
                raise ConfigError(f"Rebalance {name}", v, "must be a number >= 0")
        if self.auto is not None and not isinstance(self.auto, bool):
            raise ConfigError("Rebalance auto", self.auto, "must be True or False")
        if self.windows is not None:
            from .migrations import parse_windows

            object.__setattr__(self, "windows", tuple(self.windows))
            parse_windows(self.windows)


STRATEGIES = ("spread", "binpack", "zone")


@dataclass(frozen=True)
class Strategy:
    """How an app's candidates are weighed beyond its preferences (default ``spread``).

    ``spread``: prefer nodes with fewer active instances (of any app); ``binpack``: prefer
    nodes with more; ``zone``: prefer nodes whose ``label`` value (default ``zone``) has fewer
    active instances of this app; any other name is looked up through
    ``pycluster_placement_strategy`` (a plugin's own).
    """

    name: str = "spread"
    label: str = "zone"

    def __post_init__(self) -> None:
        validate_ident("strategy", self.name)


@dataclass(frozen=True)
class Election:
    """Per-app election settings; unset fields inherit the platform's.

    :param lease_ttl: seconds a lease lives without renewal (crash failover is bounded by it).
    :param heartbeat_interval: seconds between renewals.
    :param priority: standby priority; a lower value defers its campaign while a higher-priority
        eligible node is alive.
    :param no_failover: this node never leads the app (e.g. a read-only DR standby).
    :param hook_timeout: seconds an ``on_active``/``on_passive`` hook or stage may take.
    :param cooldown: seconds a node that stepped down waits before campaigning again.
    """

    lease_ttl: float | None = None
    heartbeat_interval: float | None = None
    priority: int | None = None
    no_failover: bool | None = None
    hook_timeout: float | None = None
    cooldown: float | None = None


def check_timing(lease_ttl: float, heartbeat_interval: float, where: str = "") -> None:
    """Validate a lease/heartbeat pair (server TTLs are whole seconds, minimum 1 s)."""
    p = f"{where}." if where else ""
    if not lease_ttl >= 1.0:
        raise ConfigError(f"{p}lease_ttl", lease_ttl, "must be at least 1 second (NATS minimum)")
    if not 0 < heartbeat_interval <= lease_ttl / 2:
        raise ConfigError(
            f"{p}heartbeat_interval",
            heartbeat_interval,
            f"must be > 0 and at most half the lease_ttl ({lease_ttl}) so a renewal can be retried",
        )
