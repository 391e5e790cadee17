"""Pure logic of the ring: key -> partition, and a balanced partition -> node assignment that
moves as few partitions as possible when nodes come and go.

Key -> partition: xxHash3 (64 bit) of the key's UTF-8 bytes modulo the partition count. xxHash is
a maintained, fast, well-distributed non-cryptographic hash with identical results on every
platform and Python version (Python's own ``hash()`` is salted per process, so it cannot be used).

Partition -> node (`rebalance`): the assignment is *sticky*. Each eligible node gets a quota
proportional to its weight (largest-remainder rounding, so quotas sum to the partition count and
differ by at most one between equal weights); a partition stays with its current owner while
that owner is eligible and within its quota; only the others move: the partitions of nodes that
left, and the surplus of nodes above their quota. That number is the minimum any balanced
assignment can achieve from the current one (about P/N partitions when one node joins N-1
others). Where a partition goes, and which partitions an over-full node gives up, is decided by
rendezvous (highest-random-weight) scores, so the outcome depends only on the inputs — every
coordinator computes the same assignment — and stays stable from one rebalance to the next.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import xxhash

__all__ = ["key_partition", "moves", "quotas", "rebalance", "score"]


def key_partition(key: str | bytes, partitions: int) -> int:
    """The partition (0..partitions-1) of ``key``: xxh3-64 of its UTF-8 bytes, modulo."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return xxhash.xxh3_64_intdigest(data) % partitions


def score(partition: int, node: str) -> int:
    """Rendezvous score of ``node`` for ``partition`` (higher: preferred)."""
    return xxhash.xxh3_64_intdigest(f"{partition}\x00{node}".encode())


def quotas(weights: Mapping[str, float], partitions: int) -> dict[str, int]:
    """How many partitions each node should own: proportional to its weight, summing to
    ``partitions`` (largest remainder; ties by node id, so the result is deterministic).

    Nodes with a weight <= 0 get nothing; with no positive weight at all, the result is empty.
    """
    live = {n: float(w) for n, w in weights.items() if w > 0 and math.isfinite(w)}
    total = sum(live.values())
    if not live or partitions <= 0:
        return {}
    exact = {n: partitions * w / total for n, w in live.items()}
    out = {n: math.floor(x) for n, x in exact.items()}
    left = partitions - sum(out.values())
    for n in sorted(live, key=lambda n: (-(exact[n] - out[n]), n))[:left]:
        out[n] += 1
    return out


def rebalance(
    current: Mapping[int, str | None],
    weights: Mapping[str, float],
    partitions: int,
) -> dict[int, str]:
    """The new owner of every partition, moving the fewest partitions (see the module docs).

    :param current: partition -> current owner (None or missing: unowned).
    :param weights: eligible node -> weight (> 0); nodes not listed own nothing.
    :param partitions: the partition count.
    :returns: partition -> node for every partition, or an empty dict when no node is eligible.
    """
    quota = quotas(weights, partitions)
    if not quota:
        return {}
    kept: dict[str, list[int]] = {n: [] for n in quota}
    free: list[int] = []
    for p in range(partitions):
        owner = current.get(p)
        if owner in kept:
            kept[owner].append(p)
        else:
            free.append(p)
    # An over-full node keeps the partitions it scores highest on, gives up the rest.
    for node, owned in kept.items():
        if len(owned) > quota[node]:
            owned.sort(key=lambda p: score(p, node), reverse=True)
            free.extend(owned[quota[node]:])
            del owned[quota[node]:]
    # Each freed partition goes to the node with room that scores highest on it. Handing out
    # the most contested partitions first keeps the result independent of iteration order.
    room = {n: quota[n] - len(kept[n]) for n in quota}
    out = {p: n for n, owned in kept.items() for p in owned}
    for p in sorted(free):
        candidates = [n for n, r in room.items() if r > 0]
        best = max(candidates, key=lambda n: (score(p, n), n))
        out[p] = best
        room[best] -= 1
    return out


def moves(before: Mapping[int, str | None], after: Mapping[int, str]) -> int:
    """How many partitions change owner (an unowned partition that gets one counts too)."""
    return sum(1 for p, n in after.items() if before.get(p) != n)
