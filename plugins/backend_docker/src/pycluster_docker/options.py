"""The `Docker` App option; its fields are also the config-file section ``docker:``."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from pycluster.backend import BackendHealth
from pycluster.kernel.declare import option
from pycluster.kernel.errors import ConfigError

if TYPE_CHECKING:
    from .backend import DockerBackend

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_MEMORY = re.compile(r"^\d+[bkmg]?$", re.IGNORECASE)
_RESTART = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
_PORT_KEY = re.compile(r"^(\d{1,5})(/(tcp|udp|sctp))?$")


def _port(value: object, what: str) -> int:
    try:
        port = int(str(value))
    except ValueError:
        raise ConfigError(what, value, "not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(what, value, "must be 1-65535")
    return port


def normalize_ports(ports: Mapping[Any, Any]) -> dict[str, Any]:
    """``{8080: 18080, "53/udp": "127.0.0.1:5353", "9000": None}`` → the SDK's form
    (``{"8080/tcp": 18080, "53/udp": ("127.0.0.1", 5353), "9000/tcp": None}``)."""
    out: dict[str, Any] = {}
    for key, value in ports.items():
        m = _PORT_KEY.match(str(key))
        if not m:
            raise ConfigError("Docker.ports", key, "container port must be 'N' or 'N/tcp|udp'")
        _port(m.group(1), "Docker.ports")
        name = f"{m.group(1)}/{m.group(3) or 'tcp'}"
        if value is None:
            out[name] = None
        elif isinstance(value, str) and ":" in value:
            host, _, port = value.rpartition(":")
            out[name] = (host, _port(port, f"Docker.ports[{key}]"))
        else:
            out[name] = _port(value, f"Docker.ports[{key}]")
    return out


def normalize_volumes(volumes: Mapping[str, str]) -> list[str]:
    """``{"/srv/data": "/data", "cache": "/cache:ro"}`` → ``["/srv/data:/data", "cache:/cache:ro"]``
    (a source without ``/`` is a named volume)."""
    out = []
    for source, target in volumes.items():
        if not source or ":" in source:
            raise ConfigError("Docker.volumes", source, "a host path or volume name without ':'")
        path, _, mode = str(target).partition(":")
        if not path.startswith("/"):
            raise ConfigError(f"Docker.volumes[{source}]", target,
                              "the container path must be absolute")
        if mode and mode not in ("ro", "rw", "z", "Z", "ro,z", "ro,Z", "rw,z", "rw,Z"):
            raise ConfigError(f"Docker.volumes[{source}]", target, "mode must be ro or rw")
        out.append(f"{source}:{target}")
    return out


def restart_policy(value: str | None) -> dict[str, Any] | None:
    """``"on-failure:3"`` → ``{"Name": "on-failure", "MaximumRetryCount": 3}``."""
    if value is None:
        return None
    if not _RESTART.match(value):
        raise ConfigError("Docker.restart_policy", value,
                          "one of no, always, unless-stopped, on-failure[:N]")
    name, _, count = value.partition(":")
    return {"Name": name, "MaximumRetryCount": int(count or 0)}


@option(eq=False)
class Docker:
    """Run a container while the app is active on this node (the BACKEND stage).

    Becoming active removes a container of the same name left by an earlier activation on
    this node, creates and starts a new one with the epoch in ``PYCLUSTER_EPOCH`` (the
    fencing token) and waits until it runs and, if it has a healthcheck (the image's, or
    ``healthcheck``), until it is healthy. Stepping down stops it (SIGTERM, SIGKILL after
    ``stop_timeout`` or at the lease deadline) and removes it unless ``remove=False``, which
    keeps the stopped container for inspection until the next activation here.

    While active it is checked every ``check_interval`` seconds. A container that exited (or
    turned unhealthy, with ``restart_unhealthy``) is restarted up to ``max_restarts`` times
    within ``restart_window`` seconds; then the node steps down so a standby takes over. With an
    engine ``restart_policy`` the engine restarts it first, and the backend only steps in when it
    stays down for ``start_timeout``.

    The option object is also the handle: ``await opt.health()``, ``opt.backend.container``
    (it holds no state: the controller is found through the app it was registered with).
    The same fields make the ``docker:`` section of an app in a config file.

    :param image: the image (must exist locally unless ``pull``).
    :param command: the command (string split like a shell, or argv); None = the image's.
    :param name: the container name; default ``pycluster-{platform}-{app}-{node}``.
    :param env: environment variables.
    :param ports: container port → host port (int, ``"ip:port"`` or None for any).
    :param volumes: host path or volume name → container path (``"/data"`` or ``"/data:ro"``).
    :param network: the network to attach to (``"host"``, ``"none"``, a network name).
    :param cpus: CPU limit (``1.5`` = one and a half CPUs).
    :param memory: memory limit (bytes, or ``"512m"``, ``"2g"``).
    :param restart_policy: the engine's policy (``"always"``, ``"on-failure:3"``, ...);
        None: the backend restarts the container itself.
    :param healthcheck: a healthcheck command replacing the image's (a string runs in
        ``/bin/sh -c``); with ``health_interval``, ``health_timeout``, ``health_retries``,
        ``health_start_period`` (seconds).
    :param health_exec: who runs the healthcheck: None (auto) uses the engine's result and
        runs the check itself through ``exec`` when the engine does not (podman without
        systemd never runs healthchecks); True always itself; False only the engine.
    :param wait_healthy: on start, wait for "healthy" when a healthcheck is defined.
    :param settle: without a healthcheck to wait for, the container must still run this many
        seconds after it was first seen running (catches a command that exits at once; 0 = off).
    :param restart_unhealthy: treat an unhealthy container like a dead one.
    :param start_timeout: seconds to wait for running / healthy.
    :param stop_timeout: seconds between SIGTERM and SIGKILL on stop.
    :param remove: remove the container after stopping it.
    :param pull: pull the image when it is missing.
    :param base_url: the engine's API (``unix:///run/podman/podman.sock``); default
        ``$DOCKER_HOST``, else ``/var/run/docker.sock``, else ``/run/podman/podman.sock``.
    :param labels: extra container labels.
    :param max_restarts: restarts within ``restart_window`` before the node steps down.
    :param restart_backoff: first restart delay (doubles each time).
    :param restart_window: seconds over which restarts are counted.
    :param check_interval: seconds between checks while active.
    :param log_lines: container log lines quoted in errors.
    """

    image: str
    command: str | tuple[str, ...] | None = None
    name: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[int | str, int | str | None] = field(default_factory=dict)
    volumes: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    cpus: float | None = None
    memory: int | str | None = None
    restart_policy: str | None = None
    healthcheck: str | tuple[str, ...] | None = None
    health_interval: float = 5.0
    health_timeout: float = 3.0
    health_retries: int = 3
    health_start_period: float = 0.0
    health_exec: bool | None = None
    wait_healthy: bool = True
    settle: float = 0.5
    restart_unhealthy: bool = True
    start_timeout: float = 60.0
    stop_timeout: float = 10.0
    remove: bool = True
    pull: bool = False
    base_url: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    restart_backoff: float = 1.0
    restart_window: float = 300.0
    check_interval: float = 2.0
    log_lines: int = 20

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image.strip() or " " in self.image:
            raise ConfigError("Docker.image", self.image, "must be an image reference")
        if self.name is not None and not _NAME.match(self.name):
            raise ConfigError("Docker.name", self.name,
                              "letters, digits and '_.-', starting with a letter or digit")
        if isinstance(self.command, str):
            try:
                if not shlex.split(self.command):
                    raise ConfigError("Docker.command", self.command, "must not be empty")
            except ValueError as exc:
                raise ConfigError("Docker.command", self.command, str(exc)) from None
        for k, v in self.env.items():
            if not isinstance(k, str) or not k or "=" in k or not isinstance(v, str):
                raise ConfigError("Docker.env", k, "names without '=' and string values")
        self.port_bindings()
        self.volume_binds()
        self.engine_restart_policy()
        if self.cpus is not None and not 0 < self.cpus <= 1024:
            raise ConfigError("Docker.cpus", self.cpus, "must be > 0")
        if self.memory is not None:
            if isinstance(self.memory, int) and self.memory < 4 * 1024 * 1024:
                raise ConfigError("Docker.memory", self.memory, "at least 4 MiB")
            if isinstance(self.memory, str) and not _MEMORY.match(self.memory):
                raise ConfigError("Docker.memory", self.memory, "bytes or e.g. '512m', '2g'")
        for name in ("health_interval", "health_timeout", "start_timeout", "check_interval",
                     "restart_window"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"Docker.{name}", getattr(self, name), "must be > 0")
        for name in ("stop_timeout", "health_start_period", "restart_backoff", "settle"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Docker.{name}", getattr(self, name), "must be >= 0")
        if self.health_retries < 1:
            raise ConfigError("Docker.health_retries", self.health_retries, "must be >= 1")
        if self.max_restarts < 0:
            raise ConfigError("Docker.max_restarts", self.max_restarts, "must be >= 0")

    def port_bindings(self) -> dict[str, Any]:
        """``ports`` in the SDK's form (`normalize_ports`)."""
        return normalize_ports(self.ports)

    def volume_binds(self) -> list[str]:
        """``volumes`` in the SDK's form (`normalize_volumes`)."""
        return normalize_volumes(self.volumes)

    def engine_restart_policy(self) -> dict[str, Any] | None:
        """``restart_policy`` in the SDK's form (None: the backend restarts it itself)."""
        return restart_policy(self.restart_policy)

    def argv(self) -> list[str] | None:
        """The command as argv (None: the image's default)."""
        if self.command is None:
            return None
        return shlex.split(self.command) if isinstance(self.command, str) else list(self.command)

    def healthcheck_spec(self) -> dict[str, Any] | None:
        """The SDK's ``healthcheck=`` argument (None: keep the image's)."""
        if self.healthcheck is None:
            return None
        test = (["CMD-SHELL", self.healthcheck] if isinstance(self.healthcheck, str)
                else ["CMD", *self.healthcheck])
        ns = 1_000_000_000
        return {"test": test, "interval": int(self.health_interval * ns),
                "timeout": int(self.health_timeout * ns), "retries": self.health_retries,
                "start_period": int(self.health_start_period * ns)}

    # -- the handle ---------------------------------------------------------------------------

    @property
    def backend(self) -> DockerBackend:
        """The controller on this node (once the option's app is registered with a platform;
        found through the kernel, the option holds no reference to it)."""
        from pycluster.kernel.backends import supervisor_of

        from .backend import DockerBackend

        sup = supervisor_of(self)
        if sup is None or not isinstance(sup.controller, DockerBackend):
            raise RuntimeError("this Docker option is not attached to a registered app")
        return sup.controller

    async def health(self) -> BackendHealth:
        """Probe the container now."""
        return await self.backend.probe()
