"""The process backend: real commands, real NATS, in-process platforms; and the fence guard
on its own (real processes, real signals)."""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster import App, ConfigError, Context, Process, Singleton, Spread, fenceguard
from pycluster.backend import (
    BackendHealth,
    HealthCheck,
    Supervisor,
    backends_of,
    expand,
    fencing_env,
)
from pycluster.builtin.process import ProcessController
from pycluster.cli.config_apps import apps_from_config
from pycluster.plugins import create_plugin_manager
from pycluster.testing import free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def pids_in(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def backend_of(app: App) -> Supervisor:
    rt = app._runtime
    assert rt is not None
    (_, backend), = backends_of(rt.stages)
    assert isinstance(backend, Supervisor) and isinstance(backend.controller, ProcessController)
    return backend


def last_exit(sup: Supervisor) -> int | None:
    assert isinstance(sup.controller, ProcessController)
    return sup.controller.last_exit


def sh(script: str) -> list[str]:
    return ["sh", "-c", textwrap.dedent(script)]


def q(path: Path) -> str:
    """A path as one shell word (a checkout or TMPDIR may contain spaces)."""
    return shlex.quote(str(path))


# -- options ----------------------------------------------------------------------------------


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="must not be empty"):
        Process("")
    with pytest.raises(ConfigError, match=r"Process\.restart"):
        Process("true", restart="sometimes")
    with pytest.raises(ConfigError, match=r"Process\.grace"):
        Process("true", grace=0)
    with pytest.raises(ConfigError, match=r"Process\.max_restarts"):
        Process("true", max_restarts=-1)
    with pytest.raises(ConfigError, match="No closing quotation"):
        Process("sh -c 'oops")
    with pytest.raises(ConfigError, match="exactly one of"):
        HealthCheck()
    with pytest.raises(ConfigError, match="exactly one of"):
        HealthCheck(tcp="127.0.0.1:1", command="true")
    with pytest.raises(ConfigError, match="host:port"):
        HealthCheck(tcp="localhost")
    with pytest.raises(ConfigError, match="http://"):
        HealthCheck(http="ftp://x/")
    with pytest.raises(ConfigError, match="start_timeout"):
        HealthCheck(command="true", start_timeout=0)
    assert Process(["a", "b c"]).argv() == ["a", "b c"]
    assert Process(["a", "b"]) == Process(("a", "b"))  # a list is kept as a tuple
    assert Process("a 'b c'").argv() == ["a", "b c"]


def test_config_file_section(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent("""
        name: prod
        apps:
          - name: web
            process:
              command: ["python", "-m", "http.server", "8000"]
              grace: 3
              restart: always
              max_restarts: 5
              health: {http: "http://127.0.0.1:8000/", interval: 1, start_timeout: 20}
    """))
    (app,) = apps_from_config(cfg, create_plugin_manager(load_entrypoints=False))
    (opt,) = app.options
    assert isinstance(opt, Process)
    assert opt.argv() == ["python", "-m", "http.server", "8000"]
    assert (opt.grace, opt.restart, opt.max_restarts) == (3, "always", 5)
    assert opt.health == HealthCheck(http="http://127.0.0.1:8000/", interval=1, start_timeout=20)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apps: [{name: web, process: {command: x, health: {tcp: nope}}}]\n")
    with pytest.raises(ConfigError, match="host:port"):
        apps_from_config(bad, create_plugin_manager(load_entrypoints=False))


# -- health probes --------------------------------------------------------------------------


