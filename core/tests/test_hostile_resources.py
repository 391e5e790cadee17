"""A hostile (or buggy) client on the bus or the network, against real nats-servers.

Each test performs the attack from outside — a raw nats-py client, raw TCP sockets, a cut in
the NATS cluster — and checks that the node keeps working, or recovers within a stated bound:

* random RPC method names do not grow the metrics registry, and a large ``/metrics`` scrape
  does not stall the event loop (the lease holder keeps its lease);
* a request flood is refused (``overloaded``) or dropped on the flooded subscriptions, never by
  losing the lease; legitimate calls work again afterwards;
* a node whose NATS server is cut off from its cluster moves its control connection to another
  server and campaigns again;
* held-open HTTP connections cannot lock probes out of the health server nor exhaust the
  node's file descriptors;
* a client that knows a call's request id cannot cancel somebody else's call.

Measured numbers are printed as ``MEASURED {...}`` lines (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from pycluster import App, OnNodes, Platform, RemoteError, Request, Singleton, ToNode
from pycluster import httpserver as httpserver_mod
from pycluster.builtin.rpc.service import rpc_service
from pycluster.builtin.rpc.wire import H_CALL, OVERLOADED
from pycluster.kernel.names import app_subject, platform_subject
from pycluster.plugins import create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = pytest.mark.timeout(120)


def measured(**numbers: Any) -> None:
    """Print numbers for the record (``pytest -s``)."""
    print("MEASURED", json.dumps(numbers, default=str), flush=True)


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET /metrics: sample name -> [(labels, value)]."""
    status, body = await asyncio.to_thread(_get, url)
    assert status == 200
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, [])
               if all(lab.get(k) == want for k, want in labels.items()))


def _rpc_series(samples: dict[str, list[tuple[dict[str, str], float]]]) -> int:
    return sum(len(v) for name, v in samples.items() if name.startswith("pycluster_rpc_"))


async def _ask_in_waves(nc: Any, subjects: list[str], wave: int = 200) -> int:
    """Send one request per subject (with a reply inbox), ``wave`` at a time, waiting for all
    answers of a wave before the next; returns the number of answers."""
    inbox = nc.new_inbox()
    got = 0
    pending = asyncio.Event()
    want = 0

    async def on_reply(msg: Any) -> None:
        nonlocal got
        got += 1
        if got >= want:
            pending.set()

    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        for start in range(0, len(subjects), wave):
            chunk = subjects[start:start + wave]
            want += len(chunk)
            pending.clear()
            for i, subject in enumerate(chunk):
                await nc.publish(subject, b"{}", reply=inbox,
                                 headers={H_CALL: f"x{start + i}/t 5.0 attacker"})
            await nc.flush()
            await asyncio.wait_for(pending.wait(), 30)
    finally:
        await sub.unsubscribe()
    return got


# -- 1. metrics: bounded labels, scrapes off the loop ------------------------------------------


@pytest.mark.slow
async def test_random_method_names_do_not_grow_metrics(make_platform: Any, nats_url: str) -> None:
    app = App("svc", Singleton())

    @app.rpc.handler("echo")
    @app.handle("echo")
    async def echo(data: Any) -> Any:
        return data

    p = await make_platform("a", app, metrics_addr="127.0.0.1:0")
    assert await app.wait_for_leadership(15) and p.metrics.url
    nc = await nats.connect(nats_url)
    try:
        def subjects(n: int) -> list[str]:
            out = []
            for _ in range(n):
                m = "m" + secrets.token_hex(6)
                out.append(app_subject(p.name, "svc", "rpc", f"a.{m}"))
                out.append(platform_subject(p.name, "api", "svc", m))
            return out

        assert await _ask_in_waves(nc, subjects(100)) == 200
        first = await scrape(p.metrics.url)
        lines_first = _rpc_series(first)
        assert await _ask_in_waves(nc, subjects(2500)) == 5000
        after = await scrape(p.metrics.url)
    finally:
        await nc.close()
    lines_after = _rpc_series(after)
    methods = {lab["method"] for name in ("pycluster_rpc_duration_seconds_count",
                                          "pycluster_rpc_errors_total")
               for lab, _ in after.get(name, [])}
    measured(test="random_methods", requests=5200, series_lines_after_200=lines_first,
             series_lines_after_5200=lines_after, methods=sorted(methods))
    assert methods == {"unknown"}
    # 5200 requests under 5200 distinct names: all counted, under one series per kind of data.
    assert total(after, "pycluster_rpc_errors_total", app="svc", method="unknown",
                 side="server") == 5200
    assert lines_after == lines_first  # the RPC metrics did not grow with the names
    # A registered method keeps its own name.
    client = await make_platform("b")
    assert await client.api("svc").call("echo", 7) == 7
    m = await scrape(p.metrics.url)
    assert total(m, "pycluster_rpc_duration_seconds_count", app="svc", method="echo") == 1


