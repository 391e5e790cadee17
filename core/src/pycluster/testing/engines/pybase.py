"""A local Python base image for building pycluster's container image without a registry.

No image registry is reachable on the project's machines, so ``python:3.11-slim`` cannot be
pulled. :func:`build_python_base_image` makes a stand-in: a Debian minbase root filesystem with
``python3``, ``python3-venv`` and ``python3-pip`` (bookworm ships Python 3.11), built once with
``debootstrap`` from the machine's own Debian mirror, cached as a tarball under
:func:`~pycluster.testing.engines.podman.cache_dir` and imported with ``podman import``.

The machine's CA bundle (``/etc/ssl/certs/ca-certificates.crt``) is copied into the image when
it exists, so ``pip`` inside a build trusts what the host trusts (Debian's pip and venvs use the
system bundle): a TLS-inspecting proxy between the machine and PyPI then works in builds too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from pycluster.testing.engines.podman import (
    cache_dir,
    podman,
)
from pycluster.testing.engines.systemd import (
    SUITE,
    cached_image,
    debian_mirror,
    debootstrap_tarball,
)

__all__ = ["PYTHON_BASE_IMAGE", "build_python_base_image", "python_base_tarball"]

PYTHON_BASE_IMAGE = "localhost/pycluster-python-base:latest"
"""Default name of the image built by :func:`build_python_base_image`."""

INCLUDE = ("python3", "python3-venv", "python3-pip", "ca-certificates")
"""Packages added to debootstrap's minbase variant."""

HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

# Bump when the rootfs recipe changes, so a stale cached tarball is not reused.
_RECIPE_VERSION = 1


def _ca_tag() -> str:
    """A short digest of the host's CA bundle (part of the tarball's name: a new CA rebuilds)."""
    try:
        return hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()[:8]
    except OSError:
        return "noca"


def python_base_tarball(suite: str = SUITE) -> Path:
    """Path of the cached root-filesystem tarball for ``suite`` (it may not exist yet)."""
    arch = os.uname().machine
    path: Path = cache_dir() / f"python-{suite}-{arch}-v{_RECIPE_VERSION}-{_ca_tag()}.tar"
    return path


def _copy_ca_bundle(root: Path) -> None:
    if HOST_CA_BUNDLE.is_file():
        dest = root / "etc/ssl/certs/ca-certificates.crt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.unlink(missing_ok=True)  # may be a symlink
        shutil.copyfile(HOST_CA_BUNDLE, dest)


def _build_tarball(tarball: Path, suite: str, mirror: str, timeout: float) -> None:
    debootstrap_tarball(tarball, INCLUDE, suite=suite, mirror=mirror, timeout=timeout,
                        customize=_copy_ca_bundle)


def _import(tarball: Path, name: str, timeout: float) -> None:
    podman("import", "--change", 'CMD ["/usr/bin/python3"]', "--change",
           "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "--change", "ENV LANG=C.UTF-8", str(tarball), name, timeout=timeout)


def build_python_base_image(
    name: str = PYTHON_BASE_IMAGE,
    *,
    suite: str = SUITE,
    mirror: str | None = None,
    rebuild: bool = False,
    timeout: float = 900.0,
) -> str:
    """Make sure the Python base image exists in podman's store and return its name.

    Like :func:`~pycluster.testing.engines.systemd.build_systemd_image`: the image already in
    podman, else the cached tarball (``podman import``), else a fresh ``debootstrap`` (then
    cached). Concurrent callers are serialised by a lock file in the cache folder.
    """
    tarball = python_base_tarball(suite)
    return cached_image(
        name, tarball, lock=".python-base-image.lock", rebuild=rebuild,
        build=lambda: _build_tarball(tarball, suite, mirror or debian_mirror(suite), timeout),
        load=lambda: _import(tarball, name, timeout))
