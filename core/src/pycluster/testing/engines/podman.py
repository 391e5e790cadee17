"""A real container engine for tests: podman's Docker-compatible API on a private socket.

``PodmanService`` runs ``podman system service`` on a unix socket inside a temporary folder (never
``/run/podman``), so each test session talks to its own API endpoint; the Python ``docker`` SDK
connects to it with ``docker.DockerClient(base_url=service.base_url)``.

No image registry is reachable on the project's machines, so images are built locally:
``build_busybox_image()`` imports a one-layer image made of ``/bin/busybox`` and its applet
symlinks. The podman CLI is used (through ``subprocess``) for setup only.

Everything here needs root and the packages installed by ``.ci/install-system.sh``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "BUSYBOX_IMAGE",
    "PodmanError",
    "PodmanService",
    "build_busybox_image",
    "cache_dir",
    "image_exists",
    "podman",
    "podman_available",
]

BUSYBOX_IMAGE = "localhost/pycluster-bb:latest"
"""Default name of the minimal busybox image built by :func:`build_busybox_image`."""

_BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


class PodmanError(RuntimeError):
    """A podman command or the podman API service failed."""


def cache_dir() -> Path:
    """Return (and create) the folder for cached build artefacts.

    ``$PYCLUSTER_CACHE_DIR`` if set, else ``~/.cache/pycluster``. It is never inside the git tree.
    """
    env = os.environ.get("PYCLUSTER_CACHE_DIR")
    path = Path(env) if env else Path.home() / ".cache" / "pycluster"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<cache dir>/<name>`` (serialises concurrent builders)."""
    with open(cache_dir() / name, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def podman(
    *args: str,
    check: bool = True,
    timeout: float = 120.0,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS...`` and return the completed process (text output captured).

    With ``check`` (the default) a non-zero exit raises :class:`PodmanError` carrying stderr.
    """
    cmd = ["podman", *args]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise PodmanError(f"{' '.join(cmd)}: timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise PodmanError(
            f"{' '.join(cmd)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc


@functools.lru_cache(maxsize=1)
def podman_available() -> tuple[bool, str]:
    """Tell whether rootful podman with the runc runtime works here; the reason when not.

    The result is cached for the life of the process.
    """
    if shutil.which("podman") is None:
        return False, "podman is not installed (run .ci/install-system.sh)"
    if os.geteuid() != 0:
        return False, "podman tests need root (rootless podman is not set up)"
    try:
        proc = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except PodmanError as exc:
        return False, f"podman info failed: {exc}"
    if proc.returncode != 0:
        return False, f"podman info failed: {proc.stderr.strip()}"
    runtime = proc.stdout.strip()
    if runtime != "runc":
        return False, (
            f"podman's OCI runtime is {runtime!r}, not 'runc' (crun fails on this machine's "
            "cgroups; run .ci/install-system.sh to write /etc/containers/containers.conf)"
        )
    return True, ""


def image_exists(name: str) -> bool:
    """Return True when podman's local store has an image called ``name``."""
    return podman("image", "exists", name, check=False).returncode == 0


def _find_busybox() -> Path:
    for candidate in _BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            return path
    found = shutil.which("busybox")
    if found is None:
        raise PodmanError("busybox not found (install busybox-static)")
    return Path(found)


def build_busybox_image(name: str = BUSYBOX_IMAGE, *, rebuild: bool = False) -> str:
    """Build a minimal image from the host's static ``busybox`` and return its name.

    The image holds ``/bin/busybox`` with a symlink for every applet (``sh``, ``sleep``,
    ``httpd``, ``nc``, ...), ``/tmp``, ``/var/www`` and a root entry in ``/etc/passwd``; its
    default command is ``/bin/sh``. Nothing is done when the image already exists (unless
    ``rebuild``). The busybox binary must be statically linked (Debian's busybox-static).
    """
    with _file_lock(".busybox-image.lock"):
        if not rebuild and image_exists(name):
            return name
        busybox = _find_busybox()
        applets = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        with tempfile.TemporaryDirectory(prefix="pyc-bb-") as tmp:
            root = Path(tmp) / "root"
            for sub in ("bin", "etc", "tmp", "var/www", "root"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            (root / "tmp").chmod(0o1777)
            shutil.copy2(busybox, root / "bin" / "busybox")
            (root / "bin" / "busybox").chmod(0o755)
            for applet in {"sh", "sleep", "httpd", "nc", *applets}:
                if applet != "busybox" and "/" not in applet:
                    (root / "bin" / applet).symlink_to("busybox")
            (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
            (root / "etc" / "group").write_text("root:x:0:\n")
            tarball = Path(tmp) / "image.tar"
            with tarfile.open(tarball, "w") as tar:
                for child in sorted(root.iterdir()):
                    tar.add(child, arcname=child.name)
            podman(
                "import",
                "--change",
                'CMD ["/bin/sh"]',
                "--change",
                "ENV PATH=/bin",
                str(tarball),
                name,
            )
    return name


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` connection over a unix-domain socket."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class PodmanService:
    """``podman system service`` serving the Docker-compatible API on a private unix socket.

    Use as a context manager or call :meth:`start` / :meth:`stop`::

        with PodmanService() as svc:
            client = docker.DockerClient(base_url=svc.base_url)

    The socket lives in a fresh temporary folder (``socket_path``); the service's output goes to
    ``log_path`` in the same folder. :meth:`stop` ends the service by its PID only; containers
    that were started through the API keep running (podman's ``conmon`` supervises them) and are
    the caller's to remove.
    """

    def __init__(self, *, extra_args: Sequence[str] = ()) -> None:
        """Prepare (but do not start) a service; ``extra_args`` go before the socket URL."""
        self._extra_args = list(extra_args)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def socket_path(self) -> Path:
        """Path of the API socket (valid once started)."""
        if self._dir is None:
            raise PodmanError("PodmanService is not started")
        return self._dir / "podman.sock"

    @property
    def base_url(self) -> str:
        """``unix://`` URL for ``docker.DockerClient(base_url=...)``."""
        return f"unix://{self.socket_path}"

    @property
    def log_path(self) -> Path:
        """File receiving the service's stdout and stderr."""
        if self._log is None:
            raise PodmanError("PodmanService is not started")
        return self._log

    @property
    def pid(self) -> int | None:
        """PID of the ``podman system service`` process, or None when not running."""
        return self._proc.pid if self._proc is not None else None

    def ping(self, timeout: float = 2.0) -> bool:
        """Return True when ``GET /_ping`` on the socket answers ``200 OK``."""
        if self._dir is None or not self.socket_path.exists():
            return False
        conn = _UnixHTTPConnection(str(self.socket_path), timeout)
        try:
            conn.request("GET", "/_ping")
            resp = conn.getresponse()
            body = resp.read()
            return resp.status == 200 and body.strip() == b"OK"
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def start(self, timeout: float = 30.0) -> PodmanService:
        """Start the service and wait (up to ``timeout`` s) until ``/_ping`` answers."""
        if self._proc is not None:
            raise PodmanError("PodmanService already started")
        ok, reason = podman_available()
        if not ok:
            raise PodmanError(reason)
        self._dir = Path(tempfile.mkdtemp(prefix="pyc-podman-"))
        self._log = self._dir / "service.log"
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    "podman",
                    "system",
                    "service",
                    "--time=0",
                    *self._extra_args,
                    f"unix://{self.socket_path}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        exitcode = self._proc.poll()
        tail = self._log_tail()
        self.stop()
        state = f"exited with {exitcode}" if exitcode is not None else f"no answer in {timeout}s"
        raise PodmanError(f"podman system service {state}; log:\n{tail}")

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the service by its PID (SIGTERM, then SIGKILL) and remove its temporary folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._log = None

    def __enter__(self) -> PodmanService:
        """Start the service (if needed) and return it."""
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the service."""
        self.stop()
