"""Randomized fault injection with an external witness: a Jepsen-style check of pycluster.

Three parts, usable together (`run_chaos`) or alone:

- **Workload** (a ``--setup`` module of the node program, ``pycluster.testing.chaos:options``):
  every node runs lock-protected increments of one app KV key with the documented pattern
  (``async with app.lock(...)`` + ``app.kv.transform(..., lock=lock)``), linearizable reads of
  that key, and — while its Singleton instance is active — sends ``(node, epoch)`` to the
  witness every few milliseconds. Operations are logged to ``{state_dir}/{node}.ops.jsonl``
  with the system-wide monotonic clock, so logs of several processes on one machine compare.
- **Witness** (`Witness`): a Unix datagram socket in the checking process. Datagrams are queued
  in send order, so the arrival order is the order in which the active instances acted.
- **Checker** (`check`): from the logs, the witness and the final value read after healing:
  lost increments (two operations acknowledged with the same value — one overwrote the other —
  or an acknowledged value above the final one), doubled increments (more landed than were
  acknowledged or indeterminate),
  stale reads (a read returning less than a value acknowledged or read before it began) and
  split brain (a node acting with an older epoch after another node acted with a newer one).

Faults (`FaultInjector`, seeded): partition of a NATS server, NATS server kill and restart,
node SIGKILL and restart, node SIGSTOP past the lease and SIGCONT, node SIGTERM and restart.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import logging
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kernel.errors import LockLostError, LockTimeoutError, RevisionMismatchError
from ..kernel.natsutil import retry_transient

log = logging.getLogger(__name__)

COUNTER_KEY = "counter"
LOCK_NAME = "counter"
WITNESS_ENV = "PYCLUSTER_CHAOS_WITNESS"

# -- workload (runs inside node processes) ----------------------------------------------------


class _OpLog:
    def __init__(self, path: Path, node: str) -> None:
        self.fh = path.open("a", buffering=1)
        self.node = node
        self.pid = os.getpid()
        self.seq = 0

    def write(self, **fields: Any) -> None:
        fields["node"] = self.node
        fields["pid"] = self.pid
        self.fh.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def next_id(self) -> str:
        self.seq += 1
        return f"{self.node}:{self.pid}:{self.seq}"


def options(ns: argparse.Namespace) -> list[Any]:
    """``--setup`` entry: no extra App options (the workload attaches in `attach`)."""
    return []


def attach(app: Any, platform: Any, ns: argparse.Namespace) -> None:
    """``--setup`` hook: start the increment, read and witness loops once the node runs."""
    args = getattr(ns, "setup_args", {})
    lock_ttl = float(args.get("lock_ttl", 2.0))
    pause = float(args.get("op_pause", 0.01))
    witness = args.get("witness") or os.environ.get(WITNESS_ENV)
    # "fenced" (the documented pattern) or "unfenced" (possibly stale read + put under the
    # lock: what the checker must catch, to show that it can fail).
    pattern = args.get("pattern", "fenced")
    workload = args.get("workload", "all")  # "all", or "witness" (acts only, for benchmarks)
    ops = _OpLog(Path(ns.state_dir) / f"{ns.node_id}.ops.jsonl", ns.node_id)
    tasks: list[asyncio.Task[None]] = []

    async def increments() -> None:
        def inc(old: bytes | None) -> str:
            return str(int(old or b"0") + 1)

        while True:
            op = ops.next_id()
            t0 = time.monotonic()
            ops.write(type="invoke", op=op, f="incr", t=t0)
            try:
                async with app.lock(LOCK_NAME, ttl=lock_ttl) as lock:
                    if pattern == "unfenced":
                        value = inc(await app.kv.get(COUNTER_KEY, stale_ok=True))
                        await app.kv.put(COUNTER_KEY, value)
                    else:
                        value = (await app.kv.transform(COUNTER_KEY, inc, lock=lock)).value
                    ops.write(type="ok", op=op, f="incr", value=int(value),
                              t0=t0, t=time.monotonic())
            except (LockTimeoutError, RevisionMismatchError) as exc:
                ops.write(type="fail", op=op, f="incr", error=type(exc).__name__)
            except LockLostError as exc:
                # Raised by the check before a write (definite) or by the release after an
                # acknowledged one (already logged ok): nothing unknown either way.
                ops.write(type="fail", op=op, f="incr", error=type(exc).__name__)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # timeouts, connection loss: the write may have landed
                ops.write(type="info", op=op, f="incr", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
            await asyncio.sleep(pause)

    async def reads() -> None:
        while True:
            t0 = time.monotonic()
            try:
                raw = await app.kv.get(COUNTER_KEY, stale_ok=pattern == "unfenced")
                ops.write(type="read", value=int(raw or b"0"), t0=t0, t=time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.1)
            await asyncio.sleep(pause * 3)

    async def witness_loop() -> None:
        if not witness:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            while True:
                if app.is_active:
                    msg = json.dumps({"node": ns.node_id, "epoch": app.epoch, "pid": os.getpid()})
                    with contextlib.suppress(OSError):
                        sock.sendto(msg.encode(), witness)
                await asyncio.sleep(0.01)
        finally:
            sock.close()

    async def _start(ctx: Any) -> None:
        loops = (witness_loop,) if workload == "witness" else (increments, reads, witness_loop)
        for fn in loops:
            tasks.append(asyncio.create_task(fn()))

    async def _stop(ctx: Any) -> None:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    app.on_start(_start)
    app.on_stop(_stop)


# -- witness (runs in the checking process) ---------------------------------------------------


class Witness:
    """Receives ``(node, epoch)`` datagrams from active instances, in the order they acted."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = str(path or Path(tempfile.mkdtemp(prefix="pycluster-witness-")) / "w.sock")
        self.records: list[tuple[float, str, int]] = []  # (arrival, node, epoch)
        self._sock: socket.socket | None = None

    def start(self) -> Witness:
        """Bind the socket and start receiving on the running event loop."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(self.path)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._drain)
        return self

    def _drain(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            with contextlib.suppress(ValueError, KeyError, TypeError):
                rec = json.loads(data)
                self.records.append((time.monotonic(), str(rec["node"]), int(rec["epoch"])))

    def stop(self) -> None:
        """Stop receiving and remove the socket file."""
        if self._sock is not None:
            self._drain()
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def gaps(self, threshold: float = 0.1) -> list[float]:
        """Pauses longer than ``threshold`` s between acts: the periods without a leader."""
        times = [t for t, _, _ in self.records]
        return [b - a for a, b in itertools.pairwise(times) if b - a > threshold]

    def violations(self) -> list[str]:
        """Acts with an older epoch after another node acted with a newer one (split brain)."""
        bad = []
        top_epoch, top_node = -1, ""
        for t, node, epoch in self.records:
            if epoch > top_epoch:
                top_epoch, top_node = epoch, node
            elif epoch < top_epoch and node != top_node:
                bad.append(f"{node} acted with epoch {epoch} after {top_node} acted with "
                           f"{top_epoch} (t={t:.3f})")
        return bad


# -- checker -----------------------------------------------------------------------------------


@dataclass
class Report:
    """Outcome of a chaos run; `ok` is False on any safety violation."""

    faults: list[str] = field(default_factory=list)
    acked: int = 0
    failed: int = 0
    indeterminate: int = 0
    reads: int = 0
    final_value: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    stale_reads: list[str] = field(default_factory=list)
    split_brain: list[str] = field(default_factory=list)
    acts: int = 0
    """Acts the witness received from active instances."""
    leader_gaps: list[float] = field(default_factory=list)
    """Pauses in the witness's record of acts (no leader acting), in seconds."""
    failovers: list[tuple[str, float]] = field(default_factory=list)
    """``(fault kind, seconds)`` for each fault across which a newer epoch took over: from the
    last act before the fault to the first act with a newer epoch (`failover_times`)."""
    seed: int | None = None

    @property
    def ok(self) -> bool:
        """No lost or doubled increment, no stale read, no split brain."""
        return not (self.lost or self.doubled or self.stale_reads or self.split_brain)

    def summary(self) -> dict[str, Any]:
        """Counts (and the first few violations) as a JSON-able dict."""
        gaps = sorted(self.leader_gaps)

        def pct(p: float) -> float | None:
            return round(gaps[min(len(gaps) - 1, int(p * len(gaps)))], 3) if gaps else None

        fo = sorted(t for _, t in self.failovers)

        def fo_pct(p: float) -> float | None:  # nearest rank
            return round(fo[max(0, math.ceil(p * len(fo)) - 1)], 3) if fo else None

        by_kind: dict[str, list[float]] = {}
        for kind, t in self.failovers:
            by_kind.setdefault(kind, []).append(t)
        return {
            "ok": self.ok, "seed": self.seed, "faults": len(self.faults), "acked": self.acked,
            "failed": self.failed, "indeterminate": self.indeterminate, "reads": self.reads,
            "final_value": self.final_value, "lost": len(self.lost),
            "doubled": len(self.doubled), "stale_reads": len(self.stale_reads),
            "split_brain": len(self.split_brain), "witness_acts": self.acts,
            "leader_gap_p50": pct(0.5), "leader_gap_p99": pct(0.99),
            "leader_gap_max": round(gaps[-1], 3) if gaps else None,
            "failovers": len(fo), "failover_p50": fo_pct(0.5), "failover_p90": fo_pct(0.9),
            "failover_p99": fo_pct(0.99), "failover_max": round(fo[-1], 3) if fo else None,
            "failover_by_kind": {k: {"count": len(v),
                                     "p50": round(sorted(v)[math.ceil(len(v) / 2) - 1], 3),
                                     "max": round(max(v), 3)}
                                 for k, v in sorted(by_kind.items())},
            "examples": (self.lost + self.doubled + self.stale_reads + self.split_brain)[:5],
        }


