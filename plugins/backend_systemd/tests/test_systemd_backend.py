"""The systemd backend against a real systemd (PID 1 of a podman container).

The backend reaches the container's manager through the command prefix ``podman exec NAME``,
exactly as it would reach another host through ``ssh host``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

import pycluster_systemd.plugin as systemd_plugin
from pycluster import App, Platform
from pycluster.kernel.context import Context
from pycluster.plugins import create_plugin_manager
from pycluster.testing.engines.systemd import SystemdContainer, systemd_available
from pycluster.testing.nodes import NodeCluster
from pycluster.testing.pytest_plugin import require
from pycluster.testing.wait import wait_for
from pycluster_systemd import Systemd, SystemdBackend, SystemdUnitError

pytestmark = pytest.mark.timeout(300)

DEP_UNIT = """[Unit]
Description=pycluster test dependency
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo dependency up'
"""

# Starts only when the dependency is active (proves the order); refuses to start while
# /tmp/broken exists (a service that cannot be restarted); records the epoch it was given.
MAIN_UNIT = """[Unit]
Description=pycluster test service
[Service]
ExecStartPre=/bin/systemctl is-active --quiet dep.service
ExecStart=/bin/sh -c 'test -f /tmp/broken && { echo refusing to start: broken >&2; exit 1; }; \
echo "epoch=$PYCLUSTER_EPOCH" > /tmp/epoch; echo serving; exec sleep infinity'
"""

NOTIFY_UNIT = """[Unit]
Description=pycluster notify test
[Service]
Type=notify
NotifyAccess=all
ExecStart=/bin/sh -c 'echo warming up; sleep 2; systemd-notify --ready --status=serving; \
exec sleep infinity'
"""

FAIL_UNIT = """[Unit]
Description=pycluster failing unit
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'echo about to fail: missing config >&2; exit 3'
"""


def _container() -> SystemdContainer:
    ok, reason = systemd_available()
    require("systemd container (podman, debootstrap)", ok, reason)
    sd = SystemdContainer().start()
    try:
        for name, text in (("dep", DEP_UNIT), ("main", MAIN_UNIT), ("notify", NOTIFY_UNIT),
                           ("fail", FAIL_UNIT)):
            sd.write_file(f"/etc/systemd/system/{name}.service", text)
        sd.systemctl("daemon-reload")
    except BaseException:
        sd.stop()
        raise
    return sd


@pytest.fixture(scope="module")
def sd1() -> Iterator[SystemdContainer]:
    """A systemd container with the test units."""
    sd = _container()
    yield sd
    sd.stop()


@pytest.fixture(scope="module")
def sd2() -> Iterator[SystemdContainer]:
    """A second one (the standby's host)."""
    sd = _container()
    yield sd
    sd.stop()


def prefix(sd: SystemdContainer) -> list[str]:
    """How the backend reaches the container's manager."""
    return ["podman", "exec", sd.name]


def active(sd: SystemdContainer, unit: str) -> bool:
    """Whether ``unit`` is active in the container."""
    return sd.systemctl("is-active", unit, check=False).stdout.strip() == "active"


def reset(sd: SystemdContainer) -> None:
    """Stop every test unit and clear the failure flag."""
    sd.exec("rm", "-f", "/tmp/broken", "/tmp/epoch")
    sd.systemctl("stop", "main.service", "notify.service", "dep.service", "fail.service",
                 check=False)
    sd.systemctl("reset-failed", check=False)


@pytest.fixture
async def platforms(nats_url: str, unique_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process platforms with the systemd plugin (stopped at teardown, in reverse)."""
    async with AsyncExitStack() as stack:

        async def make(node_id: str, *apps: App) -> Platform:
            pm = create_plugin_manager(load_entrypoints=False, extra=[("systemd", systemd_plugin)])
            p = Platform(unique_name, node_id=node_id, nats_url=nats_url, plugin_manager=pm,
                         lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=10.0)
            for app in apps:
                p.register(app)
            await p.start()
            stack.push_async_callback(p.stop)
            return p

        yield make


def offline(opt: Systemd, name: str = "t") -> tuple[SystemdBackend, Context]:
    """A controller and a context without a running platform (the controller alone: no
    supervisor, no fence)."""
    pm = create_plugin_manager(load_entrypoints=False, extra=[("systemd", systemd_plugin)])
    platform = Platform("offline", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    app = App(name, opt)
    platform.register(app)
    backend = SystemdBackend(opt, app, platform)
    return backend, Context(app=app, platform=platform, node_id="n1", epoch=7, reason="test")


@pytest.mark.slow
async def test_unit_started_and_stopped_with_requires_and_epoch(
    sd1: SystemdContainer, platforms: Callable[..., Any]
) -> None:
    reset(sd1)
    opt = Systemd("main", requires=["dep"], prefix=prefix(sd1), check_interval=0.5,
                  epoch_variable="PYCLUSTER_EPOCH")
    app = App("svc", opt)
    p = await platforms("n1", app)
    assert await app.wait_for_leadership(60)
    assert active(sd1, "dep.service") and active(sd1, "main.service")
    # The fencing token reached the unit through the manager's environment.
    assert sd1.exec("cat", "/tmp/epoch").stdout.strip() == f"epoch={app.epoch}"
    h = await opt.health()
    assert h.healthy and h.data["ActiveState"] == "active"
    assert any("serving" in line for line in await opt.journal())
    await wait_for(lambda: p.health.status().get("svc.systemd-main_service", {})
                   .get("status") == "healthy", 30, message="app health check healthy")
    await p.stop()
    assert not active(sd1, "main.service")
    assert not active(sd1, "dep.service")  # stop_requires: stopped after the unit


@pytest.mark.slow
async def test_notify_unit_waits_for_ready(sd1: SystemdContainer) -> None:
    reset(sd1)
    backend, ctx = offline(Systemd("notify", prefix=prefix(sd1)))
    started = time.monotonic()
    await backend.start(ctx)
    took = time.monotonic() - started
    try:
        h = await backend.probe()
        assert h.healthy, h
        assert h.data["Type"] == "notify" and h.data["StatusText"] == "serving"
        assert took >= 1.8, f"start returned after {took:.2f}s, before READY=1"
    finally:
        await backend.stop(ctx)
    assert not active(sd1, "notify.service")


@pytest.mark.slow
async def test_failing_unit_reports_journal_lines(sd1: SystemdContainer) -> None:
    reset(sd1)
    backend, ctx = offline(Systemd("fail", prefix=prefix(sd1), journal_lines=10))
    with pytest.raises(SystemdUnitError) as info:
        await backend.start(ctx)
    err = info.value
    assert err.unit == "fail.service" and err.action == "start"
    assert any("about to fail: missing config" in line for line in err.journal)
    assert "about to fail: missing config" in str(err)
    await backend.stop(ctx)


@pytest.mark.slow
async def test_unknown_unit_and_missing_prefix_command_are_clear_errors(
    sd1: SystemdContainer,
) -> None:
    backend, ctx = offline(Systemd("no-such-unit", prefix=prefix(sd1)))
    with pytest.raises(SystemdUnitError, match="LoadState=not-found"):
        await backend.start(ctx)
    backend, ctx = offline(Systemd("main", prefix=["/nonexistent/ssh", "host"]))
    with pytest.raises(SystemdUnitError, match="cannot run '/nonexistent/ssh'"):
        await backend.start(ctx)
    h = await backend.probe()
    assert not h.healthy and "cannot run" in h.detail


@pytest.mark.slow
async def test_unit_that_dies_is_restarted(
    sd1: SystemdContainer, platforms: Callable[..., Any]
) -> None:
    reset(sd1)
    opt = Systemd("main", requires=["dep"], prefix=prefix(sd1), check_interval=0.3,
                  restart_backoff=0.1, max_restarts=2)
    app = App("svc", opt)
    await platforms("n1", app)
    assert await app.wait_for_leadership(60)
    pid_before = (await opt.health()).data["MainPID"]
    sd1.systemctl("kill", "--signal=SIGKILL", "main.service")
    await wait_for(lambda: opt.backend.policy.total >= 1, 60, message="backend restarted unit")
    await wait_for(lambda: active(sd1, "main.service"), 60, message="unit active again")
    h = await opt.health()
    assert h.healthy and h.data["MainPID"] != pid_before
    assert app.is_active


@pytest.mark.slow
async def test_unit_that_cannot_be_restarted_hands_over_to_standby(
    sd1: SystemdContainer, sd2: SystemdContainer, platforms: Callable[..., Any]
) -> None:
    reset(sd1)
    reset(sd2)
    opt1 = Systemd("main", requires=["dep"], prefix=prefix(sd1), check_interval=0.3,
                   restart_backoff=0.1, max_restarts=1)
    opt2 = Systemd("main", requires=["dep"], prefix=prefix(sd2), check_interval=0.3)
    app1, app2 = App("svc", opt1), App("svc", opt2)
    await platforms("n1", app1)
    assert await app1.wait_for_leadership(60)
    await platforms("n2", app2)
    assert not active(sd2, "main.service")
    sd1.exec("touch", "/tmp/broken")
    sd1.systemctl("kill", "--signal=SIGKILL", "main.service")
    # n1 restarts once, fails, steps down; n2 takes over and runs the unit on its host.
    assert await app2.wait_for_leadership(90)
    assert active(sd2, "main.service")
    await wait_for(lambda: not app1.is_active, 30, message="n1 stepped down")
    assert not active(sd1, "main.service")
    rt = app1._runtime
    assert rt is not None
    failed = [e for e in rt.stage_events if e.action == "running" and e.outcome == "failed"]
    assert failed and "restart policy exhausted" in failed[-1].error


def _monotonic(sd: SystemdContainer, prop: str) -> int:
    """A ``...TimestampMonotonic`` property of main.service (the host's CLOCK_MONOTONIC, in
    microseconds: containers share the kernel's clock)."""
    out = sd.systemctl("show", "main.service", f"--property={prop}").stdout
    return int(out.strip().split("=", 1)[1])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_unit_never_outlives_the_lease_of_a_dead_or_paused_node(
    how: str, sd1: SystemdContainer, sd2: SystemdContainer, tmp_path: Path, nats_url: str,
    unique_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    reset(sd1)
    reset(sd2)
    # Prepended, not replaced: the node processes must still import this checkout's pycluster.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p))
    hosts = {"n1": sd1, "n2": sd2}
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=2, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--setup", "systemd_fence_node:options"],
                    node_args={n: ["--setup-arg", f"prefix={shlex.join(prefix(sd))}"]
                               for n, sd in hosts.items()})
    try:
        await c.start(60)
        first = await c.wait_for_leader(60)
        epoch = c.role(first)[1] or 0
        old = hosts[first]
        await wait_for(lambda: active(old, "main.service"), 60, message="unit active")
        if how == "sigkill":
            c.kill(first)  # the node runs no code any more: its fence guard stops the unit
        else:
            c.pause(first)  # SIGSTOP: renewals stop, the guard fences at the deadline
        await wait_for(lambda: not active(old, "main.service"), 60,
                       message="fence guard stopped the unit")
        second = await c.wait_for_leader(60, exclude=[first], min_epoch=epoch + 1)
        new = hosts[second]
        await wait_for(lambda: active(new, "main.service"), 60, message="unit active on n2")
        stopped = _monotonic(old, "ExecMainExitTimestampMonotonic")
        started = _monotonic(new, "ExecMainStartTimestampMonotonic")
        assert 0 < stopped < started, (stopped, started)
        if how == "sigstop":
            c.resume(first)  # it learns it lost the lease; it must not start its unit again
            await wait_for(lambda: c.role(first)[0] == "passive", 60)
            await asyncio.sleep(1.0)
            assert not active(old, "main.service")
        await c.stop()
    finally:
        c.stop_sync()
        reset(sd1)
        reset(sd2)
