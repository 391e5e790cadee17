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
import os
import shlex
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..backend import (
    BackendError,
    BackendHealth,
    HealthCheck,
    backend_env,
    backend_stage,
    backends_of,
    check_env_names,
    expand,
    guard_argv,
    guard_deadline_line,
    guard_deadlines,
)
from ..kernel.context import Context
from ..kernel.errors import ConfigError
from ..kernel.registry import BackendRegistry, ConfigRegistry, OptionRegistry
from ..kernel.stages import StageRegistry
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


@dataclass(frozen=True)
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

    command: str | Sequence[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    inherit_env: Sequence[str] = ()
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


class ProcessBackend:
    """The controller behind a `Process` option (implements `pycluster.backend.Backend`).

    :ivar state: ``stopped``, ``starting``, ``running``, ``restarting``, ``exited`` (a clean exit
        under ``on-failure``), ``failed`` (restarts exhausted; the node steps down), ``stopping``.
    :ivar restarts: restarts in a row during this activation.
    :ivar last_exit: the last exit status (negative: killed by that signal).
    """

    kind = "process"

    def __init__(self, option: Process, app: App, platform: Platform,
                 stage: str = "process-0") -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.stage = stage
        self.state = "stopped"
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_health = BackendHealth(False, "not started")
        self._child: _Child | None = None
        self._ctx: Context | None = None
        self._stopping = True
        self._tasks: list[asyncio.Task[None]] = []
        self._health_failures = 0
        self._out = logging.getLogger(f"pycluster.backend.{app.name}")

    # -- the lease ------------------------------------------------------------------------

    def _runtime(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app.name)

    def _lease_ok(self) -> bool:
        rt = self._runtime()
        return rt is None or rt.election is None or rt.election.is_leader

    def _renewed(self, deadline: float) -> None:
        child, d = self._child, guard_deadlines(self._runtime(), deadline)
        if child is not None and child.running and d is not None:
            child.send(guard_deadline_line(d))

    def _guarded(self) -> list[ProcessBackend]:
        """The app's process backends whose guards follow renewals (``app.state("process")``:
        also those another plugin runs, e.g. SQLite's Litestream)."""
        guarded: list[ProcessBackend] = self.app.state("process").setdefault("guarded", [])
        return guarded

    # -- starting -------------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Start the command; return once it runs (and is healthy, with a health check)."""
        self._stopping = False
        self._ctx = ctx
        self.restarts = 0
        self._health_failures = 0
        if self not in self._guarded():
            self._guarded().append(self)
        await self._launch(ctx)
        self._tasks = [asyncio.create_task(self._watch(ctx), name=f"{self.stage}:watch")]
        if self.option.health is not None:
            self._tasks.append(asyncio.create_task(self._monitor(), name=f"{self.stage}:health"))

    async def _launch(self, ctx: Context) -> None:
        """Spawn the command and wait until it is healthy; on failure nothing stays running."""
        self.state = "starting"
        child = await self._spawn(ctx)
        check = self.option.health
        if check is None:
            self.last_health = BackendHealth(True, f"running, pid {child.pid}")
        else:
            def failed() -> str | None:
                return None if child.running else _describe(child.exit.result())

            try:
                self.last_health = await check.wait_healthy(
                    self.app.name, failed, env=self.option.environment(ctx))
            except BaseException:
                await self._terminate(child, 0.0)
                raise
        self.state = "running"

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
            first = await asyncio.wait_for(reader.readline(), GUARD_START_TIMEOUT)
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

    async def _watch(self, ctx: Context) -> None:
        """Wait for exits; restart by policy; report a failure the node must step down for."""
        opt = self.option
        while not self._stopping:
            child = self._child
            if child is None:
                return
            code = await asyncio.shield(child.exit)  # a cancelled waiter must not cancel it
            if self._stopping:
                return
            self.last_exit = code
            why = "unhealthy" if self.state == "unhealthy" else _describe(code)
            self.last_health = BackendHealth(False, why)
            if not self._lease_ok():
                log.warning("app %s: backend %s; lease gone, not restarting", self.app.name, why)
                self.state = "stopped"
                return
            if opt.restart == "on-failure" and code == 0 and why != "unhealthy":
                log.info("app %s: backend exited with 0; not restarting (on-failure)",
                         self.app.name)
                self.state = "exited"
                return
            if opt.restart == "never":
                self._fail(f"backend {why} (restart=never)")
                return
            if time.monotonic() - child.started_at >= STABLE_AFTER:
                self.restarts = 0
            if not await self._restart(ctx, why):
                return

    async def _restart(self, ctx: Context, why: str) -> bool:
        """Restart with back-off until it runs again; False when the node must step down."""
        opt = self.option
        while True:
            if self.restarts >= opt.max_restarts:
                self._fail(f"backend {why}; {self.restarts} restart(s) did not help")
                return False
            delay = min(opt.restart_backoff * 2 ** self.restarts, BACKOFF_CAP)
            self.restarts += 1
            self.state = "restarting"
            log.warning("app %s: backend %s while active; restart %d/%d in %.1fs",
                        self.app.name, why, self.restarts, opt.max_restarts, delay)
            await asyncio.sleep(delay)
            if self._stopping or not self._lease_ok():
                return False
            try:
                await self._launch(ctx)
                self._health_failures = 0
                return True
            except BackendError as exc:
                why = exc.reason
                log.warning("app %s: restart failed: %s", self.app.name, why)
            except Exception as exc:  # e.g. out of file descriptors: still a failed restart
                why = f"{type(exc).__name__}: {exc}"
                log.exception("app %s: restart failed", self.app.name)

    async def _monitor(self) -> None:
        """Probe the health check every ``interval`` while running."""
        check = self.option.health
        assert check is not None and self._ctx is not None
        env = self.option.environment(self._ctx)
        while not self._stopping:
            await asyncio.sleep(check.interval)
            child = self._child
            if self.state != "running" or child is None or not child.running:
                continue
            result = await check.probe(env)
            if self.state != "running":
                continue
            self.last_health = result
            if result.healthy:
                self._health_failures = 0
                continue
            self._health_failures += 1
            log.warning("app %s: health check failed (%d/%d): %s", self.app.name,
                        self._health_failures, check.failure_threshold, result.detail)
            if self._health_failures >= check.failure_threshold:
                self._health_failures = 0
                self.state = "unhealthy"
                await self._terminate(child, self.option.grace)  # _watch restarts by policy

    def _fail(self, reason: str) -> None:
        self.state = "failed"
        log.error("app %s: %s; stepping down", self.app.name, reason)
        rt = self._runtime()
        if rt is not None:
            rt.report_failure(self.stage, reason)

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
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        child = self._child
        if child is not None:
            self.state = "stopping"
            grace = self.option.grace
            if ctx.deadline is not None:  # the lease ends soon: be dead well before it does
                grace = min(grace, max(0.0, ctx.deadline - time.monotonic()) / 2)
            # Renewals still reach the guard meanwhile: a graceful stop may take its whole grace.
            await self._terminate(child, grace)
        if self in self._guarded():
            self._guarded().remove(self)
        if child is None:
            self.state = "stopped"
            return
        if child.exit.done():
            self.last_exit = child.exit.result()
        self.state = "stopped"
        self.last_health = BackendHealth(False, "stopped")
        log.info("app %s: backend stopped (%s)", self.app.name,
                 _describe(self.last_exit) if self.last_exit is not None else "not started")

    # -- health ---------------------------------------------------------------------------

    async def health(self) -> BackendHealth:
        """The last known health (cheap: the monitor task does the probing)."""
        child = self._child
        running = child is not None and child.running
        data: dict[str, Any] = {
            "state": self.state, "pid": child.pid if child and running else None,
            "restarts": self.restarts, "last_exit": self.last_exit,
        }
        if not running:
            return BackendHealth(False, self.last_health.detail or self.state, data)
        return BackendHealth(self.state == "running" and self.last_health.healthy,
                             self.last_health.detail, data)


# -- the config-file section ----------------------------------------------------------------


class HealthSection(BaseModel):
    """``health:`` inside a ``process:`` section."""

    model_config = {"extra": "forbid"}

    http: str | None = None
    tcp: str | None = None
    command: str | list[str] | None = None
    interval: float = 5.0
    timeout: float = 2.0
    start_timeout: float = 60.0
    failure_threshold: int = 3


class ProcessSection(BaseModel):
    """The ``process:`` section of an app in a config file (the fields of `Process`)."""

    model_config = {"extra": "forbid"}

    command: str | list[str]
    env: dict[str, str] = {}
    inherit_env: list[str] = []
    cwd: str | None = None
    grace: float = 10.0
    restart: str = "on-failure"
    max_restarts: int = 3
    restart_backoff: float = 1.0
    health: HealthSection | None = None


def process_from_section(section: ProcessSection) -> Process:
    """Build the `Process` option of a validated ``process:`` section."""
    health = HealthCheck(**section.health.model_dump()) if section.health is not None else None
    return Process(section.command, env=section.env, cwd=section.cwd,
                   inherit_env=tuple(section.inherit_env), grace=section.grace,
                   restart=section.restart, max_restarts=section.max_restarts,
                   restart_backoff=section.restart_backoff, health=health)


# -- hooks ------------------------------------------------------------------------------------


@hookimpl(trylast=True)
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The core's process option."""
    registry.add(Process, plugin="process")


@hookimpl(trylast=True)
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "process"."""
    registry.add("process", Process, ProcessBackend, plugin="process")


@hookimpl(trylast=True)
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``process:`` section of an app."""
    registry.add("process", ProcessSection, process_from_section)


@hookimpl(trylast=True)
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `Process` options; each backend's health becomes app health check
    ``process-N`` (and so the ``pycluster_health{check}`` metric)."""
    if not isinstance(option, Process):
        return None
    index = next(i for i, o in enumerate(
        o for o in app.options if isinstance(o, Process)) if o is option)
    name = f"process-{index}"
    if name not in app.health.specs:
        interval = option.health.interval if option.health is not None else 5.0
        app.health.register(name, _backend_check(app, name), interval=interval, timeout=10.0)
    return True


def _backend_check(app: App, stage: str) -> Callable[[], Awaitable[dict[str, Any]]]:
    """The app health check of the backend behind stage ``stage`` on this node."""

    async def check() -> dict[str, Any]:
        rt = app._runtime
        backend = next((b for s, b in backends_of(rt.stages) if s.name == stage), None) \
            if rt is not None else None
        if not isinstance(backend, ProcessBackend) or backend.state == "stopped":
            return {"state": "standby"}  # nothing runs here to check
        h = await backend.health()
        if not h.healthy:
            raise RuntimeError(f"{stage} ({app.name}) is {h.detail}")
        return {"state": h.detail, **h.data}

    return check


@hookimpl
def pycluster_lease_renewed(app: App, deadline: float) -> None:
    """Hand the new lease deadline to the fence guard of each started process backend of
    ``app`` (its own stages' and those other plugins run)."""
    for backend in list(app.state("process").get("guarded", ())):
        backend._renewed(deadline)


@hookimpl(trylast=True)
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """A BACKEND stage per `Process` option of the app (``process-0``, ``process-1``, ...)."""
    for i, opt in enumerate(o for o in app.options if isinstance(o, Process)):
        name = f"process-{i}"
        backend = ProcessBackend(opt, app, platform, stage=name)
        start = opt.health.start_timeout if opt.health is not None else 0.0
        registry.add(backend_stage(name, backend, plugin="process",
                                   timeout=max(start, opt.grace) + GUARD_START_TIMEOUT))
