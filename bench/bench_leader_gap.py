"""Leader gap after faults, beside the raw NATS floor measured in the same round.

Run from the repository root::

    python bench/bench_leader_gap.py [--rounds 5] [--lease 1.0] [--heartbeat 0.25]

A 3-server NATS cluster (R3 buckets) and three node processes running one Singleton app whose
active instance reports to an external witness every 10 ms (`pycluster.testing.chaos.Witness`).
Scenarios, each ``--rounds`` times:

- ``node_kill``: SIGKILL of the active node;
- ``stream_leader_kill``: SIGKILL of the NATS server that leads the app's election stream;
- ``other_server_kill``: SIGKILL of a NATS server that does not lead it;
- ``stream_leader_partition``: the election stream leader's server cut off from the others.

The gap is the longest pause in the witness's record within 30 s after the fault (no instance
acting). The floor is the longest pause between successful raw compare-and-set writes (nats-py,
every 10 ms, a probe key in the same election bucket, a client that reconnects to any server)
in the same window: how long the bucket itself could not be written.

Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

import nats  # noqa: E402

from pycluster.kernel import natsutil as nu  # noqa: E402
from pycluster.testing import NatsCluster  # noqa: E402
from pycluster.testing.chaos import Witness  # noqa: E402
from pycluster.testing.nodes import NodeCluster  # noqa: E402

PLATFORM, APP = "gap", "svc"
BUCKET = f"{PLATFORM}_{APP}_election"


class Floor:
    """Raw CAS writes to a probe key of the election bucket; records successful write times."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.times: list[float] = []
        self.task: asyncio.Task[None] | None = None
        self.nc: nats.aio.client.Client | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.urls, max_reconnect_attempts=-1,
                                     reconnect_time_wait=0.05, connect_timeout=2)
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        seq = None
        while True:
            try:
                if seq is None:
                    last = await nu.last_msg(js, BUCKET, "bench-probe", direct=False)
                    seq = 0 if last is None else last.seq
                seq = await nu.cas_publish(js, BUCKET, "bench-probe", b"x", expected_seq=seq,
                                           timeout=0.5)
                self.times.append(time.monotonic())
            except Exception:
                seq = None
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.nc is not None:
            await self.nc.close()


def _max_pause(times: list[float], start: float, end: float) -> float:
    window = [t for t in times if start - 1 <= t <= end]
    if not window:
        return end - start
    pauses = [b - a for a, b in itertools.pairwise(window)]
    return max(pauses, default=0.0)


async def _stream_leader(cluster: NatsCluster, js: nats.js.JetStreamContext) -> int:
    while True:
        try:
            info = await js.stream_info(nu.kv_stream(BUCKET))
            if info.cluster and info.cluster.leader:
                return cluster.index_of(info.cluster.leader)
        except Exception:
            pass
        await asyncio.sleep(0.1)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lease", type=float, default=1.0)
    ap.add_argument("--heartbeat", type=float, default=0.25)
    ap.add_argument("--window", type=float, default=15.0, help="seconds observed after a fault")
    ns = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pycluster-bench-gap-"))
    results: dict[str, list[tuple[float, float]]] = {}
    async with NatsCluster(3, base_dir=work / "nats") as cluster:
        witness = Witness().start()
        nodes = NodeCluster(
            PLATFORM, cluster.urls, work, size=3, app=APP, lease_ttl=ns.lease,
            heartbeat=ns.heartbeat,
            extra_args=["--stream-replicas", "3", "--setup", "pycluster.testing.chaos:options",
                        "--setup-arg", f"witness={witness.path}",
                        "--setup-arg", "workload=witness", "--log-level", "WARNING"],
        )
        floor = Floor(cluster.urls)
        try:
            await nodes.start(timeout=60)
            await nodes.wait_for_leader(timeout=30)
            await floor.start()
            admin = await nats.connect(cluster.urls)
            js = admin.jetstream()
            scenarios = ["node_kill", "stream_leader_kill", "other_server_kill",
                         "stream_leader_partition"]
            for scenario in scenarios:
                for _ in range(ns.rounds):
                    leader = await nodes.wait_for_leader(timeout=60)
                    sl = await _stream_leader(cluster, js)
                    await asyncio.sleep(1.0)
                    t0 = time.monotonic()
                    if scenario == "node_kill":
                        nodes.kill(leader)
                    elif scenario == "stream_leader_kill":
                        cluster.kill(sl)
                    elif scenario == "other_server_kill":
                        cluster.kill((sl + 1) % 3)
                    else:
                        cluster.partition(sl)
                    await asyncio.sleep(ns.window)
                    end = time.monotonic()
                    gap = _max_pause([t for t, _, _ in witness.records], t0, end)
                    raw = _max_pause(floor.times, t0, end)
                    results.setdefault(scenario, []).append((gap, raw))
                    print(f"{scenario:24s} gap {gap * 1e3:7.0f} ms   floor {raw * 1e3:7.0f} ms",
                          flush=True)
                    # undo
                    if scenario == "node_kill":
                        await nodes.start_node(leader, timeout=60)
                    elif scenario == "stream_leader_kill":
                        await cluster.restart(sl, timeout=60)
                    elif scenario == "other_server_kill":
                        await cluster.restart((sl + 1) % 3, timeout=60)
                    else:
                        cluster.heal()
                    await asyncio.sleep(3.0)
            await admin.close()
        finally:
            await nodes.stop()  # first: node processes must never outlive the benchmark
            witness.stop()
            await floor.stop()
    print(f"\nlease {ns.lease}s, heartbeat {ns.heartbeat}s; median (min-max) over {ns.rounds}")
    for scenario, pairs in results.items():
        gaps, raws = [g for g, _ in pairs], [r for _, r in pairs]
        print(f"  {scenario:24s} leader gap {_spread(gaps)}   raw bucket write gap {_spread(raws)}")


def _spread(values: list[float]) -> str:
    return (f"{statistics.median(values) * 1e3:6.0f} ms "
            f"({min(values) * 1e3:.0f}-{max(values) * 1e3:.0f})")


if __name__ == "__main__":
    asyncio.run(main())
