"""Security on real components: secrets never shown, backends without the node's credentials,
signed requests (forgery, replay, staleness, allow lists), the embedded server's own
credentials, and the NATS permissions that ``pycluster nats-config`` generates, checked on a
real nats-server by attacking one app's resources with another app's credentials."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from click.testing import CliRunner

from pycluster import (
    App,
    AuthMiddleware,
    Platform,
    Process,
    RemoteError,
    Request,
    SignedAuth,
    Singleton,
)
from pycluster.backend import HealthCheck
from pycluster.cli.main import cli
from pycluster.middleware import SIG_HEADER, use
from pycluster.plugins import create_plugin_manager
from pycluster.signing import generate_keypair
from pycluster.testing import NatsServer, wait_for

pytestmark = pytest.mark.timeout(120)

PASSWORD = "pw-Zq81xT-never-shown"
TOKEN = "tok-Hk27pX-never-shown"


def _pm() -> Any:
    return create_plugin_manager(load_entrypoints=False)


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, obj=_pm(), catch_exceptions=False)


async def ainvoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return await asyncio.to_thread(invoke, *args, env=env)


# -- 1. secrets --------------------------------------------------------------------------------


@pytest.fixture
async def password_server(tmp_path: Path) -> Any:
    conf = tmp_path / "auth.conf"
    conf.write_text(f'authorization {{ user: ops, password: "{PASSWORD}" }}\n')
    server = NatsServer(extra_args=["-c", str(conf)], auth={"user": "ops", "password": PASSWORD})
    await server.start()
    yield server
    await server.stop()


async def test_a_password_url_is_never_shown_in_status_logs_or_cli_errors(
    password_server: NatsServer, unique_name: str, caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"nats://ops:{PASSWORD}@127.0.0.1:{password_server.port}"
    p = Platform(unique_name, node_id="n1", nats_url=url, health_addr="127.0.0.1:0",
                 lease_ttl=1.0, heartbeat_interval=0.25, plugin_manager=_pm())
    app = p.register(App("web", Singleton()))
    assert PASSWORD not in repr(p.settings) and PASSWORD not in str(p.settings)
    async with p:
        await app.wait_for_leadership(15)
        await wait_for(lambda: p.health.status().get("nats", {}).get("status") == "healthy", 15)
        status = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{p.health.url}/status", timeout=5).read().decode())
        assert f"127.0.0.1:{password_server.port}" in status  # the server is named...
        assert PASSWORD not in status  # ...without the password
        # A reconnect is logged with the server's address only.
        await password_server.restart()
        await wait_for(lambda: any("reconnected to" in r.getMessage() for r in caplog.records),
                       30)
        # The CLI against the same URL, with the server gone: the error names it masked.
        out = await ainvoke("status", "--platform", unique_name, "--nats-url",
                            f"nats://ops:{PASSWORD}@127.0.0.1:1")
        assert out.exit_code == 2 and "ops:***@127.0.0.1:1" in out.output, out.output
        assert PASSWORD not in out.output
    # A wrong password: "authorization failed", the URL masked.
    out = await ainvoke("status", "--platform", unique_name, "--nats-url",
                        f"nats://ops:{PASSWORD}x@127.0.0.1:{password_server.port}")
    assert out.exit_code == 2 and "authorization" in out.output.lower(), out.output
    assert PASSWORD not in out.output
    logged = "\n".join(r.getMessage() for r in caplog.records) + capfd.readouterr().err
    assert "reconnected to 127.0.0.1:" in logged
    assert PASSWORD not in logged


def test_secret_settings_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    from pycluster.settings import load_settings

    monkeypatch.setenv("PYCLUSTER_NATS_PASSWORD", PASSWORD)
    monkeypatch.setenv("PYCLUSTER_NATS_TOKEN", TOKEN)
    s = load_settings(name="p", node_id="n", nats_url=f"nats://u:{PASSWORD}@h:4222")
    shown = repr(s) + str(s) + str(s.model_dump()) + s.model_dump_json()
    assert PASSWORD not in shown and TOKEN not in shown
    assert s.nats_password is not None and s.nats_password.get_secret_value() == PASSWORD
    # A CLI error made of anything still has the environment's secrets masked.
    out = invoke("status", "--platform", "p", "--nats-url", f"nats://u:{TOKEN}@h:notaport",
                 env={"PYCLUSTER_NATS_TOKEN": TOKEN})
    assert out.exit_code == 2 and TOKEN not in out.output, out.output


SHOW_ENV = textwrap.dedent("""
    import json, os, sys
    json.dump(dict(os.environ), open(sys.argv[1], "w"))
    import time
    time.sleep(600)
