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
    DuplicateNodeError,
    Platform,
    Process,
    RemoteError,
    Request,
    SignedAuth,
    Singleton,
)
from pycluster.backend import HealthCheck
from pycluster.builtin.rpc.service import rpc_service
from pycluster.cli.main import cli
from pycluster.kernel.platform import stepdown_subject
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


@pytest.mark.slow
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
    from pycluster.kernel.settings import load_settings

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


async def test_control_requests_are_signed_too(
    make_platform: Any, keys: dict[str, tuple[str, str]], nats_url: str, unique_name: str
) -> None:
    trusted = {name: keys[name][1] for name in ("shop", "ops")}

    def auth() -> SignedAuth:
        return SignedAuth("shop", keys["shop"][0], trusted=trusted,
                          allow={"control.stepdown": ["ops"]})

    app = App("svc", Singleton())
    node = await make_platform("a", app, start=False)
    use(node, auth())
    await node.start()
    await app.wait_for_leadership(15)
    epoch = app.epoch
    # A second process with the same node id pings it, signed: the live node answers.
    twin = await make_platform("a", App("svc", Singleton()), start=False)
    use(twin, auth())
    with pytest.raises(DuplicateNodeError):
        await twin.start()
    subject = stepdown_subject(unique_name, "svc")
    body = b'{"cooldown": 0}'
    nc = await nats.connect(nats_url)
    try:
        # A step-down request: unsigned, or signed by an identity the allow list does not
        # name, is refused; signed by ops, it is served.
        res = json.loads((await nc.request(subject, body, timeout=10)).data)
        assert res["error"]["code"] == "unauthorized"
        for identity, allowed in (("shop", False), ("ops", True)):
            headers: dict[str, str] = {}
            SignedAuth(identity, keys[identity][0])._sign(subject, body, headers)
            res = json.loads((await nc.request(subject, body, timeout=15,
                                               headers=headers)).data)
            if allowed:
                assert "error" not in res and res["node"] == "a", res
            else:
                assert res["error"]["code"] == "unauthorized", res
                assert app.is_active and app.epoch == epoch
    finally:
        await nc.close()
    await wait_for(lambda: app.epoch != epoch, 15, message="a new epoch after the step-down")
    # Let the new activation settle (its subscriptions) before the platform stops.
    await wait_for(lambda: app.is_active and all(rpc_service(node).subscribed("svc").values()),
                   15)


