"""Benchmark of `pycluster.kernel.locks` against the raw nats-py floor, on a nats-server it starts
itself.

Run from the repository root (needs the ``nats-server`` binary: ``$PYCLUSTER_NATS_SERVER``, the
venv's ``bin/nats-server`` or ``PATH``)::

    python bench/bench_locks.py [--iterations 1000] [--procs 4] [--increments 500]

It prints, all measured in the same run on loopback:

1. the floor: a raw nats-py KV compare-and-set pair, ``kv.create(key)`` + ``kv.delete(key,
   last=rev)``, p50/p99;
2. pycluster uncontended ``acquire()`` + ``release()`` p50/p99 and the ratio to the floor
   (target: within 1.2x);
3. contended: ``--procs`` processes each doing ``--increments`` get+put increments of a KV
   counter under the lock: throughput, wait p50/p99 (target: p99 < 10x p50) and an exact
   counter check; the same workload with a naive create/delete lock (watch for the delete, then
   retry) as the baseline that lets the releaser win again and again.

Numbers, not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

import nats  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from pycluster.kernel import natsutil  # noqa: E402
from pycluster.kernel.kv import AppKV  # noqa: E402
from pycluster.kernel.locks import LockService  # noqa: E402

LOCKS = "bench_locks"
NAIVE = "bench_naive"
DATA = "bench_data"


def _nats_server() -> str:
    candidates = [
        os.environ.get("PYCLUSTER_NATS_SERVER"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    sys.exit("nats-server not found: set PYCLUSTER_NATS_SERVER")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.3f}"


async def _quiet(_exc: Exception) -> None:
    pass


async def _connect(url: str) -> Client:
    return await nats.connect(url, error_cb=_quiet)


# -- workers (separate processes) --------------------------------------------------------------


async def _worker(url: str, kind: str, ident: int, increments: int) -> None:
    """Increment the shared counter ``increments`` times under a lock; print one JSON line."""
    nc = await _connect(url)
    js = nc.jetstream()
    data = AppKV(js, DATA)
    key = f"counter_{kind}"
    waits: list[float] = []
    if kind == "pycluster":
        svc = LockService(js, LOCKS, f"proc-{ident}")
        for _ in range(increments):
            lock = svc.lock("contended", ttl=10)
            started = time.perf_counter()
            await lock.acquire()
            waits.append(time.perf_counter() - started)
            value = int(await data.get(key) or b"0")
            await data.put(key, str(value + 1))
            await lock.release()
        await svc.close()
    else:
        kv = await js.key_value(NAIVE)
        watcher = await kv.watch("contended")
        for _ in range(increments):
            started = time.perf_counter()
            while True:
                try:
                    rev = await kv.create("contended", b"1")
                    break
                except nats.js.errors.KeyWrongLastSequenceError:
                    # Held: wait for the next change (the delete), then try again.
                    try:
                        await watcher.updates(timeout=0.05)
                    except nats.errors.TimeoutError:
                        pass
            waits.append(time.perf_counter() - started)
            value = int(await data.get(key) or b"0")
            await data.put(key, str(value + 1))
            await kv.delete("contended", last=rev)
        await watcher.stop()
    print(json.dumps({"waits": waits}), flush=True)
    await nc.close()


# -- the benchmark -----------------------------------------------------------------------------


async def _floor(url: str, iterations: int, warmup: int) -> list[float]:
    nc = await _connect(url)
    kv = await nc.jetstream().key_value(LOCKS)
    samples = []
    for i in range(warmup + iterations):
        key = f"floor_{i}"  # a fresh key: create is one round trip (no tombstone to read)
        started = time.perf_counter()
        rev = await kv.create(key, b"1")
        await kv.delete(key, last=rev)
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    await nc.close()
    return samples


async def _uncontended(url: str, iterations: int, warmup: int) -> list[float]:
    nc = await _connect(url)
    svc = LockService(nc.jetstream(), LOCKS, "bench")
    lock = svc.lock("uncontended", ttl=10)
    samples = []
    for i in range(warmup + iterations):
        started = time.perf_counter()
        await lock.acquire()
        await lock.release()
        if i >= warmup:
            samples.append(time.perf_counter() - started)
    await svc.close()
    await nc.close()
    return samples


async def _contended(url: str, kind: str, procs: int, increments: int) -> dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "core" / "src"), env.get("PYTHONPATH")) if p
    )
    started = time.perf_counter()
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--worker",
            kind,
            "--url",
            url,
            "--ident",
            str(i),
            "--increments",
            str(increments),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for i in range(procs)
    ]
    outputs = await asyncio.gather(*(c.communicate() for c in children))
    elapsed = time.perf_counter() - started
    if any(c.returncode for c in children):
        sys.exit(f"a {kind} worker failed")
    waits = [w for out, _ in outputs for w in json.loads(out.decode().splitlines()[-1])["waits"]]
    nc = await _connect(url)
    counter = int(await AppKV(nc.jetstream(), DATA).get(f"counter_{kind}") or b"0")
    await nc.close()
    return {
        "throughput": len(waits) / elapsed,
        "p50": _pct(waits, 50),
        "p99": _pct(waits, 99),
        "max": max(waits),
        "counter": counter,
        "expected": procs * increments,
    }


async def _bench(url: str, args: argparse.Namespace) -> None:
    deadline = time.monotonic() + 15
    while True:  # the server is ready when JetStream answers
        try:
            nc = await nats.connect(url, allow_reconnect=False, error_cb=_quiet)
            await nc.jetstream().account_info()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    js = nc.jetstream()
    for bucket in (LOCKS, NAIVE):  # same bucket type for the floor and the locks
        await natsutil.ensure_kv(js, bucket, history=1, marker_ttl=1)
    await AppKV(js, DATA).ensure()
    await nc.close()

    warmup = max(50, args.iterations // 10)
    floor = await _floor(url, args.iterations, warmup)
    ours = await _uncontended(url, args.iterations, warmup)
    contended = await _contended(url, "pycluster", args.procs, args.increments)
    naive = await _contended(url, "naive", args.procs, args.increments)

    f50, f99, o50, o99 = (_pct(floor, 50), _pct(floor, 99), _pct(ours, 50), _pct(ours, 99))
    print(f"\nUncontended, {args.iterations} iterations (ms per pair)")
    print(f"{'':40} {'p50':>8} {'p99':>8} {'mean':>8}")
    print(
        f"{'floor: nats-py kv.create + kv.delete(last=)':40} {_ms(f50)} {_ms(f99)} "
        f"{_ms(statistics.fmean(floor))}"
    )
    print(
        f"{'pycluster acquire() + release()':40} {_ms(o50)} {_ms(o99)} "
        f"{_ms(statistics.fmean(ours))}"
    )
    print(f"{'ratio (target <= 1.2x)':40} {o50 / f50:7.2f}x {o99 / f99:7.2f}x")

    print(
        f"\nContended: {args.procs} processes x {args.increments} increments (get+put under "
        "the lock)"
    )
    print(
        f"{'':28} {'acq/s':>8} {'wait p50':>9} {'wait p99':>9} {'p99/p50':>8} {'max':>9} "
        f"{'counter':>12}"
    )
    for label, r in (("pycluster (FIFO handoff)", contended), ("naive create/delete", naive)):
        check = "ok" if r["counter"] == r["expected"] else "WRONG"
        print(
            f"{label:28} {r['throughput']:8.0f} {_ms(r['p50'])}  {_ms(r['p99'])} "
            f"{r['p99'] / r['p50']:7.1f}x {_ms(r['max'])} "
            f"{int(r['counter']):>6}/{int(r['expected'])} {check}"
        )
    print("(target for pycluster: wait p99 < 10x p50; times in ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--increments", type=int, default=500)
    parser.add_argument("--worker", choices=["pycluster", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--ident", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker(args.url, args.worker, args.ident, args.increments))
        return
    data_dir = tempfile.mkdtemp(prefix="pycluster-bench-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [_nats_server(), "-js", "-sd", data_dir, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(_bench(f"nats://127.0.0.1:{port}", args))
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
