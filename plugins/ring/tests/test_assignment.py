"""The ring's pure logic: hashing, quotas, minimal-move balanced assignment (no NATS needed)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pycluster_ring.assignment import key_partition, moves, quotas, rebalance


def test_key_partition_is_stable_and_spreads() -> None:
    assert key_partition("order-42", 64) == key_partition(b"order-42", 64)
    assert key_partition("order-42", 64) == key_partition("order-42", 64)
    counts = Counter(key_partition(f"k{i}", 16) for i in range(16000))
    assert set(counts) == set(range(16))
    assert max(counts.values()) < 1.15 * 1000  # within 15 % of even


def test_quotas_sum_and_weights() -> None:
    assert quotas({"a": 1, "b": 1, "c": 1}, 64) == {"a": 22, "b": 21, "c": 21}
    assert sum(quotas({"a": 1, "b": 2, "c": 3.5}, 100).values()) == 100
    q = quotas({"a": 1, "b": 3}, 64)
    assert q == {"a": 16, "b": 48}
    assert quotas({"a": 0, "b": -1}, 8) == {}
    assert quotas({"a": 1, "b": 0}, 8) == {"a": 8}


def _assign(nodes: list[str], p: int = 64) -> dict[int, str]:
    return rebalance({}, {n: 1.0 for n in nodes}, p)


def test_balanced_and_complete() -> None:
    a = _assign(["n1", "n2", "n3"])
    assert sorted(a) == list(range(64))
    assert sorted(Counter(a.values()).values()) == [21, 21, 22]
    assert rebalance({}, {}, 64) == {}


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_join_moves_the_minimum(n: int) -> None:
    p = 64
    nodes = [f"n{i}" for i in range(n)]
    before = _assign(nodes, p)
    after = rebalance(before, {x: 1.0 for x in [*nodes, "new"]}, p)
    # Minimum possible: the newcomer's quota; nobody else moves.
    assert moves(before, after) == Counter(after.values())["new"] == quotas(
        {x: 1.0 for x in [*nodes, "new"]}, p)["new"]
    assert all(after[q] == before[q] for q in after if after[q] != "new")


@pytest.mark.parametrize("n", [3, 4, 9])
def test_leave_moves_only_the_leavers_partitions(n: int) -> None:
    p = 64
    nodes = [f"n{i}" for i in range(n)]
    before = _assign(nodes, p)
    gone = nodes[1]
    after = rebalance(before, {x: 1.0 for x in nodes if x != gone}, p)
    moved = {q for q in after if after[q] != before[q]}
    assert moved == {q for q, owner in before.items() if owner == gone}
    assert sorted(Counter(after.values()).values())[-1] - sorted(
        Counter(after.values()).values())[0] <= 1


def test_deterministic_regardless_of_input_order() -> None:
    nodes = [f"n{i}" for i in range(6)]
    rng = random.Random(3)
    current = {q: rng.choice([*nodes, None]) for q in range(50)}  # type: ignore[list-item]
    shuffled = dict(sorted(current.items(), key=lambda kv: rng.random()))
    weights = {n: 1.0 for n in nodes}
    rev = dict(reversed(list(weights.items())))
    assert rebalance(current, weights, 50) == rebalance(shuffled, rev, 50)


def test_repeated_rebalance_is_a_fixed_point() -> None:
    a = _assign(["a", "b", "c", "d"], 37)
    assert rebalance(a, {n: 1.0 for n in "abcd"}, 37) == a


def test_random_churn_stays_balanced_and_minimal() -> None:
    rng = random.Random(11)
    p = 128
    live = {f"n{i}" for i in range(5)}
    current: dict[int, str] = rebalance({}, {n: 1.0 for n in live}, p)
    for step in range(60):
        if len(live) > 1 and rng.random() < 0.5:
            live.discard(rng.choice(sorted(live)))
        else:
            live.add(f"m{step}")
        weights = {n: 1.0 for n in live}
        nxt = rebalance(current, weights, p)
        q = quotas(weights, p)
        # minimal: partitions kept by owners still live, up to their quota
        keepable = sum(min(q[n], sum(1 for o in current.values() if o == n)) for n in live)
        assert moves(current, nxt) == p - keepable
        assert Counter(nxt.values()) == Counter({n: c for n, c in q.items() if c})
        current = nxt
