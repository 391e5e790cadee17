"""Probe nodes for ``scripts/validate-locks.sh`` and ``validate-api.sh``: in-process platforms
that join the cluster named by ``PYCLUSTER_CONFIG`` (its platform name, NATS URL, credentials,
TLS, replicas) under node ids ``vprobe-<pid>-<i>``, without HTTP endpoints, and leave at the end.

Prints one line with the figure; exits 1 on a violation.

    python scripts/validate_probe.py locks [--nodes 3] [--rounds 20]
    python scripts/validate_probe.py api [--calls 200]
    python scripts/validate_probe.py sqlite [--rows 20]

``sqlite`` runs two node processes of ``examples/sqlite`` (app ``validate_notes``) instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from pycluster import App, Platform, Spread
from pycluster.kernel.settings import load_settings


def probe(i: int, tmp: str, *apps: App) -> Platform:
    s = load_settings(os.environ["PYCLUSTER_CONFIG"])
    kw: dict[str, Any] = s.model_dump(exclude_none=True, exclude={
        "apps", "name", "node_id", "health_addr", "metrics_addr", "data_dir", "labels"})
    p = Platform(s.name, node_id=f"vprobe-{os.getpid()}-{i}", data_dir=f"{tmp}/{i}",
                 labels={"probe": "validate"}, **kw)
    for app in apps:
        p.register(app)
    return p


async def locks(nodes: int, rounds: int) -> int:
    """``nodes`` probes each add 1 ``rounds`` times under one platform lock; the counter lives
    in a fresh KV bucket and is read, then written after a pause (no compare-and-set: only the
    lock keeps two writers apart)."""
    with tempfile.TemporaryDirectory() as tmp:
        ps = [probe(i, tmp) for i in range(nodes)]
        for p in ps:
            await p.start()
        bucket = f"validate_locks_{os.getpid()}"
        try:
            assert ps[0].js is not None
            kv = await ps[0].js.create_key_value(bucket=bucket,
                                                 replicas=ps[0].settings.stream_replicas)
            await kv.put("n", b"0")
            name = f"validate-{os.getpid()}"

            async def worker(p: Platform) -> None:
                for _ in range(rounds):
                    async with p.lock(name, ttl=10):
                        value = int((await kv.get("n")).value or b"0")
                        await asyncio.sleep(0.005)
                        await kv.put("n", str(value + 1).encode())

            t = time.monotonic()
            await asyncio.gather(*(worker(p) for p in ps))
            took = time.monotonic() - t
            got = int((await kv.get("n")).value or b"0")
            await ps[0].js.delete_key_value(bucket)
        finally:
            for p in reversed(ps):
                await p.stop()
    want = nodes * rounds
    if got != want:
        print(f"counter {got}, expected {want}: {abs(want - got)} increment(s) "
              f"{'lost' if got < want else 'doubled'}")
        return 1
    print(f"{want} lock-protected increments from {nodes} nodes, none lost or doubled; "
          f"{want / took:.1f} hand-overs/s")
    return 0


async def api(calls: int) -> int:
    """A probe serves ``validate_api_<pid>.echo``; another calls it ``calls`` times."""
    app_name = f"validate_api_{os.getpid()}"
    server_app, client_app = App(app_name, Spread()), App(f"{app_name}_c", Spread())

    @server_app.handle("echo")
    async def echo(body: dict[str, Any]) -> dict[str, Any]:
        return {"n": body.get("n"), "node": server.node_id}

    with tempfile.TemporaryDirectory() as tmp:
        server, client = probe(0, tmp, server_app), probe(1, tmp, client_app)
        await server.start()
        await client.start()
        try:
            for _ in range(200):  # until the server's instance is active
                if server_app.is_active:
                    break
                await asyncio.sleep(0.05)
            bus = client.api(app_name, timeout=10)
            lat: list[float] = []
            bad = 0
            for n in range(calls):
                t = time.monotonic()
                res = await bus.call("echo", {"n": n})
                lat.append(time.monotonic() - t)
                bad += res != {"n": n, "node": server.node_id}
        finally:
            await client.stop()
            await server.stop()
    if bad:
        print(f"{bad} of {calls} calls answered wrongly")
        return 1
    q = statistics.quantiles(lat, n=100)
    print(f"{calls} calls over the API bus, p50 {q[49] * 1000:.1f} ms, "
          f"p99 {q[98] * 1000:.1f} ms")
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            doc: dict[str, Any] = json.loads(r.read())
            return doc
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _poll(fn: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    return None


def sqlite(rows: int) -> int:
    """Two nodes of examples/sqlite; ``rows`` synced inserts on the primary; SIGKILL it; every
    acknowledged row must be on the promoted standby."""
    example = Path(__file__).resolve().parents[1] / "examples" / "sqlite"
    s = load_settings(os.environ["PYCLUSTER_CONFIG"])
    base: dict[str, Any] = s.model_dump(mode="json", exclude_none=True, exclude={
        "apps", "node_id", "health_addr", "metrics_addr", "data_dir", "labels"})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    ports: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i in (1, 2):
                node = f"vsql-{os.getpid()}-{i}"
                cfg = Path(tmp) / f"{node}.yaml"
                cfg.write_text(yaml.safe_dump({**base, "node_id": node,
                                               "data_dir": f"{tmp}/{node}"}))
                cfg.chmod(0o600)
                ports[node] = _free_port()
                env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
                env.update(NOTES_CONFIG=str(cfg), NOTES_APP="validate_notes",
                           NOTES_PORT=str(ports[node]), NOTES_DB=f"{tmp}/{node}/notes.db")
                with (Path(tmp) / f"{node}.log").open("ab") as log:
                    procs[node] = subprocess.Popen(
                        [sys.executable, "-m", "pycluster.cli", "run", "app:platform"],
                        cwd=example, env=env, stdout=log, stderr=subprocess.STDOUT)

            def on(node: str, path: str) -> dict[str, Any] | None:
                return _get(f"http://127.0.0.1:{ports[node]}{path}")

            first = _poll(lambda: next((n for n in ports if on(n, "/notes")), None), 120)
            if first is None:
                print("no node of examples/sqlite became active within 120 s")
                return 1
            other = next(n for n in ports if n != first)
            log = Path(tmp) / f"{other}.log"
            if not _poll(lambda: f"{other}: standby" in log.read_text(errors="replace"), 60):
                print(f"{other} did not become a standby within 60 s")
                return 1
            acked = []
            for i in range(rows):
                res = on(first, f"/add?text=validate-{i}")
                if not res or not res.get("synced"):
                    print(f"insert {i} on the primary {first} failed: {res}")
                    return 1
                acked.append(res["id"])
            procs[first].send_signal(signal.SIGKILL)
            procs[first].wait()
            t = time.monotonic()
            after = _poll(lambda: on(other, "/notes"), 90)
            took = time.monotonic() - t
            if after is None:
                print(f"the standby {other} did not serve within 90 s of the SIGKILL")
                return 1
            ids = {r["id"] for r in after["notes"]}
            lost = sorted(set(acked) - ids)
            if lost:
                print(f"{len(lost)} of {rows} synced rows lost: {lost[:10]}")
                return 1
            print(f"{rows} synced rows, none lost across a SIGKILL of the primary; the "
                  f"promoted standby served {took:.2f} s after it")
            return 0
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lk = sub.add_parser("locks")
    lk.add_argument("--nodes", type=int, default=3)
    lk.add_argument("--rounds", type=int, default=20)
    ap_ = sub.add_parser("api")
    ap_.add_argument("--calls", type=int, default=200)
    sq = sub.add_parser("sqlite")
    sq.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    if args.cmd == "sqlite":
        return sqlite(args.rows)
    if args.cmd == "locks":
        return asyncio.run(locks(args.nodes, args.rounds))
    return asyncio.run(api(args.calls))


if __name__ == "__main__":
    sys.exit(main())
