"""pycluster-ring: a keyspace split into a fixed number of partitions, each owned by exactly one
active instance of an app at a time, rebalanced as instances come and go.

``from pycluster_ring import Ring`` and pass ``Ring(partitions=64)`` to an ``App`` with
``Spread()`` or ``Replicas(n)``; ``@app.on_own`` / ``@app.on_release`` hooks get a
`RingContext` (``partitions``, ``epochs``); ``ring_of(app)`` answers ``owner(key)``,
``owns(key)``, ``partition(key)``, ... In a config file the section is ``ring:``.
"""

from .assignment import key_partition, moves, rebalance
from .options import Ring
from .plugin import ring_of
from .runtime import RingContext, RingMember, ring_bucket

__all__ = ["Ring", "RingContext", "RingMember", "key_partition", "moves", "rebalance",
           "ring_bucket", "ring_of"]
