"""Jepsen-style fault injection on a 3-server NATS cluster with R3 buckets (see
`pycluster.testing.chaos`): lock-protected increments with the documented pattern, linearizable
reads and an external witness of the active instance's epochs, under randomized partitions,
NATS server kills, node SIGKILL/SIGSTOP/SIGTERM. Zero lost or doubled increments, zero stale
reads, zero split brain.

``PYCLUSTER_CHAOS_FAULTS`` (default 30) and ``PYCLUSTER_CHAOS_SEED`` (default: random, printed)
tune the run; a failure prints the seed to replay it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from pycluster.testing.chaos import run_chaos

FAULTS = int(os.environ.get("PYCLUSTER_CHAOS_FAULTS", "30"))


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_no_lost_update_stale_read_or_split_brain_under_faults(tmp_path: Path) -> None:
    seed = int(os.environ.get("PYCLUSTER_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed}, {FAULTS} faults")
    report = await run_chaos(
        tmp_path, faults=FAULTS, seed=seed,
        on_fault=lambda n, what: print(f"fault {n + 1}: {what}", flush=True),
    )
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    assert len(report.faults) == FAULTS
    assert report.acked > 0 and report.reads > 0, "the workload made no progress"
    assert report.ok, f"seed {seed}: {summary}"
