"""A newcomer's first hour: every mistake gets a clear error (or warning), never a traceback
or a misleading answer. Real NATS throughout; the CLI runs in-process (click's runner) or as
a real process where signals, logging or the exit status of the program matter."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from click.testing import CliRunner, Result

from pycluster import (
    App,
    ConfigError,
    NoInstanceError,
    NoLiveNodesError,
    NoSuchAppError,
    Platform,
)
from pycluster.cli.inspect import request_stepdown
from pycluster.cli.main import cli
from pycluster.kernel.embedded import EmbeddedServerLock
from pycluster.kernel.errors import EmbeddedServerConflictError
from pycluster.kernel.platform import stepdown_subject
from pycluster.plugins import create_plugin_manager, hookimpl
from pycluster.testing import NatsCluster, wait_for

pytestmark = pytest.mark.timeout(90)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """The ``pycluster`` command line in this process (no plugins from entry points)."""
    pm = create_plugin_manager(load_entrypoints=False)
    return CliRunner().invoke(cli, list(args), obj=pm, env=env)


async def ainvoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`invoke` from a test's event loop (the command runs its own loop, in a thread)."""
    return await asyncio.to_thread(invoke, *args, env=env)


# -- settings and NATS ---------------------------------------------------------------------


async def test_stream_replicas_beyond_a_single_server_fails_before_any_bucket(
    nats_url: str, unique_name: str
) -> None:
    """The configuration doc's own example (``stream_replicas: 3``) against one server."""
    p = Platform(unique_name, node_id="n1", nats_url=nats_url, stream_replicas=3,
                 plugin_manager=create_plugin_manager(load_entrypoints=False))
    p.register(App("web"))
    with pytest.raises(ConfigError) as info:
        await p.start()
    assert info.value.field == "stream_replicas" and info.value.value == 3
    assert "single server" in str(info.value) and "cluster size 1" in str(info.value)
    nc = await nats.connect(nats_url)
    try:
        names = [s.config.name for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert not [n for n in names if unique_name in (n or "")]  # nothing was created


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_stream_replicas_beyond_the_cluster_size_names_the_setting(
    nats_cluster: NatsCluster, unique_name: str
) -> None:
    p = Platform(unique_name, node_id="n1", nats_url=nats_cluster.urls, stream_replicas=5,
                 plugin_manager=create_plugin_manager(load_entrypoints=False))
    with pytest.raises(ConfigError) as info:
        await p.start()
    assert info.value.field == "stream_replicas" and "cannot place 5 replicas" in str(info.value)


def test_cli_names_a_variable_that_is_not_json() -> None:
    out = invoke("status", env={"PYCLUSTER_LABELS": "zone=a"})
    assert out.exit_code == 2 and "PYCLUSTER_LABELS='zone=a'" in out.output
    assert "Traceback" not in out.output and "SettingsError" not in out.output


def test_cli_names_a_url_with_a_wrong_scheme_without_its_password() -> None:
    out = invoke("status", "--nats-url", "htp://ops:hunter2@nats-1:4222")
    assert out.exit_code == 2, out.output
    assert "htp://ops:***@nats-1:4222" in out.output
    assert "accepted: nats://, tls://, ws://, wss://" in out.output
    assert "hunter2" not in out.output and "DNS" not in out.output


def test_an_unknown_log_level_is_refused() -> None:
    out = invoke("run", "--log-level", "LOUD", "x:y")
    assert out.exit_code == 2 and "--log-level" in out.output and "LOUD" in out.output


# -- pycluster run TARGET ----------------------------------------------------------------------


def test_run_target_that_is_not_importable_or_not_a_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "fh_target.py").write_text("count = 3\nplatfrom = None\ndef make():\n"
                                           "    return 'not a platform'\n")
    (tmp_path / "fh_broken.py").write_text("import fh_missing_dependency\n")
    cases = {
        "fh_nosuchmod:platform": "no module named 'fh_nosuchmod'",
        "fh_target:platform": "has no attribute 'platform' (did you mean 'platfrom'?)",
        "fh_target:count": "is int 3, not a pycluster Platform",
        "fh_target:make": "is str 'not a platform', not a pycluster Platform",
        "fh_target": "expected module:attribute",
    }
    for target, needle in cases.items():
        out = invoke("run", target)
        assert out.exit_code == 2, (target, out.output)
        assert needle in out.output, (target, out.output)
    # A module that the target itself imports is missing: that error is the user's own, with
    # its traceback (hiding it would hide where).
    out = invoke("run", "fh_broken:platform")
    assert isinstance(out.exception, ModuleNotFoundError)
    assert out.exception.name == "fh_missing_dependency"