@pytest.mark.slow
async def test_cli_stepdown_signs_with_an_operator_seed(
    make_platform: Any, keys: dict[str, tuple[str, str]], nats_url: str, unique_name: str,
    tmp_path: Path,
) -> None:
    """`pycluster stepdown --sign-as ops --seed FILE` reaches a leader that only serves signed
    control requests of ops; without a signature the CLI reports the refusal."""
    trusted = {"shop": keys["shop"][1], "ops": keys["ops"][1]}
    app = App("svc", Singleton())
    node = await make_platform("a", app, start=False)
    use(node, SignedAuth("shop", keys["shop"][0], trusted=trusted,
                         allow={"control.stepdown": ["ops"]}))
    await node.start()
    await make_platform("b", App("svc", Singleton()))
    await app.wait_for_leadership(15)
    epoch = app.epoch
    seed = tmp_path / "ops.nk"
    seed.write_text(keys["ops"][0])
    seed.chmod(0o600)
    base = [sys.executable, "-m", "pycluster.cli", "stepdown", "svc", "-p", unique_name,
            "--nats-url", nats_url]

    async def run(*extra: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *base, *extra, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await run()
    assert code != 0 and "refused the request" in out and "--sign-as" in out, out
    assert app.is_active and app.epoch == epoch
    code, out = await run("--sign-as", "ops", "--seed", str(seed))
    assert code == 0, out
    assert "stepped down" in out
    await wait_for(lambda: app.epoch != epoch or not app.is_active, 15)


@pytest.mark.slow
async def test_cli_status_signs_its_node_requests(
    make_platform: Any, keys: dict[str, tuple[str, str]], nats_url: str, unique_name: str,
    tmp_path: Path,
) -> None:
    """`pycluster status` / `health` ask each node over NATS: a node whose SignedAuth covers
    control requests refuses unsigned ones (shown, with the hint), and serves them signed."""
    trusted = {"shop": keys["shop"][1], "ops": keys["ops"][1]}
    app = App("svc", Singleton())
    node = await make_platform("a", app, start=False)
    use(node, SignedAuth("shop", keys["shop"][0], trusted=trusted))
    await node.start()
    await app.wait_for_leadership(15)
    seed = tmp_path / "ops.nk"
    seed.write_text(keys["ops"][0])
    seed.chmod(0o600)
    base = [sys.executable, "-m", "pycluster.cli"]
    conn = ["-p", unique_name, "--nats-url", nats_url, "-o", "json"]

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *base, *args, *conn, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    code, out = await run("status")
    assert code == 0, out
    (rec,) = json.loads(out)["nodes"]
    assert "refused" in rec["status_error"] and "--sign-as" in rec["status_error"]
    code, out = await run("status", "--sign-as", "ops", "--seed", str(seed))
    (rec,) = json.loads(out)["nodes"]
    assert code == 0 and rec["detail"]["healthy"] is True, out
    assert json.loads(out)["apps"][0]["lease_age"] is not None
    code, out = await run("health")
    assert code == 1 and "refused" in json.loads(out)["problems"][0]
    code, out = await run("health", "--sign-as", "ops", "--seed", str(seed))
    assert code == 0 and "svc.election" in json.loads(out)["nodes"]["a"]["checks"], out


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


# -- 4. generated per-app NATS permissions ----------------------------------------------------


class Secured:
    """A nats-server started with the configuration `pycluster nats-config` generates for a
    platform of two nodes: ``na`` runs app ``a``, ``nb`` runs app ``b``."""

    def __init__(self, tmp: Path, platform: str, auth: str = "nkey",
                 nodes: tuple[str, ...] = ("na=a", "nb=b"), extra: tuple[str, ...] = ()) -> None:
        self.dir = tmp / "nats-auth"
        self.platform = platform
        self.apps = sorted({a for spec in nodes for a in spec.split("=")[1].split(",")})
        self.extra = extra
        args = [x for spec in nodes for x in ("--node", spec)]
        out = invoke("nats-config", "--platform", platform, *args, *extra, "--auth", auth,
                     "--out", str(self.dir), "--output", "json")
        assert out.exit_code == 0, out.output
        self.users = {u["user"]: u for u in json.loads(out.output)["users"]}
        self.server = NatsServer(config_file=self.dir / "nats-server.conf",
                                 auth=self.connect_options("operator"))

    def env(self, stem: str) -> dict[str, str]:
        lines = (self.dir / f"{stem}.env").read_text().splitlines()
        return dict(x.split("=", 1) for x in lines if x and not x.startswith("#"))

    def connect_options(self, stem: str) -> dict[str, str]:
        """nats-py connect() options of a user (its seed or password, its inbox prefix)."""
        env = self.env(stem)
        opts = {"inbox_prefix": env["PYCLUSTER_INBOX_PREFIX"]}
        if "PYCLUSTER_NATS_NKEY_SEED" in env:
            opts["nkeys_seed_str"] = Path(env["PYCLUSTER_NATS_NKEY_SEED"]).read_text().strip()
        else:
            opts["user"], opts["password"] = env["PYCLUSTER_NATS_USER"], env[
                "PYCLUSTER_NATS_PASSWORD"]
        return opts

    def settings(self, stem: str) -> dict[str, Any]:
        """Platform(...) keyword arguments of a node user."""
        env = self.env(stem)
        kw: dict[str, Any] = {"nats_url": self.server.url,
                              "inbox_prefix": env["PYCLUSTER_INBOX_PREFIX"]}
        if "PYCLUSTER_NATS_NKEY_SEED" in env:
            kw["nats_nkey_seed"] = env["PYCLUSTER_NATS_NKEY_SEED"]
        else:
            kw["nats_user"], kw["nats_password"] = env["PYCLUSTER_NATS_USER"], env[
                "PYCLUSTER_NATS_PASSWORD"]
        return kw

    async def provision(self) -> None:
        env = dict(self.env("operator"), PYCLUSTER_NATS_URL=self.server.url)
        apps = [x for a in self.apps for x in ("--app", a)]
        out = await ainvoke("provision", "--platform", self.platform, *apps, *self.extra,
                            env=env)
        assert out.exit_code == 0 and "created" in out.output, out.output


class Attacker:
    """A raw nats-py client with some user's credentials that records the server's refusals."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None
        self.got: list[str] = []

    async def connect(self, url: str, opts: dict[str, str]) -> Attacker:
        async def error_cb(exc: Exception) -> None:
            self.errors.append(str(exc).lower())

        self.nc = await nats.connect(url, error_cb=error_cb, **opts)
        return self

    async def _record(self, msg: Any) -> None:
        self.got.append(msg.subject)

    async def denied(self, action: str, subject: str) -> None:
        needle = f'permissions violation for {action} to "{subject.lower()}"'
        await wait_for(lambda: any(needle in e for e in self.errors), 10,
                       message=f"the server did not refuse {action} to {subject}")

    async def publish_denied(self, subject: str, data: bytes = b"x",
                             headers: dict[str, str] | None = None) -> None:
        inbox = self.nc.new_inbox()  # under the user's own prefix: allowed
        await self.nc.publish(subject, data, reply=inbox, headers=headers)
        await self.denied("publish", subject)

    async def subscribe_denied(self, subject: str) -> None:
        await self.nc.subscribe(subject, cb=self._record)
        await self.denied("subscription", subject)


def attack_app(name: str) -> App:
    app = App(name, Singleton())

    @app.handle("echo")
    async def echo(data: Any) -> Any:
        return data

    @app.rpc.handler("hi")
    async def hi() -> str:
        assert app.platform is not None
        return f"hi from {app.platform.node_id}"

    return app


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_generated_permissions_keep_one_app_out_of_another(
    tmp_path: Path, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    P = unique_name
    sec = Secured(tmp_path, P)
    await sec.server.start()
    platforms: list[Platform] = []
    attacker = Attacker()
    op = await nats.connect(sec.server.url, **sec.connect_options("operator"))
    try:
        # Without the operator's buckets and streams a node may not start: it may not create
        # streams (a stream could capture another app's subjects).
        await sec.provision()
        app_b, app_a = attack_app("b"), attack_app("a")
        b = Platform(P, node_id="nb", lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=5.0,
                     plugin_manager=_pm(), **sec.settings("node-nb"))
        b.register(app_b)
        await b.start()
        platforms.append(b)
        await app_b.wait_for_leadership(15)
        epoch_b = app_b.epoch
        await app_b.kv.put("secret", b"b-data")
        lock_b = app_b.lock("bl", ttl=30)
        await lock_b.acquire(timeout=10)

        # Everything of A's works with A's credentials: election, kv, locks, rpc, events, the
        # API bus (A may call B's API: who may call what is SignedAuth's job), platform events.
        a = Platform(P, node_id="na", lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=5.0,
                     plugin_manager=_pm(), **sec.settings("node-na"))
        a.register(app_a)
        await a.start()
        platforms.append(a)
        await app_a.wait_for_leadership(15)
        await app_a.kv.put("k", b"a-data")
        assert await app_a.kv.get("k") == b"a-data" and await app_a.kv.keys() == ["k"]
        async with app_a.lock("al", ttl=5) as lock:
            await app_a.kv.transform("n", lambda old: b"1", lock=lock)
        async with a.lock("shared", ttl=5):
            pass
        assert await app_a.rpc.call("na", "hi") == "hi from na"
        assert await app_a.rpc.call_leader("hi") == "hi from na"
        assert await a.api("a").call("echo", {"x": 1}) == {"x": 1}
        assert await a.api("b").call("echo", "to b") == "to b"
        assert await b.api("a").call("echo", "to a") == "to a"
        got: list[Any] = []

        async def on_event(ev: Any) -> None:
            got.append(ev.type)

        await app_a.events.subscribe("x.>", on_event)
        await app_a.events.subscribe_durable("x.>", "a-durable", on_event, deliver="all")
        await app_a.events.publish("x.y", {"n": 1})
        await a.events.publish("hello", {"n": 2}, source_app="a")
        await wait_for(lambda: got.count("x.y") == 2, 10)
        await app_a.step_down()
        await app_a.wait_for_leadership(15)

        # A's credentials against B: every read, write, delete and forgery is refused.
        await attacker.connect(sec.server.url, sec.connect_options("node-na"))
        await attacker.nc.publish(f"$KV.{P}_a.probe", b"allowed")  # a control: no refusal
        kv_b = f"$KV.{P}_b.secret"
        for subject, headers in (
            (kv_b, None),                                        # overwrite B's value
            (kv_b, {"KV-Operation": "DEL"}),                     # delete it
            (f"$JS.API.STREAM.PURGE.KV_{P}_b", None),            # purge B's bucket
            (f"$JS.API.DIRECT.GET.KV_{P}_b.{kv_b}", None),       # read it
            (f"$JS.API.STREAM.MSG.GET.KV_{P}_b", None),
            (f"$JS.API.STREAM.INFO.KV_{P}_b", None),
            (f"$JS.API.CONSUMER.CREATE.KV_{P}_b", None),          # watch it
            (f"$KV.{P}_b_locks.bl", None),                        # take B's lock
            (f"$JS.API.DIRECT.GET.KV_{P}_b_locks.$KV.{P}_b_locks.bl", None),
            (f"$KV.{P}_b_election.leader", None),                 # forge B's lease
            (f"{P}.b.rpc.nb.hi", None),                           # B's internal RPC
            (f"{P}.b.rpc._leader.hi", None),
            (f"{P}.b.control.stepdown", None),                    # make B step down
            (f"{P}.b.events.forged", None),                       # B's events
            (f"{P}._.events.b.forged", None),                     # platform events as B
            (f"$JS.API.CONSUMER.CREATE.{P}_b_events", None),
            (f"_INBOX_{P}.node.nb.forged", None),                 # a forged reply to B
            (f"$KV.{P}_platform.nodes.nb", None),                 # B's node record
            (f"{P}._.audit.lock.b.na", None),                     # audit entries about B
            (f"{P}._.audit.membership._.nb", None),               # ...or as node nb
            (f"{P}._.node.nb.ping", None),                        # impersonate nb's ping
            (f"$JS.API.STREAM.CREATE.{P}_capture", None),         # a stream capturing B
            (f"$JS.API.STREAM.DELETE.KV_{P}_b", None),
        ):
            await attacker.publish_denied(subject, b"{}", headers)
        for subject in (f"$KV.{P}_b.>", f"{P}.b.>", f"{P}.b.rpc.>", f"{P}._.api.b.>",
                        f"{P}.b.events.>", f"_INBOX_{P}.node.nb.>", "_INBOX.>",
                        f"_INBOX_{P}.>", f"{P}._.node.nb.ping", f"{P}._.node.nb.status", ">",
                        "$JS.ACK.>"):
            await attacker.subscribe_denied(subject)
        assert not any('"$kv.' + f"{P}_a.probe".lower() + '"' in e for e in attacker.errors)

        # B carries on, and nothing of its traffic reached the attacker's subscriptions.
        assert await app_b.rpc.call("nb", "hi") == "hi from nb"
        assert await b.api("b").call("echo", "own") == "own"
        assert await a.api("b").call("echo", "from a") == "from a"
        assert attacker.got == []
        # Checked from outside, with the operator's credentials: B's state is intact, and B
        # answers the operator's status request (`pycluster status`) under its own user.
        doc = json.loads((await op.request(f"{P}._.node.nb.status", b"", timeout=10)).data)
        assert doc["node_id"] == "nb" and doc["apps"]["b"]["role"] == "active"
        js = op.jetstream()
        assert (await (await js.key_value(f"{P}_b")).get("secret")).value == b"b-data"
        assert app_b.is_leader and app_b.epoch == epoch_b
        holder = await (await js.key_value(f"{P}_b_locks")).get("bl")
        assert holder.value is not None and b"nb" in holder.value
        assert f"{P}_capture" not in [s.config.name for s in await js.streams_info()]
        record = json.loads((await (await js.key_value(f"{P}_platform")).get("nodes.nb")).value)
        assert record["node_id"] == "nb"
        await lock_b.release()
        # The nodes themselves never hit a refusal: their users allow all they do.
        refused = [r.getMessage() for r in caplog.records if r.name == "pycluster.nats"
                   and "permissions violation" in r.getMessage()]
        assert refused == []
    finally:
        if attacker.nc is not None:
            await attacker.nc.close()
        await op.close()
        for p in reversed(platforms):
            await p.stop()
        await sec.server.stop()


async def test_a_node_may_not_create_its_streams_and_says_so(
    tmp_path: Path, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    sec = Secured(tmp_path, unique_name, auth="password")
    await sec.server.start()
    try:
        p = Platform(unique_name, node_id="na", plugin_manager=_pm(), **sec.settings("node-na"))
        p.register(App("a", Singleton()))
        starting = asyncio.create_task(p.start())  # retries until its start-up deadline

        def refused() -> bool:
            return any("permissions violation" in r.getMessage()
                       and "stream.create" in r.getMessage() for r in caplog.records
                       if r.levelno >= logging.ERROR and r.name == "pycluster.nats")

        await wait_for(refused, 20, message="the refused stream creation was not logged")
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await p.stop()
        # With the buckets and streams provisioned, the same user starts.
        await sec.provision()
        p = Platform(unique_name, node_id="na", plugin_manager=_pm(), lease_ttl=1.0,
                     heartbeat_interval=0.25, **sec.settings("node-na"))
        app = p.register(App("a", Singleton()))
        async with p:
            await app.wait_for_leadership(15)
        # The CLI with the operator's environment file sees the platform.
        env = dict(sec.env("operator"), PYCLUSTER_NATS_URL=sec.server.url)
        out = await ainvoke("audit", "--platform", unique_name, "--limit", "5", env=env)
        assert out.exit_code == 0 and "election/" in out.output, out.output
    finally:
        await sec.server.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_sqlite_app_replicates_under_generated_permissions(
    tmp_path: Path, unique_name: str
) -> None:
    pytest.importorskip("pycluster_sqlite")
    from pycluster.testing.pytest_plugin import require
    from pycluster_sqlite import SQLite
    from pycluster_sqlite.litestream import find_litestream

    try:
        find_litestream()
    except Exception as exc:
        require("litestream", False, str(exc))
    # Litestream takes passwords, not NKey seeds, and has no inbox prefix (docs/security.md).
    sec = Secured(tmp_path, unique_name, auth="password", nodes=("n1=db", "n2=db"),
                  extra=("--sqlite-app", "db"))
    await sec.server.start()
    nodes: list[tuple[Platform, App, Any]] = []
    try:
        await sec.provision()
        for n in ("n1", "n2"):
            db = SQLite(tmp_path / n / "data.db")
            app = App("db", Singleton(), db)
            p = Platform(unique_name, node_id=n, lease_ttl=2.0, heartbeat_interval=0.5,
                         data_dir=str(tmp_path / n), **sec.settings(f"node-{n}"))
            p.register(app)
            await p.start()
            nodes.append((p, app, db))
        await wait_for(lambda: any(a.is_active for _, a, _ in nodes), 60)
        _, _, db = next(x for x in nodes if x[1].is_active)
        _, _, standby = next(x for x in nodes if not x[1].is_active)
        import sqlite3

        con = sqlite3.connect(db.path)
        con.execute("create table t(x)")
        con.execute("insert into t values (42)")
        con.commit()
        con.close()
        await db.wal.sync()
        def caught_up() -> bool:
            lag = standby.wal.lag()
            return lag is not None and lag < 5

        await wait_for(caught_up, 60, message="the standby did not follow the WAL")
        await db.snapshots.create()
        assert len(await db.snapshots.list()) == 1
    finally:
        for p, _, _ in reversed(nodes):
            await p.stop()
        server_log = sec.server.log_tail(100000)  # before stop() removes its directory
        await sec.server.stop()
    assert "Server is ready" in server_log
    assert "Violation" not in server_log, [x for x in server_log.splitlines() if "Violation" in x]
