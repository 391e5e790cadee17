"""A real systemd for tests: systemd as PID 1 of a podman container.

systemd cannot be PID 1 of the project's machines, but it runs as PID 1 of a container. The
image is a Debian minbase root filesystem with systemd, built once with ``debootstrap`` from the
machine's own Debian mirror; its tarball is cached under :func:`~pycluster.testing.podman.cache_dir`
(``$PYCLUSTER_CACHE_DIR``, default ``~/.cache/pycluster``) so later runs only ``podman import`` it.

``SystemdContainer`` starts one container, waits until the manager is up, and gives the shape a
systemd backend needs: :meth:`SystemdContainer.systemctl_prefix` (``podman exec NAME systemctl``,
like ``ssh host systemctl``), :meth:`SystemdContainer.write_file` for unit files, and
:meth:`SystemdContainer.exec`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from pycluster.testing.engines.podman import (
    PodmanError,
    _file_lock,
    cache_dir,
    image_exists,
    podman,
    podman_available,
)

__all__ = [
    "SYSTEMD_IMAGE",
    "SystemdContainer",
    "build_systemd_image",
    "cached_image",
    "debian_mirror",
    "debootstrap_tarball",
    "systemd_available",
    "systemd_tarball",
]

SYSTEMD_IMAGE = "localhost/pycluster-systemd:latest"
"""Default name of the systemd image built by :func:`build_systemd_image`."""

SUITE = "bookworm"
"""Debian suite of the image (the machines' own release)."""

INCLUDE = ("systemd", "systemd-sysv", "dbus")
"""Packages added to debootstrap's minbase variant."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Bump when the rootfs recipe changes, so a stale cached tarball is not reused.
_RECIPE_VERSION = 1

# Units that only slow down or fail inside a container; masked in the image.
_MASKED_UNITS = (
    "getty@tty1.service",
    "console-getty.service",
    "systemd-logind.service",
    "systemd-timesyncd.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
)


def _sources_files() -> list[Path]:
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    return [f for f in files if f.is_file()]


def _mirror_from_sources(suite: str) -> str | None:
    """Return the first http(s) URI that the machine's apt sources use for ``suite``."""
    for path in _sources_files():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                if suite not in fields.get("suites", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    if uri.startswith(("http://", "https://")):
                        return uri.rstrip("/")
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    if parts[1].startswith(("http://", "https://")):
                        return parts[1].rstrip("/")
    return None


def debian_mirror(suite: str = SUITE) -> str:
    """Return the Debian mirror to debootstrap from.

    ``$PYCLUSTER_DEBIAN_MIRROR`` if set, else the mirror the machine's apt sources use for
    ``suite`` (``/etc/apt/sources.list`` and ``sources.list.d``), else ``deb.debian.org``.
    """
    env = os.environ.get("PYCLUSTER_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    return _mirror_from_sources(suite) or DEFAULT_MIRROR


def systemd_tarball(suite: str = SUITE) -> Path:
    """Path of the cached root-filesystem tarball for ``suite`` (it may not exist yet)."""
    arch = os.uname().machine
    path: Path = cache_dir() / f"systemd-{suite}-{arch}-v{_RECIPE_VERSION}.tar"
    return path


@functools.lru_cache(maxsize=1)
def systemd_available() -> tuple[bool, str]:
    """Tell whether a systemd container can be had here; the reason when not.

    Needs working podman (see :func:`~pycluster.testing.podman.podman_available`) and either the
    image, its cached tarball, or ``debootstrap`` to build it. Cached for the process's life.
    """
    ok, reason = podman_available()
    if not ok:
        return False, reason
    if image_exists(SYSTEMD_IMAGE) or systemd_tarball().is_file():
        return True, ""
    if shutil.which("debootstrap") is None:
        return False, "debootstrap is not installed (run .ci/install-system.sh)"
    return True, ""


def _run(cmd: Sequence[str], timeout: float) -> None:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        raise PodmanError(f"{shlex.join(cmd)}: exit {proc.returncode}:\n" + "\n".join(out))


# What a container does not need at run time: downloaded .debs, apt lists and docs.
_TRIMMED = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
            "usr/share/info", "usr/share/locale")


def debootstrap_tarball(tarball: Path, include: Sequence[str], *, suite: str = SUITE,
                        mirror: str | None = None, timeout: float = 900.0,
                        systemd: bool = False,
                        customize: Callable[[Path], None] | None = None) -> None:
    """Build a Debian root filesystem and tar it to ``tarball`` (atomically).

    ``debootstrap --variant=minbase --include=INCLUDE`` from ``mirror`` (default
    :func:`debian_mirror`), trimmed of what a container does not need; with ``systemd`` the
    units that only fail in a container are masked and ``/etc/machine-id`` is emptied (systemd
    makes one at boot); ``customize(root)`` may change the tree last.
    """
    work = Path(tempfile.mkdtemp(prefix="pyc-rootfs-", dir=tarball.parent))
    try:
        root = work / "root"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(include)}", suite,
              str(root), mirror or debian_mirror(suite)], timeout)
        for sub in _TRIMMED:
            target = root / sub
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    elif child.name != "lock":
                        child.unlink(missing_ok=True)
        if systemd:
            wants = root / "etc/systemd/system"
            wants.mkdir(parents=True, exist_ok=True)
            for unit in _MASKED_UNITS:
                link = wants / unit
                link.unlink(missing_ok=True)
                link.symlink_to("/dev/null")
            (root / "etc/machine-id").write_text("")
        if customize is not None:
            customize(root)
        partial = tarball.with_suffix(".tar.partial")
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
             timeout)
        os.replace(partial, tarball)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cached_image(name: str, tarball: Path, *, lock: str, build: Callable[[], None],
                 load: Callable[[], None], rebuild: bool = False) -> str:
    """Make sure image ``name`` is in podman's store and return it: the image already there,
    else the cached ``tarball`` loaded with ``load()``, else ``build()`` (which writes the
    tarball) then ``load()``. A cached tarball that fails to load is built again, once.
    Concurrent callers are serialised by the lock file ``lock`` in the cache folder."""
    with _file_lock(lock):
        if not rebuild and image_exists(name):
            return name
        fresh = rebuild or not tarball.is_file()
        if fresh:
            build()
        try:
            load()
        except PodmanError:
            if fresh:
                raise
            tarball.unlink(missing_ok=True)  # a damaged cached tarball
            build()
            load()
    return name