def _load_ops(state_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(state_dir.glob("*.ops.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def check(state_dir: str | Path, final_value: int, witness: Witness | None = None) -> Report:
    """Check the operation logs of a run against ``final_value`` (read after healing)."""
    ops = _load_ops(Path(state_dir))
    report = Report(final_value=final_value)
    invoked: set[str] = set()
    done: dict[str, str] = {}
    writes: list[tuple[float, float, int, str]] = []  # (start, end, value, op)
    reads: list[tuple[float, float, int]] = []
    for o in ops:
        kind = o.get("type")
        if kind == "invoke":
            invoked.add(o["op"])
        elif kind in ("ok", "fail", "info"):
            done[o["op"]] = kind
            if kind == "ok":
                writes.append((o["t0"], o["t"], int(o["value"]), o["op"]))
        elif kind == "read":
            reads.append((o["t0"], o["t"], int(o["value"])))
    report.acked = sum(1 for k in done.values() if k == "ok")
    report.failed = sum(1 for k in done.values() if k == "fail")
    report.indeterminate = sum(1 for k in done.values() if k == "info") + len(invoked - set(done))
    report.reads = len(reads)
    # Each landed increment wrote a distinct value 1..final (compare-and-set from n to n+1).
    by_value: dict[int, list[str]] = {}
    for _, _, value, op in writes:
        by_value.setdefault(value, []).append(op)
    for value, op_ids in sorted(by_value.items()):
        if len(op_ids) > 1:
            # Two increments acknowledged with the same value: one overwrote the other.
            report.lost.append(f"value {value} acknowledged to {len(op_ids)} ops {op_ids}: "
                               f"{len(op_ids) - 1} increment(s) overwritten")
        if value > final_value:
            report.lost.append(f"value {value} ({op_ids[0]}) acknowledged, final is {final_value}")
    landed_unacked = final_value - len(by_value)
    if landed_unacked > report.indeterminate:
        report.doubled.append(
            f"{landed_unacked} increments landed without an acknowledgement but only "
            f"{report.indeterminate} were indeterminate (applied twice)"
        )
    # Linearizable reads: never less than a value acknowledged or read before the read began.
    events = sorted([(end, value) for _, end, value, _ in writes] + [(e, v) for _, e, v in reads])
    ends = [e for e, _ in events]
    best: list[int] = []
    top = 0
    for _, value in events:
        top = max(top, value)
        best.append(top)
    for start, end, value in reads:
        i = bisect.bisect_left(ends, start) - 1
        if i >= 0 and best[i] > value:
            report.stale_reads.append(
                f"read {value} during [{start:.3f}, {end:.3f}] after {best[i]} was known"
            )
    if witness is not None:
        report.split_brain = witness.violations()
        report.acts = len(witness.records)
    return report


def failover_times(records: list[tuple[float, str, int]],
                   faults: list[tuple[float, str]]) -> list[tuple[str, float]]:
    """Failover time per fault, from the witness's records ``(arrival, node, epoch)``.

    ``faults`` are ``(start, kind)`` in start order (the same clock as the records). A fault
    caused a failover when an act with a newer epoch than the last act before its start arrives
    before the next fault starts; its failover time runs from that last act to the first act
    with the newer epoch (the time no instance acted). Faults that left the leader in place
    yield nothing.
    """
    times = [t for t, _, _ in records]
    out: list[tuple[str, float]] = []
    for i, (start, kind) in enumerate(faults):
        end = faults[i + 1][0] if i + 1 < len(faults) else float("inf")
        j = bisect.bisect_left(times, start)
        if j == 0:
            continue  # nothing acted before this fault
        last_t, _, epoch = records[j - 1]
        for t, _, e in records[j:]:
            if t >= end:
                break
            if e > epoch:
                out.append((kind, t - last_t))
                break
    return out


# -- faults ------------------------------------------------------------------------------------


class FaultInjector:
    """Seeded random faults on a `NatsCluster` and a `NodeCluster`; each call injects one.

    :param lease: the apps' lease (a SIGSTOP lasts longer than it).
    :param max_hold: the longest a fault other than a SIGSTOP is held (default 2.5 leases);
        each is held a random time between 0.5 s (or ``max_hold`` if smaller) and this.
    """

    KINDS = ("partition", "server_kill", "node_kill", "node_pause", "node_term")

    def __init__(self, nats: Any, nodes: Any, seed: int, lease: float,
                 kinds: tuple[str, ...] = KINDS, max_hold: float | None = None) -> None:
        unknown = set(kinds) - set(self.KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds must be among {', '.join(self.KINDS)}, "
                             f"got {', '.join(sorted(unknown)) or 'none'}")
        self.nats = nats
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.lease = lease
        self.kinds = kinds
        self.max_hold = 2.5 * lease if max_hold is None else max_hold
        self.log: list[str] = []
        self.starts: list[tuple[float, str]] = []
        """``(monotonic start, kind)`` of each fault, for `failover_times`."""

    async def inject(self) -> str:
        """Inject one fault, hold it, undo it; return its description."""
        kind = self.rng.choice(self.kinds)
        hold = self.rng.uniform(min(0.5, self.max_hold), self.max_hold)
        self.starts.append((time.monotonic(), kind))
        if kind in ("partition", "server_kill"):
            i = self.rng.randrange(len(self.nats))
            what = f"{kind} server {i} for {hold:.1f}s"
            if kind == "partition":
                self.nats.partition(i)
                await asyncio.sleep(hold)
                self.nats.heal()
            else:
                self.nats.kill(i)
                await asyncio.sleep(hold)
                await self.nats.restart(i, timeout=60)
        else:
            node = self.rng.choice(sorted(self.nodes.nodes))
            what = f"{kind} {node}"
            if kind == "node_kill":
                self.nodes.kill(node)
                await asyncio.sleep(hold)
                await self.nodes.start_node(node, timeout=60)
            elif kind == "node_pause":
                hold = self.lease * self.rng.uniform(1.2, 2.5)
                what += f" for {hold:.1f}s"
                self.nodes.pause(node)
                await asyncio.sleep(hold)
                self.nodes.resume(node)
            else:
                await self.nodes.terminate(node, timeout=30)
                await asyncio.sleep(hold)
                await self.nodes.start_node(node, timeout=60)
        self.log.append(what)
        return what


async def run_chaos(
    workdir: str | Path,
    *,
    faults: int = 30,
    seed: int | None = None,
    nodes: int = 3,
    lease_ttl: float = 1.0,
    heartbeat: float = 0.25,
    settle: float = 1.0,
    on_fault: Callable[[int, str], None] | None = None,
    pattern: str = "fenced",
    kinds: tuple[str, ...] = FaultInjector.KINDS,
    max_hold: float | None = None,
    lock_ttl: float = 2.0,
) -> Report:
    """Run the whole check on a fresh 3-server NATS cluster (R3 buckets) and ``nodes`` nodes.

    Injects ``faults`` faults one after another (each held, undone, then ``settle`` seconds of
    normal operation), heals everything, stops the nodes gracefully, reads the final counter
    (linearizable) and returns the `Report`. ``pattern="unfenced"`` runs the workload with a
    possibly stale read and an unconditional put under the lock, which the checker must catch.
    ``max_hold`` bounds how long a fault is held (`FaultInjector`); ``lock_ttl`` is the
    workload's lock TTL. The report's ``seed`` replays the same faults.
    """
    from .servers import NatsCluster

    seed = random.randrange(1 << 30) if seed is None else seed
    FaultInjector(None, None, seed, lease_ttl, kinds, max_hold)  # bad kinds: fail before starting
    async with NatsCluster(3, base_dir=Path(workdir) / "nats") as cluster:
        return await run_workload(
            cluster, cluster.urls, workdir, platform=f"chaos{seed % 100000}", replicas=3,
            faults=faults, seed=seed, nodes=nodes, lease_ttl=lease_ttl, heartbeat=heartbeat,
            settle=settle, on_fault=on_fault, pattern=pattern, kinds=kinds,
            max_hold=max_hold, lock_ttl=lock_ttl)


async def run_workload(
    servers: Any,
    urls: list[str],
    workdir: str | Path,
    *,
    platform: str,
    replicas: int,
    faults: int,
    seed: int,
    nodes: int = 3,
    lease_ttl: float = 1.0,
    heartbeat: float = 0.25,
    settle: float = 1.0,
    on_fault: Callable[[int, str], None] | None = None,
    pattern: str = "fenced",
    kinds: tuple[str, ...] = FaultInjector.KINDS,
    max_hold: float | None = None,
    lock_ttl: float = 2.0,
) -> Report:
    """The check of `run_chaos` on NATS servers that already run: ``servers`` is what
    `FaultInjector` faults (``kill(i)``, ``restart(i, timeout)``, ``partition(i)``, ``heal()``,
    ``len()``: a `NatsCluster`, or the servers of a ``pycluster dev`` cluster), ``urls`` their
    client URLs; ``nodes`` workload node processes of ``platform`` (buckets with ``replicas``
    replicas) are started under ``workdir`` and stopped at the end."""
    import nats as nats_py

    from ..kernel.kv import AppKV
    from .nodes import NodeCluster

    workdir = Path(workdir)
    witness = Witness()  # a short path of its own: Unix socket paths are limited to 107 bytes
    witness.start()
    cluster_nodes = NodeCluster(
        platform, urls, workdir, size=nodes, app="svc", lease_ttl=lease_ttl,
        heartbeat=heartbeat,
        extra_args=["--stream-replicas", str(replicas), "--act-interval", "0.02",
                    "--setup", "pycluster.testing.chaos:options",
                    "--setup-arg", f"witness={witness.path}",
                    "--setup-arg", f"pattern={pattern}",
                    "--setup-arg", f"lock_ttl={lock_ttl}", "--log-level", "WARNING"],
    )
    report = Report()
    try:
        await cluster_nodes.start(timeout=60)
        await cluster_nodes.wait_for_leader(timeout=30)
        injector = FaultInjector(servers, cluster_nodes, seed, lease_ttl, kinds, max_hold)
        for n in range(faults):
            what = await injector.inject()
            if on_fault is not None:
                on_fault(n, what)
            with contextlib.suppress(Exception):
                await cluster_nodes.wait_for_leader(timeout=30)
            await asyncio.sleep(settle)
        servers.heal()
        await asyncio.sleep(settle)
        report.faults = injector.log
        report.failovers = failover_times(witness.records, injector.starts)
    finally:
        await cluster_nodes.stop()
        witness.stop()
    nc = await nats_py.connect(urls, connect_timeout=5)
    try:
        kv = AppKV(nc.jetstream(), f"{platform}_svc", timeout=10)
        # Right after the heal the bucket's stream may still be electing its leader (a loaded
        # machine): retried, since the final value is what everything is checked against.
        # (ReadNotConfirmedError is a TimeoutError, so retry_transient retries it too.)
        raw = await retry_transient(lambda: kv.get(COUNTER_KEY), wait=60.0)
    finally:
        await nc.close()
    result = check(workdir / "state", int(raw or b"0"), witness)
    result.faults, result.leader_gaps = report.faults, witness.gaps()
    result.failovers, result.seed = report.failovers, seed
    return result
