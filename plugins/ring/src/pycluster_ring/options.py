"""The `Ring` option: what an app declares to split a keyspace into owned partitions."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pycluster.kernel.errors import ConfigError

WEIGHT_LABEL = "ring.weight"
"""Default node label holding a node's weight in the ring (a positive number; default 1)."""


@dataclass(frozen=True)
class Ring:
    """Split the app's keyspace into ``partitions`` partitions, each owned by exactly one
    active instance at a time, rebalanced as instances come and go.

    Use with `pycluster.Spread` (every eligible node is an instance) or `pycluster.Replicas`
    (the ``n`` active instances share the partitions); with `pycluster.Singleton` it is refused.

    :param partitions: the fixed number of partitions (1..65536).
    :param own_timeout: seconds an ``on_own`` run may take (default: the app's hook timeout);
        one that fails or overruns gives the partitions back and backs off.
    :param release_timeout: seconds an ``on_release`` run may take (default: the app's hook
        timeout); when it passes the node stops acting for the partitions and gives them up
        anyway.
    :param settle: seconds the set of members (and their weights) must stay unchanged before
        the coordinator moves partitions to a joining node (a flapping node does not churn the
        ring). Nodes that leave or crash are rebalanced without it.
    :param min_interval: minimum seconds between two published assignments (rate limit).
    :param weight_label: the node label read as the node's weight.
    """

    partitions: int = 64
    own_timeout: float | None = None
    release_timeout: float | None = None
    settle: float = 1.0
    min_interval: float = 0.5
    weight_label: str = WEIGHT_LABEL

    def __post_init__(self) -> None:
        if isinstance(self.partitions, bool) or not isinstance(self.partitions, int) or not (
                1 <= self.partitions <= 65536):
            raise ConfigError("Ring.partitions", self.partitions, "must be an int in 1..65536")
        for name in ("own_timeout", "release_timeout"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ConfigError(f"Ring.{name}", v, "must be a positive number of seconds")
        for name in ("settle", "min_interval"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"Ring.{name}", v, "must be >= 0 seconds")
