"""Plugin "docker": run a container while the app is active on this node.

Hooks: the `Docker` option class and its claim (which also registers the app health check
``docker-<i>``), backend kind "docker", one BACKEND stage per `Docker` option (``docker-<i>``),
the ``docker:`` config section, the audit category ``docker``, metrics, and a start-up check
that a container engine answers (``$DOCKER_HOST``, ``/var/run/docker.sock`` or
``/run/podman/podman.sock``).

Metrics (per app and container): ``pycluster_docker_container_healthy`` (1/0, the last check
while active; absent on a standby) and ``pycluster_docker_restarts_total`` (restarts by the
backend).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycluster.backend import backend_stage
from pycluster.kernel.registry import BackendRegistry, ConfigRegistry, OptionRegistry
from pycluster.kernel.stages import StageRegistry
from pycluster.pluginkit import BackendCollector, backend_health_check, claim_with_health_check
from pycluster.plugins import hookimpl

from .backend import DEFAULT_SOCKETS, DockerBackend, engine_url, make_client
from .options import Docker, DockerSection, docker_from_section

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

PLUGIN = "docker"


def missing_dependency() -> str | None:
    """Why the default container engine cannot be used from here (None when it can)."""
    try:
        import docker  # noqa: F401
    except ImportError as exc:
        return f"the docker SDK is not importable: {exc}"
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
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `Docker` option."""
    registry.add(Docker, plugin=PLUGIN)


@hookimpl
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "docker"."""
    registry.add(PLUGIN, Docker, DockerBackend, plugin=PLUGIN)


def _index(app: App, option: Docker) -> int:
    return [o for o in app.options if isinstance(o, Docker)].index(option)


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `Docker` options; the container's health becomes an app health check."""
    return claim_with_health_check(
        app, option, Docker, lambda a, o: f"docker-{_index(a, o)}",
        lambda o: backend_health_check(lambda: o._backend, lambda b: f"container {b.name}"),
        timeout=30.0)


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``docker:`` section of an app."""
    registry.add(PLUGIN, DockerSection, docker_from_section)


@hookimpl
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """A BACKEND stage per `Docker` option."""
    for i, opt in enumerate(o for o in app.options if isinstance(o, Docker)):
        name = f"docker-{i}"
        backend = DockerBackend(opt, app, platform, stage=name)
        # Leftover removal, image check and run, then the wait for running/healthy; or the
        # stop grace plus removal.
        timeout = max(opt.start_timeout, opt.stop_timeout) + 30.0
        registry.add(backend_stage(name, backend, plugin=PLUGIN, timeout=timeout))


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``docker`` audit category."""
    registry.add(PLUGIN, {
        "started": "the container started on activation (data: container, epoch, id)",
        "stopped": "the container was stopped on step-down (data: container, epoch, reason, "
                   "removed)",
        "restarted": "the backend restarted a dead or unhealthy container while active "
                     "(data: container, detail, restarts)",
        "failed": "the container kept failing; the node steps down (data: container, detail, "
                  "logs)",
    }, plugin=PLUGIN)


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """``pycluster_docker_container_healthy`` and ``pycluster_docker_restarts_total``."""
    registry.register(BackendCollector(
        platform, Docker, label="container", label_of=lambda opt, b: b.name,
        healthy=("pycluster_docker_container_healthy",
                 "1 when the container was healthy at its last check, else 0"),
        restarts=("pycluster_docker_restarts",
                  "Restarts of dead or unhealthy containers by the backend"),
    ))


@hookimpl
def pycluster_check() -> str | None:
    """Report when no container engine answers."""
    return missing_dependency()