# -- pycluster demo ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["--nodes", "0"], "--nodes"), (["--nodes", "1"], "--nodes"),
    (["--lease-ttl", "0"], "--lease-ttl"), (["--lease-ttl", "-2"], "--lease-ttl"),
])
def test_demo_refuses_settings_it_cannot_show_at_once(args: list[str], needle: str) -> None:
    t0 = time.monotonic()
    out = invoke("demo", *args)
    assert out.exit_code == 2 and needle in out.output and "range" in out.output, out.output
    assert time.monotonic() - t0 < 10  # refused up front, not after a 30 s wait


# -- status and stepdown: answers that say what is wrong ---------------------------------------


async def test_status_of_a_platform_without_live_nodes(
    make_platform: Any, nats_url: str, unique_name: str
) -> None:
    await make_platform("a", App("orders"))
    out = await ainvoke("status", "--nats-url", nats_url, "--platform", f"{unique_name}x")
    assert out.exit_code == 2, out.output
    assert f"no node of platform '{unique_name}x' is alive" in out.output
    assert unique_name in out.output.split("platforms found there:")[1]  # the likely one
    out = await ainvoke("status", "--nats-url", nats_url, "--platform", unique_name)
    assert out.exit_code == 0 and "1 node(s)" in out.output


@pytest.mark.slow
async def test_platforms_are_found_beyond_the_first_page_of_streams(tmp_path: Path) -> None:
    """The "platforms found there" hint pages through every stream (a NATS shared by many
    platforms has more than the 256 the server lists at a time)."""
    from pycluster.cli.inspect import _platforms
    from pycluster.testing.servers import NatsServer

    server = NatsServer(data_dir=tmp_path / "js")
    await server.start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        for i in range(270):
            await js.add_stream(name=f"F{i:03d}", subjects=[f"filler.{i}"])  # listed before KV_
        await js.add_stream(name="KV_zzlast_platform", subjects=["$KV.zzlast_platform.>"])
        assert await _platforms(js) == ["zzlast"]
    finally:
        await nc.close()
        await server.stop()


async def test_stepdown_names_what_is_wrong(
    make_platform: Any, nats_url: str, unique_name: str
) -> None:
    a, b = App("orders"), App("orders")
    await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b, no_failover=True)
    reports = App("reports")
    await make_platform("c", App("billing"), reports, no_failover=True)  # c never leads
    await wait_for(lambda: b.leader == "a" and reports.role.value == "passive", 10)
    epoch = a.epoch

    async def refused(app: str, *opts: str, platform: str = unique_name) -> str:
        out = await ainvoke("stepdown", app, "--nats-url", nats_url, "--platform", platform,
                            *opts)
        assert out.exit_code == 2, out.output
        assert "not the leader (leader=None" not in out.output
        return out.output

    assert "no node of platform 'nosuch' is alive" in await refused("orders", platform="nosuch")
    typo = await refused("ordres")
    assert f"no app 'ordres' on platform '{unique_name}'" in typo
    assert "apps of its live nodes: billing, orders, reports" in typo
    assert "no active instance" in await refused("reports")
    assert "standby on: c" in await refused("reports")
    assert "is not a live node" in await refused("orders", "--successor", "zed")
    assert "is the node stepping down" in await refused("orders", "--successor", "a")
    assert "never leads app 'orders' (no_failover)" in await refused(
        "orders", "--successor", "b")
    assert "--cooldown" in await refused("orders", "--cooldown", "-1")
    assert a.is_leader and a.epoch == epoch  # nothing was restarted
    with pytest.raises(NoLiveNodesError):  # the same errors, typed, for scripts
        await request_stepdown(nats_url, f"{unique_name}z", "orders", None, None)
    with pytest.raises(NoSuchAppError):
        await request_stepdown(nats_url, unique_name, "ordres", None, None)
    with pytest.raises(NoInstanceError):
        await request_stepdown(nats_url, unique_name, "reports", None, None)


