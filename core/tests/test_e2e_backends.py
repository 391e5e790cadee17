"""End-to-end: a process backend follows the lease across real node processes.

Every backend instance takes an exclusive ``flock`` on one shared file the moment it starts, and
hands the locked descriptor to a child process of its own (so the lock is held until the whole
process tree is gone). A backend that finds the lock taken records ``locked: false``: two
instances ran at the same moment. Each test also checks that no two nodes were active at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BACKEND = '''
import fcntl, json, os, signal, subprocess, sys, time

lock_path, log_path, healthy_dir = sys.argv[1], sys.argv[2], sys.argv[3]
node, epoch = os.environ["PYCLUSTER_NODE"], int(os.environ["PYCLUSTER_EPOCH"])


def record(event, **fields):
    line = dict(event=event, node=node, epoch=epoch, pid=os.getpid(), t=time.time(), **fields)
    with open(log_path, "a") as fh:
        fh.write(json.dumps(line) + "\\n")


fd = os.open(lock_path, os.O_RDWR | os.O_CREAT)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    locked = True
except BlockingIOError:
    locked = False
# A grandchild in a session of its own keeps the lock: only a whole-tree kill releases it.
child = subprocess.Popen(["setsid", "sleep", "600"], pass_fds=[fd])
poisoned = os.path.join(healthy_dir, "poisoned")
if os.environ.get("POISON_FIRST") and not os.path.exists(poisoned):
    with open(poisoned, "w") as fh:
        fh.write(node)
if not (os.path.exists(poisoned) and open(poisoned).read() == node):
    open(os.path.join(healthy_dir, node), "w").close()
record("start", locked=locked, child=child.pid)


def stop(*_):
    record("stop")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
while True:
    time.sleep(1)
'''

VIP_STAGE = '''
"""A stand-in VIP stage (order VIP) that records when it is acquired and released."""
import json, os, time

from pycluster import Stage, StageOrder, hookimpl


def record(event, ctx):
    line = dict(event=event, node=ctx.node_id, epoch=ctx.epoch, t=time.time())
    with open(os.environ["E2E_BACKEND_LOG"], "a") as fh:
        fh.write(json.dumps(line) + "\\n")


class VipRecorder:
    @hookimpl
    def pycluster_stages(self, app, platform, registry):
        async def up(ctx):
            record("vip-up", ctx)

        async def down(ctx):
            record("vip-down", ctx)

        registry.add(Stage("fake-vip", StageOrder.VIP, up, down, plugin="e2e"))


def options(ns):
    return []


def attach(app, platform, ns):
    platform.pm.register(VipRecorder(), name="e2e-vip")
'''


class Backends:
    """The shared files of one test's backends."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "backend"
        self.dir.mkdir()
        self.script = self.dir / "backend.py"
        self.script.write_text(BACKEND)
        self.lock = self.dir / "lock"
        self.log = self.dir / "events.jsonl"
        (self.dir / "vipstage.py").write_text(textwrap.dedent(VIP_STAGE))

    def command(self) -> str:
        return f"{sys.executable} {self.script} {self.lock} {self.log} {self.dir}"

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]
        return [e for e in out if kind is None or e["event"] == kind]

    def starts(self) -> list[dict[str, Any]]:
        return self.events("start")

    def assert_never_two(self) -> None:
        clashes = [e for e in self.starts() if not e["locked"]]
        assert clashes == [], f"a backend started while another still ran: {clashes}"


@pytest.fixture
def backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backends:
    b = Backends(tmp_path)
    monkeypatch.setenv("E2E_BACKEND_LOG", str(b.log))
    # Prepended, not replaced: the node processes must still import this checkout's pycluster.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(b.dir), os.environ.get("PYTHONPATH")) if p))
    return b


