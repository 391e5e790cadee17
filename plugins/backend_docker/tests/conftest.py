"""Fixtures shared by the docker plugin's tests: a real engine (podman's Docker-compatible API
on a private socket) and an SDK client that cleans up the tests' containers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import docker
import pytest

from pycluster.testing.engines.podman import PodmanService, build_busybox_image, podman_available
from pycluster.testing.pytest_plugin import require


@pytest.fixture(scope="module")
def engine() -> Iterator[PodmanService]:
    """podman's API on a private socket, and the busybox image."""
    ok, reason = podman_available()
    require("podman", ok, reason)
    build_busybox_image()
    with PodmanService() as svc:
        yield svc


@pytest.fixture
def client(engine: PodmanService) -> Iterator[Any]:
    """An SDK client; removes the test's containers (by label) afterwards."""
    c = docker.DockerClient(base_url=engine.base_url, timeout=60)
    yield c
    for ctr in c.containers.list(all=True, filters={"label": "pycluster.test=docker"}):
        ctr.remove(force=True)
    c.close()
