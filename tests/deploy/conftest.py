"""Fixtures of the deployment tests: a wheel directory of pycluster (what the installers'
offline mode installs) and systemd containers with Python (the "hosts")."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from deploy_util import ROOT, SYSTEMD_PYTHON_IMAGE, build_systemd_python_image, pip_wheel

from pycluster.testing.engines.systemd import SystemdContainer, systemd_available
from pycluster.testing.pytest_plugin import require


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pycluster, pycluster-core and every dependency as wheels."""
    return pip_wheel(tmp_path_factory.mktemp("wheels"), str(ROOT / "core"), str(ROOT))


@pytest.fixture
def systemd_host() -> Iterator[Callable[..., SystemdContainer]]:
    """Start systemd containers with python3/venv (``mounts``: host path -> container path,
    read-only; ``network`` as for podman run: "none" or "host"); every container started is
    removed after the test."""
    ok, reason = systemd_available()
    require("systemd container", ok, reason)
    require("debootstrap", shutil.which("debootstrap") is not None,
            "debootstrap is not installed (run .ci/install-system.sh)")
    started: list[SystemdContainer] = []

    def start(mounts: dict[Path, str], network: str = "none") -> SystemdContainer:
        build_systemd_python_image()
        args = [a for host, inside in mounts.items() for a in ("-v", f"{host}:{inside}:ro")]
        sd = SystemdContainer(image=SYSTEMD_PYTHON_IMAGE, network=network, extra_args=args)
        started.append(sd)
        return sd.start()

    try:
        yield start
    finally:
        for sd in started:
            sd.stop()
