"""The backend protocol: what a controller of a service (process, unit, container) offers.

A *backend* is the thing an existing service becomes highly available through: pycluster starts
it on the node that won the election and stops it when that node steps down. The core ships the
``process`` backend (`pycluster.Process`); plugins add ``systemd``, ``docker`` and others.

Writing a third-party backend (see docs/backends.md for a complete example):

1. Declare the option class users pass to ``App(...)`` with `pycluster.kernel.declare.option`
   (a frozen pydantic dataclass; its fields are also the config-file section).
2. Subclass `Controller`: async ``start(ctx)``, ``stop(ctx)``, ``probe()`` (optionally
   ``restart``, ``wait_down``, ``fence``, ``diagnostics``) and set its attributes
   (``check_interval``, ``policy``, ``stage_timeout``, ...) from the option.
3. In your plugin module, register the kind once (``pycluster_register_backends``:
   ``registry.add(kind, OptionClass, MyController, audit=..., metrics=...)``) and, for a
   config-file section, ``registry.add(kind, OptionClass)`` (``pycluster_config_sections``).

The kernel then claims the options, runs each controller under a `Supervisor` and makes it the
app's BACKEND stage, health check (``{kind}-{i}``), metrics and audit entries.

Contract (what the supervisor relies on):

* ``start(ctx)`` runs in the BACKEND stage of the failover sequence, after the VIP is acquired.
  Return once the service is up, and healthy when a health check is configured; raise (any
  exception, ideally `BackendError`) when it cannot be started, leaving nothing running: the
  coordinator then undoes the sequence (``stop`` is called too), releases the lease and backs
  off, so that another node takes over. ``start`` is bounded by the stage timeout and may be
  cancelled when the lease is lost.
* ``ctx.epoch`` is the fencing token: strictly increasing across leader changes. Hand it to the
  service (`fencing_env`, `expand`) so that it can refuse orders from an older epoch.
* ``stop(ctx)`` runs in reverse order when the node steps down, leaves, or lost its lease. It
  must be idempotent (it is also called after a failed ``start``) and must have stopped the
  service before ``ctx.deadline`` (monotonic) when one is set: after that instant another node
  may hold the lease. Never leave the service running on a failed stop: escalate (SIGKILL,
  ``docker kill``, ...) and raise only if it may still be running.
* ``probe()`` is cheap enough to run every ``check_interval`` and never raises. The supervisor
  restarts a failed service by the controller's `RestartPolicy` (only while the lease is
  valid) and, past it, calls ``report_failure``: the node steps down so a standby takes over.
* A backend must never outlive its node's lease. The process backend guarantees it with a fence
  guard (`pycluster.fenceguard`); a backend the node does not run itself (a unit, a container)
  returns a `LeaseFence` from ``fence()`` — a guard in fence-action mode that stops the service
  when the node dies or stops renewing — which the supervisor arms once the service runs and
  releases first on a graceful stop.

Size: the backend toolkit plugin authors import as one module (protocol, controller,
shared supervisor, health checks, restart policy, fence guard client and `LeaseFence`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import fnmatch
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import fenceguard
from .kernel.aio import supervise
from .kernel.context import Context
from .kernel.declare import option
from .kernel.errors import ConfigError, PyclusterError
from .plugins import hookimpl

if TYPE_CHECKING:
    from .kernel.coordinator import AppRuntime
    from .kernel.platform import Platform
    from .kernel.stages import Stage

log = logging.getLogger("pycluster.backend")

FENCE_START_TIMEOUT = 30.0  # seconds for a fence guard to report it is armed (loaded hosts)

__all__ = [
    "ENV_ALLOWLIST",
    "Backend",
    "BackendError",
    "BackendHealth",
    "BackendState",
    "Controller",
    "Down",
    "HealthCheck",
    "LeaseFence",
    "RestartMode",
    "RestartPolicy",
    "Supervisor",
    "backend_env",
    "backends_of",
    "base_environ",
    "expand",
    "fencing_env",
    "guard_argv",
    "guard_deadlines",
    "scrubbed_environ",
]


@dataclass
class BackendHealth:
    """Result of a backend health probe.

    :ivar healthy: whether the service answers as expected.
    :ivar detail: a short human-readable explanation ("running, pid 1234", "HTTP 503", ...).
    :ivar data: structured extras for health endpoints and metrics (pid, restarts, ...).
    :ivar settling: not healthy, but the engine itself is (re)starting the service (a unit
        ``activating`` under systemd's ``Restart=``, a container under the engine's restart
        policy): the `Supervisor` gives it the controller's ``settle_timeout`` before it
        counts as a failure.
    """

    healthy: bool
    detail: str = ""
    data: dict[str, object] = field(default_factory=dict)
    settling: bool = False


class BackendError(PyclusterError):
    """A backend could not be started or stopped; names the app, the backend and why."""

    def __init__(self, app: str, backend: str, reason: str) -> None:
        self.app = app
        self.backend = backend
        self.reason = reason
        super().__init__(f"app {app!r}: backend {backend}: {reason}")


@runtime_checkable
class Backend(Protocol):
    """What a BACKEND stage runs: start and stop one service instance on this node (a
    `Supervisor` is one; a backend kind registers a `Controller` instead).

    Example (a backend that only records what it is told)::

        class EchoBackend:
            def __init__(self, option, app, platform):
                self.running = False

            async def start(self, ctx):
                print("start with fencing token", ctx.epoch)
                self.running = True

            async def stop(self, ctx):
                self.running = False

            async def health(self):
                return BackendHealth(self.running, "running" if self.running else "stopped")
    """

    async def start(self, ctx: Context) -> None:
        """Start the service for ``ctx.epoch``; return once it is up (and healthy if checked).

        :param ctx: the transition: ``ctx.epoch`` is the fencing token, ``ctx.app`` the app.
        """

    async def stop(self, ctx: Context) -> None:
        """Stop the service (idempotent); be done before ``ctx.deadline`` when one is set.

        :param ctx: the transition; ``ctx.remaining(default)`` gives the time left.
        """

    async def health(self) -> BackendHealth:
        """Probe the service: cheap, never raises."""


# -- the epoch and identity handed to a service -----------------------------------------------


def fencing_env(ctx: Context) -> dict[str, str]:
    """Environment variables telling a service who runs it and with which fencing token.

    ``PYCLUSTER_EPOCH`` (the fencing token, ``0`` for apps without election),
    ``PYCLUSTER_APP``, ``PYCLUSTER_NODE``, ``PYCLUSTER_PLATFORM``.
    """
    return {
        "PYCLUSTER_EPOCH": str(ctx.epoch or 0),
        "PYCLUSTER_APP": ctx.app.name,
        "PYCLUSTER_NODE": ctx.node_id,
        "PYCLUSTER_PLATFORM": ctx.platform.name,
    }


# -- the environment of a service ---------------------------------------------------------------

ENV_ALLOWLIST: tuple[str, ...] = (
    "PATH", "HOME", "LANG", "LANGUAGE", "LC_*", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR",
    # A node that runs in a virtualenv or with a PYTHONPATH starts Python services that expect
    # the same import path and I/O encoding; none of these carries a credential.
    "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "PYTHONUTF8", "VIRTUAL_ENV",
)
"""The node's environment variables a service gets (names; ``LC_*`` is a pattern). Everything
else — NATS credentials (``PYCLUSTER_NATS_PASSWORD``, ``PYCLUSTER_NATS_TOKEN``, ...), API
tokens, cloud keys — stays with the node unless an option names it (``inherit_env``)."""

# Node settings that are credentials or lead to them: never handed to a helper process.
_SECRET_ENV = re.compile(r"^PYCLUSTER_(NATS_(PASSWORD|TOKEN|USER|NKEY_SEED|CREDS|URL)|TLS_KEY)$",
                         re.IGNORECASE)


def check_env_names(field: str, names: Iterable[str]) -> tuple[str, ...]:
    """Validate ``inherit_env``: variable names or shell-style patterns (``AWS_*``)."""
    out = tuple(names)
    bad = [n for n in out if not isinstance(n, str) or not n or "=" in n or n.strip() != n]
    if bad:
        raise ConfigError(field, bad, "names (or patterns such as 'AWS_*') of environment "
                          "variables, without '=' or spaces")
    return out


def base_environ(inherit: Iterable[str] = (),
                 environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of the node's environment a service may see: `ENV_ALLOWLIST` plus the names
    or patterns in ``inherit`` (an option's ``inherit_env``)."""
    env = os.environ if environ is None else environ
    patterns = (*ENV_ALLOWLIST, *inherit)
    exact = {p for p in patterns if not any(c in p for c in "*?[")}
    globs = [p for p in patterns if p not in exact]
    return {k: v for k, v in env.items()
            if k in exact or any(fnmatch.fnmatchcase(k, g) for g in globs)}