async def test_step_down_api_refuses_pointless_requests(make_platform: Any) -> None:
    a, b = App("orders"), App("orders")
    await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 10)
    epoch = a.epoch
    with pytest.raises(ConfigError, match="cooldown"):
        await a.step_down(cooldown=-1)
    with pytest.raises(ConfigError, match="is not a live node of this platform"):
        await a.step_down(successor="nobody")
    with pytest.raises(ConfigError, match="is the node stepping down"):
        await a.step_down(successor="a")
    assert a.is_leader and a.epoch == epoch
    await a.step_down(successor="b", cooldown=5)  # a sensible request still works
    await wait_for(lambda: b.is_leader, 10)


async def test_the_leader_checks_a_step_down_request_itself(
    make_platform: Any, nats_url: str, unique_name: str
) -> None:
    """Anything on the bus can send the request: the leader validates it too."""
    a = App("orders")
    await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    epoch = a.epoch
    nc = await nats.connect(nats_url)
    try:
        subject = stepdown_subject(unique_name, "orders")
        for body, field in (({"successor": "ghost"}, "successor"),
                            ({"cooldown": -3}, "cooldown"), ([1, 2], "request")):
            reply = json.loads((await nc.request(subject, json.dumps(body).encode(), 5)).data)
            assert reply["error"]["field"] == field, reply
    finally:
        await nc.close()
    assert a.is_leader and a.epoch == epoch


# -- several nodes on one machine ------------------------------------------------------------


async def test_a_second_embedded_server_of_a_platform_is_refused(tmp_path: Path) -> None:
    def node(node_id: str) -> Platform:
        p = Platform("local", node_id=node_id, data_dir=str(tmp_path / node_id), lease_ttl=1.0,
                     heartbeat_interval=0.25,
                     plugin_manager=create_plugin_manager(load_entrypoints=False))
        p.register(App("orders"))
        return p

    first = node("n1")
    async with first:
        second = node("n2")
        with pytest.raises(EmbeddedServerConflictError) as info:
            await second.start()
        msg = str(info.value)
        assert "node_id n1" in msg and first.embedded.url in msg and "nats-server -js" in msg
        assert second.embedded is None and second.nc is None  # nothing was started
        other = Platform("elsewhere", node_id="n2", data_dir=str(tmp_path / "n2"),
                         plugin_manager=create_plugin_manager(load_entrypoints=False))
        lock = EmbeddedServerLock(tmp_path, other.name)
        lock.acquire()  # another platform's lock is independent
        lock.release()
    second = node("n2")  # the first left: its lock went with it
    async with second:
        assert second.embedded is not None


def test_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, sys
        from pycluster.kernel.embedded import EmbeddedServerLock
        lock = EmbeddedServerLock({str(tmp_path)!r}, "p")
        lock.acquire()
        lock.describe(node_id="n1")
        print("held", flush=True)
        sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(EmbeddedServerConflictError, match=f"pid {proc.pid}"):
            EmbeddedServerLock(tmp_path, "p").acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = EmbeddedServerLock(tmp_path, "p")
    lock.acquire()  # SIGKILL released it: no stale claim
    assert lock.held
    lock.release()