async def test_health_probes_against_real_endpoints(tmp_path: Path) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        status = b"200 OK" if b"/ok" in request else b"503 Service Unavailable"
        writer.write(b"HTTP/1.0 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await HealthCheck(http=f"http://127.0.0.1:{port}/ok").probe()
        assert ok.healthy and ok.detail == "HTTP 200"
        bad = await HealthCheck(http=f"http://127.0.0.1:{port}/bad").probe()
        assert not bad.healthy and bad.detail == "HTTP 503"
        assert (await HealthCheck(tcp=f"127.0.0.1:{port}").probe()).healthy
    finally:
        server.close()
        await server.wait_closed()
    closed = await HealthCheck(tcp=f"127.0.0.1:{free_port()}").probe()
    assert not closed.healthy and "TCP" in closed.detail
    marker = tmp_path / "ok"
    check = HealthCheck(command=["test", "-e", str(marker)])
    assert not (await check.probe()).healthy
    marker.touch()
    assert (await check.probe()).healthy
    slow = await HealthCheck(command="sleep 30", timeout=0.2).probe()
    assert not slow.healthy and "timed out" in slow.detail
    env = await HealthCheck(command=["sh", "-c", 'test "$X" = 1']).probe({"X": "1"})
    assert env.healthy


# -- the backend in a platform ---------------------------------------------------------------


async def test_epoch_env_and_placeholders_reach_the_command(make_platform: Any,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "seen"
    app = App("svc", Singleton(), Process(
        ["sh", "-c", 'echo "$PYCLUSTER_EPOCH $1 $PYCLUSTER_APP $PYCLUSTER_NODE" > "$2"; '
                     "exec sleep 600", "sh", "{epoch}", str(out)]))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 15)
    await wait_for(out.exists, 10)
    await wait_for(lambda: out.read_text().strip() != "", 10)
    assert out.read_text().split() == [str(app.epoch), str(app.epoch), "svc", "n1"]
    assert app.epoch and app.epoch > 0


async def test_output_goes_to_the_node_log_with_the_app_name(
    make_platform: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pycluster.backend")
    app = App("chatty", Singleton(), Process(sh("""
        echo hello from stdout
        echo trouble on stderr >&2
        exec sleep 600
    """)))
    await make_platform("n1", app)

    def lines() -> list[tuple[str, str]]:
        return [(r.name, r.getMessage()) for r in caplog.records
                if r.name.startswith("pycluster.backend")]

    await wait_for(lambda: len(lines()) >= 2, 15)
    assert ("pycluster.backend.chatty", "chatty[stdout] hello from stdout") in lines()
    assert ("pycluster.backend.chatty", "chatty[stderr] trouble on stderr") in lines()


async def test_stop_is_sigterm_then_sigkill_for_the_whole_tree(make_platform: Any,
                                                               tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The command ignores SIGTERM, has a child in its group and a double-forked daemon in a
    # session of its own: stop must reach all of them.
    app = App("svc", Singleton(), Process(sh(f"""
        trap '' TERM
        P={q(pids)}; export P
        sleep 600 & echo $! >> "$P"
        setsid sh -c 'trap "" TERM; sleep 601 & echo $! >> "$P"; wait' &
        echo $$ >> "$P"
        wait
    """), grace=0.5))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active and len(pids_in(pids)) == 3, 15)
    tree = pids_in(pids)
    assert all(alive(p) for p in tree)
    backend = backend_of(app)
    await app.step_down(cooldown=30)
    assert last_exit(backend) == -signal.SIGKILL  # SIGTERM was ignored: SIGKILL after the grace
    await wait_for(lambda: not any(alive(p) for p in tree), 10)


async def test_graceful_stop_lets_the_command_exit_on_sigterm(make_platform: Any) -> None:
    app = App("svc", Singleton(), Process(sh("""
        trap 'exit 0' TERM
        sleep 600 & wait
    """), grace=30))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 15)
    backend = backend_of(app)
    assert (await backend.health()).healthy
    await app.step_down(cooldown=30)
    assert last_exit(backend) == 0
    health = await backend.health()
    assert not health.healthy and health.data["state"] == "stopped"


@pytest.mark.slow
async def test_graceful_stop_may_take_longer_than_the_lease_ttl(make_platform: Any) -> None:
    # The lease (2 s) keeps being renewed while the node steps down gracefully, and the guard
    # follows the renewals: the command gets its 3 s of clean-up, not only the lease's rest.
    app = App("svc", Singleton(), Process(sh("""
        trap 'sleep 3; exit 0' TERM
        sleep 600 & wait
    """), grace=20))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 15)
    backend = backend_of(app)
    await app.step_down(cooldown=30)
    assert last_exit(backend) == 0


