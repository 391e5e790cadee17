"""Core default plugin "process": run a command while the app is active on this node.

`Process` is an App option; each one adds a BACKEND stage to the app's failover sequence (after
the VIP, before replication and ``on_active``).

* **Start**: the command runs under a fence guard (`pycluster.fenceguard`) in a session and
  process group of its own, with the fencing token in ``PYCLUSTER_EPOCH`` (and ``{epoch}``,
  ``{app}``, ``{node}``, ``{platform}`` substituted in its arguments). Its environment is an
  allow-list of the node's (`pycluster.backend.ENV_ALLOWLIST`), the option's ``env`` and the
  variables it names in ``inherit_env``: never the node's NATS credentials by default. With a
  `HealthCheck` the stage completes only once the service is healthy; not healthy within
  ``start_timeout``, or an exit before that, fails the stage, and the node steps down so that
  another takes over.
* **Output**: stdout and stderr go to the node's log, line by line, under the logger
  ``pycluster.backend.<app>``, each line prefixed with the app name.
* **While active**: the health check runs every ``interval``; ``failure_threshold`` failures in
  a row count as a failure of the service. A service that exits or fails is restarted by the
  ``restart`` policy with doubling back-off, at most ``max_restarts`` times in a row (the count
  resets once a restart stayed up for a minute); after that the node steps down
  (`AppRuntime.report_failure`). A restart happens only while the lease is valid.
* **Stop**: SIGTERM to the whole process tree, SIGKILL after ``grace`` seconds, or sooner when
  the lease is about to end (``ctx.deadline``).
* **Never outliving the lease**: the guard receives the lease deadline on every renewal. If the
  node is SIGKILLed, the guard sees its control socket close and stops the tree (SIGKILL at
  the latest at the lease deadline); if the node is paused or stuck, the guard stops the tree
  when the deadline it last received passes (SIGTERM ``fence_margin`` before it, SIGKILL at
  it), which is before any other node can win the lease. If the guard itself is killed, the
  command dies with it (parent-death signal).

Under connection loss the node keeps its lease until the local deadline and then self-fences:
the coordinator stops the backend, and the guard enforces the same deadline on its own.

Size: the `Process` option and its controller (spawn, output, restarts, health, fence guard)
share the child-process state; split when the shared supervisor takes the restart logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
import signal
import socket
import time
from dataclasses import field
from typing import TYPE_CHECKING, Any

from ..backend import (
    BackendError,
    BackendHealth,
    BackendState,
    Controller,
    Down,
    HealthCheck,
    RestartMode,
    RestartPolicy,
    Supervisor,
    backend_env,
    check_env_names,
    expand,
    guard_argv,
    guard_deadline_line,
    guard_deadlines,
)
from ..kernel.context import Context
from ..kernel.declare import option
from ..kernel.errors import ConfigError
from ..kernel.registry import BackendRegistry, ConfigRegistry
from ..plugins import hookimpl

if TYPE_CHECKING:
    from ..kernel.app import App
    from ..kernel.coordinator import AppRuntime
    from ..kernel.platform import Platform

log = logging.getLogger("pycluster.process")

RESTART_POLICIES = ("on-failure", "always", "never")
BACKOFF_CAP = 30.0  # seconds: the longest wait between two restarts
STABLE_AFTER = 60.0  # seconds a restarted process must stay up for its restart count to reset
GUARD_START_TIMEOUT = 30.0  # seconds for the guard to report the command started (loaded hosts)


@option
class Process:
    """Run ``command`` while the app is active on this node (the "process" backend).

    Example::

        App("web", Singleton(), Process(
            "python -m http.server 8000 --bind 127.0.0.1",
            health=HealthCheck(http="http://127.0.0.1:8000/", start_timeout=20),
            grace=5, max_restarts=3))

    :param command: argv list, or a string split like a shell would (no shell is run). The
        placeholders ``{epoch}``, ``{app}``, ``{node}``, ``{platform}`` are substituted.
    :param env: extra environment variables (``PYCLUSTER_EPOCH``, ``PYCLUSTER_APP``,
        ``PYCLUSTER_NODE``, ``PYCLUSTER_PLATFORM`` are always set).
    :param inherit_env: names (or shell-style patterns such as ``"AWS_*"``) of the node's own
        environment variables to pass on. The command does not inherit the node's whole
        environment: only `pycluster.backend.ENV_ALLOWLIST` (``PATH``, ``HOME``, ``LANG``,
        ``LC_*``, ...), these, ``env`` and the four variables above — never the node's NATS
        credentials unless named here. The same environment is given to a command health
        check.
    :param cwd: working directory (must exist when the command starts).
    :param grace: seconds between SIGTERM and SIGKILL on stop.
    :param restart: ``"on-failure"`` (restart after a non-zero exit, a signal or failed health
        checks; a clean exit 0 is left alone), ``"always"`` (after any exit) or ``"never"``
        (any exit or health failure makes the node step down at once).
    :param max_restarts: restarts in a row before the node steps down.
    :param restart_backoff: first restart delay in seconds (doubles each time, capped at 30).
    :param health: a `HealthCheck` (HTTP, TCP or command); without one the service counts as
        started once its command runs and as healthy while it runs.
    """

    command: str | tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    inherit_env: str | tuple[str, ...] = ()
    grace: float = 10.0
    restart: str = "on-failure"
    max_restarts: int = 3
    restart_backoff: float = 1.0
    health: HealthCheck | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.command, str):  # a list is kept as a tuple (frozen, comparable)
            object.__setattr__(self, "command", tuple(self.command))
        if isinstance(self.inherit_env, str):
            raise ConfigError("Process.inherit_env", self.inherit_env,
                              "a list of variable names (or patterns), not one string")
        object.__setattr__(self, "inherit_env",
                           check_env_names("Process.inherit_env", self.inherit_env))
        self.argv()
        if not self.grace > 0:
            raise ConfigError("Process.grace", self.grace, "must be positive")
        if self.restart not in RESTART_POLICIES:
            raise ConfigError("Process.restart", self.restart,
                              f"must be one of {', '.join(RESTART_POLICIES)}")
        if self.max_restarts < 0:
            raise ConfigError("Process.max_restarts", self.max_restarts, "must not be negative")
        if self.restart_backoff < 0:
            raise ConfigError("Process.restart_backoff", self.restart_backoff,
                              "must not be negative")
        bad = {k: v for k, v in self.env.items()
               if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise ConfigError("Process.env", bad, "keys and values must be strings")
        if self.health is not None and not isinstance(self.health, HealthCheck):
            raise ConfigError("Process.health", self.health, "must be a HealthCheck")

    def environment(self, ctx: Context | None) -> dict[str, str]:
        """The command's environment for the transition ``ctx`` (see ``inherit_env``)."""
        return backend_env(ctx, self.env, self.inherit_env)

    def argv(self) -> list[str]:
        """The command as an argv list (placeholders not yet substituted)."""
        try:
            cmd = self.command
            argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        except ValueError as exc:
            raise ConfigError("Process.command", self.command, str(exc)) from None
        if not argv:
            raise ConfigError("Process.command", self.command, "must not be empty")
        return argv