def backend_env(ctx: Context | None, env: Mapping[str, str] | None = None,
                inherit: Iterable[str] = ()) -> dict[str, str]:
    """The whole environment of a service: `base_environ` (the allow-list and ``inherit``),
    then the option's own ``env``, then `fencing_env` (which nothing overrides)."""
    out = base_environ(inherit) | dict(env or {})
    if ctx is not None:
        out |= fencing_env(ctx)
    return out


def scrubbed_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The node's environment without its NATS credentials: for the node's own helper tools
    (fence actions such as ``systemctl kill`` through an ``ssh`` prefix), which may need more
    than `ENV_ALLOWLIST` (``SSH_AUTH_SOCK``, ``XDG_RUNTIME_DIR``) but never the credentials."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not _SECRET_ENV.match(k)}


def expand(args: Iterable[str], ctx: Context) -> list[str]:
    """Substitute ``{epoch}``, ``{app}``, ``{node}`` and ``{platform}`` in each argument.

    Only these four exact placeholders are replaced; other braces (``${HOME}``, JSON) are kept.
    """
    values = {
        "{epoch}": str(ctx.epoch or 0),
        "{app}": ctx.app.name,
        "{node}": ctx.node_id,
        "{platform}": ctx.platform.name,
    }
    out = []
    for arg in args:
        for token, value in values.items():
            arg = arg.replace(token, value)
        out.append(arg)
    return out