@pytest.fixture
async def cluster_factory(tmp_path: Path, unique_name: str) -> Any:
    made: list[NodeCluster] = []

    def make(urls: Any, backends: Backends, *extra: str, **kw: Any) -> NodeCluster:
        args = ["--backend-cmd", backends.command(), "--setup", "vipstage:options",
                "--backend-inherit-env", "POISON_FIRST", *extra]
        c = NodeCluster(unique_name, urls, tmp_path / f"c{len(made)}", extra_args=args, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_sync()


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _no_split_brain(c: NodeCluster) -> None:
    assert c.overlaps() == [], f"two nodes active at once: {c.overlaps()}"


async def _running_on(b: Backends, node: str, count: int = 1) -> dict[str, Any]:
    await wait_for(lambda: len([e for e in b.starts() if e["node"] == node]) >= count, 30,
                   message=f"backend started on {node}")
    return [e for e in b.starts() if e["node"] == node][count - 1]


async def test_sigkill_of_the_leader_moves_the_backend(
    nats_url: str, backends: Backends, cluster_factory: Any,
) -> None:
    c = cluster_factory([nats_url], backends, lease_ttl=2.0, heartbeat=0.5)
    await c.start()
    leader = await c.wait_for_leader(30)
    first = await _running_on(backends, leader)
    assert first["epoch"] == c.role(leader)[1]
    c.kill(leader)  # the node runs no code any more: its fence guard stops the backend
    new = await c.wait_for_leader(30, exclude=[leader], min_epoch=first["epoch"] + 1)
    second = await _running_on(backends, new)
    assert second["epoch"] > first["epoch"] and second["t"] > first["t"]
    await wait_for(lambda: not _pid_alive(first["pid"]) and not _pid_alive(first["child"]), 10)
    await c.start_node(leader)  # comes back as a standby: no backend there
    await asyncio.sleep(1.0)
    assert [e["node"] for e in backends.starts()] == [leader, new]
    await c.stop()
    backends.assert_never_two()
    _no_split_brain(c)


async def test_paused_leader_cannot_keep_its_backend(
    nats_url: str, backends: Backends, cluster_factory: Any,
) -> None:
    c = cluster_factory([nats_url], backends, lease_ttl=2.0, heartbeat=0.5)
    await c.start()
    zombie = await c.wait_for_leader(30)
    first = await _running_on(backends, zombie)
    c.pause(zombie)  # SIGSTOP: the node cannot stop anything; the guard fences on its own
    paused_at = time.time()
    new = await c.wait_for_leader(30, exclude=[zombie], min_epoch=first["epoch"] + 1)
    await _running_on(backends, new)
    assert not _pid_alive(first["pid"]) and not _pid_alive(first["child"])
    c.resume(zombie)  # it learns it lost the lease; it must not restart its backend
    await wait_for(lambda: c.role(zombie)[0] == "passive", 30)
    await wait_for(lambda: "lease deadline passed" in c.log_tail(zombie, 400), 10,
                   message="the fence guard stopped the paused node's backend")
    await asyncio.sleep(1.5)
    assert [e["node"] for e in backends.starts()] == [zombie, new]
    assert c.active_nodes() == [new]
    await c.stop()
    backends.assert_never_two()
    # The zombie's recorded "active" interval only ends when it resumes, so check what it did:
    # it never acted as leader after it was paused.
    assert [t for t in c.acts(zombie) if t > paused_at + 0.2] == []


async def test_graceful_handover_stops_the_backend_before_the_next_starts(
    nats_url: str, backends: Backends, cluster_factory: Any,
) -> None:
    c = cluster_factory([nats_url], backends, lease_ttl=10.0, heartbeat=3.0, size=2)
    await c.start()
    leader = await c.wait_for_leader(30)
    first = await _running_on(backends, leader)
    assert await c.terminate(leader) == 0
    other = next(n for n in c.nodes if n != leader)
    await c.wait_for_leader(15, exclude=[leader])
    second = await _running_on(backends, other)
    stop = next(e for e in backends.events("stop") if e["pid"] == first["pid"])
    assert stop["t"] < second["t"]
    # The order of the sequence on both sides: VIP up → backend start; backend stop → VIP down.
    ups = {e["node"]: e for e in backends.events("vip-up")}
    downs = {e["node"]: e for e in backends.events("vip-down")}
    assert ups[leader]["t"] < first["t"] < stop["t"] < downs[leader]["t"]
    assert downs[leader]["t"] < ups[other]["t"] < second["t"]
    assert ups[other]["epoch"] == second["epoch"] > first["epoch"]
    await c.stop()
    backends.assert_never_two()
    _no_split_brain(c)


async def test_backend_that_never_becomes_healthy_hands_over(
    nats_url: str, backends: Backends, cluster_factory: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POISON_FIRST", "1")  # the first node to run the backend is broken
    # The folder is an argument ($0), not pasted into the script: it may contain spaces.
    health = f"sh -c 'test -e \"$0/$PYCLUSTER_NODE\"' {shlex.quote(str(backends.dir))}"
    c = cluster_factory([nats_url], backends, "--backend-health-cmd", health,
                        "--backend-start-timeout", "2", lease_ttl=2.0, heartbeat=0.5)
    await c.start()
    leader = await c.wait_for_leader(60)
    poisoned = (backends.dir / "poisoned").read_text()
    assert leader != poisoned
    assert not any(e.get("role") == "active" for e in c.events(poisoned))
    assert all(e["node"] == poisoned for e in backends.starts()[:1])
    await c.stop()
    backends.assert_never_two()
    _no_split_brain(c)
