"""`DockerBackend`: the controller behind a `Docker` option (the ``docker`` SDK).

The SDK is synchronous; every call runs in a worker thread (``asyncio.to_thread``) so the
event loop — and with it the lease renewal — never waits on the engine.

Behaviour:
* start: remove a container of the same name that this node's app left behind (a container of
  that name with other labels is refused, never removed), make sure the image exists, run the
  container with the epoch in ``PYCLUSTER_EPOCH``, wait for running (and healthy).
* health: running, and not unhealthy. The container's healthcheck result comes from the engine
  when it runs healthchecks; otherwise (podman without systemd never does) the backend runs
  the healthcheck command itself through ``exec``, with the same interval, timeout, retries
  and start period.
* supervision while active: a check every ``check_interval``; an exited (or unhealthy)
  container is restarted by policy (only while the lease is valid), past the policy the node
  steps down (`AppRuntime.report_failure`). Starts, stops, restarts and failures are audited
  (category ``docker``); `DockerBackend.health` feeds the app health check ``docker-<i>`` and
  the metrics.
* stop: ``stop(timeout)`` bounded by the lease deadline (SIGKILL after it), then remove or keep.
* the fence: before the container is created, a `pycluster.backend.LeaseFence` (a fence guard
  process) gets every lease renewal; if the node is SIGKILLed or paused past the lease, the
  guard stops the container itself through the engine API (``POST /containers/NAME/stop?t=0``,
  then ``/kill``; stdlib HTTP, no SDK), before another node can win the lease, and stops it
  again if a start the dead node left in flight runs it within a few seconds. A graceful stop
  releases the guard first.
* Loss of the NATS connection does not touch the container; the coordinator stops it when the
  lease is lost. An unreachable engine shows as an unhealthy probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from pycluster.backend import (
    BackendError,
    BackendHealth,
    Controller,
    LeaseFence,
    RestartPolicy,
    fencing_env,
)
from pycluster.kernel.context import Context

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

    from .options import Docker

log = logging.getLogger("pycluster.docker")

DEFAULT_SOCKETS = ("/var/run/docker.sock", "/run/podman/podman.sock")
_API_TIMEOUT = 60
_NS = 1_000_000_000
_FENCE_ACTION_TIMEOUT = 10.0  # bound of the fence guard's call to the engine


class DockerBackendError(BackendError):
    """A container could not be started, checked or stopped; carries its last log lines.

    :ivar container: the container name. :ivar action: start, stop, connect, ...
    :ivar logs: the container's last log lines.
    """

    def __init__(self, app: str, container: str, action: str, reason: str,
                 logs: list[str] | None = None) -> None:
        self.container = container
        self.action = action
        self.logs = list(logs or [])
        text = f"{action} failed: {reason}"
        if self.logs:
            text += "\n  last log lines:\n    " + "\n    ".join(self.logs)
        super().__init__(app, f"container {container}", text)
        self.reason = reason


def engine_url(base_url: str | None = None) -> str | None:
    """The engine API to use: ``base_url``, ``$DOCKER_HOST``, or the first existing default
    socket; None when there is none."""
    if base_url:
        return base_url
    if os.environ.get("DOCKER_HOST"):
        return os.environ["DOCKER_HOST"]
    for path in DEFAULT_SOCKETS:
        if os.path.exists(path):
            return f"unix://{path}"
    return None


class EngineUnavailableError(OSError):
    """No container engine is configured or reachable."""


def make_client(base_url: str | None, timeout: int = _API_TIMEOUT) -> Any:
    """A ``docker.DockerClient`` for the engine (`engine_url`); honours the DOCKER_TLS_*
    variables when the engine comes from ``$DOCKER_HOST``."""
    import docker

    url = engine_url(base_url)
    if url is None:
        raise EngineUnavailableError("no container engine: set DOCKER_HOST or "
                                     "Docker(base_url=...); none of "
                                     f"{', '.join(DEFAULT_SOCKETS)} exists")
    if base_url is None and os.environ.get("DOCKER_HOST"):
        return docker.from_env(timeout=timeout)
    return docker.DockerClient(base_url=url, timeout=timeout)


class ExecHealth:
    """Runs a container's healthcheck command through ``exec`` with Docker's semantics:
    ``starting`` until the first success (failures inside the start period do not count),
    ``unhealthy`` after ``retries`` consecutive failures."""

    def __init__(self, test: list[str], interval: float, timeout: float, retries: int,
                 start_period: float) -> None:
        self.argv = self.command(test)
        self.interval = interval
        self.timeout = timeout
        self.retries = retries
        self.start_period = start_period
        self.started = time.monotonic()
        self.status = "starting"
        self.streak = 0
        self.last_run = 0.0
        self.last_output = ""

    @staticmethod
    def command(test: list[str]) -> list[str]:
        """The argv of a Docker ``Healthcheck.Test`` (``CMD-SHELL`` runs in ``/bin/sh -c``)."""
        if test and test[0] == "CMD-SHELL":
            return ["/bin/sh", "-c", " ".join(test[1:])]
        if test and test[0] == "CMD":
            return list(test[1:])
        return list(test)

    async def run(self, container: Any, force: bool = False) -> str:
        """Run the check if due (or ``force``); return the status."""
        now = time.monotonic()
        if not force and now - self.last_run < self.interval:
            return self.status
        self.last_run = now
        try:
            async with asyncio.timeout(self.timeout):
                res = await asyncio.to_thread(container.exec_run, self.argv)
            ok = res.exit_code == 0
            self.last_output = (res.output or b"").decode(errors="replace").strip()[-200:]
        except TimeoutError:
            ok, self.last_output = False, f"timed out after {self.timeout}s"
        except Exception as exc:
            ok, self.last_output = False, f"{type(exc).__name__}: {exc}"
        if ok:
            self.status, self.streak = "healthy", 0
        elif self.status == "starting" and now - self.started < self.start_period:
            pass
        else:
            self.streak += 1
            if self.streak >= self.retries:
                self.status = "unhealthy"
        return self.status


class DockerBackend(Controller):
    """Start, stop and probe one container; the shared `pycluster.backend.Supervisor` does
    the rest (restarts, fence, audit, metrics)."""

    kind = "docker"
    check_timeout = 30.0

    def __init__(self, option: Docker, app: App, platform: Platform) -> None:
        super().__init__(option, app, platform)
        self.option: Docker = option
        self.name = option.name or f"pycluster-{platform.name}-{app.name}-{platform.node_id}"
        self.policy = RestartPolicy(option.max_restarts, option.restart_backoff,
                                    option.restart_window)
        self.check_interval = option.check_interval
        self.settle_timeout = option.start_timeout  # the engine's restart policy at work
        # Leftover removal, image check and run, then the wait for running/healthy; or the
        # stop grace plus removal.
        self.stage_timeout = max(option.start_timeout, option.stop_timeout) + 30.0
        self.client: Any = None
        self.container: Any = None
        self.epoch: int | None = None
        self._exec_health: ExecHealth | None = None
        self._engine_checks = False
        self._started_at = 0.0
        self._fence: LeaseFence | None = None

    def fence(self) -> LeaseFence | None:
        """The guard that stops the container through the engine API if this node dies or
        stops renewing its lease (created once the engine is known)."""
        return self._fence

    def describe(self) -> str:
        """``container NAME``."""
        return f"container {self.name}"

    def identity(self) -> dict[str, object]:
        """``{"container": NAME}`` in every audit entry."""
        return {"container": self.name}

    def started_info(self) -> dict[str, object]:
        """The container's short id."""
        return {"id": self.container.short_id if self.container is not None else None}

    async def diagnostics(self) -> dict[str, list[str]]:
        """The container's last log lines."""
        return {"logs": await self.logs()}

    def _labels(self) -> dict[str, str]:
        return {"pycluster.platform": self.platform.name, "pycluster.app": self.app.name,
                "pycluster.node": self.platform.node_id}

    async def _client(self) -> Any:
        if self.client is None:
            try:
                self.client = await asyncio.to_thread(make_client, self.option.base_url)
            except Exception as exc:
                raise DockerBackendError(self.app.name, self.name, "connect",
                                         f"{type(exc).__name__}: {exc}") from exc
        return self.client

    async def logs(self, lines: int | None = None) -> list[str]:
        """The container's last log lines (best effort)."""
        n = self.option.log_lines if lines is None else lines
        if self.container is None or n <= 0:
            return []
        try:
            raw = await asyncio.to_thread(self.container.logs, tail=n)
        except Exception:
            return []
        return bytes(raw).decode(errors="replace").splitlines()[-n:]

    async def _fail(self, action: str, reason: str) -> DockerBackendError:
        return DockerBackendError(self.app.name, self.name, action, reason, await self.logs())

    # -- start -------------------------------------------------------------------------------

    def _remove_leftover(self) -> None:
        import docker.errors

        try:
            old = self.client.containers.get(self.name)
        except docker.errors.NotFound:
            return
        labels = old.labels or {}
        if any(labels.get(k) != v for k, v in self._labels().items()):
            raise DockerBackendError(self.app.name, self.name, "start",
                                     "a container of this name exists and "
                                     "was not created by this app on this node; remove it or "
                                     "choose another Docker(name=...)")
        log.info("app %s: removing container %s left by an earlier activation", self.app.name,
                 self.name)
        old.remove(force=True)

    def _ensure_image(self) -> None:
        import docker.errors

        try:
            self.client.images.get(self.option.image)
        except docker.errors.ImageNotFound:
            if not self.option.pull:
                raise DockerBackendError(self.app.name, self.name, "start",
                                         f"image {self.option.image!r} is "
                                         "not present (build or pull it, or Docker(pull=True))"
                                         ) from None
            log.info("app %s: pulling %s", self.app.name, self.option.image)
            self.client.images.pull(self.option.image)

    def _run(self, ctx: Context) -> Any:
        opt = self.option
        env = dict(opt.env) | fencing_env(ctx)
        labels = dict(opt.labels)
        labels.update(self._labels())
        labels["pycluster.epoch"] = str(ctx.epoch or 0)
        kw: dict[str, Any] = {
            "name": self.name, "detach": True, "environment": env, "labels": labels,
        }
        if opt.ports:
            kw["ports"] = opt.port_bindings()
        if opt.volumes:
            kw["volumes"] = opt.volume_binds()
        if opt.network:
            kw["network"] = opt.network
        if opt.cpus is not None:
            kw["nano_cpus"] = int(opt.cpus * _NS)
        if opt.memory is not None:
            kw["mem_limit"] = opt.memory
        engine_policy = opt.engine_restart_policy()
        if engine_policy is not None:
            kw["restart_policy"] = engine_policy
        hc = opt.healthcheck_spec()
        if hc is not None:
            kw["healthcheck"] = hc
        return self.client.containers.run(opt.image, opt.argv(), **kw)

    def _setup_health(self) -> None:
        """Decide how health is read, from the container's own healthcheck config."""
        self._exec_health = None
        self._engine_checks = False
        self._started_at = time.monotonic()
        cfg = (self.container.attrs.get("Config") or {}).get("Healthcheck") or {}
        test = cfg.get("Test") or []
        if not test or test[0] == "NONE":
            return
        self._exec_health = ExecHealth(
            test,
            interval=(cfg.get("Interval") or 30 * _NS) / _NS,
            timeout=(cfg.get("Timeout") or 30 * _NS) / _NS,
            retries=cfg.get("Retries") or 3,
            start_period=(cfg.get("StartPeriod") or 0) / _NS,
        )

    async def _health_status(self) -> str | None:
        """"healthy" / "unhealthy" / "starting", or None without a healthcheck."""
        probe = self._exec_health
        if probe is None:
            return None
        state = self.container.attrs.get("State") or {}
        engine = state.get("Health") or state.get("Healthcheck") or {}
        if self.option.health_exec is not True:
            if engine.get("Log"):
                self._engine_checks = True
            if self._engine_checks or self.option.health_exec is False:
                return str(engine.get("Status") or "starting")
            # The engine has had time for a check and shows none: it does not run them.
            grace = probe.start_period + probe.interval * 1.5 + 1.0
            if time.monotonic() - self._started_at < grace:
                return "starting"
        return await probe.run(self.container)

    async def _wait_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        running_since: float | None = None
        while True:
            await asyncio.to_thread(self.container.reload)
            status = self.container.status
            if status in ("exited", "dead"):
                code = (self.container.attrs.get("State") or {}).get("ExitCode")
                raise await self._fail("start", f"container {status} with code {code}")
            if status == "running":
                hs = await self._health_status() if self.option.wait_healthy else None
                if hs == "healthy":
                    return
                if hs is None:
                    # Nothing to wait for but "still running after `settle` seconds".
                    running_since = running_since or time.monotonic()
                    if time.monotonic() - running_since >= self.option.settle:
                        return
                if hs == "unhealthy":
                    raise await self._fail("start", "healthcheck reports unhealthy"
                                           + self._probe_output())
            if time.monotonic() >= deadline:
                raise await self._fail("start", f"not running and healthy after {timeout}s "
                                       f"(status {status})" + self._probe_output())
            await asyncio.sleep(0.2)

    def _probe_output(self) -> str:
        p = self._exec_health
        return f": {p.last_output}" if p is not None and p.last_output else ""

    async def start(self, ctx: Context) -> BackendHealth:
        """Create and start the container; return once it runs (and is healthy)."""
        import docker.errors

        self.epoch = ctx.epoch
        await self._client()
        if self._fence is None:
            url = engine_url(self.option.base_url)
            assert url is not None  # the client connected to it
            self._fence = LeaseFence(self.app.name, self.platform, docker=[(url, self.name)],
                                     action_timeout=_FENCE_ACTION_TIMEOUT)
        # Armed before the container is created: if this node dies while the container comes
        # up, the guard stops it (it retries a kill that finds no container yet for a while).
        await self._fence.start()
        try:
            await asyncio.to_thread(self._remove_leftover)
            await asyncio.to_thread(self._ensure_image)
            self.container = await asyncio.to_thread(self._run, ctx)
        except docker.errors.DockerException as exc:
            raise await self._fail("start", f"{type(exc).__name__}: {exc}") from exc
        self._setup_health()
        await self._wait_up(self.option.start_timeout)
        log.info("app %s: container %s (%s) is up, epoch %s", self.app.name, self.name,
                 self.container.short_id, ctx.epoch)
        return BackendHealth(True, "running")

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, ctx: Context) -> dict[str, object] | None:
        """Stop the container (SIGKILL at the deadline) and remove it unless kept."""
        import docker.errors

        c = self.container
        if c is None:
            return None
        grace = int(ctx.remaining(self.option.stop_timeout))
        try:
            async with asyncio.timeout(grace + 15):
                await asyncio.to_thread(c.stop, timeout=grace)
        except docker.errors.NotFound:
            pass
        except (TimeoutError, docker.errors.DockerException) as exc:
            log.error("app %s: stopping %s failed (%s); killing it", self.app.name, self.name,
                      exc)
            with contextlib.suppress(docker.errors.DockerException):
                await asyncio.to_thread(c.kill)
        if self.option.remove:
            with contextlib.suppress(docker.errors.NotFound):
                await asyncio.to_thread(c.remove, force=True)
            self.container = None
        log.info("app %s: container %s stopped%s", self.app.name, self.name,
                 " and removed" if self.option.remove else " (kept)")
        return {"removed": self.option.remove}

    # -- health and supervision --------------------------------------------------------------

    async def probe(self) -> BackendHealth:
        """Healthy while the container runs and its healthcheck (if any) is not unhealthy; a
        container the engine's restart policy is restarting is `BackendHealth.settling`."""
        c = self.container
        if c is None:
            return BackendHealth(False, "no container")
        try:
            await asyncio.to_thread(c.reload)
        except Exception as exc:
            return BackendHealth(False, f"cannot inspect the container: {exc}")
        status = str(c.status)
        hs = await self._health_status() if status == "running" else None
        state = c.attrs.get("State") or {}
        data: dict[str, object] = {
            "status": status, "health": hs, "exit_code": state.get("ExitCode"),
            "restart_count": c.attrs.get("RestartCount", 0), "restarts": self.policy.total,
            "id": c.short_id, "epoch": self.epoch,
        }
        healthy = status == "running" and (hs != "unhealthy" or not self.option.restart_unhealthy)
        detail = status + (f" ({hs})" if hs else "")
        if hs == "unhealthy":
            detail += self._probe_output()
        settling = self.option.restart_policy is not None and status in ("restarting", "running")
        return BackendHealth(healthy, detail, data, settling=settling)

    async def restart(self, ctx: Context) -> BackendHealth:
        """Start the dead (or restart the unhealthy) container again."""
        c = self.container
        if c is None:
            return await self.start(ctx)
        if c.status == "running":
            await asyncio.to_thread(c.restart, timeout=int(self.option.stop_timeout))
        else:
            await asyncio.to_thread(c.start)
        self._setup_health()
        await self._wait_up(self.option.start_timeout)
        return BackendHealth(True, "running")