@pytest.mark.slow
async def test_large_scrape_does_not_stall_the_loop(make_platform: Any) -> None:
    """A registry large enough to take a noticeable time to render: a scrape runs in a thread,
    so the event loop keeps ticking (and the lease holder keeps renewing) meanwhile."""
    app = App("svc", Singleton())
    p = await make_platform("a", app, metrics_addr="127.0.0.1:0", lease_ttl=2.0,
                            heartbeat_interval=0.5)
    assert await app.wait_for_leadership(15) and p.metrics.url
    big = Histogram("test_big_seconds", "A large metric.", ["k"], registry=p.metrics.registry)

    def populate() -> None:  # in a thread: metric updates are thread-safe
        for i in range(12_000):
            big.labels(str(i)).observe(0.01)

    await asyncio.to_thread(populate)
    assert await app.wait_for_leadership(15)
    epoch = app.epoch

    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    gaps.clear()
    t0 = time.perf_counter()
    status, body = await asyncio.to_thread(_get, p.metrics.url, 60)
    scrape_s = time.perf_counter() - t0
    stop.set()
    await ticker
    assert status == 200 and b"test_big_seconds_bucket" in body
    max_gap = max(gaps)
    # The loop kept running throughout the scrape (ticks all along, no gap near its length)
    # and the leader kept its lease.
    assert len(gaps) >= 3 and max_gap < scrape_s / 3, (max_gap, scrape_s)
    assert app.is_active and app.epoch == epoch
    # For the record: what rendering on the loop (the former way) blocks it for.
    t1 = time.perf_counter()
    p.metrics.render()
    on_loop = time.perf_counter() - t1
    measured(test="scrape_loop_lag", body_bytes=len(body), scrape_s=round(scrape_s, 3),
             max_loop_gap_ms=round(max_gap * 1000, 1), ticks=len(gaps),
             render_on_loop_blocks_s=round(on_loop, 3))


# -- 2. in-flight limit, request floods, the control connection --------------------------------


async def test_inflight_limit_refuses_at_once(make_platform: Any) -> None:
    release = asyncio.Event()
    started = 0
    app = App("svc", Singleton())

    @app.handle("hold")
    async def hold() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "done"

    @app.rpc.handler("whoami")
    async def whoami() -> str:
        return "a"

    p = await make_platform("a", app, max_inflight=3, metrics_addr="127.0.0.1:0")
    assert await app.wait_for_leadership(15) and p.metrics.url
    caller_app = App("svc", Singleton(), OnNodes("a"))  # registered on b, served only by a
    b = await make_platform("b", caller_app)
    api = b.api("svc", timeout=20)
    held = [asyncio.create_task(api.call("hold", route=ToNode("a"))) for _ in range(3)]
    await wait_for(lambda: started == 3, 10)
    for _ in range(2):
        with pytest.raises(RemoteError) as ei:
            await api.call("hold", route=ToNode("a"))
        assert ei.value.code == OVERLOADED and ei.value.node == "a"
        assert ei.value.details == {"limit": 3}
    assert started == 3  # the refused ones never reached the handler
    # Another kind of the same app has its own limit.
    assert await caller_app.rpc.call("a", "whoami") == "a"
    release.set()
    assert await asyncio.gather(*held) == ["done"] * 3
    assert await api.call("hold", route=ToNode("a")) == "done"
    m = await scrape(p.metrics.url)
    assert total(m, "pycluster_rpc_rejected_total", app="svc", reason=OVERLOADED) == 2