class _Child:
    """One run of the command: the guard process, the control socket, the exit status."""

    def __init__(self, guard: asyncio.subprocess.Process, writer: asyncio.StreamWriter) -> None:
        self.guard = guard
        self.writer = writer
        self.pid: int | None = None  # the command's pid, reported by the guard
        self.started_at = time.monotonic()
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.fenced = False
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        """True until the command (and the guard) exited."""
        return not self.exit.done()

    def send(self, line: str) -> None:
        """A command to the guard (ignored once it is gone)."""
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(line.encode() + b"\n")


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with {code}"


class ProcessController(Controller):
    """The controller behind a `Process` option (run by the shared `Supervisor`).

    The supervisor restarts by ``restart`` / ``max_restarts`` / ``restart_backoff`` (in a row:
    the count resets once a restart stayed up for `STABLE_AFTER` seconds), probes the health
    check every ``interval`` (``failure_threshold`` failures in a row bring the process down
    and restart it) and learns of exits through `wait_down`.

    :ivar last_exit: the last exit status (negative: killed by that signal).
    """

    kind = "process"
    stable_after = STABLE_AFTER
    check_timeout = 10.0

    def __init__(self, option: Process, app: App, platform: Platform) -> None:
        super().__init__(option, app, platform)
        self.option: Process = option
        check = option.health
        self.check_interval = check.interval if check is not None else None
        self.failure_threshold = check.failure_threshold if check is not None else 1
        self.restart_mode = RestartMode(option.restart)
        self.policy = RestartPolicy(option.max_restarts, option.restart_backoff, math.inf,
                                    cap=BACKOFF_CAP)
        start = check.start_timeout if check is not None else 0.0
        self.stage_timeout = max(start, option.grace) + GUARD_START_TIMEOUT
        self.last_exit: int | None = None
        self._child: _Child | None = None
        self._ctx: Context | None = None
        self._out = logging.getLogger(f"pycluster.backend.{app.name}")

    @property
    def pid(self) -> int | None:
        """The running command's pid (None while it is not running)."""
        child = self._child
        return child.pid if child is not None and child.running else None

    # -- the lease ------------------------------------------------------------------------

    def _runtime(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app.name)  # type: ignore[no-any-return]

    def renewed(self, deadline: float) -> None:
        """Hand the new lease deadline to the fence guard of the running command."""
        child, d = self._child, guard_deadlines(self._runtime(), deadline)
        if child is not None and child.running and d is not None:
            child.send(guard_deadline_line(d))

    def describe(self) -> str:
        """The stage and app, for messages (``process-0 (web)``)."""
        return f"{self.stage or self.kind} ({self.app.name})"

    # -- starting -------------------------------------------------------------------------

    async def start(self, ctx: Context) -> BackendHealth:
        """Start the command; return once it runs (and is healthy, with a health check)."""
        self._ctx = ctx
        return await self._launch(ctx)

    async def restart(self, ctx: Context) -> BackendHealth:
        """Run the command again (the last run has exited)."""
        return await self._launch(ctx)

    async def _launch(self, ctx: Context) -> BackendHealth:
        """Spawn the command and wait until it is healthy; on failure nothing stays running."""
        child = await self._spawn(ctx)
        check = self.option.health
        if check is None:
            return BackendHealth(True, f"running, pid {child.pid}")

        def failed() -> str | None:
            return None if child.running else _describe(child.exit.result())

        try:
            return await check.wait_healthy(self.app.name, failed,
                                            env=self.option.environment(ctx))
        except BaseException:
            await self._terminate(child, 0.0)
            raise

    async def _spawn(self, ctx: Context) -> _Child:
        opt = self.option
        argv = expand(opt.argv(), ctx)
        if opt.cwd is not None and not os.path.isdir(opt.cwd):
            raise BackendError(self.app.name, self.kind, f"cwd {opt.cwd!r} is not a directory")
        rt = self._runtime()
        lease = rt.lease_deadline() if rt is not None else None
        if rt is not None and rt.election is not None and lease is None:
            raise BackendError(self.app.name, self.kind, "no valid lease: not starting")
        env = opt.environment(ctx)  # not the node's whole environment (its credentials)
        ours, theirs = socket.socketpair()
        cmd = guard_argv(theirs.fileno(), self.app.name, guard_deadlines(rt, lease),
                         "--grace", str(opt.grace))
        try:
            guard = await asyncio.create_subprocess_exec(
                *cmd, "--", *argv, env=env, cwd=opt.cwd, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(),), start_new_session=True, limit=1 << 20,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        child = _Child(guard, writer)
        self._child = child
        assert guard.stdout is not None and guard.stderr is not None
        child.tasks = [
            asyncio.create_task(self._pump(guard.stdout, "stdout")),
            asyncio.create_task(self._pump(guard.stderr, "stderr")),
        ]
        try:
            async with asyncio.timeout(GUARD_START_TIMEOUT):
                first = await reader.readline()
        except BaseException:
            child.tasks.append(asyncio.create_task(self._follow(child, reader)))
            await self._terminate(child, 0.0)
            raise
        words = first.decode(errors="replace").split(maxsplit=1)
        child.tasks.append(asyncio.create_task(self._follow(child, reader)))
        if words[:1] != ["started"]:
            code = await asyncio.shield(child.exit)  # a cancelled waiter must not cancel it
            why = words[1].strip() if len(words) > 1 else f"fence guard {_describe(code)}"
            raise BackendError(self.app.name, self.kind, f"cannot start {argv[0]!r}: {why}")
        child.pid = int(words[1])
        log.info("app %s: started %s (pid %d, epoch %s, fence guard pid %d)", self.app.name,
                 shlex.join(argv)[:200], child.pid, ctx.epoch, guard.pid)
        return child

    async def _follow(self, child: _Child, reader: asyncio.StreamReader) -> None:
        """Read the guard's reports until it exits, then resolve ``child.exit``."""
        code: int | None = None
        try:
            while line := await reader.readline():
                words = line.decode(errors="replace").split(maxsplit=1)
                if words[:1] == ["exited"] and len(words) == 2:
                    code = int(words[1])
                elif words[:1] == ["fencing"]:
                    child.fenced = True
                    log.warning("app %s: fence guard: %s", self.app.name, " ".join(words[1:]))
        except (OSError, ValueError):  # reset: the guard exited with a renewal still unread
            pass
        rc = await child.guard.wait()
        child.writer.close()
        if code is None and rc > 128:  # the guard's status for "killed by signal rc-128"
            code = 128 - rc
        if not child.exit.done():
            child.exit.set_result(code if code is not None else rc)

    async def _pump(self, stream: asyncio.StreamReader, name: str) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the limit: log it in pieces
                line = await stream.read(1 << 20)
            if not line:
                return
            self._out.info("%s[%s] %s", self.app.name, name,
                           line.decode(errors="replace").rstrip("\n"))

    # -- while active ---------------------------------------------------------------------

    async def wait_down(self) -> Down:
        """Return once the command exited."""
        child = self._child
        if child is None:
            return await super().wait_down()
        code = await asyncio.shield(child.exit)  # a cancelled waiter must not cancel it
        self.last_exit = code
        return Down(_describe(code), clean=code == 0)

    async def probe(self) -> BackendHealth:
        """Run the health check once (without one: whether the command runs)."""
        child, check = self._child, self.option.health
        if child is None or not child.running:
            return BackendHealth(False, "not running")
        if check is None:
            return BackendHealth(True, f"running, pid {child.pid}")
        return await check.probe(self.option.environment(self._ctx))

    async def unhealthy(self) -> None:
        """Failed health checks: stop the command (the supervisor restarts it by policy)."""
        child = self._child
        if child is not None:
            await self._terminate(child, self.option.grace)
            if child.exit.done():
                self.last_exit = child.exit.result()

    # -- stopping -------------------------------------------------------------------------

    async def _terminate(self, child: _Child, grace: float) -> None:
        """Stop one run: SIGTERM, SIGKILL after ``grace``; the guard does it, with fallbacks."""
        if child.running:
            child.send(f"stop {grace:.3f}")
            done, _ = await asyncio.wait({child.exit}, timeout=grace + 5.0)
            if not done:  # the guard does not answer: kill it; the command dies with it
                log.error("app %s: fence guard %d unresponsive; killing it", self.app.name,
                          child.guard.pid)
                for pid in (child.pid, child.guard.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pid, signal.SIGKILL)
                await asyncio.wait({child.exit}, timeout=5.0)
        # Let the output pumps drain what the command wrote last, then drop them.
        await asyncio.wait(child.tasks, timeout=1.0)
        for t in child.tasks:
            t.cancel()
        child.writer.close()

    async def stop(self, ctx: Context) -> None:
        """SIGTERM the process tree, SIGKILL after the grace period or near ``ctx.deadline``."""
        child = self._child
        if child is None:
            return
        grace = self.option.grace
        if ctx.deadline is not None:  # the lease ends soon: be dead well before it does
            grace = min(grace, max(0.0, ctx.deadline - time.monotonic()) / 2)
        # Renewals still reach the guard meanwhile: a graceful stop may take its whole grace.
        await self._terminate(child, grace)
        if child.exit.done():
            self.last_exit = child.exit.result()
        log.info("app %s: backend stopped (%s)", self.app.name,
                 _describe(self.last_exit) if self.last_exit is not None else "not started")

    # -- health ---------------------------------------------------------------------------

    async def health(self, state: BackendState, last: BackendHealth | None) -> BackendHealth:
        """The last known health (cheap: the supervisor does the probing), with the pid,
        the restarts in a row and the last exit status."""
        child = self._child
        running = child is not None and child.running
        data: dict[str, Any] = {
            "state": state.value, "pid": child.pid if child and running else None,
            "restarts": self.policy.recent, "last_exit": self.last_exit,
        }
        detail = last.detail if last is not None else ""
        if not running:
            return BackendHealth(False, detail or state.value, data)
        healthy = state is BackendState.RUNNING and last is not None and last.healthy
        return BackendHealth(healthy, detail, data)