def _build_tarball(tarball: Path, suite: str, mirror: str, timeout: float) -> None:
    """The systemd image's root filesystem (see `debootstrap_tarball`)."""
    def hostname(root: Path) -> None:
        (root / "etc/hostname").write_text("pycluster-systemd\n")

    debootstrap_tarball(tarball, INCLUDE, suite=suite, mirror=mirror, timeout=timeout,
                        systemd=True, customize=hostname)


def build_systemd_image(
    name: str = SYSTEMD_IMAGE,
    *,
    suite: str = SUITE,
    mirror: str | None = None,
    rebuild: bool = False,
    timeout: float = 900.0,
) -> str:
    """Make sure the systemd image exists in podman's store and return its name.

    Order of preference: the image already in podman (nothing to do), the cached tarball
    (``podman import``), a fresh ``debootstrap --variant=minbase`` with :data:`INCLUDE` from
    :func:`debian_mirror` (then cached). ``rebuild`` forces a fresh debootstrap. Concurrent
    callers are serialised by a lock file in the cache folder.
    """
    tarball = systemd_tarball(suite)
    return cached_image(
        name, tarball, lock=".systemd-image.lock", rebuild=rebuild,
        build=lambda: _build_tarball(tarball, suite, mirror or debian_mirror(suite), timeout),
        load=lambda: _import(tarball, name, timeout))


