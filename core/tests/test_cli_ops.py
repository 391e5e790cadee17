"""Operator commands run as real processes against a real nats-server: ``--config`` on the
commands that connect (no default URL), ``version``, ``init`` and ``doctor``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pycluster import App
from pycluster.kernel.settings import load_settings
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(120)

PYCLUSTER = [sys.executable, "-m", "pycluster.cli"]


def run(*args: str, home: Path | None = None, stdin: str = "",
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # No PYCLUSTER_* from the test's environment; XDG_DATA_HOME isolates the embedded-server
    # lookup of the default data directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    if home is not None:
        env["XDG_DATA_HOME"] = str(home)
    return subprocess.run([*PYCLUSTER, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, input=stdin)


async def arun(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run, *args, **kw)


def write_config(path: Path, **fields: Any) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.slow
def test_version_command() -> None:
    out = run("version", "-o", "json")
    assert out.returncode == 0, out.stderr
    v = json.loads(out.stdout)
    assert v["pycluster"] == "0.1.0" and v["distributions"]["pycluster-core"] == "0.1.0"
    assert v["nats-server"] and v["nats-py"]
    text = run("version")
    assert text.returncode == 0 and text.stdout.startswith("pycluster 0.1.0")


@pytest.mark.slow
def test_init_writes_a_valid_commented_config_without_asking(tmp_path: Path) -> None:
    target = tmp_path / "node.yaml"
    out = run("init", "--output", str(target), "-p", "prod", "--node-id", "node-1",
              "--nats-url", "nats://a:4222,nats://b:4222,nats://c:4222", home=tmp_path)
    assert out.returncode == 0, out.stderr
    text = target.read_text()
    assert text.startswith("# pycluster node configuration")
    s = load_settings(target)
    assert (s.name, s.node_id, s.stream_replicas) == ("prod", "node-1", 3)
    assert s.nats_url == ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
    assert s.health_addr == "0.0.0.0:8080"
    # Not on a terminal: asks nothing, uses the defaults (embedded NATS, one replica).
    again = run("init", "--output", str(target), home=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    forced = run("init", "--output", str(target), "--force", home=tmp_path)
    assert forced.returncode == 0, forced.stderr
    s = load_settings(target)
    assert s.name == "default" and s.nats_url is None and s.stream_replicas == 1
    stdout = run("init", "--output", "-", "-p", "x", home=tmp_path)
    assert stdout.returncode == 0 and "name: x" in stdout.stdout
    bad = run("init", "--output", str(tmp_path / "b.yaml"), "-p", "no spaces", home=tmp_path)
    assert bad.returncode == 2 and "platform" in bad.stderr
    assert not (tmp_path / "b.yaml").exists()


@pytest.mark.slow
def test_no_default_url_answers_for_another_cluster(tmp_path: Path) -> None:
    for cmd in (["status"], ["stepdown", "orders"], ["audit"]):
        out = run(*cmd, "-p", "prod", home=tmp_path)
        assert out.returncode == 2, (cmd, out.stderr)
        assert "no NATS to ask" in out.stderr and "--config FILE" in out.stderr
    cfg = write_config(tmp_path / "n.yaml", name="prod", node_id="n1")  # embedded, not running
    out = run("status", "--config", str(cfg), home=tmp_path)
    assert out.returncode == 2 and f"the config file {cfg} names no nats_url" in out.stderr


@pytest.mark.slow
async def test_commands_read_the_node_config_file(make_platform: Any, nats_url: str,
                                                  unique_name: str, tmp_path: Path) -> None:
    a, b = App("orders"), App("orders")
    await make_platform("a", a)
    await wait_for(lambda: a.is_leader, 10)
    await make_platform("b", b)
    await wait_for(lambda: b.leader == "a", 10)
    cfg = write_config(tmp_path / "node.yaml", name=unique_name, node_id="a",
                       nats_url=nats_url)
    st = await arun("status", "--config", str(cfg), "-o", "json", home=tmp_path)
    assert st.returncode == 0, st.stderr
    data = json.loads(st.stdout)
    assert data["platform"] == unique_name
    assert sorted(n["node_id"] for n in data["nodes"]) == ["a", "b"]
    # PYCLUSTER_CONFIG works as --config.
    env_run = await asyncio.to_thread(
        subprocess.run, [*PYCLUSTER, "status", "-o", "json"], capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYCLUSTER_CONFIG": str(cfg)})
    assert env_run.returncode == 0 and json.loads(env_run.stdout)["platform"] == unique_name
    au = await arun("audit", "--config", str(cfg), "-o", "json", home=tmp_path)
    assert au.returncode == 0, au.stderr
    assert any(json.loads(line)["category"] == "election" for line in au.stdout.splitlines())
    # A wrong app or platform says so.
    sd = await arun("stepdown", "nope", "--config", str(cfg), home=tmp_path)
    assert sd.returncode == 2 and f"no app 'nope' on platform {unique_name!r}" in sd.stderr
    other = await arun("status", "--config", str(cfg), "-p", "elsewhere", home=tmp_path)
    assert other.returncode == 2
    assert "no node of platform 'elsewhere' is alive" in other.stderr
    sd = await arun("stepdown", "orders", "--config", str(cfg), "-o", "json", home=tmp_path)
    assert sd.returncode == 0, sd.stderr
    assert json.loads(sd.stdout)["node"] == "a"
    await wait_for(lambda: b.is_leader, 10)


@pytest.mark.slow
async def test_doctor_passes_on_a_good_setup_and_names_what_to_fix(
        make_platform: Any, nats_url: str, unique_name: str, tmp_path: Path) -> None:
    await make_platform("a", App("orders"))
    good = write_config(tmp_path / "good.yaml", name=unique_name, node_id="n9",
                        nats_url=nats_url, health_addr="127.0.0.1:0",
                        data_dir=str(tmp_path / "data"))
    out = await arun("doctor", "--config", str(good), "-o", "json", home=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    for name in ("config", "nats", "jetstream", "replicas", "platform", "data_dir"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "1 live node(s): a" in checks["platform"]["detail"]
    # R3 on a single server, and a health address taken by something that is not a node.
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        bad = write_config(tmp_path / "bad.yaml", name=unique_name, node_id="n9",
                           nats_url=nats_url, stream_replicas=3,
                           health_addr=f"127.0.0.1:{port}")
        out = await arun("doctor", "--config", str(bad), home=tmp_path)
    assert out.returncode == 1, out.stdout
    assert "FAIL  replicas" in out.stdout and "stream_replicas=3" in out.stdout
    assert "FAIL  health_addr" in out.stdout and "fix:" in out.stdout


@pytest.mark.slow
def test_doctor_fails_on_unreachable_nats(tmp_path: Path) -> None:
    from pycluster.kernel.embedded import free_port

    cfg = write_config(tmp_path / "n.yaml", name="prod", node_id="n1", connect_timeout=0.5,
                       nats_url=f"nats://127.0.0.1:{free_port()}")
    out = run("doctor", "--config", str(cfg), "-o", "json", home=tmp_path)
    assert out.returncode == 1
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["nats"]["status"] == "fail" and "cannot connect" in checks["nats"]["detail"]


@pytest.mark.slow
def test_doctor_on_a_three_server_cluster(nats_cluster: Any, tmp_path: Path) -> None:
    urls = ",".join(nats_cluster.urls)
    cfg = write_config(tmp_path / "n.yaml", name="prod", node_id="n1", nats_url=urls,
                       stream_replicas=3, data_dir=str(tmp_path / "d"))
    out = run("doctor", "--config", str(cfg), "-o", "json", home=tmp_path)
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["replicas"]["status"] == "ok", checks["replicas"]
    assert "a stream with 3 replica(s)" in checks["replicas"]["detail"]
    assert out.returncode == 0, out.stdout


@pytest.mark.slow
def test_shell_completion_as_documented() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYCLUSTER_")}
    script = subprocess.run([*PYCLUSTER], env={**env, "_PYCLUSTER_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_pycluster_completion" in script.stdout
    words = subprocess.run([*PYCLUSTER], capture_output=True, text=True, timeout=60,
                           env={**env, "_PYCLUSTER_COMPLETE": "bash_complete",
                                "COMP_WORDS": "pycluster d", "COMP_CWORD": "1"})
    assert {"plain,dev", "plain,doctor", "plain,demo"} <= set(words.stdout.split())


def test_every_command_help_shows_an_example() -> None:
    import click
    from click.testing import CliRunner

    from pycluster.cli.main import cli
    from pycluster.plugins import create_plugin_manager

    pm = create_plugin_manager()
    pm.hook.pycluster_add_cli_commands(cli=cli)  # the plugins' commands too, as main() does

    ctx = click.Context(cli, obj=pm)

    def walk(group: click.Group, path: list[str]) -> list[list[str]]:
        out = []
        for name in group.list_commands(ctx):  # the lazily imported ones too
            cmd = group.get_command(ctx, name)
            assert cmd is not None, [*path, name]
            if isinstance(cmd, click.Group):
                out += walk(cmd, [*path, name])
            else:
                out.append([*path, name])
        return out

    missing = []
    for path in walk(cli, []):
        res = CliRunner().invoke(cli, [*path, "--help"], obj=pm)
        assert res.exit_code == 0, (path, res.output)
        if "example" not in res.output.lower():
            missing.append(" ".join(path))
    assert not missing, f"--help without an example: {missing}"


@pytest.mark.slow
async def test_kv_get_put_ls(make_platform: Any, nats_url: str, unique_name: str,
                             tmp_path: Path) -> None:
    orders = App("orders")
    await make_platform("a", orders)
    await wait_for(lambda: orders.is_leader, 10)
    await orders.kv.put("user.1", "alice")
    cfg = write_config(tmp_path / "node.yaml", name=unique_name, node_id="a",
                       nats_url=nats_url)
    c = ["--config", str(cfg)]
    got = await arun("kv", "orders", "get", "user.1", *c, home=tmp_path)
    assert got.returncode == 0 and got.stdout.strip() == "alice", got.stderr
    put = await arun("kv", "orders", "put", "user.2", "bob", *c, "-o", "json", home=tmp_path)
    assert put.returncode == 0 and json.loads(put.stdout)["revision"] > 0, put.stderr
    assert await orders.kv.get("user.2") == b"bob"  # the app sees the operator's write
    ls = await arun("kv", "orders", "ls", "user.*", *c, "-o", "json", home=tmp_path)
    assert json.loads(ls.stdout) == ["user.1", "user.2"]
    missing = await arun("kv", "orders", "get", "nope", *c, home=tmp_path)
    assert missing.returncode == 1 and "no such key" in missing.stderr
    bad = await arun("kv", "orders", "get", "..", *c, home=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr
    typo = await arun("kv", "ordrs", "ls", *c, home=tmp_path)
    assert typo.returncode == 2 and f"no app 'ordrs' on platform {unique_name!r}" in typo.stderr


@pytest.mark.slow
async def test_lock_ls_shows_holder_token_and_waiters(make_platform: Any, nats_url: str,
                                                      unique_name: str, tmp_path: Path) -> None:
    orders = App("orders")
    p = await make_platform("a", orders)
    await wait_for(lambda: orders.is_leader, 10)
    cfg = write_config(tmp_path / "node.yaml", name=unique_name, node_id="a",
                       nats_url=nats_url)
    async with orders.lock("batch", ttl=5) as held, p.lock("deploy", ttl=5) as plat:
        second = orders.lock("batch", ttl=5)
        waiter = asyncio.create_task(second.acquire(timeout=30))
        out: subprocess.CompletedProcess[str] | None = None

        async def listed_with_waiter() -> bool:
            nonlocal out
            out = await arun("lock", "ls", "--config", str(cfg), "-o", "json", home=tmp_path)
            rows = json.loads(out.stdout) if out.returncode == 0 else []
            return any(r["lock"] == "batch" and r["waiters"] for r in rows)

        await wait_for(listed_with_waiter, 30)
        assert out is not None
        rows = {(r["scope"], r["lock"]): r for r in json.loads(out.stdout)}
        batch, deploy = rows[("orders", "batch")], rows[("platform", "deploy")]
        assert batch["token"] == held.token and batch["holder"].startswith("a")
        assert len(batch["waiters"]) == 1 and batch["held_for"] is not None
        assert deploy["token"] == plat.token
        text = await arun("lock", "ls", "--app", "orders", "--config", str(cfg),
                          home=tmp_path)
        assert "batch" in text.stdout and "deploy" not in text.stdout
        assert "HOLDER" in text.stdout
    await waiter
    await second.release()
    typo = await arun("lock", "ls", "--app", "ordrs", "--config", str(cfg), home=tmp_path)
    assert typo.returncode == 2 and "no app 'ordrs'" in typo.stderr


@pytest.mark.slow
async def test_placement_commands_read_the_node_config_file(
        make_platform: Any, nats_url: str, unique_name: str, tmp_path: Path) -> None:
    a = await make_platform("a", App("orders"))
    await make_platform("b", App("orders"))
    cfg = write_config(tmp_path / "node.yaml", name=unique_name, node_id="a",
                       nats_url=nats_url)
    cordon = await arun("node", "cordon", "b", "--config", str(cfg), "-o", "json",
                        home=tmp_path)
    assert cordon.returncode == 0, cordon.stderr
    assert json.loads(cordon.stdout) == {"node": "b", "cordoned": True}
    await wait_for(lambda: "b" in a.placement.ops.cordoned, 10)
    # PYCLUSTER_CONFIG works as --config.
    listed = await asyncio.to_thread(
        subprocess.run, [*PYCLUSTER, "node", "list", "-o", "json"], capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYCLUSTER_CONFIG": str(cfg)})
    assert listed.returncode == 0, listed.stderr
    nodes = {n["node_id"]: n for n in json.loads(listed.stdout)["nodes"]}
    assert nodes["b"]["cordoned"] and not nodes["a"]["cordoned"]
    shown = await arun("app", "show", "orders", "--config", str(cfg), "-o", "json",
                       home=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout)["nodes"]["b"]["cordoned"]
    maint = await arun("maintenance", "show", "--config", str(cfg), "-o", "json",
                       home=tmp_path)
    assert json.loads(maint.stdout) == {"maintenance": False, "maintenance_apps": []}
