"""The backend protocol: what a controller of a service (process, unit, container) offers.

A *backend* is the thing an existing service becomes highly available through: pycluster starts
it on the node that won the election and stops it when that node steps down. The core ships the
``process`` backend (`pycluster.Process`); plugins add ``systemd``, ``docker`` and others.

Writing a third-party backend (see docs/backends.md for a complete example):

1. Define a frozen option class (``MyThing(name, ...)``) that users pass to ``App(...)``.
2. Implement `Backend`: async ``start(ctx)``, ``stop(ctx)``, ``health()``.
3. In your plugin module, declare the option (``pycluster_register_options``), the kind
   (``pycluster_register_backends``), claim the option (``pycluster_claim_option``) and add one
   stage per option with `backend_stage` (``pycluster_stages``).

Contract (what the coordinator relies on):

* ``start(ctx)`` runs in the BACKEND stage of the failover sequence, after the VIP is acquired.
  Return once the service is up, and healthy when a health check is configured; raise (any
  exception, ideally `BackendError`) when it cannot be started: the coordinator then undoes the
  sequence (your ``stop`` is called too, so clean up a half-started service there), releases
  the lease and backs off, so that another node takes over. ``start`` is bounded by the stage
  timeout and may be cancelled when the lease is lost.
* ``ctx.epoch`` is the fencing token: strictly increasing across leader changes. Hand it to the
  service (`fencing_env`, `expand`) so that it can refuse orders from an older epoch.
* ``stop(ctx)`` runs in reverse order when the node steps down, leaves, or lost its lease. It
  must be idempotent (it is also called after a failed ``start``) and must have stopped the
  service before ``ctx.deadline`` (monotonic) when one is set: after that instant another node
  may hold the lease. Never leave the service running on a failed stop: escalate (SIGKILL,
  ``docker kill``, ...) and raise only if it may still be running.
* ``health()`` is cheap, never raises and never blocks for long: it is polled by the health
  checks and metrics of the app (through ``stage.extra["backend"]``, see `backends_of`).
* A backend that fails while active and cannot recover by itself calls
  ``platform.runtimes[app.name].report_failure(stage_name, reason)``: the node steps down (with
  back-off) so that a standby takes over.
* A backend must never outlive its node's lease. The process backend guarantees it with a fence
  guard (`pycluster.fenceguard`); a backend the node does not run itself (a unit, a container)
  starts a `LeaseFence` once the service runs — a guard in fence-action mode that stops the
  service when the node dies or stops renewing — and releases it first on a graceful stop.

Size: the backend toolkit plugin authors import as one module (protocol, health checks,
restart policy, fence guard client and `LeaseFence`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fnmatch
import json
import logging
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
    "HealthCheck",
    "LeaseFence",
    "RestartPolicy",
    "backend_env",
    "backend_stage",
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
    """

    healthy: bool
    detail: str = ""
    data: dict[str, object] = field(default_factory=dict)


class BackendError(PyclusterError):
    """A backend could not be started or stopped; names the app, the backend and why."""

    def __init__(self, app: str, backend: str, reason: str) -> None:
        self.app = app
        self.backend = backend
        self.reason = reason
        super().__init__(f"app {app!r}: backend {backend}: {reason}")


@runtime_checkable
class Backend(Protocol):
    """A controller that starts and stops one service instance on this node.

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
    :ivar total: restarts made since the backend was created (for metrics).
    """

    def __init__(self, max_restarts: int, backoff: float, window: float) -> None:
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.window = window
        self.times: collections.deque[float] = collections.deque()
        self.total = 0

    def next_delay(self) -> float | None:
        """Record a restart and return its delay, or None when the policy is exhausted."""
        now = time.monotonic()
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        delay: float = self.backoff * 2.0 ** len(self.times)
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


@dataclass(frozen=True)
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
    command: str | Sequence[str] | None = None
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
                return await asyncio.wait_for(asyncio.to_thread(self._http), self.timeout + 1)
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
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
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
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
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


def backend_stage(
    name: str,
    backend: Backend,
    *,
    plugin: str,
    order: int | None = None,
    timeout: float | None = None,
) -> Stage:
    """A failover `Stage` that starts ``backend`` on activation and stops it on deactivation.

    The backend object is kept in ``stage.extra["backend"]`` (found again by `backends_of`).

    :param name: unique stage name within the app (e.g. ``"docker-0"``).
    :param backend: the controller.
    :param plugin: the plugin name (for logs, audit and metrics).
    :param order: position in the sequence; default `StageOrder.BACKEND` (after the VIP).
    :param timeout: bound of start and of stop; default the app's hook timeout.
    """
    from .kernel.stages import Stage, StageOrder

    return Stage(
        name=name, order=StageOrder.BACKEND if order is None else order,
        activate=backend.start, deactivate=backend.stop, timeout=timeout, plugin=plugin,
        extra={"backend": backend},
    )


def backends_of(stages: Iterable[Stage]) -> list[tuple[Stage, Backend]]:
    """The ``(stage, backend)`` pairs among an app's stages (e.g. ``runtime.stages``)."""
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
            first = await asyncio.wait_for(reader.readline(), FENCE_START_TIMEOUT)
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
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.error("app %s: fence guard %d does not release; killing it", self.app,
                          proc.pid)
        await self._kill()