class ProcessBackend(Supervisor):
    """A supervised command outside the app's BACKEND stages (e.g. a plugin's helper such as
    ``litestream replicate``): a `Supervisor` around a `ProcessController`. While started it
    is a plugin object taking its app's lease renewals (``pycluster_lease_renewed``), so its
    fence guard follows the lease like a BACKEND stage's.

    :ivar state: a `pycluster.backend.BackendState`.
    """

    def __init__(self, option: Process, app: App, platform: Platform,
                 stage: str = "process-0") -> None:
        self.process = ProcessController(option, app, platform)
        super().__init__(self.process, stage=stage)
        self._plugin_name = f"process-backend-{id(self):x}"

    def _follow_renewals(self, on: bool) -> None:
        pm = self.platform.pm
        if on and pm.get_plugin(self._plugin_name) is None:
            pm.register(self, name=self._plugin_name)
        elif not on and pm.get_plugin(self._plugin_name) is not None:
            pm.unregister(name=self._plugin_name)

    @hookimpl
    def pycluster_lease_renewed(self, app: App, deadline: float) -> None:
        """Hand a renewal of this command's app to its fence guard."""
        if app.platform is self.platform and app.name == self.app.name:
            self.renewed(deadline)

    async def start(self, ctx: Context) -> None:
        """Start the command (see `Supervisor.start`) and follow the app's lease."""
        self._follow_renewals(True)
        try:
            await super().start(ctx)
        except BaseException:
            self._follow_renewals(False)
            raise

    async def stop(self, ctx: Context) -> None:
        """Stop the command (see `Supervisor.stop`)."""
        try:
            await super().stop(ctx)
        finally:
            self._follow_renewals(False)

    @property
    def _child(self) -> _Child | None:
        return self.process._child

    @property
    def pid(self) -> int | None:
        """The running command's pid (None while it is not running)."""
        return self.process.pid

    @property
    def last_exit(self) -> int | None:
        """The last exit status (negative: killed by that signal)."""
        return self.process.last_exit


# -- hooks ------------------------------------------------------------------------------------


@hookimpl(trylast=True)
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "process": each `Process` option becomes stage and app health check
    ``process-N`` (built by the kernel, run by the shared supervisor)."""
    registry.add("process", Process, ProcessController, plugin="process")


@hookimpl(trylast=True)
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``process:`` section of an app."""
    registry.add("process", Process)  # the section is the declaration of Process