# -- restarts while active ----------------------------------------------------------------------


class RestartPolicy:
    """At most ``max_restarts`` restarts within ``window`` seconds, with doubling back-off.

    For a backend that supervises its service while active: on each failure ask `next_delay`,
    sleep that long and restart, or step down (``report_failure``) when it answers None.

    Example::

        policy = RestartPolicy(max_restarts=3, backoff=1.0, window=300.0)
        delay = policy.next_delay()  # 1.0, then 2.0, 4.0, then None within 300 s

    :param max_restarts: restarts allowed within ``window``.
    :param backoff: the first delay in seconds (doubles with each restart in the window).
    :param window: seconds over which restarts are counted.
    :param cap: the longest delay in seconds (None: no cap).
    :ivar total: restarts made since the backend was created (for metrics).
    """

    def __init__(self, max_restarts: int, backoff: float, window: float,
                 cap: float | None = None) -> None:
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.window = window
        self.cap = cap
        self.times: collections.deque[float] = collections.deque()
        self.total = 0

    @property
    def recent(self) -> int:
        """Restarts counted now (within ``window``, since the last `reset`)."""
        return len(self.times)

    def next_delay(self) -> float | None:
        """Record a restart and return its delay, or None when the policy is exhausted."""
        now = time.monotonic()
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        delay: float = self.backoff * 2.0 ** len(self.times)
        if self.cap is not None:
            delay = min(delay, self.cap)
        self.times.append(now)
        self.total += 1
        return delay

    def reset(self) -> None:
        """Forget past restarts (a fresh activation)."""
        self.times.clear()


# -- health checks ------------------------------------------------------------------------------


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"HealthCheck.{name}", value, "must be positive")