async def test_crash_is_restarted_with_back_off_then_the_node_steps_down(
    make_platform: Any, tmp_path: Path,
) -> None:
    starts = tmp_path / "starts"
    proc = Process(sh(f"""
        echo "$PYCLUSTER_NODE" >> {q(starts)}
        [ "$PYCLUSTER_NODE" = n2 ] && exec sleep 600
        exit 3
    """), max_restarts=2, restart_backoff=0.2)
    a1, a2 = App("svc", Singleton(), proc), App("svc", Singleton(), proc)
    p1 = await make_platform("n1", a1)
    await wait_for(lambda: a1.is_active, 15)
    await make_platform("n2", a2)
    await wait_for(lambda: a2.is_active, 30)
    assert starts.read_text().split().count("n1") == 3  # the first run and two restarts
    assert not a1.is_active
    ev = next(e for e in p1.runtimes["svc"].stage_events if e.action == "running")
    assert (ev.stage, ev.outcome, ev.policy) == ("process-0", "failed", "step_down")
    assert "exited with 3" in ev.error
    assert backend_of(a1).state in ("failed", "stopped")


async def test_restart_never_steps_down_at_the_first_exit(make_platform: Any,
                                                          tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    proc = Process(sh(f"""
        echo "$PYCLUSTER_NODE" >> {q(starts)}
        [ "$PYCLUSTER_NODE" = n2 ] && exec sleep 600
        sleep 0.3; exit 1
    """), restart="never")
    a1, a2 = App("svc", Singleton(), proc), App("svc", Singleton(), proc)
    await make_platform("n1", a1)
    await wait_for(lambda: a1.is_active, 15)
    await make_platform("n2", a2)
    await wait_for(lambda: a2.is_active, 30)
    assert starts.read_text().split().count("n1") == 1


async def test_clean_exit_is_left_alone_under_on_failure(make_platform: Any) -> None:
    app = App("svc", Spread(), Process(["true"], restart_backoff=0.1))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 15)
    backend = backend_of(app)
    await wait_for(lambda: backend.state == "exited", 10)
    assert backend.restarts == 0 and last_exit(backend) == 0 and app.is_active
    assert not (await backend.health()).healthy


async def test_command_that_cannot_start_fails_the_stage(make_platform: Any) -> None:
    missing = Process(["/nonexistent/daemon", "--flag"])
    a1 = App("svc", Singleton(), missing)
    p1 = await make_platform("n1", a1)
    rt = p1.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "failed" for e in rt.stage_events), 15)
    ev = next(e for e in rt.stage_events if e.outcome == "failed")
    assert ev.stage == "process-0" and ev.policy == "step_down"
    assert "cannot start '/nonexistent/daemon'" in ev.error
    assert "No such file or directory" in ev.error
    assert not a1.is_active


async def test_becomes_active_only_once_healthy(make_platform: Any) -> None:
    port = free_port()
    seen: list[bool] = []
    app = App("web", Singleton(), Process(
        sh(f"sleep 1; exec {sys.executable} -m http.server {port} --bind 127.0.0.1"),
        health=HealthCheck(http=f"http://127.0.0.1:{port}/", interval=0.5,
                           start_timeout=60)))

    @app.on_active
    async def check(ctx: Context) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            seen.append(True)  # the port answers by the time the app is active

    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 60)
    assert seen == [True]
    health = await backend_of(app).health()
    assert health.healthy and health.detail == "HTTP 200"


@pytest.mark.slow
async def test_never_healthy_fails_the_stage_and_another_node_takes_over(
    make_platform: Any,
) -> None:
    proc = Process(["sleep", "600"], health=HealthCheck(
        command=["sh", "-c", 'test "$PYCLUSTER_NODE" = n2'], interval=0.2, start_timeout=1.0))
    a1, a2 = App("svc", Singleton(), proc), App("svc", Singleton(), proc)
    p1 = await make_platform("n1", a1)
    rt = p1.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "failed" for e in rt.stage_events), 20)
    ev = next(e for e in rt.stage_events if e.outcome == "failed")
    assert "not healthy within 1.0s" in ev.error and "command exited 1" in ev.error
    await make_platform("n2", a2)
    await wait_for(lambda: a2.is_active, 30)
    assert not a1.is_active


