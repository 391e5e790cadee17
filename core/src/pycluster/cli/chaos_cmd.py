"""``pycluster chaos``: seeded fault injection with an external check (`pycluster.testing.chaos`).

Starts a fresh 3-server NATS cluster (R3 buckets and streams), or uses the servers of a
``pycluster dev`` cluster, and node processes of a throwaway platform, runs the chaos workload
on them (lock-protected increments, linearizable reads, a witness of the active instance's
epochs), injects faults one after another, and reports what the checker found.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from ..kernel.errors import PyclusterError
from ..testing.chaos import FaultInjector, Report, run_chaos, run_workload

EXIT_OK, EXIT_VIOLATION, EXIT_ERROR, EXIT_NO_PROGRESS = 0, 1, 2, 3
DEV_KINDS = tuple(k for k in FaultInjector.KINDS if k != "partition")


def _text(summary: dict[str, Any], report: Report) -> str:
    def secs(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}s"

    lines = [
        f"seed {summary['seed']}: {summary['faults']} faults injected",
        f"increments: {summary['acked']} acknowledged, {summary['failed']} refused, "
        f"{summary['indeterminate']} indeterminate; final value {summary['final_value']}",
        f"reads: {summary['reads']}; witness acts: {summary['witness_acts']}",
        f"lost increments: {summary['lost']}",
        f"doubled increments: {summary['doubled']}",
        f"stale reads: {summary['stale_reads']}",
        f"split brain (acts with an older epoch after a newer one): {summary['split_brain']}",
        f"failovers: {summary['failovers']}  p50 {secs(summary['failover_p50'])}  "
        f"p90 {secs(summary['failover_p90'])}  p99 {secs(summary['failover_p99'])}  "
        f"max {secs(summary['failover_max'])}",
    ]
    for kind, st in summary["failover_by_kind"].items():
        lines.append(f"  {kind:<12} {st['count']:>4}  p50 {secs(st['p50'])}  max {secs(st['max'])}")
    violations = report.lost + report.doubled + report.stale_reads + report.split_brain
    for v in violations[:10]:
        lines.append(f"VIOLATION: {v}")
    lines.append("OK: no violation" if report.ok else f"FAIL: {len(violations)} violation(s)")
    return "\n".join(lines)


@click.command("chaos")
@click.option("--faults", type=click.IntRange(min=1), default=30, show_default=True,
              help="Faults to inject, one after another.")
@click.option("--seed", type=int, default=None,
              help="Seed of the fault sequence (default: random, printed; replay with it).")
@click.option("--nodes", type=click.IntRange(2, 9), default=3, show_default=True,
              help="Node processes.")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(FaultInjector.KINDS),
              help="Fault kinds to draw from (repeatable; default: all): partition (one NATS "
                   "server cut off), server_kill (a NATS server killed and restarted), "
                   "node_kill (SIGKILL, restart), node_pause (SIGSTOP past the lease, SIGCONT), "
                   "node_term (SIGTERM, restart).")
@click.option("--lease-ttl", type=click.FloatRange(min=1.0), default=1.0, show_default=True,
              help="The app's lease in seconds.")
@click.option("--heartbeat", type=click.FloatRange(min=0.05), default=0.25, show_default=True,
              help="The app's lease renewal interval in seconds.")
@click.option("--max-hold", type=click.FloatRange(min=0.1), default=None,
              help="Longest a fault is held in seconds (default 2.5 leases; a SIGSTOP always "
                   "lasts 1.2 to 2.5 leases).")
@click.option("--settle", type=click.FloatRange(min=0.0), default=1.0, show_default=True,
              help="Seconds of normal operation after each fault is undone.")
@click.option("--lock-ttl", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
              help="TTL of the workload's lock in seconds.")
@click.option("--unfenced", is_flag=True,
              help="Run a deliberately wrong workload (possibly stale read + unconditional put "
                   "under the lock) to see the checker catch it: expect exit code 1.")
@click.option("--dev", "dev_dir", type=click.Path(file_okay=False),
              help="Fault the nats-servers of the `pycluster dev up` cluster in this directory "
                   "instead of a fresh cluster (its buckets' replicas: 1, or 3 with "
                   "--nats-cluster); the workload nodes join it as a platform of their own. "
                   "No partitions there.")
@click.option("--workdir", type=click.Path(file_okay=False),
              help="Where logs and operation histories go (default: a temporary directory, "
                   "removed after a clean run, kept and printed otherwise).")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Report format (progress goes to stderr).")
def chaos_cmd(faults: int, seed: int | None, nodes: int, kinds: tuple[str, ...],
              lease_ttl: float, heartbeat: float, max_hold: float | None, settle: float,
              lock_ttl: float, unfenced: bool, dev_dir: str | None, workdir: str | None,
              output: str) -> None:
    """Inject seeded random faults into a throwaway cluster and check safety from outside.

    Runs on a fresh 3-server NATS cluster with R3 buckets (needs the nats-server binary that
    pycluster installs) and NODES node processes of a platform of its own; with --dev, on the
    nats-servers of a `pycluster dev up` cluster instead. It never touches another cluster.
    While faults are injected, every node runs lock-protected increments of
    one counter and linearizable reads, and the active instance reports (node, epoch) to a
    witness in this process. The report gives the faults injected, lost and doubled
    increments, stale reads, split brain (acts with an older epoch after a newer one) and
    failover time percentiles (last act before a fault to the first act of a newer epoch).

    \b
    Examples:
      pycluster chaos --faults 100 --seed 42
      pycluster chaos --faults 20 --kind node_pause --kind node_kill -o json
      pycluster chaos --unfenced --kind node_pause --lock-ttl 1   # must report violations
      pycluster dev up --nats-cluster && pycluster chaos --dev .pycluster-dev --faults 20

    \b
    Exit codes: 0 no violation; 1 a violation (lost or doubled increment, stale read, split
    brain); 2 the run could not be set up or failed; 3 the workload made no progress (nothing
    was checked).
    """
    if seed is None:
        import random

        seed = random.randrange(1 << 30)
    keep = workdir is not None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pycluster-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    target = f"the dev cluster in {dev_dir}" if dev_dir else "3 NATS servers (R3)"
    click.echo(f"chaos: seed {seed}, {faults} faults, {nodes} nodes, {target}, "
               f"workdir {work}", err=True)

    def progress(n: int, what: str) -> None:
        click.echo(f"fault {n + 1}/{faults}: {what}", err=True)

    common: dict[str, Any] = dict(
        faults=faults, seed=seed, nodes=nodes, lease_ttl=lease_ttl, heartbeat=heartbeat,
        settle=settle, on_fault=progress, pattern="unfenced" if unfenced else "fenced",
        max_hold=max_hold, lock_ttl=lock_ttl)
    try:
        if dev_dir is None:
            report = asyncio.run(run_chaos(work, kinds=kinds or FaultInjector.KINDS, **common))
        else:
            from .dev import DevServers, load_running

            if "partition" in kinds:
                raise ValueError("--kind partition: a dev cluster cannot be partitioned")
            root, state = load_running(Path(dev_dir))
            servers = DevServers(root, state)
            FaultInjector(None, None, seed, lease_ttl, kinds or DEV_KINDS, max_hold)
            report = asyncio.run(run_workload(
                servers, servers.urls, work, platform=f"{state['platform']}chaos{seed % 1000}",
                replicas=len(servers), kinds=kinds or DEV_KINDS, **common))
    except (PyclusterError, ValueError, RuntimeError, TimeoutError, OSError) as exc:
        click.echo(f"error: chaos run failed: {type(exc).__name__}: {exc} (logs in {work}; "
                   f"replay with --seed {seed})", err=True)
        sys.exit(EXIT_ERROR)
    summary = report.summary()
    if output == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(_text(summary, report))
    if not report.ok:
        click.echo(f"violations found: logs in {work}; replay with --seed {seed}", err=True)
        sys.exit(EXIT_VIOLATION)
    if report.acked == 0 or report.reads == 0 or report.acts == 0:
        click.echo(f"the workload made no progress (acknowledged {report.acked}, reads "
                   f"{report.reads}, witness acts {report.acts}): nothing was checked; logs "
                   f"in {work}", err=True)
        sys.exit(EXIT_NO_PROGRESS)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
