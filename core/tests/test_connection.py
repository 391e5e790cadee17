"""NATS connection options against real nats-servers: auth, TLS, unreachable, no JetStream."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pycluster import NatsUnavailableError, Platform
from pycluster.kernel.connection import connect
from pycluster.kernel.embedded import find_nats_server, free_port
from pycluster.kernel.settings import load_settings
from pycluster.plugins import create_plugin_manager
from pycluster.testing.pytest_plugin import require

pytestmark = pytest.mark.timeout(60)


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} not open")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[object]:
    """Start a nats-server with the given config text; yields a starter function."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: str, js: bool = True) -> str:
        port = free_port()
        conf = tmp_path / f"s{port}.conf"
        store = tmp_path / f"store{port}"
        js_block = f'jetstream {{ store_dir: "{store}" }}\n' if js else ""
        conf.write_text(f"listen: 127.0.0.1:{port}\n{js_block}{config}\n")
        proc = subprocess.Popen([find_nats_server(), "-c", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        _wait_port(port, proc)
        return f"127.0.0.1:{port}"

    yield start
    for p in procs:
        p.kill()
        p.wait()


async def _check(**settings: object) -> None:
    nc = await connect(load_settings(name="t", node_id="n", connect_timeout=1.0, **settings))
    try:
        assert nc.is_connected
        await nc.jetstream().account_info()
    finally:
        await nc.close()


async def test_user_password(server) -> None:  # type: ignore[no-untyped-def]
    addr = server('authorization { user: alice, password: "s3cret" }')
    await _check(nats_url=f"nats://{addr}", nats_user="alice", nats_password="s3cret")
    with pytest.raises(NatsUnavailableError, match="uthorization"):
        await _check(nats_url=f"nats://{addr}", nats_user="alice", nats_password="wrong")


async def test_token(server) -> None:  # type: ignore[no-untyped-def]
    addr = server("authorization { token: t0ken }")
    await _check(nats_url=f"nats://{addr}", nats_token="t0ken")


async def test_nkey_seed_file(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    addr = server(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}')
    await _check(nats_url=f"nats://{addr}", nats_nkey_seed=str(seed_file))


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.slow
async def test_mutual_tls(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    require("openssl", shutil.which("openssl") is not None, "openssl is needed to make certs")
    d = tmp_path
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
             "ca.pem", "-days", "1", "-subj", "/CN=pycluster-test-ca", cwd=d)
    for who in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out",
                 f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{who}.pem", "-days", "1", "-extfile", "san.ext",
                 cwd=d)
    addr = server(
        f'tls {{ cert_file: "{d}/server.pem", key_file: "{d}/server.key", '
        f'ca_file: "{d}/ca.pem", verify: true }}'
    )
    await _check(nats_url=f"tls://{addr}", tls_ca=str(d / "ca.pem"),
                 tls_cert=str(d / "client.pem"), tls_key=str(d / "client.key"))
    # Without the client certificate the server refuses.
    with pytest.raises(NatsUnavailableError):
        await _check(nats_url=f"tls://{addr}", tls_ca=str(d / "ca.pem"))


async def test_unreachable_fails_fast_with_clear_error() -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(NatsUnavailableError) as info:
        await _check(nats_url=f"nats://127.0.0.1:{port}", reconnect_wait=0.1)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert time.monotonic() - t0 < 30


async def test_server_without_jetstream(server) -> None:  # type: ignore[no-untyped-def]
    addr = server("", js=False)
    with pytest.raises(NatsUnavailableError, match="JetStream"):
        await _check(nats_url=f"nats://{addr}")


async def test_several_urls_first_dead(nats_url: str) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    await _check(nats_url=f"{dead},{nats_url}")


async def test_embedded_server_when_no_url(tmp_path: Path) -> None:
    from pycluster import App

    app = App("svc")
    p = Platform("emb", node_id="n1", data_dir=str(tmp_path / "data"), lease_ttl=1.0,
                 heartbeat_interval=0.25,
                 plugin_manager=create_plugin_manager(load_entrypoints=False))
    p.register(app)
    async with p:
        assert p.embedded is not None and p.embedded.running
        assert (tmp_path / "data" / "nats").is_dir()
        assert await app.wait_for_leadership(10)
        await app.kv.put("k", b"v")
        pid = p.embedded.pid
    assert p.embedded is None
    # The embedded server process is gone.
    await asyncio.sleep(0)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.timeout(10)
async def test_placement_refused_for_an_offline_peer_is_retried_too_few_servers_is_not() -> None:
    import nats.js.errors

    from pycluster.kernel import natsutil as nu

    offline = nats.js.errors.APIError(code=500, err_code=10005,
                                      description="no suitable peers for placement, peer offline")
    too_few = nats.js.errors.APIError(code=500, err_code=10005,
                                      description="no suitable peers for placement")
    assert nu.placement_offline(offline) and not nu.placement_offline(too_few)
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise offline
        return "created"

    assert await nu.retry_transient(flaky, wait=5.0, first_delay=0.01) == "created"
    assert len(calls) == 3

    async def refused() -> str:
        calls.append(1)
        raise too_few

    calls.clear()
    with pytest.raises(nats.js.errors.APIError):
        await nu.retry_transient(refused, wait=5.0, first_delay=0.01)
    assert len(calls) == 1  # a cluster too small for the replicas: at once