async def test_exit_before_healthy_fails_the_stage(make_platform: Any) -> None:
    app = App("svc", Singleton(), Process(
        sh("sleep 0.2; exit 7"),
        health=HealthCheck(tcp=f"127.0.0.1:{free_port()}", interval=0.1, start_timeout=30)))
    p = await make_platform("n1", app)
    rt = p.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "failed" for e in rt.stage_events), 20)
    ev = next(e for e in rt.stage_events if e.outcome == "failed")
    assert "exited with 7 before it became healthy" in ev.error


async def test_unhealthy_while_active_is_restarted(make_platform: Any, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    starts = tmp_path / "starts"
    app = App("svc", Singleton(), Process(
        sh(f"echo x >> {q(starts)}; touch {q(ready)}; exec sleep 600"), restart_backoff=0.1,
        health=HealthCheck(command=["test", "-e", str(ready)], interval=0.2, failure_threshold=2,
                           start_timeout=30)))
    await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 20)
    backend = backend_of(app)
    first = (await backend.health()).data["pid"]
    ready.unlink()  # the service turns unhealthy: after 2 failed checks it is restarted
    await wait_for(lambda: starts.read_text().count("x") == 2, 20)
    await wait_for(lambda: backend.state == "running", 20)
    health = await backend.health()
    assert health.healthy and health.data["pid"] != first and backend.restarts == 1
    assert isinstance(first, int) and not alive(first)
    assert app.is_active


# -- the fence guard on its own --------------------------------------------------------------


