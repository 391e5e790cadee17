"""`NodeCluster`: real node processes (``python -m pycluster.testing.node``) with fault injection.

Every node writes its events to ``{workdir}/state/{node}.jsonl``; the cluster reads them to find
the active node(s), to measure failovers and to detect split brain (two nodes active at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .wait import wait_for


@dataclass
class NodeProc:
    """One node process."""

    node_id: str
    urls: list[str]
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    paused: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self.proc.pid if self.proc is not None else None

    @property
    def alive(self) -> bool:
        """Whether the process is running (paused counts as running)."""
        return self.proc is not None and self.proc.poll() is None


class NodeCluster:
    """N node processes of one platform running one app.

    :param platform: platform name (use a unique one per test).
    :param urls: NATS URLs; a list of lists gives each node its own URLs (node i → urls[i]),
        e.g. to pin node i to server i of a `NatsCluster` for partition tests.
    :param workdir: where state and logs go.
    :param size: number of nodes ``n1..nN``.
    :param app: the app name; ``mode``, ``lease_ttl``, ``heartbeat`` as for the node program.
    :param node_args: extra arguments per node id (e.g. ``{"n3": ["--priority", "-1"]}``).
    :param env: environment variables set for every node process on top of this process's
        (e.g. ``{"PYCLUSTER_DISABLE_PLUGINS": "audit,metrics"}``).
    """

    def __init__(
        self,
        platform: str,
        urls: Sequence[str] | Sequence[Sequence[str]],
        workdir: str | Path,
        *,
        size: int = 3,
        app: str = "svc",
        mode: str = "singleton",
        lease_ttl: float = 2.0,
        heartbeat: float = 0.5,
        extra_args: Sequence[str] = (),
        node_args: dict[str, list[str]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.platform = platform
        self.env = dict(env or {})
        self.app = app
        self.workdir = Path(workdir)
        self.state_dir = self.workdir / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.nodes: dict[str, NodeProc] = {}
        for i in range(size):
            node_id = f"n{i + 1}"
            mine = urls[i] if urls and not isinstance(urls[0], str) else urls
            mine_list = [str(u) for u in mine]
            args = [
                "--platform", platform, "--node-id", node_id, "--nats-url", ",".join(mine_list),
                "--state-dir", str(self.state_dir), "--app", app, "--mode", mode,
                "--lease-ttl", str(lease_ttl), "--heartbeat", str(heartbeat), *extra_args,
                *(node_args or {}).get(node_id, []),
            ]
            self.nodes[node_id] = NodeProc(node_id, mine_list, args)

    # -- process control ---------------------------------------------------------------------

    def _spawn(self, node: NodeProc) -> None:
        node.log_path = self.workdir / f"{node.node_id}.log"
        log = node.log_path.open("ab")
        env = dict(os.environ)
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "pycluster.testing.node", *node.args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        node.paused = False

    async def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until each reports ready."""
        for node in self.nodes.values():
            self._spawn(node)
        for node_id in self.nodes:
            await self.wait_ready(node_id, timeout)

    async def start_node(self, node_id: str, timeout: float = 30.0, wait: bool = True) -> None:
        """Start (or restart) one node."""
        node = self.nodes[node_id]
        if node.alive:
            raise RuntimeError(f"{node_id} is already running")
        mark = len(self.events(node_id))
        self._spawn(node)
        if wait:
            await self.wait_ready(node_id, timeout, after=mark)

    async def wait_ready(self, node_id: str, timeout: float = 30.0, after: int = 0) -> None:
        """Wait for the node's "ready" event (or fail with its log tail when it exits)."""
        node = self.nodes[node_id]

        def ready() -> bool:
            if not node.alive:
                raise RuntimeError(f"{node_id} exited: {self.log_tail(node_id)}")
            return any(e.get("event") == "ready" for e in self.events(node_id)[after:])

        await wait_for(ready, timeout, message=f"{node_id} ready")

    def kill(self, node_id: str) -> None:
        """SIGKILL the node (a crash)."""
        node = self.nodes[node_id]
        if node.proc is not None and node.alive:
            if node.paused:
                os.kill(node.proc.pid, signal.SIGCONT)
            node.proc.kill()
            node.proc.wait()

    def pause(self, node_id: str) -> None:
        """SIGSTOP the node (a zombie: frozen, not dead)."""
        node = self.nodes[node_id]
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGSTOP)
        node.paused = True

    def resume(self, node_id: str) -> None:
        """SIGCONT a paused node."""
        node = self.nodes[node_id]
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGCONT)
        node.paused = False

    async def terminate(self, node_id: str, timeout: float = 20.0) -> int | None:
        """SIGTERM the node (graceful leave) and wait for it to exit; returns the exit code."""
        node = self.nodes[node_id]
        if node.proc is None or not node.alive:
            return node.proc.returncode if node.proc else None
        node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while node.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        return node.proc.returncode

    async def restart(self, node_id: str, timeout: float = 30.0) -> None:
        """Kill (if running) and start the node again."""
        self.kill(node_id)
        await self.start_node(node_id, timeout)

    async def stop(self) -> None:
        """Stop every node: SIGTERM, then SIGKILL; safe to call twice."""
        for node in self.nodes.values():
            if node.alive and node.paused:
                self.resume(node.node_id)
        await asyncio.gather(*(self.terminate(n, 10.0) for n in self.nodes))

    def stop_sync(self) -> None:
        """Kill every node at once (finaliser)."""
        for node in self.nodes.values():
            if node.proc is not None and node.alive:
                with contextlib.suppress(ProcessLookupError):
                    if node.paused:
                        os.kill(node.proc.pid, signal.SIGCONT)
                    node.proc.kill()
                node.proc.wait()

    # -- observing ---------------------------------------------------------------------------

    def events(self, node_id: str) -> list[dict[str, Any]]:
        """Every event the node recorded (all its incarnations)."""
        path = self.state_dir / f"{node_id}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def log_tail(self, node_id: str, lines: int = 30) -> str:
        """Last lines of the node's log."""
        node = self.nodes[node_id]
        if node.log_path is None or not node.log_path.exists():
            return ""
        return "\n".join(node.log_path.read_text(errors="replace").splitlines()[-lines:])

    def role(self, node_id: str) -> tuple[str | None, int | None]:
        """The node's last recorded role and epoch (None if dead or never started)."""
        node = self.nodes[node_id]
        if not node.alive:
            return None, None
        for e in reversed(self.events(node_id)):
            if e.get("event") in ("role",):
                return e.get("role"), e.get("epoch")
            if e.get("event") in ("exit", "ready") and e.get("event") == "exit":
                return None, None
        return None, None

    def active_nodes(self) -> list[str]:
        """Live, unpaused nodes whose last role is active."""
        return [
            n for n, p in self.nodes.items()
            if p.alive and not p.paused and self.role(n)[0] == "active"
        ]

    def leader_count(self) -> int:
        """How many nodes consider themselves active right now."""
        return len(self.active_nodes())

    async def wait_for_leader(
        self, timeout: float = 30.0, exclude: Sequence[str] = (), min_epoch: int = 0
    ) -> str:
        """Wait until exactly one node (not in ``exclude``) is active with epoch ≥ min_epoch."""

        def one() -> str | None:
            act = [n for n in self.active_nodes() if n not in exclude]
            if len(act) == 1 and (self.role(act[0])[1] or 0) >= min_epoch:
                return act[0]
            return None

        result = await wait_for(one, timeout, message="exactly one leader")
        return str(result)

    def intervals(self) -> list[tuple[str, float, float, int | None]]:
        """Active intervals ``(node, start, end, epoch)`` from every node's events; an interval
        still open ends at its node's last recorded event, or now if the node is running."""
        out = []
        for n in self.nodes:
            start: tuple[float, int | None] | None = None
            last_t, pid = 0.0, None  # the previous event: where a crashed incarnation stopped
            for e in self.events(n):
                t = e.get("t", 0.0)
                if e.get("pid") != pid and start is not None:
                    out.append((n, start[0], last_t, start[1]))  # a new process: the old died
                    start = None
                pid = e.get("pid")
                if e.get("event") == "role":
                    if e.get("role") == "active" and start is None:
                        start = (t, e.get("epoch"))
                    elif e.get("role") != "active" and start is not None:
                        out.append((n, start[0], t, start[1]))
                        start = None
                elif e.get("event") == "exit" and start is not None:
                    out.append((n, start[0], t, start[1]))
                    start = None
                last_t = t
            if start is not None:
                end = time.time() if self.nodes[n].alive else last_t
                out.append((n, start[0], end, start[1]))
        return out

    def acts(self, node_id: str) -> list[float]:
        """Times at which the node acted as leader ("act" events)."""
        return [e["t"] for e in self.events(node_id) if e.get("event") == "act"]

    def overlaps(self) -> list[tuple[Any, Any]]:
        """Pairs of active intervals of different nodes that overlap in time (split brain)."""
        iv = self.intervals()
        bad = []
        for i, a in enumerate(iv):
            for b in iv[i + 1:]:
                if a[0] != b[0] and a[1] < b[2] and b[1] < a[2]:
                    bad.append((a, b))
        return bad