""")


async def test_a_process_backend_gets_an_allow_listed_environment(
    make_platform: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "show_env.py"
    script.write_text(SHOW_ENV)
    seen, checked = tmp_path / "env.json", tmp_path / "check.json"
    # What a node's environment holds: its NATS credentials, other secrets, the basics.
    monkeypatch.setenv("PYCLUSTER_NATS_PASSWORD", PASSWORD)
    monkeypatch.setenv("PYCLUSTER_NATS_TOKEN", TOKEN)
    monkeypatch.setenv("NATS_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("SHARED_CACHE_DIR", "/var/cache/x")
    monkeypatch.setenv("LC_TIME", "C")
    check = HealthCheck(command=[sys.executable, "-c", f"import json, os; json.dump(dict("
                                 f"os.environ), open({str(checked)!r}, 'w'))"],
                        interval=0.2, start_timeout=20)
    app = App("svc", Singleton(), Process(
        [sys.executable, str(script), str(seen)], env={"EXPLICIT": "yes"},
        inherit_env=["SHARED_*"], health=check, grace=2))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active and seen.exists() and checked.exists(), 20)
    for path in (seen, checked):
        env = await wait_for(lambda p=path: _json(p), 10, ignore=(ValueError,))
        assert env["EXPLICIT"] == "yes" and env["SHARED_CACHE_DIR"] == "/var/cache/x"
        assert env["PATH"] == os.environ["PATH"] and env["LC_TIME"] == "C"
        assert env["PYCLUSTER_APP"] == "svc" and env["PYCLUSTER_NODE"] == "n1"
        assert int(env["PYCLUSTER_EPOCH"]) == app.epoch
        for secret in ("PYCLUSTER_NATS_PASSWORD", "PYCLUSTER_NATS_TOKEN", "NATS_TOKEN",
                       "AWS_SECRET_ACCESS_KEY"):
            assert secret not in env, f"{secret} leaked into {path.name}"
        assert PASSWORD not in json.dumps(env) and TOKEN not in json.dumps(env)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


# -- 2. signed requests ----------------------------------------------------------------------


def shop_app() -> App:
    app = App("shop", Singleton())

    @app.handle("whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        return {"identity": request.identity, "claimed": request.source_app}

    @app.handle("reset")
    async def reset() -> str:
        return "reset done"

    @app.rpc.handler("peer")
    async def peer(request: Request) -> str | None:
        return request.identity

    return app


async def capture_one(nc: Any, subject: str) -> asyncio.Future[Any]:
    """The next message on ``subject``, as any subscriber of it sees it (a spy on the bus)."""
    captured: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def spy(msg: Any) -> None:
        if not captured.done():
            captured.set_result(msg)

    await nc.subscribe(subject, cb=spy)
    await nc.flush()
    return captured


@pytest.fixture
def keys() -> dict[str, tuple[str, str]]:
    return {name: generate_keypair() for name in ("web", "ops", "shop", "mallory")}


async def test_signed_requests_bind_identity_to_keys(
    make_platform: Any, keys: dict[str, tuple[str, str]], nats_url: str
) -> None:
    trusted = {name: keys[name][1] for name in ("web", "ops", "shop")}
    app = shop_app()
    server = await make_platform("a", app)
    use(server, SignedAuth("shop", keys["shop"][0], trusted=trusted, allow={"reset": ["ops"]}))
    web = await make_platform("c1")
    use(web, SignedAuth("web", keys["web"][0]))
    ops = await make_platform("c2")
    use(ops, SignedAuth("ops", keys["ops"][0]))
    forger = await make_platform("c3")  # the right name, its own (wrong) key
    use(forger, SignedAuth("ops", keys["mallory"][0]))
    anon = await make_platform("c4")
    await app.wait_for_leadership(15)

    # A valid signed call works; the handler sees the verified identity.
    got = await web.api("shop", source_app="ops").call("whoami")
    assert got == {"identity": "web", "claimed": "ops"}  # the claim is not the identity
    assert await ops.api("shop").call("reset") == "reset done"
    # Allow lists apply to verified identities: web may not reset, whatever it claims.
    with pytest.raises(RemoteError) as ei:
        await web.api("shop", source_app="ops").call("reset")
    assert ei.value.code == "unauthorized" and "'web' may not call shop.reset" in ei.value.message
    # A forged identity (ops, signed with another key) and an unsigned call are refused.
    for client, why in ((forger, "'ops' is not trusted with key id"),
                        (anon, "missing signature")):
        with pytest.raises(RemoteError) as ei:
            await client.api("shop").call("whoami")
        assert ei.value.code == "unauthorized" and why in ei.value.message, ei.value.message
    # app.rpc between the app's own nodes is signed too (identity "shop").
    assert await app.rpc.call("a", "peer") == "shop"

    # A signed request captured on the bus and sent again is refused as a replay; with
    # another nonce or body, as a bad signature.
    nc = await nats.connect(nats_url)
    try:
        subject = f"{server.name}._.api.shop.whoami"
        captured = await capture_one(nc, subject)
        await web.api("shop").call("whoami")
        msg = await asyncio.wait_for(captured, 10)
        assert SIG_HEADER in (msg.headers or {})
        ident, kid, ts, _nonce, sig = msg.headers[SIG_HEADER].split(" ")
        fresh = dict(msg.headers, **{SIG_HEADER: f"{ident} {kid} {ts} AAAAAAAAAAAAAAAA {sig}"})
        for body, headers, why in ((msg.data, msg.headers, "replayed request"),
                                   (msg.data, fresh, "bad signature"),  # another nonce
                                   (b'"other"', fresh, "bad signature")):  # another body
            reply = await nc.request(subject, body, timeout=5, headers=dict(headers))
            assert (reply.headers or {}).get("Pycluster-Error") == "unauthorized"
            assert why in json.loads(reply.data)["message"]
    finally:
        await nc.close()


async def test_a_stale_signed_request_is_refused(
    make_platform: Any, keys: dict[str, tuple[str, str]], nats_url: str
) -> None:
    app = shop_app()
    server = await make_platform("a", app)
    verifier = SignedAuth(trusted={"web": keys["web"][1]}, max_skew=1.0)
    use(server, verifier)
    web = await make_platform("c1")
    use(web, SignedAuth("web", keys["web"][0]))
    await app.wait_for_leadership(15)
    nc = await nats.connect(nats_url)
    try:
        subject = f"{server.name}._.api.shop.whoami"
        captured = await capture_one(nc, subject)
        await web.api("shop").call("whoami")
        msg = await asyncio.wait_for(captured, 10)
        verifier._seen.clear()  # forget it: only the timestamp may refuse it now
        await asyncio.sleep(1.5)  # past max_skew (the point of this test)
        reply = await nc.request(subject, msg.data, timeout=5, headers=dict(msg.headers))
        assert "stale request" in json.loads(reply.data)["message"]
    finally:
        await nc.close()


async def test_weak_token_mode_proves_no_identity(make_platform: Any) -> None:
    app = shop_app()
    server = await make_platform("a", app)
    use(server, AuthMiddleware(token="t0ken"))
    client = await make_platform("c")
    use(client, AuthMiddleware(token="t0ken"))
    await app.wait_for_leadership(15)
    got = await client.api("shop", source_app="ops").call("whoami")
    assert got["identity"] is None  # a token holder's claimed app is not an identity
    with pytest.raises(Exception, match="allow lists need per-app"):
        AuthMiddleware(token="t0ken", allow={"reset": ["ops"]})


# -- 3. the embedded server's credentials ---------------------------------------------------


async def test_the_embedded_server_refuses_clients_without_its_credentials(
    tmp_path: Path, unique_name: str
) -> None:
    node_dir = tmp_path / "n1"
    p = Platform(unique_name, node_id="n1", data_dir=str(node_dir), lease_ttl=1.0,
                 heartbeat_interval=0.25, plugin_manager=_pm())
    app = p.register(App("web", Singleton()))
    creds = node_dir / "nats" / "credentials.json"
    async with p:
        await app.wait_for_leadership(15)
        assert p.embedded is not None
        url = p.embedded.url
        # Anyone on the machine can reach the port; without the credentials: refused.
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1,
                               connect_timeout=2, error_cb=_quiet)
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert stat.S_IMODE((node_dir / "nats" / "auth.conf").stat().st_mode) == 0o600
        password = json.loads(creds.read_text())["password"]
        assert password not in " ".join(p.embedded.command())  # not on the command line
        # The CLI finds the server and its credentials through the node's data directory.
        out = await ainvoke("status", "--platform", unique_name, "--data-dir", str(node_dir),
                            "--output", "json")
        assert out.exit_code == 0, out.output
        st = json.loads(out.output)
        assert [n["node_id"] for n in st["nodes"]] == ["n1"]
        assert st["apps"][0]["leader"] == "n1"
        out = await ainvoke("stepdown", "web", "--platform", unique_name, "--data-dir",
                            str(node_dir))
        assert out.exit_code == 0 and "n1 stepped down" in out.output, out.output
    # A restart keeps the credentials (another process may hold them already).
    async with p:
        await app.wait_for_leadership(15)
        assert json.loads(creds.read_text())["password"] == password
        assert p.embedded is not None
        nc = await nats.connect(p.embedded.url, user="pycluster", password=password)
        await nc.close()


async def _quiet(exc: Exception) -> None:
    pass
