"""Helpers of the ring plugin's tests: app ``cache`` (Spread + Ring) with a witness that
records ownership from inside the owner, and the witness's check."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from pycluster import App, Spread
from pycluster_ring import Ring, RingContext, ring_of

Record = tuple[int, str, int, float]  # partition, node, epoch, time


@dataclass
class Witness:
    """Every owner appends (partition, node, epoch, time) every few ms while it holds the
    partition (checked through the ring itself, as an app would before each side effect)."""

    records: list[Record] = field(default_factory=list)
    owns: int = 0
    releases: int = 0

    def check(self) -> None:
        """No two owners of one partition at any moment; epochs increase per partition."""
        by_part: dict[int, dict[tuple[str, int], list[float]]] = {}
        for p, node, epoch, t in self.records:
            by_part.setdefault(p, {}).setdefault((node, epoch), []).append(t)
        for p, spans in by_part.items():
            ivs = sorted((min(ts), max(ts), node, epoch) for (node, epoch), ts in spans.items())
            for a, b in itertools.pairwise(ivs):
                assert a[1] < b[0], f"partition {p}: {a[2]}@{a[3]} overlaps {b[2]}@{b[3]}"
                assert a[3] < b[3], f"partition {p}: epoch {a[3]} then {b[3]}"


def ring_app(witness: Witness, ring: Ring, *, release_hang: bool = False) -> App:
    """App ``cache`` with a Ring and witness hooks."""
    app = App("cache", Spread(), ring)

    async def watch(p: int, epoch: int, node: str) -> None:
        m = ring_of(app)
        while m.holds(p, epoch):
            witness.records.append((p, node, epoch, time.time()))
            await asyncio.sleep(0.01)

    @app.on_own
    async def own(ctx: RingContext) -> None:
        witness.owns += 1
        for p, e in ctx.epochs.items():
            asyncio.get_running_loop().create_task(watch(p, e, ctx.node_id))

    @app.on_release
    async def release(ctx: RingContext) -> None:
        witness.releases += 1
        if release_hang and not ctx.lost:
            await asyncio.sleep(3600)

    @app.handle("whoami")
    async def whoami(key: str) -> dict[str, Any]:
        epoch = ring_of(app).require_owner(key)
        return {"node": ctx_node(app), "epoch": epoch}

    return app


def ctx_node(app: App) -> str:
    assert app.platform is not None
    return app.platform.node_id