PUBLISH_N = r"""
import asyncio, sys
import nats

async def main() -> None:
    url, subject, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    nc = await nats.connect(url)
    for i in range(n):
        headers = {"Pc-Call": f"p{i}/0 5 x"}
        await nc.publish(subject, b'"x"', reply="nobody.listens", headers=headers)
    await nc.flush(timeout=30)
    await nc.close()

asyncio.run(main())
"""


async def test_a_backlog_beyond_the_pending_limit_is_dropped_and_counted(
    make_platform: Any, nats_url: str,
) -> None:
    """The node cannot read while 20,000 requests arrive (its event loop is blocked here, as by
    a long stall): when it reads again, what exceeds the subscription's pending limit is
    dropped on that subscription and counted; the node serves normally afterwards."""
    app = App("svc", Singleton())

    @app.handle("echo")
    async def echo(data: Any) -> Any:
        return data

    p = await make_platform("a", app, max_inflight=1, metrics_addr="127.0.0.1:0")
    assert await app.wait_for_leadership(15) and p.metrics.url
    subject = platform_subject(p.name, "api", "svc", "echo")
    # Synchronous on purpose: the event loop (and so the node) does not run meanwhile.
    done = subprocess.run(  # noqa: ASYNC221
        [sys.executable, "-c", PUBLISH_N, nats_url, subject, "20000"],
        capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    await wait_for(lambda: rpc_service(p).gate("svc", "api").dropped > 0, 20)
    client = await make_platform("b")
    assert await wait_for_call(client, 20, "echo", 5) == 5
    m = await scrape(p.metrics.url)
    dropped = total(m, "pycluster_slow_consumer_total", app="svc", kind="api")
    measured(test="backlog_dropped", sent=20000, dropped=dropped,
             refused=total(m, "pycluster_rpc_rejected_total", app="svc"))
    assert dropped == rpc_service(p).gate("svc", "api").dropped > 0


FLOOD = r"""
import asyncio, sys, time
import nats

async def main() -> None:
    url, seconds, subjects = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
    nc = await nats.connect(url, pending_size=32 * 1024 * 1024, max_reconnect_attempts=0)
    headers = {"Pc-Call": "flood/0 5.0 flooder"}
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(500):
            for subject in subjects:
                await nc.publish(subject, b'"x"', reply="flood.nobody", headers=headers)
                sent += 1
        await asyncio.sleep(0)
    elapsed = seconds
    await nc.flush(timeout=60)
    print(sent, round(sent / elapsed), flush=True)
    await nc.close()

asyncio.run(main())
"""


def _url_in_log(c: NodeCluster, node: str, what: str) -> str:
    log = c.nodes[node].log_path
    assert log is not None
    found = re.search(rf"{what} endpoints on (http://[0-9.]+:[0-9]+)", log.read_text())
    assert found, f"no {what} address in the log of {node}"
    return found.group(1)


def _role_events(c: NodeCluster, node: str) -> list[dict[str, Any]]:
    return [e for e in c.events(node) if e.get("event") == "role"]


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_request_flood_does_not_cost_the_lease(
    nats_url: str, unique_name: str, tmp_path: Path, make_platform: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYCLUSTER_HEALTH_ADDR", "127.0.0.1:0")  # /metrics is served there too
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=2, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--setup", "pycluster.testing.rpc_node:options"])
    try:
        await c.start()
        leader = await c.wait_for_leader(30)
        epoch = c.role(leader)[1]
        roles_before = len(_role_events(c, leader))
        metrics_url = _url_in_log(c, leader, "health") + "/metrics"
        client = await make_platform("client")
        assert (await client.api("svc").call("whoami"))["node"] == leader

        seconds = 8.0
        targets = [app_subject(unique_name, "svc", "rpc", "_leader.echo"),
                   platform_subject(unique_name, "api", "svc", "echo")]
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, nats_url, str(seconds), *targets,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        # During the flood: calls are answered or refused, never lost to a failover.
        during: dict[str, int] = {}
        flood_done = asyncio.ensure_future(flood.communicate())
        while not flood_done.done():
            try:
                await client.api("svc").call("whoami", timeout=2.0)
                during["ok"] = during.get("ok", 0) + 1
            except Exception as exc:
                key = getattr(exc, "code", None) or type(exc).__name__
                during[key] = during.get(key, 0) + 1
            await asyncio.sleep(0.2)
        out, err = await flood_done
        assert flood.returncode == 0, err.decode()[-2000:]
        sent, rate = (int(x) for x in out.split())

        # The leader never lost its lease: same epoch, no role change, nobody else active.
        await asyncio.sleep(1.0)
        assert c.role(leader) == ("active", epoch)
        assert len(_role_events(c, leader)) == roles_before
        assert c.active_nodes() == [leader]
        # Legitimate calls work again (within a few seconds of the flood's end).
        got = await wait_for_call(client, 20)
        assert got == {"node": leader, "active": True, "epoch": epoch}
        assert (await client.api("svc").call("echo", {"x": 1})) == {"x": 1}
        m = await scrape(metrics_url)
        rejected = total(m, "pycluster_rpc_rejected_total", app="svc", reason=OVERLOADED)
        dropped = total(m, "pycluster_slow_consumer_total", app="svc")
        reconnects = {lab["connection"] + ":" + lab["reason"]: v
                      for lab, v in m.get("pycluster_nats_reconnects_total", [])}
        measured(test="request_flood", seconds=seconds, sent=sent, rate_per_s=rate,
                 refused_overloaded=rejected, dropped_slow_consumer=dropped,
                 reconnects=reconnects, calls_during_flood=during, epoch=epoch)
        # What the leader did not serve was refused or dropped on the flooded subscriptions.
        assert rejected + dropped > 0
        assert not any(k.startswith("control:") for k in reconnects)
    finally:
        await c.stop()
    assert c.overlaps() == []


async def wait_for_call(client: Platform, timeout: float, method: str = "whoami",
                        payload: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await client.api("svc").call(method, payload, timeout=2.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_control_connection_leaves_a_cut_off_server(nats_cluster: Any,
                                                          unique_name: str) -> None:
    """The node's control connection is on server i (the first URL: nats-py keeps the pool
    order for the first connection only when told to, so the server is read back); server i is
    cut off from the cluster. Before, the node stayed there and could neither renew nor
    campaign until the heal; now the control connection moves within about a lease of failed
    writes, and the node wins the election again."""
    app = App("svc", Singleton())
    p = Platform(unique_name, node_id="a", nats_url=nats_cluster.urls, lease_ttl=2.0,
                 heartbeat_interval=0.5, stream_replicas=3, hook_timeout=5.0,
                 plugin_manager=create_plugin_manager(load_entrypoints=False))
    p.register(app)
    await p.start()
    try:
        assert await app.wait_for_leadership(60)
        ctl = p.nc_control
        assert ctl is not None and ctl.connected_url is not None
        cut = ctl.connected_url.netloc
        i = [u.split("//")[1] for u in nats_cluster.urls].index(cut)
        epoch = app.epoch
        assert epoch is not None and p.nc is not None and p.nc.connected_url is not None
        data_was_there = p.nc.connected_url.netloc == cut
        nats_cluster.partition(i)
        t0 = time.monotonic()
        await wait_for(lambda: not app.is_active, 10)
        fenced = time.monotonic() - t0
        await wait_for(lambda: ctl.is_connected and ctl.connected_url is not None
                       and ctl.connected_url.netloc != cut, 30)
        moved = time.monotonic() - t0
        await wait_for(lambda: app.is_active and (app.epoch or 0) > epoch, 60)
        leading = time.monotonic() - t0
        assert p.connections.watchdog is not None and p.connections.watchdog.moves >= 1
        # The data connection, if it was on the same server, moved along.
        data = p.nc
        assert data is not None
        if data_was_there:
            await wait_for(lambda: data.is_connected and data.connected_url is not None
                           and data.connected_url.netloc != cut, 10)
        measured(test="partition_control_moves", server=i, fenced_s=round(fenced, 2),
                 control_moved_s=round(moved, 2), leader_again_s=round(leading, 2),
                 data_was_there=data_was_there, epoch_before=epoch, epoch_after=app.epoch)
    finally:
        nats_cluster.heal()
        await p.stop()


# -- 3. the health HTTP server -----------------------------------------------------------------


def _idle_connections(host: str, port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=5)
        socks.append(s)
    return socks


@pytest.mark.slow
async def test_held_connections_do_not_lock_out_probes(make_platform: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpserver_mod, "HEADER_TIMEOUT", 0.5)
    p = await make_platform("a", App("svc", Singleton()), health_addr="127.0.0.1:0")
    server = p.health._server
    assert server is not None
    host, port = server.address
    socks = await asyncio.to_thread(_idle_connections, host, port, 200)
    try:
        await wait_for(lambda: server.evicted >= 200 - server.max_connections, 10)
        assert server.open_connections <= server.max_connections
        # A real probe is answered, repeatedly, while the idle ones are held.
        for _ in range(5):
            status, body = await asyncio.to_thread(_get, f"{server.url}/health")
            assert status in (200, 503) and b"checks" in body
        # Slowloris: a request head trickling in is cut off after HEADER_TIMEOUT.
        slow = socket.create_connection((host, port), timeout=5)
        slow.sendall(b"GET /health HTTP/1.1\r\n")

        def trickle() -> int:
            sent = 0
            try:
                for _ in range(100):
                    slow.sendall(b"X-Slow: 1\r\n")
                    sent += 1
                    time.sleep(0.1)
            except OSError:
                pass  # reset by the server
            return sent

        sent = await asyncio.to_thread(trickle)
        assert sent < 100, "the slow request head was never cut off"
        slow.close()
    finally:
        for s in socks:
            s.close()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_held_connections_do_not_break_an_activation(
    nats_url: str, unique_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A standby whose descriptor limit is 256 gets 400 connections held open against its
    health port; its descriptor count stays bounded, probes are answered, and when the leader
    leaves it activates (starting a process backend) normally."""
    monkeypatch.setenv("PYCLUSTER_HEALTH_ADDR", "127.0.0.1:0")
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=2, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--backend-cmd", "sleep 600", "--backend-grace", "1"])
    socks: list[socket.socket] = []
    try:
        await c.start()
        leader = await c.wait_for_leader(30)
        standby = next(n for n in c.nodes if n != leader)
        pid = c.nodes[standby].pid
        assert pid is not None
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
        url = _url_in_log(c, standby, "health")
        host, port = url.removeprefix("http://").rsplit(":", 1)
        before = _fd_count(pid)
        socks = await asyncio.to_thread(_idle_connections, host, int(port), 400)
        await asyncio.sleep(0.5)
        held = _fd_count(pid)
        status, _ = await asyncio.to_thread(_get, url + "/health")
        assert status in (200, 503)
        assert held <= before + httpserver_mod.MAX_CONNECTIONS + 8, (before, held)
        # The leader leaves: the standby activates (a backend process, NATS work) as usual.
        assert await c.terminate(leader) == 0
        new = await c.wait_for_leader(30, exclude=[leader])
        assert new == standby
        await asyncio.sleep(0.5)
        assert c.role(standby)[0] == "active"
        assert "Too many open files" not in c.log_tail(standby, 200)
        measured(test="held_http_connections", held=len(socks), fds_before=before,
                 fds_while_held=held, fds_after_activation=_fd_count(pid), limit=256)
    finally:
        for s in socks:
            s.close()
        await c.stop()
    assert c.overlaps() == []


# -- 4. cancellation is tied to the caller -----------------------------------------------------


@pytest.mark.slow
async def test_foreign_cancel_is_ignored_callers_cancel_works(make_platform: Any,
                                                             nats_url: str) -> None:
    seen: list[str] = []
    cancelled: list[str] = []
    finished: list[str] = []
    app = App("svc", Singleton())

    @app.rpc.handler("slow")
    async def slow(req: Request) -> str:
        seen.append(req.request_id)
        try:
            await asyncio.sleep(float(req.payload))
        except asyncio.CancelledError:
            cancelled.append(req.request_id)
            raise
        finished.append(req.request_id)
        return "done"

    pa = await make_platform("a", app)
    assert await app.wait_for_leadership(15)
    caller_app = App("svc", Singleton(), OnNodes("a"))
    await make_platform("b", caller_app)
    cancel_subject = platform_subject(pa.name, "rpc", "cancel")
    cancel_sub = rpc_service(pa).cancellations.sub
    assert cancel_sub is not None
    third = await nats.connect(nats_url)
    try:
        # A call the third client knows the request id of (as from a log line or an audit
        # entry): it tries the id, the id with guessed tokens, and the old format.
        call = asyncio.create_task(caller_app.rpc.call("a", "slow", 3.0, timeout=20))
        await wait_for(lambda: len(seen) == 1, 10)
        rid = seen[0]
        assert "/" not in rid
        attempts = [rid, f"{rid}/", f"{rid}/0000000000000000", f"{rid}/{secrets.token_hex(8)}"]
        delivered = cancel_sub.delivered
        for body in attempts:
            await third.publish(cancel_subject, body.encode())
        await third.flush()
        await wait_for(lambda: cancel_sub.delivered >= delivered + len(attempts), 10)
        assert await call == "done"  # ran to its end
        assert cancelled == [] and finished == [rid]

        # The caller itself can cancel (it holds the token): the handler stops within a bound.
        call = asyncio.create_task(caller_app.rpc.call("a", "slow", 30.0, timeout=60))
        await wait_for(lambda: len(seen) == 2, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for(lambda: cancelled == [seen[1]], 5)

        # A request without a token (an old caller) cannot be cancelled by its id either.
        inbox = third.new_inbox()
        sub = await third.subscribe(inbox, max_msgs=1)
        await third.publish(app_subject(pa.name, "svc", "rpc", "a.slow"), b"1.0", reply=inbox,
                            headers={H_CALL: "legacy-1 10 old-node"})
        await wait_for(lambda: "legacy-1" in seen, 10)
        delivered = cancel_sub.delivered
        await third.publish(cancel_subject, b"legacy-1")
        await wait_for(lambda: cancel_sub.delivered > delivered, 10)
        reply = await sub.next_msg(timeout=10)
        assert json.loads(reply.data) == "done" and "legacy-1" in finished
    finally:
        await third.close()


def test_server_selector_avoids_a_marked_server() -> None:
    from urllib.parse import urlparse

    from nats.aio.client import Server

    from pycluster.kernel.connection import ServerSelector

    pool = [Server(urlparse(f"nats://127.0.0.1:{port}")) for port in (1, 2, 3)]
    sel = ServerSelector(wait=0.5)
    assert sel(pool, {}) == (pool[0], 0.0)
    sel.avoid("127.0.0.1:1", 60)
    assert sel(pool, {}) == (pool[1], 0.0)
    pool[1].reconnects = 1  # a failed attempt: the next one without failures first
    assert sel(pool, {}) == (pool[2], 0.0)
    pool[2].reconnects = 2
    assert sel(pool, {}) == (pool[1], 0.5)  # fewest failures, after a pause
    for srv in pool[1:]:
        sel.avoid(srv.uri.netloc, 60)
    assert sel(pool, {})[0] is pool[0] and sel.avoided() == ["127.0.0.1:1", "127.0.0.1:2",
                                                             "127.0.0.1:3"]


def test_unit_file_raises_the_descriptor_limit() -> None:
    unit = Path(__file__).resolve().parents[2] / "packaging" / "pycluster@.service"
    limits = re.findall(r"^LimitNOFILE=(\d+)$", unit.read_text(), re.M)
    assert limits and int(limits[0]) >= 65536

