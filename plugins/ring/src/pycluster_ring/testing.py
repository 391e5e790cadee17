"""The node program's ``--setup`` hook for ring tests, and the external witness's check.

``python -m pycluster.testing.node --mode spread --setup pycluster_ring.testing:setup
--setup-arg partitions=16 [--setup-arg settle=0.5 --setup-arg release_timeout=2]`` gives the
test node a `Ring` option and hooks that record ownership from inside the owner: while it holds
a partition, the node appends ``{"p", "epoch", "t"}`` lines to
``{state_dir}/{node}.ring.jsonl`` every 20 ms (``t``: the wall-clock time at which it checked
that it still holds the partition; ``--setup-arg witness=0`` leaves these out), plus
``own``/``release`` lines. A ``whoami`` API method
answers the owner of a key (refused with ``not_leader`` when this node does not own it);
``ping`` answers from any instance (a baseline for latency).
`check_witness` proves from these files that no partition ever had two owners at once and that
epochs increase per partition.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .options import Ring
from .plugin import ring_of
from .runtime import RingContext

if TYPE_CHECKING:
    from pycluster import App, Platform


def setup(ns: argparse.Namespace) -> list[object]:
    """``--setup`` hook: one `Ring` from ``--setup-arg`` values."""
    args: dict[str, str] = getattr(ns, "setup_args", {})
    return [Ring(
        partitions=int(args.get("partitions", "16")),
        settle=float(args.get("settle", "0.5")),
        release_timeout=float(args["release_timeout"]) if "release_timeout" in args else None,
    )]


def attach(app: App, platform: Platform, ns: argparse.Namespace) -> None:
    """Add the witness hooks and the ``whoami`` method to the node's app."""
    path = Path(ns.state_dir) / f"{ns.node_id}.ring.jsonl"
    fh = path.open("a", buffering=1)
    node = ns.node_id

    def write(**fields: Any) -> None:
        fields.setdefault("t", time.time())
        fields.setdefault("node", node)
        fields.setdefault("pid", os.getpid())
        fh.write(json.dumps(fields) + "\n")

    async def watch(p: int, epoch: int) -> None:
        m = ring_of(app)
        while True:
            t = time.time()
            if not m.holds(p, epoch):
                return
            write(event="hold", p=p, epoch=epoch, t=t)
            await asyncio.sleep(0.02)

    holds = getattr(ns, "setup_args", {}).get("witness", "1") != "0"

    @app.on_own
    async def own(ctx: RingContext) -> None:
        write(event="own", partitions=sorted(ctx.partitions), epoch=ctx.epoch)
        for p, e in ctx.epochs.items():
            if holds:
                asyncio.get_running_loop().create_task(watch(p, e))

    @app.on_release
    async def release(ctx: RingContext) -> None:
        write(event="release", partitions=sorted(ctx.partitions), lost=ctx.lost,
              reason=ctx.reason)

    @app.handle("whoami")
    async def whoami(key: str) -> dict[str, Any]:
        epoch = ring_of(app).require_owner(key)
        return {"node": node, "epoch": epoch}

    @app.handle("ping")
    async def ping(key: str) -> dict[str, Any]:
        return {"node": node}


def read_witness(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every line of every node's ring witness file."""
    out: list[dict[str, Any]] = []
    for f in sorted(Path(state_dir).glob("*.ring.jsonl")):
        for line in f.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line cut by SIGKILL
    return out


def check_witness(records: list[dict[str, Any]]) -> list[str]:
    """Violations: two owners of a partition at overlapping times, or an epoch that did not
    increase from one owner to the next. Empty when the ring kept its promise."""
    spans: dict[int, dict[tuple[str, int], list[float]]] = {}
    for r in records:
        if r.get("event") == "hold":
            spans.setdefault(int(r["p"]), {}).setdefault((r["node"], int(r["epoch"])),
                                                         []).append(float(r["t"]))
    bad: list[str] = []
    for p, by in sorted(spans.items()):
        ivs = sorted((min(ts), max(ts), n, e) for (n, e), ts in by.items())
        for a, b in itertools.pairwise(ivs):
            if a[1] >= b[0]:
                bad.append(f"partition {p}: {a[2]}@{a[3]} until {a[1]:.3f} overlaps "
                           f"{b[2]}@{b[3]} from {b[0]:.3f}")
            if a[3] >= b[3]:
                bad.append(f"partition {p}: epoch {a[3]} ({a[2]}) then {b[3]} ({b[2]})")
    return bad