@option
class HealthCheck:
    """How to tell that a backend's service is healthy: exactly one of ``http``, ``tcp``,
    ``command``.

    Example::

        Process("python -m http.server 8000",
                health=HealthCheck(http="http://127.0.0.1:8000/", start_timeout=20))

    :param http: URL; healthy when it answers with a status below 400.
    :param tcp: ``host:port``; healthy when a TCP connection is accepted.
    :param command: argv list or shell-like string; healthy when it exits 0 (its environment
        is `base_environ` plus the `fencing_env` variables, and a process backend's own
        ``env``/``inherit_env``: not the node's credentials).
    :param interval: seconds between checks while active.
    :param timeout: seconds one check may take.
    :param start_timeout: seconds the service may take to become healthy after a start; the
        backend stage fails (the node steps down) when it does not.
    :param failure_threshold: consecutive failed checks while active that count as a failure of
        the service (restarted by the backend's restart policy).
    """

    http: str | None = None
    tcp: str | None = None
    command: str | tuple[str, ...] | None = None
    interval: float = 5.0
    timeout: float = 2.0
    start_timeout: float = 60.0
    failure_threshold: int = 3

    def __post_init__(self) -> None:
        if self.command is not None and not isinstance(self.command, str):
            object.__setattr__(self, "command", tuple(self.command))
        given = [k for k in ("http", "tcp", "command") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError("HealthCheck", given or None,
                              "give exactly one of http=, tcp= or command=")
        for name in ("interval", "timeout", "start_timeout"):
            _positive(name, getattr(self, name))
        if self.failure_threshold < 1:
            raise ConfigError("HealthCheck.failure_threshold", self.failure_threshold,
                              "must be at least 1")
        if self.http is not None:
            url = urllib.parse.urlsplit(self.http)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ConfigError("HealthCheck.http", self.http,
                                  "must be an http:// or https:// URL with a host")
        if self.tcp is not None:
            self.tcp_address()
        if self.command is not None and not self.argv():
            raise ConfigError("HealthCheck.command", self.command, "must not be empty")

    @property
    def kind(self) -> str:
        """``"http"``, ``"tcp"`` or ``"command"``."""
        return "http" if self.http else "tcp" if self.tcp else "command"

    def tcp_address(self) -> tuple[str, int]:
        """``(host, port)`` of a TCP check."""
        host, sep, port = (self.tcp or "").rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("HealthCheck.tcp", self.tcp, "must be host:port")
        return host.strip("[]"), int(port)

    def argv(self) -> list[str]:
        """The command of a command check as an argv list."""
        cmd = self.command or ()
        return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)

    async def probe(self, env: dict[str, str] | None = None) -> BackendHealth:
        """Run the check once, bounded by ``timeout``; never raises."""
        try:
            if self.http is not None:
                async with asyncio.timeout(self.timeout + 1):
                    return await asyncio.to_thread(self._http)
            if self.tcp is not None:
                return await self._tcp()
            return await self._command(env)
        except TimeoutError:
            return BackendHealth(False, f"{self.kind} check timed out after {self.timeout}s")
        except Exception as exc:
            return BackendHealth(False, f"{self.kind} check failed: {type(exc).__name__}: {exc}")

    def _http(self) -> BackendHealth:
        assert self.http is not None
        try:
            with urllib.request.urlopen(self.http, timeout=self.timeout) as resp:
                return BackendHealth(True, f"HTTP {resp.status}", {"status": resp.status})
        except urllib.error.HTTPError as exc:
            return BackendHealth(False, f"HTTP {exc.code}", {"status": exc.code})
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return BackendHealth(False, f"HTTP check failed: {reason}")

    async def _tcp(self) -> BackendHealth:
        host, port = self.tcp_address()
        try:
            async with asyncio.timeout(self.timeout):
                _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            return BackendHealth(False, f"TCP {host}:{port}: {exc.strerror or exc}")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return BackendHealth(True, f"TCP {host}:{port} accepts connections")

    async def _command(self, env: dict[str, str] | None) -> BackendHealth:
        # Not the node's whole environment: its NATS credentials stay with it.
        full_env = base_environ() | (env or {})
        proc = await asyncio.create_subprocess_exec(
            *self.argv(), env=full_env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(self.timeout):
                out, _ = await proc.communicate()
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
        detail = f"command exited {proc.returncode}" + (f": {tail[0]}" if tail else "")
        return BackendHealth(proc.returncode == 0, detail, {"exit": proc.returncode})

    async def wait_healthy(
        self, app: str, failed: Callable[[], str | None], env: dict[str, str] | None = None,
        poll: float = 0.2,
    ) -> BackendHealth:
        """Probe until healthy, for at most ``start_timeout`` seconds.

        :param app: the app name (for the error).
        :param failed: called between probes; a non-None answer (e.g. "exited with 1") aborts.
        :param env: environment for a command check.
        :param poll: seconds between probes (capped by ``interval``).
        :raises BackendError: not healthy in time, or ``failed`` reported a reason.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        last = BackendHealth(False, "not checked yet")
        while True:
            why = failed()
            if why is not None:
                raise BackendError(app, f"{self.kind} check", f"{why} before it became healthy "
                                   f"(last check: {last.detail})")
            last = await self.probe(env)
            if last.healthy:
                return last
            left = deadline - loop.time()
            if left <= 0:
                raise BackendError(app, f"{self.kind} check",
                                   f"not healthy within {self.start_timeout}s "
                                   f"(last check: {last.detail})")
            await asyncio.sleep(min(poll, self.interval, left))


# -- joining the failover sequence --------------------------------------------------------------


def backends_of(stages: Iterable[Stage]) -> list[tuple[Stage, Backend]]:
    """The ``(stage, supervisor)`` pairs among an app's stages (e.g. ``runtime.stages``): the
    BACKEND stages the kernel built keep their `Supervisor` in ``stage.extra["backend"]``."""
    return [(s, s.extra["backend"]) for s in stages if "backend" in s.extra]


# -- the fence guard: a backend never outlives the lease ----------------------------------------


def guard_deadlines(rt: AppRuntime | None, deadline: float | None) -> tuple[float, float] | None:
    """(TERM_AT, KILL_AT) for a fence guard from a local lease deadline: the guard starts to
    stop the service ``fence_margin`` before the deadline and is done at it (None: no lease).

    :param rt: the app's runtime (its ``fence_margin``).
    :param deadline: the local lease deadline (monotonic), as ``pycluster_lease_renewed``
        gives it.
    """
    if deadline is None or rt is None:
        return None
    return deadline - rt.fence_margin, deadline


def guard_deadline_line(deadlines: tuple[float, float]) -> str:
    """The control-socket command that hands new deadlines to a guard.

    :param deadlines: (TERM_AT, KILL_AT) from `guard_deadlines`.
    """
    return f"deadline {deadlines[0]:.6f} {deadlines[1]:.6f}"


def guard_argv(control_fd: int, label: str, deadlines: tuple[float, float] | None,
               *extra: str) -> list[str]:
    """The command line of a fence guard (``python -I -S fenceguard.py ...``).

    :param control_fd: the guard's end of the control socket (pass it with ``pass_fds``).
    :param label: the name in the guard's diagnostics (the app).
    :param deadlines: the initial (TERM_AT, KILL_AT), or None.
    :param extra: further options (``--grace``, ``--fence-action``, ...; not COMMAND).
    """
    cmd = [sys.executable, "-I", "-S", fenceguard.__file__, "--control-fd", str(control_fd),
           "--parent-pid", str(os.getpid()), "--label", label, *extra]
    if deadlines is not None:
        cmd += ["--term-at", f"{deadlines[0]:.6f}", "--kill-at", f"{deadlines[1]:.6f}"]
    return cmd


class LeaseFence:
    """A fence guard in fence-action mode for a service the node does not run itself.

    `start` it once the service runs: it gets the app's lease deadline on every renewal and runs
    its stop actions when the node dies (SIGKILL: the control socket closes), or stops renewing
    (SIGSTOP, a stuck loop: TERM_AT passes), so the service stops before another node can win
    the lease. `release` it first on a graceful stop (no action runs), then stop the service.

    :param app: the app's name. :param platform: the node's platform (for the lease).
    :param actions: argvs run in order when fencing (e.g. ``systemctl kill``).
    :param docker: ``(engine URL, container name)`` pairs stopped through the engine API.
    :param action_timeout: bound of each action, in seconds.
    :ivar fenced: True once the guard reported that it fenced.
    """

    def __init__(self, app: str, platform: Platform, *,
                 actions: Sequence[Sequence[str]] = (),
                 docker: Sequence[tuple[str, str]] = (), action_timeout: float = 10.0) -> None:
        if not actions and not docker:
            raise ValueError("LeaseFence needs at least one action")
        self.app = app
        self.platform = platform
        self.actions = [list(a) for a in actions]
        self.docker = list(docker)
        self.action_timeout = action_timeout
        self.fenced = False
        self._proc: asyncio.subprocess.Process | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._follow: asyncio.Task[None] | None = None

    def _runtime(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app)

    @property
    def running(self) -> bool:
        """True while the guard process runs."""
        return self._proc is not None and self._proc.returncode is None

    def _send(self, line: str) -> None:
        w = self._writer
        if w is not None and not w.is_closing():
            with contextlib.suppress(Exception):
                w.write(line.encode() + b"\n")

    def _renewed(self, deadline: float) -> None:
        d = guard_deadlines(self._runtime(), deadline)
        if d is not None and self.running:
            self._send(guard_deadline_line(d))

    @hookimpl
    def pycluster_lease_renewed(self, app: Any, deadline: float) -> None:
        """While armed, the fence is a plugin object: it takes every renewal of its app."""
        if app.platform is self.platform and app.name == self.app:
            self._renewed(deadline)

    def _follow_renewals(self, on: bool) -> None:
        pm, name = self.platform.pm, f"lease-fence-{id(self):x}"
        if on and pm.get_plugin(name) is None:
            pm.register(self, name=name)
        elif not on and pm.get_plugin(name) is not None:
            pm.unregister(name=name)

    async def start(self) -> None:
        """Start the guard (no-op while one runs); return once it is armed."""
        if self.running:
            return
        await self.release()  # a guard that fenced: drop what is left of it
        self.fenced = False
        rt = self._runtime()
        extra = ["--action-timeout", str(self.action_timeout)]
        for argv in self.actions:
            extra += ["--fence-action", json.dumps(argv)]
        for url, name in self.docker:
            extra += ["--docker-kill", url, name]
        ours, theirs = socket.socketpair()
        try:
            argv = guard_argv(theirs.fileno(), self.app,
                              guard_deadlines(rt, rt.lease_deadline() if rt else None), *extra)
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                start_new_session=True, env=scrubbed_environ())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            async with asyncio.timeout(FENCE_START_TIMEOUT):
                first = await reader.readline()
        except BaseException:
            await self._kill()
            raise
        if first.strip() != b"armed":
            await self._kill()
            raise BackendError(self.app, "fence guard", f"not armed: {first!r}")
        self._follow_renewals(True)
        self._follow = supervise(f"{self.app}:fence", lambda: self._read(reader))
        log.info("app %s: fence guard %d armed", self.app, self._proc.pid)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ValueError):
            while line := await reader.readline():
                text = line.decode(errors="replace").strip()
                if text.startswith("fenc"):
                    self.fenced = True
                    log.warning("app %s: fence guard: %s", self.app, text)

    async def _kill(self) -> None:
        """SIGKILL the guard (no action runs) and forget it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self._close()

    def _close(self) -> None:
        self._follow_renewals(False)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._follow is not None:
            self._follow.cancel()
            self._follow = None

    async def release(self, timeout: float = 5.0) -> None:
        """Stop the guard without any action (the node's graceful stop); idempotent."""
        proc = self._proc
        if proc is None:
            self._close()
            return
        self._follow_renewals(False)
        if proc.returncode is None:
            self._send("release")
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                log.error("app %s: fence guard %d does not release; killing it", self.app,
                          proc.pid)
        await self._kill()


# -- the shared supervisor ------------------------------------------------------------------


class BackendState(enum.StrEnum):
    """Where a backend is in its life on this node (`Supervisor.state`)."""

    STOPPED = "stopped"
    """Not started here (a standby), or stopped."""
    STARTING = "starting"
    """The controller is starting the service (and waiting for it to be healthy)."""
    RUNNING = "running"
    """Started and, at the last check, healthy."""
    UNHEALTHY = "unhealthy"
    """Failed its health checks ``failure_threshold`` times in a row; about to be restarted."""
    RESTARTING = "restarting"
    """Waiting out the restart back-off, or restarting."""
    EXITED = "exited"
    """Exited cleanly under ``restart="on-failure"``: left alone, the app stays active."""
    FAILED = "failed"
    """The restart policy is exhausted (or ``restart="never"``): the node steps down."""
    STOPPING = "stopping"
    """The controller is stopping the service."""


class RestartMode(enum.StrEnum):
    """Which failures the `Supervisor` restarts."""

    ON_FAILURE = "on-failure"
    """Everything but a clean exit (`Down.clean`)."""
    ALWAYS = "always"
    """Every failure, a clean exit too."""
    NEVER = "never"
    """None: any failure makes the node step down at once."""


@dataclass(frozen=True)
class Down:
    """The service went down by itself (`Controller.wait_down`).

    :ivar reason: what happened ("exited with 1", "killed by SIGKILL").
    :ivar clean: a clean exit (status 0): not restarted under `RestartMode.ON_FAILURE`.
    """

    reason: str
    clean: bool = False


class Controller:
    """The engine-specific part of a backend; the `Supervisor` does everything else.

    A backend kind is an option class plus a controller class registered together
    (``registry.add(kind, OptionClass, MyController)`` in ``pycluster_register_backends``);
    the kernel builds one controller per option with ``MyController(option, app, platform)``,
    wraps it in a `Supervisor` and makes it the app's BACKEND stage, health check, metrics and
    audit trail. A subclass implements `start`, `stop` and `probe` (the rest is optional) and
    sets the class or instance attributes below from its option.

    :cvar kind: the backend kind (``"docker"``), for logs.
    :ivar check_interval: seconds between probes while active (None: no periodic probe; a
        failure is then only seen through `wait_down`).
    :ivar failure_threshold: failed probes in a row that count as a failure.
    :ivar settle_timeout: seconds a probe may report `BackendHealth.settling` before it counts
        as a failure.
    :ivar restart_mode: which failures are restarted (`RestartMode`).
    :ivar policy: the `RestartPolicy` (its ``total`` is the restarts metric).
    :ivar stable_after: seconds a (re)started service must stay up for the policy's count to
        reset (None: only the policy's window ages restarts out).
    :ivar stage_timeout: bound of the BACKEND stage's start and stop (None: the app's hook
        timeout).
    :ivar check_timeout: bound of one run of the app health check.
    """

    kind: str = ""
    check_interval: float | None = 5.0
    failure_threshold: int = 1
    settle_timeout: float = 60.0
    restart_mode: RestartMode = RestartMode.ALWAYS
    stable_after: float | None = None
    stage_timeout: float | None = None
    check_timeout: float = 30.0

    def __init__(self, option: Any, app: Any, platform: Any) -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.policy = RestartPolicy(3, 1.0, 300.0)
        #: The name of the stage that runs it (set by its `Supervisor`).
        self.stage = ""

    async def start(self, ctx: Context) -> BackendHealth | None:
        """Start the service for ``ctx.epoch`` and return once it is up (and healthy, when it
        has a check); raise (ideally `BackendError`) when it cannot, leaving nothing running.

        :returns: the first health result (None: "running").
        """
        raise NotImplementedError

    async def stop(self, ctx: Context) -> dict[str, object] | None:
        """Stop the service (idempotent; done before ``ctx.deadline`` when one is set).

        :returns: extra data for the ``stopped`` audit entry; None when there was nothing to
            stop (no entry is written).
        """
        raise NotImplementedError

    async def probe(self) -> BackendHealth:
        """Probe the service now: never raises."""
        raise NotImplementedError

    async def restart(self, ctx: Context) -> BackendHealth | None:
        """Start the service again after a failure while active (default: `start`)."""
        return await self.start(ctx)

    async def wait_down(self) -> Down:
        """Return when the service went down by itself (a process that exited); the default
        never returns (failures are seen by probing)."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def unhealthy(self) -> None:
        """The service failed its checks ``failure_threshold`` times: bring it down before it
        is restarted (default: nothing; `restart` deals with it)."""

    async def health(self, state: BackendState, last: BackendHealth | None) -> BackendHealth:
        """What the app health check (while started) and the option's handle report.

        :param state: the supervisor's state. :param last: its last probe.
        """
        if state is BackendState.STOPPED:
            return last or BackendHealth(False, "stopped")
        return last or await self.probe()

    def fence(self) -> LeaseFence | None:
        """The `LeaseFence` armed once the service runs (None: the controller fences itself,
        or cannot outlive the node)."""
        return None

    def renewed(self, deadline: float) -> None:
        """The app's lease was renewed until ``deadline`` (monotonic), while started."""

    def describe(self) -> str:
        """The service in messages ("unit web.service", "container web-1")."""
        return f"{self.kind} backend of {self.app.name}"

    def identity(self) -> dict[str, object]:
        """Data naming the service in every audit entry (``{"unit": ...}``)."""
        return {}

    def started_info(self) -> dict[str, object]:
        """Extra data for the ``started`` audit entry."""
        return {}

    async def diagnostics(self) -> dict[str, list[str]]:
        """Recent output quoted when the service fails (``{"journal": [...]}``)."""
        return {}


class Supervisor:
    """Runs one controller while the app is active on this node: the BACKEND stage.

    It starts the service (the controller waits until it is up), arms the controller's
    `LeaseFence`, then watches it: a probe every ``check_interval`` (``failure_threshold``
    failures in a row, or a `BackendHealth.settling` answer for longer than
    ``settle_timeout``, are a failure) and the controller's `Controller.wait_down`. A failure
    is restarted by the restart policy with back-off, only while the lease is valid; past the
    policy (or with `RestartMode.NEVER`) the node steps down (`AppRuntime.report_failure`).
    Stopping releases the fence first, then stops the service. Audit entries (category
    ``audit``: started, stopped, restarted, failed) and the healthy/restarts metrics come from
    here; the kernel makes it the app's stage and health check.

    :param controller: the engine-specific part.
    :param stage: the stage name (``docker-0``), for `AppRuntime.report_failure`.
    :param audit: the audit category (None: no audit entries).
    :ivar state: a `BackendState`.
    :ivar last_health: the last probe (None before the first).
    """

    def __init__(self, controller: Controller, *, stage: str, audit: str | None = None) -> None:
        self.controller = controller
        self.app = controller.app
        self.platform = controller.platform
        self.stage = stage
        controller.stage = stage
        self.audit_category = audit
        self.state = BackendState.STOPPED
        self.last_health: BackendHealth | None = None
        self._stopping = True
        self._ctx: Context | None = None
        self._task: asyncio.Task[None] | None = None
        self._up_since = 0.0

    def __repr__(self) -> str:
        return f"Supervisor({self.stage!r}, {self.state.value})"

    @property
    def policy(self) -> RestartPolicy:
        """The controller's restart policy."""
        return self.controller.policy

    @property
    def restarts(self) -> int:
        """Restarts counted by the policy now (in a row, or within its window)."""
        return self.policy.recent

    @property
    def running(self) -> bool:
        """True while started on this node (not stopped)."""
        return self.state is not BackendState.STOPPED

    def _runtime(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app.name)  # type: ignore[no-any-return]

    def _lease_ok(self) -> bool:
        rt = self._runtime()
        return rt is None or rt.election is None or rt.election.is_leader

    def audit(self, action: str, **data: object) -> None:
        """Write an audit entry of the backend's category (best effort)."""
        if self.audit_category is None:
            return
        try:
            self.platform.audit.log(self.audit_category, action,
                                    dict(data, **self.controller.identity()), app=self.app)
        except Exception:
            log.debug("audit %s not written", action, exc_info=True)

    async def _arm(self) -> None:
        fence = self.controller.fence()
        if fence is not None:
            await fence.start()  # from now on the service cannot outlive the lease

    # -- the stage -----------------------------------------------------------------------

    async def start(self, ctx: Context) -> None:
        """Start the service; return once it is up (the BACKEND stage's activation)."""
        self._stopping = False
        self._ctx = ctx
        self.policy.reset()
        self.state = BackendState.STARTING
        # A fence the controller already knows guards the start too: a node SIGKILLed while
        # its service comes up (a container waiting to be healthy) must not leave it running.
        await self._arm()
        try:
            first = await self.controller.start(ctx)
            await self._arm()
        except BaseException:
            fence = self.controller.fence()
            if fence is not None:
                with contextlib.suppress(Exception):
                    await fence.release()  # the node lives: the controller's failure path
            raise
        self.last_health = first or BackendHealth(True, "running")
        self.state = BackendState.RUNNING
        self._up_since = time.monotonic()
        self.audit("started", epoch=ctx.epoch, **self.controller.started_info())
        self._task = asyncio.create_task(self._supervise(ctx), name=f"{self.stage}:supervise")

    async def stop(self, ctx: Context) -> None:
        """Release the fence, stop watching, stop the service (the stage's deactivation)."""
        self._stopping = True
        fence = self.controller.fence()
        if fence is not None:  # a graceful stop: the guard must not act meanwhile
            await fence.release()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self.state = BackendState.STOPPING
        try:
            extra = await self.controller.stop(ctx)
        except BaseException as exc:
            self.audit("stopped", epoch=ctx.epoch, reason=ctx.reason, error=str(exc))
            raise
        finally:
            self.state = BackendState.STOPPED
            self.last_health = BackendHealth(False, "stopped")
        if extra is not None:
            self.audit("stopped", epoch=ctx.epoch, reason=ctx.reason, **extra)

    async def health(self) -> BackendHealth:
        """The backend's health as the app health check reports it (cheap)."""
        return await self.controller.health(self.state, self.last_health)

    def renewed(self, deadline: float) -> None:
        """Hand a lease renewal to the controller while started."""
        if self.running:
            self.controller.renewed(deadline)

    # -- while active --------------------------------------------------------------------

    async def _supervise(self, ctx: Context) -> None:
        try:
            await self._watch(ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a controller broke its contract: do not go on unwatched
            log.exception("app %s: supervising %s failed", self.app.name,
                          self.controller.describe())
            if not self._stopping:
                await self._fail(f"supervising {self.controller.describe()} failed: "
                                 f"{type(exc).__name__}: {exc}", str(exc))

    async def _watch(self, ctx: Context) -> None:
        c = self.controller
        while not self._stopping:
            down = await self._next_failure()
            if down is None or self._stopping:
                return
            self.last_health = BackendHealth(False, down.reason)
            if not self._lease_ok():
                log.warning("app %s: %s %s; lease gone, not restarting", self.app.name,
                            c.describe(), down.reason)
                self.state = BackendState.STOPPED
                return
            if c.restart_mode is RestartMode.ON_FAILURE and down.clean:
                log.info("app %s: %s %s; not restarting (on-failure)", self.app.name,
                         c.describe(), down.reason)
                self.state = BackendState.EXITED
                return
            if c.restart_mode is RestartMode.NEVER:
                await self._fail(f"{c.describe()} {down.reason} (restart=never)", down.reason)
                return
            if c.stable_after is not None and time.monotonic() - self._up_since >= c.stable_after:
                self.policy.reset()
            if not await self._restart(ctx, down.reason):
                return

    async def _next_failure(self) -> Down | None:
        """Wait for the next failure: the controller's `Controller.wait_down`, or failed
        probes; None once stopping."""
        c = self.controller
        watch = asyncio.ensure_future(c.wait_down())
        failures, settling_since = 0, None
        try:
            while not self._stopping:
                await asyncio.wait({watch}, timeout=c.check_interval)
                if watch.done():
                    down = watch.result()
                    if self.state is BackendState.UNHEALTHY:
                        return Down("unhealthy")
                    return down
                if self._stopping:
                    return None
                if self.state is not BackendState.RUNNING:
                    continue
                h = await c.probe()
                if self.state is not BackendState.RUNNING or self._stopping:
                    continue
                self.last_health = h
                if h.healthy:
                    failures, settling_since = 0, None
                    continue
                if h.settling:  # the engine itself is restarting it: give it time
                    settling_since = settling_since or time.monotonic()
                    if time.monotonic() - settling_since < c.settle_timeout:
                        continue
                settling_since = None
                failures += 1
                if failures < c.failure_threshold:
                    log.warning("app %s: health check failed (%d/%d): %s", self.app.name,
                                failures, c.failure_threshold, h.detail)
                    continue
                self.state = BackendState.UNHEALTHY
                await c.unhealthy()
                return Down(h.detail if c.failure_threshold == 1 else "unhealthy")
            return None
        finally:
            watch.cancel()

    async def _restart(self, ctx: Context, why: str) -> bool:
        """Restart with back-off until it runs again; False when done (stepping down or
        stopping)."""
        c = self.controller
        while True:
            diag = await c.diagnostics()
            text = "".join(f"\nRecent {k}:\n" + "\n".join(v) for k, v in diag.items() if v)
            delay = self.policy.next_delay()
            if delay is None:
                p = self.policy
                spent = (f"{p.recent} restart(s) did not help" if math.isinf(p.window)
                         else f"{p.max_restarts} in {p.window:.0f}s")
                reason = f"{c.describe()} is {why}; restart policy exhausted ({spent})"
                await self._fail(reason, why, diag, text)
                return False
            self.state = BackendState.RESTARTING
            log.warning("app %s: %s is %s while active; restart %d/%d in %.1fs%s",
                        self.app.name, c.describe(), why, self.policy.recent,
                        self.policy.max_restarts, delay, text)
            await asyncio.sleep(delay)
            if self._stopping or not self._lease_ok():
                return False
            try:
                first = await c.restart(ctx)
                await self._arm()  # re-armed if it fenced meanwhile
            except Exception as exc:  # e.g. out of file descriptors: still a failed restart
                why = exc.reason if isinstance(exc, BackendError) else \
                    f"{type(exc).__name__}: {exc}"
                log.warning("app %s: restart of %s failed: %s", self.app.name, c.describe(),
                            why)
                continue
            self.last_health = first or BackendHealth(True, "running")
            self.state = BackendState.RUNNING
            self._up_since = time.monotonic()
            log.info("app %s: %s restarted", self.app.name, c.describe())
            self.audit("restarted", detail=why, restarts=self.policy.total)
            return True

    async def _fail(self, reason: str, detail: str, diag: dict[str, list[str]] | None = None,
                    text: str = "") -> None:
        self.state = BackendState.FAILED
        log.error("app %s: %s; stepping down%s", self.app.name, reason, text)
        self.audit("failed", detail=detail, **{k: v[-5:] for k, v in (diag or {}).items()})
        rt = self._runtime()
        if rt is not None:
            rt.report_failure(self.stage, reason)
