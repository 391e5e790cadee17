"""Plugin "docker": run a container while the app is active on this node.

Hooks: backend kind "docker" (the `Docker` option and its `DockerBackend` controller: the
kernel turns each option into a BACKEND stage and app health check ``docker-<i>``, the audit
category ``docker`` and the metrics), the ``docker:`` config section, and a start-up check
that a container engine answers (``$DOCKER_HOST``, ``/var/run/docker.sock`` or
``/run/podman/podman.sock``).

Metrics (per app and container): ``pycluster_docker_container_healthy`` (1/0, the last check
while active; absent on a standby) and ``pycluster_docker_restarts_total`` (restarts by the
backend).
"""

from __future__ import annotations

import importlib.util

from pycluster.kernel.registry import BackendMetrics, BackendRegistry, ConfigRegistry
from pycluster.plugins import hookimpl

from .backend import DEFAULT_SOCKETS, DockerBackend, engine_url, make_client
from .options import Docker

PLUGIN = "docker"


def missing_dependency() -> str | None:
    """Why the default container engine cannot be used from here (None when it can)."""
    # Found, not imported: the check runs whenever the plugin manager is built (every node
    # start, ``pycluster plugins``); importing docker there costs a tenth of a second.
    if importlib.util.find_spec("docker") is None:
        return "the docker SDK is not installed"
    url = engine_url(None)
    if url is None:
        return (f"no container engine: DOCKER_HOST is not set and none of "
                f"{', '.join(DEFAULT_SOCKETS)} exists")
    try:
        client = make_client(None, timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"the container engine at {url} does not answer: {type(exc).__name__}: {exc}"
    return None


@hookimpl
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "docker": per `Docker` option the kernel builds stage and app health check
    ``docker-<i>``, the audit category ``docker`` and the metrics, around a `DockerBackend`
    controller."""
    registry.add(
        PLUGIN, Docker, DockerBackend, plugin=PLUGIN,
        audit={
            "started": "the container started on activation (data: container, epoch, id)",
            "stopped": "the container was stopped on step-down (data: container, epoch, "
                       "reason, removed)",
            "restarted": "the backend restarted a dead or unhealthy container while active "
                         "(data: container, detail, restarts)",
            "failed": "the container kept failing; the node steps down (data: container, "
                      "detail, logs)",
        },
        metrics=BackendMetrics(
            label="container", label_of=lambda sup: sup.controller.name,
            healthy=("pycluster_docker_container_healthy",
                     "1 when the container was healthy at its last check, else 0"),
            restarts=("pycluster_docker_restarts",
                      "Restarts of dead or unhealthy containers by the backend"),
        ),
    )


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``docker:`` section of an app."""
    registry.add(PLUGIN, Docker)  # the section is the declaration of Docker


@hookimpl
def pycluster_check() -> str | None:
    """Report when no container engine answers."""
    return missing_dependency()
