"""pycluster-ring: a keyspace split into a fixed number of partitions, each owned by exactly one
active instance of an app at a time, rebalanced as instances come and go.

``from pycluster_ring import Ring`` and pass ``Ring(partitions=64)`` to an ``App`` with
``Spread()`` or ``Replicas(n)``; ``@app.on_own`` / ``@app.on_release`` hooks get a
`RingContext` (``partitions``, ``epochs``); ``ring_of(app)`` answers ``owner(key)``,
``owns(key)``, ``partition(key)``, ... In a config file the section is ``ring:``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycluster.lazy import lazy_exports

if TYPE_CHECKING:
    from .assignment import key_partition, moves, rebalance
    from .options import Ring
    from .plugin import ring_of
    from .runtime import RingContext, RingMember, ring_bucket

# The public names are imported on first use (PEP 562): the command line imports this
# package for its command declarations only.
_EXPORTS: dict[str, str] = {
    "Ring": ".options",
    "RingContext": ".runtime",
    "RingMember": ".runtime",
    "key_partition": ".assignment",
    "moves": ".assignment",
    "rebalance": ".assignment",
    "ring_bucket": ".runtime",
    "ring_of": ".plugin",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())



__all__ = ["Ring", "RingContext", "RingMember", "key_partition", "moves", "rebalance",
           "ring_bucket", "ring_of"]