def _import(tarball: Path, name: str, timeout: float) -> None:
    podman(
        "import",
        "--change",
        'CMD ["/lib/systemd/systemd"]',
        "--change",
        "STOPSIGNAL SIGRTMIN+3",
        str(tarball),
        name,
        timeout=timeout,
    )


class SystemdContainer:
    """A podman container running systemd as PID 1, for tests of systemd backends.

    Example::

        with SystemdContainer() as sd:
            sd.write_file("/etc/systemd/system/demo.service", unit_text)
            sd.exec("systemctl", "daemon-reload")
            subprocess.run([*sd.systemctl_prefix(), "start", "demo.service"], check=True)

    ``network`` is passed to ``podman run --network``: ``"none"`` (default) for no network,
    ``"host"``, or ``"ns:/run/netns/NAME"`` to place the container inside a network namespace made
    by :class:`~pycluster.testing.netns.NetNamespaces`. :meth:`stop` removes only the container this
    object created.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        image: str = SYSTEMD_IMAGE,
        network: str = "none",
        extra_args: Sequence[str] = (),
    ) -> None:
        """Prepare (but do not start) a container; ``name`` defaults to a unique one."""
        self.name = name or f"pyc-systemd-{secrets.token_hex(4)}"
        self.image = image
        self.network = network
        self._extra_args = list(extra_args)
        self._started = False

    def start(self, timeout: float = 60.0) -> SystemdContainer:
        """Build the image if needed, run the container, and wait until systemd is up.

        "Up" means ``systemctl is-system-running`` answers ``running`` or ``degraded`` within
        ``timeout`` seconds (the image build is not counted against it).
        """
        ok, reason = systemd_available()
        if not ok:
            raise PodmanError(reason)
        if self.image == SYSTEMD_IMAGE:
            build_systemd_image(self.image)
        podman(
            "run",
            "-d",
            "--name",
            self.name,
            "--hostname",
            self.name,
            "--systemd=always",
            f"--network={self.network}",
            "--label",
            "pycluster.test=systemd",
            *self._extra_args,
            self.image,
            "/lib/systemd/systemd",
        )
        self._started = True
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = podman(
                "exec", self.name, "systemctl", "is-system-running", check=False, timeout=30
            )
            state = proc.stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.2)
        logs = podman("logs", "--tail", "30", self.name, check=False).stdout
        failed = podman(
            "exec", self.name, "systemctl", "--failed", "--no-pager", check=False
        ).stdout
        self.stop()
        raise PodmanError(
            f"systemd in {self.name} not up after {timeout}s (state {state!r});\n"
            f"failed units:\n{failed}\nlogs:\n{logs}"
        )

    def exec(
        self,
        *cmd: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the container (``podman exec``); output is captured as text."""
        args = ["exec"] + (["-i"] if input is not None else []) + [self.name, *cmd]
        result: subprocess.CompletedProcess[str] = podman(
            *args, check=check, input=input, timeout=timeout
        )
        return result

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write ``text`` to ``path`` inside the container (parents created), then chmod it."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.exec("sh", "-c", script, "sh", path, format(mode, "o"), input=text)

    def systemctl_prefix(self) -> list[str]:
        """Command prefix reaching this container's systemd.

        ``["podman", "exec", NAME, "systemctl"]``: the same shape as ``ssh host systemctl``.
        """
        return ["podman", "exec", self.name, "systemctl"]

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl ARGS...`` inside the container."""
        return self.exec("systemctl", *args, check=check)

    def stop(self) -> None:
        """Remove the container this object created (``podman rm -f``); a no-op otherwise."""
        if self._started:
            self._started = False
            with contextlib.suppress(PodmanError):
                podman("rm", "-f", "--time", "0", self.name, timeout=60)

    def __enter__(self) -> SystemdContainer:
        """Start the container (if needed) and return it."""
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Remove the container."""
        self.stop()
