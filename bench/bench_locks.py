"""Benchmark of `pycluster.kernel.locks` against the raw nats-py floor, on a nats-server it starts
itself.

Run from the repository root (needs the ``nats-server`` binary: ``$PYCLUSTER_NATS_SERVER``, the
venv's ``bin/nats-server`` or ``PATH``)::

    python bench/bench_locks.py [--iterations 1000] [--runs 5] [--procs 4] [--increments 500]

It prints, all measured in the same run on loopback (``--runs`` rounds, the variants
interleaved in each so the noise of a shared machine spreads evenly; medians over the rounds
with their spread, min..max, and the load average at each round):

1. the floor: the raw compare-and-set pair a lock needs, on one connection: one conditional
   publish to acquire (``Nats-Expected-Last-Subject-Sequence`` = the key's last revision,
   ``Nats-TTL``) and one conditional delete publish (``KV-Operation: DEL`` against the acquire's
   revision): two round trips, nothing else;
2. the naive nats-py pair ``kv.create(key)`` + ``kv.delete(key, last=rev)`` (for comparison with
   older figures: ``kv.create`` of an existing deleted key reads it first);
3. the bare `LockService` ``acquire()`` + ``release()``;
4. ``app.lock()`` on a started `Platform` with every default plugin on (audit, metrics, tracing,
   ...): the figure users get; target p50 within 1.2x of the floor (1). The floor and (2), (3)
   publish with nats-py's ``JetStreamContext.publish``; the platform's context is
   `pycluster.kernel.connection.LeanJetStream` (the same messages, a cheaper wait for the
   acknowledgement);
5. contended: ``--procs`` processes each doing ``--increments`` get+put increments of a KV
   counter under the lock: throughput, wait p50/p99 (target: p99 < 4x p50) and an exact
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
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "core" / "src"))

import nats  # noqa: E402
import nats.js.errors  # noqa: E402
from nats.aio.client import Client  # noqa: E402

from pycluster import App, Platform, Spread  # noqa: E402
from pycluster.kernel import natsutil  # noqa: E402
from pycluster.kernel.kv import AppKV  # noqa: E402
from pycluster.kernel.locks import LockService  # noqa: E402
from pycluster.plugins import DEFAULT_PLUGINS, create_plugin_manager  # noqa: E402

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


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


PairFn = Callable[[], Awaitable[None]]


async def _cas_floor(url: str) -> tuple[PairFn, Callable[[], Awaitable[None]]]:
    """The raw CAS pair: conditional publish + conditional delete, one round trip each."""
    nc = await _connect(url)
    js = nc.jetstream()
    subject = f"$KV.{LOCKS}.floor_cas"
    last = (await js.publish(subject, b"", headers={"KV-Operation": "DEL"})).seq

    async def pair() -> None:
        nonlocal last
        ack = await js.publish(subject, b'{"holder":"bench"}', headers={
            "Nats-Expected-Last-Subject-Sequence": str(last), "Nats-TTL": "10s"})
        last = (await js.publish(subject, b"", headers={
            "KV-Operation": "DEL", "Nats-Expected-Last-Subject-Sequence": str(ack.seq)})).seq

    return pair, nc.close


async def _kv_floor(url: str) -> tuple[PairFn, Callable[[], Awaitable[None]]]:
    nc = await _connect(url)
    kv = await nc.jetstream().key_value(LOCKS)
    run = os.urandom(4).hex()
    count = 0

    async def pair() -> None:
        nonlocal count
        count += 1
        key = f"floor_{run}_{count}"  # a fresh key: create is one round trip (no tombstone)
        rev = await kv.create(key, b"1")
        await kv.delete(key, last=rev)

    return pair, nc.close


async def _bare(url: str) -> tuple[PairFn, Callable[[], Awaitable[None]]]:
    nc = await _connect(url)
    svc = LockService(nc.jetstream(), LOCKS, "bench")
    lock = svc.lock("uncontended", ttl=10)

    async def pair() -> None:
        await lock.acquire()
        await lock.release()

    async def close() -> None:
        await svc.close()
        await nc.close()

    return pair, close


async def _app_lock(url: str) -> tuple[PairFn, Callable[[], Awaitable[None]]]:
    """``app.lock()`` on a started platform with every default plugin (audit included: its
    entries are flushed, i.e. stored, before the platform stops)."""
    app = App("bench", Spread())
    platform = Platform("benchlocks", node_id="n1", nats_url=url,
                        plugin_manager=create_plugin_manager(load_entrypoints=False))
    platform.register(app)
    await platform.start()
    lock = app.lock("uncontended", ttl=10)

    async def pair() -> None:
        await lock.acquire()
        await lock.release()

    async def close() -> None:
        await platform.audit.flush(30)
        stats = platform.audit.stats()
        enabled = ", ".join(n for n in DEFAULT_PLUGINS if platform.pm.get_plugin(n) is not None)
        print(f"plugins on: {enabled}; audit entries written {stats['written']}, dropped "
              f"{stats['dropped']}")
        await platform.stop()

    return pair, close


async def _measure(pairs: dict[str, PairFn], iterations: int, warmup: int,
                   chunk: int = 50) -> dict[str, list[float]]:
    """Run the variants interleaved in chunks of ``chunk`` pairs (a burst of load on the
    machine then hits every variant alike); warm-up pairs are not recorded."""
    samples: dict[str, list[float]] = {k: [] for k in pairs}
    for fn in pairs.values():
        for _ in range(warmup):
            await fn()
    done = 0
    while done < iterations:
        n = min(chunk, iterations - done)
        for k, fn in pairs.items():
            out = samples[k]
            for _ in range(n):
                started = time.perf_counter()
                await fn()
                out.append(time.perf_counter() - started)
        done += n
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
    labels = {
        "cas": "floor: raw CAS pair (publish + DEL)",
        "kv": "nats-py kv.create + kv.delete(last=)",
        "bare": "LockService acquire()+release()",
        "app": "app.lock() acquire()+release()",
    }
    made = {"cas": await _cas_floor(url), "kv": await _kv_floor(url), "bare": await _bare(url),
            "app": await _app_lock(url)}
    per_run: dict[str, list[tuple[float, float]]] = {k: [] for k in labels}
    loads = []
    for run in range(args.runs):
        loads.append(_load())
        results = await _measure({k: m[0] for k, m in made.items()}, args.iterations,
                                 warmup if run == 0 else 0)
        for k, v in results.items():
            per_run[k].append((_pct(v, 50), _pct(v, 99)))
        f50 = per_run["cas"][-1][0]
        print(f"run {run + 1}/{args.runs} (load {loads[-1]}): p50 ms "
              + "  ".join(f"{k} {_ms(per_run[k][-1][0]).strip()}" for k in labels)
              + f"  | app/floor {per_run['app'][-1][0] / f50:.2f}x", flush=True)
    for _, close in made.values():
        await close()

    def spread(k: str, q: int) -> str:
        xs = [r[q] for r in per_run[k]]
        return f"{_ms(statistics.median(xs))} ({_ms(min(xs)).strip()}..{_ms(max(xs)).strip()})"

    print(f"\nUncontended, {args.runs} runs x {args.iterations} iterations, variants "
          f"interleaved every 50 (ms per pair; median of the runs' p50/p99 (min..max); load "
          f"{' '.join(loads)})")
    print(f"{'':38} {'p50':>22} {'p99':>22}  ratio p50 to floor")
    for k, label in labels.items():
        ratios = [r[0] / f[0] for r, f in zip(per_run[k], per_run["cas"], strict=True)]
        print(f"{label:38} {spread(k, 0):>22} {spread(k, 1):>22}  "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}..{max(ratios):.2f})")
    print("target: app.lock() p50 <= 1.2x the floor")
    contended = await _contended(url, "pycluster", args.procs, args.increments)
    naive = await _contended(url, "naive", args.procs, args.increments)

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
    print(f"(target for pycluster: wait p99 < 4x p50; times in ms; load {_load()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
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