# -- plugin warnings only where they matter ---------------------------------------------------


@dataclass(frozen=True)
class Gadget:
    name: str


class GadgetPlugin:
    """A plugin whose system dependency is missing here."""

    @hookimpl
    def pycluster_register_options(self, registry: Any) -> None:
        registry.add(Gadget, plugin="gadget")

    @hookimpl
    def pycluster_claim_option(self, app: App, option: object) -> bool | None:
        return True if isinstance(option, Gadget) else None

    @hookimpl
    def pycluster_check(self) -> str | None:
        return "no gadget driver on this machine"


async def test_unusable_plugin_is_reported_only_when_an_app_uses_it(
    nats_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pycluster")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "gadget" in r.getMessage()]

    for node, options in (("n1", ()), ("n2", (Gadget("g"),))):
        pm = create_plugin_manager(load_entrypoints=False, extra=[("gadget", GadgetPlugin())])
        p = Platform(unique_name, node_id=node, nats_url=nats_url, plugin_manager=pm)
        p.register(App(f"app-{node}", *options))
        caplog.clear()
        async with p:
            pass
        if options:
            (msg,) = warnings()
            assert "used by app(s) app-n2" in msg and "no gadget driver" in msg
        else:
            assert warnings() == []


# -- a node logs by default; the application's logging set-up wins -------------------------------


NODE_SCRIPT = """
import asyncio, logging, sys
from pycluster import App, Platform, Process
{setup}
app = App("web", Process(["sh", "-c", "echo 'Address already in use' >&2; exec sleep 60"]))
platform = Platform("logs", node_id="n1", data_dir=sys.argv[1], lease_ttl=2,
                    heartbeat_interval=0.5)
platform.register(app)
asyncio.run(platform.run())
"""


@pytest.mark.slow
@pytest.mark.parametrize("configured", [False, True])
def test_run_logs_to_stderr_unless_the_app_configured_logging(
    tmp_path: Path, configured: bool
) -> None:
    setup = ("logging.basicConfig(level=logging.WARNING, format='APP %(message)s')"
             if configured else "")
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT.format(setup=setup))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data")],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        if not configured:
            while not any("Address already in use" in line for line in lines):
                assert time.monotonic() < deadline and proc.poll() is None, lines
                lines.append(proc.stderr.readline())
        else:
            time.sleep(3)  # let it start and run the backend; nothing at INFO may appear
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.stderr.read()
        assert proc.wait(30) == 0, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if configured:
        assert " INFO " not in out and "web[stderr]" not in out, out
    else:
        assert "pycluster INFO started an embedded nats-server" in out
        assert "web[stderr] Address already in use" in out
        assert "leaving gracefully" in out
        assert "unusable" not in out  # installed plugins that no app uses stay quiet


SIGNAL_IN_START = """
import asyncio, os, signal, sys
from pycluster import App, Platform, Singleton

app = App("svc", Singleton())

@app.on_start
async def started(ctx):
    os.kill(os.getpid(), signal.SIGTERM)  # arrives while the platform is still starting
    await asyncio.sleep(0.2)

async def main():
    platform = Platform(sys.argv[1], node_id="n1", nats_url=sys.argv[2])
    platform.register(app)
    if sys.argv[3] == "block":
        async with platform:
            await asyncio.sleep(60)
    else:
        await platform.run()
    print("left", flush=True)

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["block", "run"])
def test_a_signal_while_starting_makes_the_node_leave_once_started(
        tmp_path: Path, nats_url: str, unique_name: str, how: str) -> None:
    script = tmp_path / "node.py"
    script.write_text(SIGNAL_IN_START)
    proc = subprocess.run([sys.executable, str(script), unique_name, nats_url, how],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "left\n", proc.stdout + proc.stderr
    assert "leaving gracefully" in proc.stderr and "Traceback" not in proc.stderr