class Guarded:
    """A fence guard run by the test (the test plays the node)."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.pids = tmp / "pids"
        self.ours, theirs = socket.socketpair()
        script = f"""
            trap '' TERM
            P={q(self.pids)}; export P
            echo $$ >> "$P"
            sleep 600 & echo $! >> "$P"
            setsid sh -c 'sleep 601 & echo $! >> "$P"; wait' &
            wait
        """
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", fenceguard.__file__, "--control-fd",
             str(theirs.fileno()), "--grace", "0.3", "--label", "t", *extra, "--",
             *sh(script)],
            pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
        )
        theirs.close()
        self.ours.settimeout(30)
        first = self.ours.recv(100).decode()
        assert first.startswith("started "), first
        self.pid = int(first.split()[1])

    def tree(self) -> list[int]:
        return pids_in(self.pids)

    def messages(self) -> str:
        self.ours.settimeout(5)
        out = b""
        while chunk := self.ours.recv(1000):
            out += chunk
        return out.decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.ours.close()


@pytest.fixture
def guarded(tmp_path: Path) -> Any:
    made: list[Guarded] = []

    def make(*extra: str) -> Guarded:
        g = Guarded(tmp_path, *extra)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


async def test_guard_kills_the_tree_when_the_node_dies(guarded: Any) -> None:
    g = guarded()
    await wait_for(lambda: len(g.tree()) == 3, 10)
    tree = g.tree()
    g.ours.close()  # what the kernel does when the node is SIGKILLed
    assert await asyncio.to_thread(g.proc.wait, 30) == 128 + signal.SIGKILL
    assert not any(alive(p) for p in tree)


async def test_guard_fences_when_the_lease_deadline_passes(guarded: Any) -> None:
    now = time.monotonic()
    g = guarded("--term-at", str(now + 1.0), "--kill-at", str(now + 1.5))
    await wait_for(lambda: len(g.tree()) == 3, 10)
    tree = g.tree()
    # A renewal moves the deadline: nothing happens at the first one.
    g.ours.sendall(f"deadline {now + 2.0} {now + 2.5}\n".encode())
    await asyncio.sleep(1.2)
    assert all(alive(p) for p in tree)
    # No more renewals (the node is paused): SIGTERM at 2.0 (ignored), SIGKILL after the grace
    # (0.3 s), at the latest at 2.5.
    assert await asyncio.to_thread(g.proc.wait, 30) == 128 + signal.SIGKILL
    assert time.monotonic() >= now + 2.0
    assert not any(alive(p) for p in tree)
    msgs = g.messages()
    assert "fencing lease deadline passed" in msgs and "exited -9" in msgs


async def test_guard_stop_follows_lease_renewals(guarded: Any) -> None:
    now = time.monotonic()
    g = guarded("--term-at", str(now + 1.0), "--kill-at", str(now + 1.5))
    await wait_for(lambda: len(g.tree()) == 3, 10)
    g.ours.sendall(b"stop 2.5\n")  # SIGTERM is ignored: SIGKILL after 2.5 s, if renewed
    t0 = time.monotonic()
    while g.proc.poll() is None and time.monotonic() - t0 < 30:
        d = time.monotonic() + 1.0
        g.ours.sendall(f"deadline {d - 0.2} {d}\n".encode())
        await asyncio.sleep(0.2)
    assert g.proc.returncode == 128 + signal.SIGKILL
    assert time.monotonic() - t0 >= 2.5  # the renewals moved the lease's kill deadline
    assert "fencing" not in g.messages()


async def test_guard_stop_command_and_exit_status(guarded: Any, tmp_path: Path) -> None:
    g = guarded()
    await wait_for(lambda: len(g.tree()) == 3, 10)
    tree = g.tree()
    g.ours.sendall(b"stop 0.2\n")
    assert await asyncio.to_thread(g.proc.wait, 30) == 128 + signal.SIGKILL
    assert not any(alive(p) for p in tree)
    assert g.messages().strip().endswith("exited -9")


async def test_guard_reports_a_command_that_cannot_start() -> None:
    ours, theirs = socket.socketpair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", fenceguard.__file__, "--control-fd", str(theirs.fileno()),
        "--", "/nonexistent/x", pass_fds=[theirs.fileno()])
    theirs.close()
    assert await asyncio.wait_for(proc.wait(), 30) == fenceguard.EXEC_FAILED
    ours.settimeout(5)
    assert ours.recv(200).decode().startswith("failed No such file or directory")
    ours.close()


# -- helpers for third-party backends ----------------------------------------------------------


async def test_fencing_env_and_expand(make_platform: Any) -> None:
    app = App("svc", Singleton())
    p = await make_platform("n1", app)
    ctx = Context(app=app, platform=p, node_id="n1", epoch=42)
    assert fencing_env(ctx) == {"PYCLUSTER_EPOCH": "42", "PYCLUSTER_APP": "svc",
                                "PYCLUSTER_NODE": "n1", "PYCLUSTER_PLATFORM": p.name}
    assert expand(["--token={epoch}", "{app}@{node}", "${HOME}", "{other}"], ctx) == [
        "--token=42", "svc@n1", "${HOME}", "{other}"]
    assert BackendHealth(True).detail == ""
    assert os.environ.get("PYCLUSTER_EPOCH") is None


async def test_backend_health_feeds_app_health_and_metrics(make_platform: Any,
                                                          tmp_path: Path) -> None:
    """The process backend's state is app health check ``process-0`` on every node, and so
    the ``pycluster_health{check}`` gauge: healthy while the command runs, unhealthy once it
    is gone and cannot be restarted, "standby" where the app is not active."""
    flag = tmp_path / "up"
    flag.write_text("1")
    app = App("svc", Singleton(), Process(
        ["sh", "-c", "exec sleep 600"], max_restarts=0,
        health=HealthCheck(command=["test", "-e", str(flag)], interval=0.2,
                           failure_threshold=1)))
    platform = await make_platform("n1", app)
    await wait_for(lambda: app.is_active, 15)

    def check() -> dict[str, Any]:
        return app.health.status().get("svc.process-0", {})

    await wait_for(lambda: check().get("status") == "healthy", 15)
    from prometheus_client.parser import text_string_to_metric_families

    text = platform.services["metrics"].render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = [s for s in families["pycluster_health"].samples
               if s.labels.get("check") == "svc.process-0"]
    assert samples and samples[0].value == 1.0
    flag.unlink()  # the service stops answering its health check
    await wait_for(lambda: check().get("status") == "unhealthy", 15)
