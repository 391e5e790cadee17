"""The docker backend never outlives its node's lease: the fence guard stops the container.

Real node processes (``python -m pycluster.testing.node``), a real engine (podman's
Docker-compatible API). The order "old container dead before the new one started" is read from
the engine's own timestamps, not from wall-clock limits.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest

from pycluster import fenceguard
from pycluster.testing.engines.podman import PodmanService, build_busybox_image
from pycluster.testing.nodes import NodeCluster
from pycluster.testing.wait import wait_for

pytestmark = pytest.mark.timeout(300)


def _when(stamp: str) -> datetime.datetime:
    """An engine timestamp (RFC 3339 with up to nanoseconds) as a datetime."""
    m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?", stamp)
    assert m, stamp
    frac = (m.group(2) or ".0")[:7]
    tz = m.group(3) or "Z"
    return datetime.datetime.fromisoformat(m.group(1) + frac + ("+00:00" if tz == "Z" else tz))


def _state(client: Any, name: str) -> dict[str, Any]:
    try:
        return dict(client.api.inspect_container(name)["State"])
    except docker.errors.NotFound:
        return {}


@pytest.mark.slow
def test_docker_kill_stops_a_container_without_the_sdk(engine: PodmanService,
                                                       client: Any) -> None:
    ctr = client.containers.run(build_busybox_image(), ["sleep", "3600"], detach=True,
                                labels={"pycluster.test": "docker"})
    assert "204" in fenceguard.docker_kill(engine.base_url, ctr.name)
    ctr.reload()
    assert ctr.status == "exited"
    assert "no such container" in fenceguard.docker_kill(engine.base_url, "pyc-no-such-ctr")
    with pytest.raises(OSError):
        fenceguard.docker_kill(f"unix://{engine.socket_path}.missing", ctr.name)


def _action_guard(*args: str) -> tuple[subprocess.Popen[bytes], socket.socket]:
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", fenceguard.__file__, "--control-fd", str(theirs.fileno()),
         *args], pass_fds=(theirs.fileno(),))
    theirs.close()
    ours.settimeout(30)
    first = b""
    while b"\n" not in first:  # the guard may send "fenced ..." right behind "armed"
        chunk = ours.recv(100)
        assert chunk, "the guard closed the socket before arming"
        first += chunk
    assert first.split(b"\n", 1)[0] == b"armed"
    return proc, ours


def test_action_guard_fences_on_node_death_and_deadline_not_on_release(tmp_path: Path) -> None:
    mark = tmp_path / "fenced"
    action = ["--fence-action", json.dumps(["sh", "-c", f"echo x >> {shlex.quote(str(mark))}"])]
    proc, ctl = _action_guard(*action)
    ctl.sendall(b"release\n")
    assert proc.wait(30) == 0 and not mark.exists()  # graceful: no action
    ctl.close()
    proc, ctl = _action_guard(*action)
    ctl.close()  # what the kernel does when the node is SIGKILLed
    assert proc.wait(30) == 0 and mark.read_text() == "x\n"
    # A deadline that passes without renewal (the node is paused) fences too.
    proc, ctl = _action_guard(*action, "--term-at", "0", "--kill-at", "0")
    assert proc.wait(30) == 0 and mark.read_text() == "x\nx\n"
    ctl.close()
    failing = ["--fence-action", json.dumps(["false"])]
    proc, ctl = _action_guard(*failing)
    ctl.close()
    assert proc.wait(30) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
async def test_container_never_outlives_the_lease_of_a_dead_or_paused_node(
    how: str, engine: PodmanService, client: Any, tmp_path: Path, nats_url: str,
    unique_name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepended, not replaced: the node processes must still import this checkout's pycluster.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p))
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=2, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--setup", "docker_fence_node:options",
                                "--setup-arg", f"image={build_busybox_image()}",
                                "--setup-arg", f"base_url={engine.base_url}"])
    try:
        await c.start(60)
        first = await c.wait_for_leader(60)
        epoch = c.role(first)[1] or 0
        old = f"pycluster-{unique_name}-svc-{first}"
        await wait_for(lambda: _state(client, old).get("Running") is True, 60,
                       message=f"container {old} running")
        if how == "sigkill":
            c.kill(first)  # the node runs no code any more: its fence guard stops the container
        else:
            c.pause(first)  # SIGSTOP: renewals stop, the guard fences at the deadline
        await wait_for(lambda: _state(client, old).get("Running") is False, 60,
                       message=f"fence guard stopped {old}")
        second = await c.wait_for_leader(60, exclude=[first], min_epoch=epoch + 1)
        new = f"pycluster-{unique_name}-svc-{second}"
        await wait_for(lambda: _state(client, new).get("Running") is True, 60,
                       message=f"container {new} running")
        stopped, started = _state(client, old)["FinishedAt"], _state(client, new)["StartedAt"]
        assert _when(stopped) < _when(started), (stopped, started)
        if how == "sigstop":
            c.resume(first)  # it learns it lost the lease; it must not start its container again
            await wait_for(lambda: c.role(first)[0] == "passive", 60)
            await asyncio.sleep(1.0)
            assert _state(client, old).get("Running") is not True
        await c.stop()
    finally:
        c.stop_sync()


@pytest.mark.slow
async def test_a_node_killed_while_its_container_comes_up_leaves_it_stopped(
    engine: PodmanService, client: Any, tmp_path: Path, nats_url: str, unique_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGKILL of the leader while its container runs but is not healthy yet (the BACKEND
    stage still waiting, no on_active): the fence guard, armed before the container was
    created, stops it; the next leader's container starts only after that."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p))
    c = NodeCluster(unique_name, [nats_url], tmp_path, size=2, lease_ttl=2.0, heartbeat=0.5,
                    extra_args=["--setup", "docker_fence_node:options",
                                "--setup-arg", f"image={build_busybox_image()}",
                                "--setup-arg", f"base_url={engine.base_url}",
                                "--setup-arg", "slow_start=8"])
    try:
        await c.start(60)
        names = {n: f"pycluster-{unique_name}-svc-{n}" for n in c.nodes}

        def starting() -> str | None:
            for n, name in names.items():
                if _state(client, name).get("Running") is True:
                    return n
            return None

        first = await wait_for(starting, 60, message="a container running")
        assert c.role(first)[0] != "active"  # still waiting for its container to be healthy
        c.kill(first)
        old = names[first]
        await wait_for(lambda: _state(client, old).get("Running") is False, 30,
                       message=f"fence guard stopped {old} of the node killed while starting")
        second = await c.wait_for_leader(90, exclude=[first])
        new = names[second]
        await wait_for(lambda: _state(client, new).get("Running") is True, 60,
                       message=f"container {new} running")
        stopped, started = _state(client, old)["FinishedAt"], _state(client, new)["StartedAt"]
        assert _when(stopped) < _when(started), (stopped, started)
        await asyncio.sleep(4.0)  # past the guard's watch: the old one stays stopped
        assert _state(client, old).get("Running") is not True
        await c.stop()
    finally:
        c.stop_sync()
