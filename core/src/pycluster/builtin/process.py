"""Core default plugin "process": run a command while the app is active on this node.

The command runs in its own process group with the epoch in ``PYCLUSTER_EPOCH`` (the fencing
token). On Linux it gets ``PR_SET_PDEATHSIG=SIGKILL``, so a SIGKILLed node takes its backend
with it. Stop = SIGTERM to the group, then SIGKILL after the grace period (or sooner when the
lease is about to end). Output goes to the node's log, prefixed with the app name. If the
command exits while active it is restarted with back-off up to ``max_restarts``; after that the
node steps down so a standby takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..backend import BackendHealth
from ..context import Context
from ..errors import ConfigError
from ..plugins import hookimpl
from ..registry import BackendRegistry, OptionRegistry, Stage, StageOrder, StageRegistry

if TYPE_CHECKING:
    from ..app import App
    from ..platform import Platform

log = logging.getLogger("pycluster.process")


@dataclass(frozen=True)
class Process:
    """Run ``command`` while the app is active here.

    :param command: argv list, or a string split like a shell would.
    :param env: extra environment variables.
    :param cwd: working directory.
    :param grace: seconds between SIGTERM and SIGKILL on stop.
    :param max_restarts: restarts after unexpected exits before the node steps down.
    :param restart_backoff: first restart delay (doubles each time).
    """

    command: tuple[str, ...] | str
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    grace: float = 10.0
    max_restarts: int = 3
    restart_backoff: float = 1.0

    def argv(self) -> list[str]:
        """The command as an argv list."""
        argv = shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
        if not argv:
            raise ConfigError("Process.command", self.command, "must not be empty")
        return argv


def _pdeathsig() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ProcessBackend:
    """The controller behind a `Process` option."""

    def __init__(self, option: Process, app: App, platform: Platform) -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.restarts = 0

    async def _spawn(self, ctx: Context) -> None:
        env = dict(os.environ)
        env.update(self.option.env)
        env.update({
            "PYCLUSTER_EPOCH": str(ctx.epoch or 0),
            "PYCLUSTER_APP": self.app.name,
            "PYCLUSTER_NODE": self.platform.node_id,
            "PYCLUSTER_PLATFORM": self.platform.name,
        })
        self.proc = await asyncio.create_subprocess_exec(
            *self.option.argv(), env=env, cwd=self.option.cwd,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=_pdeathsig,
        )
        log.info("app %s: started %s (pid %d, epoch %s)", self.app.name,
                 self.option.argv()[0], self.proc.pid, ctx.epoch)
        self._tasks = [
            asyncio.create_task(self._pump(self.proc)),
            asyncio.create_task(self._supervise(self.proc, ctx)),
        ]

    async def start(self, ctx: Context) -> None:
        """Start the command."""
        self._stopping = False
        self.restarts = 0
        await self._spawn(ctx)

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        out = logging.getLogger(f"pycluster.app.{self.app.name}")
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            out.info("%s", line.decode(errors="replace").rstrip())

    async def _supervise(self, proc: asyncio.subprocess.Process, ctx: Context) -> None:
        code = await proc.wait()
        if self._stopping:
            return
        log.warning("app %s: backend exited with %s while active", self.app.name, code)
        if self.restarts < self.option.max_restarts:
            delay = self.option.restart_backoff * 2 ** self.restarts
            self.restarts += 1
            await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn(ctx)
            return
        log.error("app %s: backend keeps failing; stepping down", self.app.name)
        self.platform.spawn(self.app.step_down(), f"{self.app.name}:backend-failed")

    async def stop(self, ctx: Context) -> None:
        """SIGTERM the group, SIGKILL after the grace period or at the lease deadline."""
        self._stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        grace = ctx.remaining(self.option.grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # The group may hold children that ignored SIGTERM.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for t in self._tasks:
            t.cancel()
        log.info("app %s: backend stopped (exit %s) at %.3f", self.app.name, proc.returncode,
                 time.monotonic())

    async def health(self) -> BackendHealth:
        """Healthy while the process runs."""
        alive = self.proc is not None and self.proc.returncode is None
        return BackendHealth(alive, "running" if alive else "not running")


@hookimpl(trylast=True)
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The core's process option."""
    registry.add(Process, plugin="process")


@hookimpl(trylast=True)
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "process"."""
    registry.add("process", Process, ProcessBackend, plugin="process")


@hookimpl(trylast=True)
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `Process` options."""
    return True if isinstance(option, Process) else None


@hookimpl(trylast=True)
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """A BACKEND stage per `Process` option of the app."""
    for i, opt in enumerate(o for o in app.options if isinstance(o, Process)):
        backend = ProcessBackend(opt, app, platform)
        registry.add(Stage(
            name=f"process-{i}", order=StageOrder.BACKEND, activate=backend.start,
            deactivate=backend.stop, plugin="process", extra={"backend": backend},
        ))
