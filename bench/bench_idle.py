"""Idle CPU and memory of node processes, beside raw nats-py clients that only keep their
connection (the floor), measured in the same run from outside: ``/proc/<pid>/stat``.

Run from the repository root (needs the ``nats-server`` binary: ``$PYCLUSTER_NATS_SERVER``, the
venv's ``bin/nats-server`` or ``PATH``)::

    python bench/bench_idle.py [--nodes 3 9 30] [--lease 10 1] [--window 30] [--runs 3]

For each lease (``--lease``, seconds; the heartbeat keeps the default ratio, 3 s at the default
10 s lease) and each cluster size (``--nodes``), it starts that many node processes (one
`Platform` each with every default plugin, one Singleton app), waits until every node sees all
the others and the app has a leader, lets it settle, then reads the CPU time (user + system) of
every node process over ``--window`` seconds. Three raw nats-py client processes (connect, then
nothing) run during every window: their CPU is the floor of a Python process holding a NATS
connection (its PINGs, the event loop). Printed per size: CPU per node in % of one core (the
mean over the nodes; median of the ``--runs`` windows with min..max), the busiest node (the
leader), the floor, the nats-server's own CPU, and the node's RSS; with the load average.

Target: <= 0.3 % of a core per node at the default lease. Numbers, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

TICK = os.sysconf("SC_CLK_TCK")


def _nats_server() -> str:
    for path in (os.environ.get("PYCLUSTER_NATS_SERVER"),
                 str(Path(sys.executable).parent / "nats-server"), shutil.which("nats-server")):
        if path and os.access(path, os.X_OK):
            return path
    sys.exit("nats-server not found: set PYCLUSTER_NATS_SERVER")


def _cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


# -- child processes -----------------------------------------------------------------------


async def _node(url: str, platform: str, node_id: str, lease: float, size: int) -> None:
    from pycluster import App, Platform, Singleton

    app = App("idle", Singleton())
    p = Platform(platform, node_id=node_id, nats_url=url, lease_ttl=lease,
                 heartbeat_interval=lease * 0.3)
    p.register(app)
    await p.start()
    assert p.membership is not None
    while len(p.membership.members) < size:
        await asyncio.sleep(0.2)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def _floor(url: str) -> None:
    import nats

    await nats.connect(url)
    print("ready", flush=True)
    await asyncio.Event().wait()


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "core" / "src"), env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


def _wait_ready(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        assert p.stdout is not None
        while True:
            if time.monotonic() > deadline or p.poll() is not None:
                sys.exit("a child process did not get ready")
            line = p.stdout.readline()
            if line.strip() == "ready":
                break


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- the benchmark ------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, nargs="+", default=[3, 9, 30])
    ap.add_argument("--lease", type=float, nargs="+", default=[10.0, 1.0])
    ap.add_argument("--window", type=float, default=30.0, help="seconds measured per run")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds before measuring")
    ap.add_argument("--runs", type=int, default=3, help="windows per size")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        kind, url, *rest = args.worker
        if kind == "node":
            asyncio.run(_node(url, rest[0], rest[1], float(rest[2]), int(rest[3])))
        else:
            asyncio.run(_floor(url))
        return

    data_dir = tempfile.mkdtemp(prefix="pycluster-bench-idle-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"nats://127.0.0.1:{port}"
    server = subprocess.Popen(
        [_nats_server(), "-js", "-sd", data_dir, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    floor: list[subprocess.Popen[str]] = []
    try:
        time.sleep(0.5)
        floor = [_spawn("--worker", "floor", url) for _ in range(3)]
        _wait_ready(floor, 60)
        print(f"idle CPU per process, % of one core; {args.runs} windows of {args.window:.0f} s "
              "each (median (min..max)); python "
              f"{sys.version.split()[0]}, {os.cpu_count()} cores, loopback")
        print(f"{'lease':>6} {'nodes':>5} {'per node':>20} {'busiest':>7} {'floor':>18} "
              f"{'server':>7} {'RSS MB':>7}  load")
        for lease in args.lease:
            for size in args.nodes:
                name = f"idle{int(lease * 1000)}n{size}x{os.getpid()}"
                nodes = [_spawn("--worker", "node", url, name, f"n{i}", str(lease), str(size))
                         for i in range(size)]
                try:
                    _wait_ready(nodes, 60 + 5 * size)
                    time.sleep(args.settle)
                    per_node, busiest, floors, servers, loads = [], [], [], [], []
                    for _ in range(args.runs):
                        loads.append(_load())
                        pids = [p.pid for p in nodes]
                        fpids = [p.pid for p in floor]
                        c0 = {pid: _cpu(pid) for pid in (*pids, *fpids, server.pid)}
                        t0 = time.monotonic()
                        time.sleep(args.window)
                        elapsed = time.monotonic() - t0
                        c1 = {pid: _cpu(pid) for pid in c0}
                        pct = {pid: 100 * (c1[pid] - c0[pid]) / elapsed for pid in c0}
                        per_node.append(statistics.fmean(pct[p] for p in pids))
                        busiest.append(max(pct[p] for p in pids))
                        floors.append(statistics.fmean(pct[p] for p in fpids))
                        servers.append(pct[server.pid])
                    rss = statistics.median(_rss_mb(p.pid) for p in nodes)
                finally:
                    _stop(nodes)

                def fmt(xs: list[float]) -> str:
                    return f"{statistics.median(xs):.3f} ({min(xs):.3f}..{max(xs):.3f})"

                print(f"{lease:>5g}s {size:>5} {fmt(per_node):>20} "
                      f"{statistics.median(busiest):>6.2f} {fmt(floors):>18} "
                      f"{statistics.median(servers):>6.2f} {rss:>7.0f}  {' '.join(loads)}",
                      flush=True)
        print("per node: mean over the node processes; busiest: the node with the most CPU "
              "(the leader); floor: a raw nats-py client holding its connection; server: the "
              "nats-server; target <= 0.3 % per node at the default lease (10 s)")
    finally:
        _stop(floor)
        server.send_signal(signal.SIGTERM)
        server.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
