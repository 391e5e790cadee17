"""The docker backend against podman's Docker-compatible API, with a locally built image."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest

import pycluster_docker.plugin as docker_plugin
from pycluster import App, Platform
from pycluster.kernel.context import Context
from pycluster.kernel.embedded import free_port
from pycluster.plugins import create_plugin_manager
from pycluster.testing.engines.podman import PodmanService, build_busybox_image
from pycluster.testing.wait import wait_for
from pycluster_docker import Docker, DockerBackend, DockerBackendError

pytestmark = pytest.mark.timeout(300)

# Serves "ok" on 8080 and records its epoch in /data; refuses to start while /data/broken exists.
SERVE = ("test -f /data/broken && { echo 'refusing: broken' >&2; exit 1; }; "
         "echo \"$PYCLUSTER_EPOCH\" > /data/epoch; echo ok > /var/www/index.html; "
         "echo serving; exec httpd -f -p 8080 -h /var/www")
HEALTH = "wget -q -O /dev/null http://127.0.0.1:8080/"


def opt(engine: PodmanService, data: Path, **kw: Any) -> Docker:
    """A `Docker` option running the test service, with test-friendly timings."""
    kw.setdefault("command", ["sh", "-c", SERVE])
    kw.setdefault("check_interval", 0.3)
    kw.setdefault("restart_backoff", 0.1)
    kw.setdefault("stop_timeout", 2)
    return Docker(build_busybox_image(), base_url=engine.base_url, volumes={str(data): "/data"},
                  labels={"pycluster.test": "docker"}, **kw)


@pytest.fixture
async def platforms(nats_url: str, unique_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process platforms with the docker plugin (stopped at teardown, in reverse)."""
    async with AsyncExitStack() as stack:

        async def make(node_id: str, *apps: App) -> Platform:
            pm = create_plugin_manager(load_entrypoints=False, extra=[("docker", docker_plugin)])
            p = Platform(unique_name, node_id=node_id, nats_url=nats_url, plugin_manager=pm,
                         lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=10.0)
            for app in apps:
                p.register(app)
            await p.start()
            stack.push_async_callback(p.stop)
            return p

        yield make


def offline(option: Docker, unique: str) -> tuple[DockerBackend, Context]:
    """A controller and a context without a running platform (the controller alone: no
    supervisor, no fence)."""
    pm = create_plugin_manager(load_entrypoints=False, extra=[("docker", docker_plugin)])
    platform = Platform(unique, node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    app = App("svc", option)
    platform.register(app)
    return DockerBackend(option, app, platform), Context(app=app, platform=platform,
                                                         node_id="n1", epoch=7, reason="test")


@pytest.mark.slow
async def test_container_started_and_stopped_with_settings(
    engine: PodmanService, client: Any, platforms: Callable[..., Any], tmp_path: Path,
    unique_name: str,
) -> None:
    port = free_port()
    o = opt(engine, tmp_path, env={"GREETING": "hi"}, ports={8080: f"127.0.0.1:{port}"},
            cpus=0.5, memory="64m", restart_policy="no", healthcheck=HEALTH,
            health_interval=0.5, health_retries=2)
    app = App("svc", o)
    p = await platforms("n1", app)
    assert await app.wait_for_leadership(60)
    name = f"pycluster-{unique_name}-svc-n1"
    ctr = client.containers.get(name)
    assert ctr.status == "running"
    assert (tmp_path / "epoch").read_text().strip() == str(app.epoch)  # the fencing token

    def fetch() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            return bytes(resp.read())

    assert await asyncio.to_thread(fetch) == b"ok\n"
    host = ctr.attrs["HostConfig"]
    assert host["NanoCpus"] == 500_000_000 and host["Memory"] == 64 * 1024 * 1024
    assert host["RestartPolicy"]["Name"] in ("no", "")
    env = dict(e.split("=", 1) for e in ctr.attrs["Config"]["Env"])
    assert env["GREETING"] == "hi" and env["PYCLUSTER_EPOCH"] == str(app.epoch)
    assert ctr.labels["pycluster.app"] == "svc" and ctr.labels["pycluster.node"] == "n1"
    h = await o.health()
    assert h.healthy and h.data["health"] == "healthy", h
    await wait_for(lambda: p.health.status().get("svc.docker-0", {}).get("status")
                   == "healthy", 30, message="app health check healthy")
    await p.stop()
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(name)  # stopped and removed


@pytest.mark.slow
async def test_unhealthy_container_fails_the_start_with_logs(
    engine: PodmanService, client: Any, tmp_path: Path, unique_name: str
) -> None:
    o = opt(engine, tmp_path, healthcheck="test -f /data/never", health_interval=0.3,
            health_retries=2, start_timeout=30)
    backend, ctx = offline(o, unique_name)
    with pytest.raises(DockerBackendError) as info:
        await backend.start(ctx)
    assert "unhealthy" in info.value.reason
    assert "serving" in info.value.logs
    await backend.stop(ctx)
    assert not client.containers.list(all=True, filters={"name": backend.name})


@pytest.mark.slow
async def test_exited_container_fails_the_start_and_missing_image_is_clear(
    engine: PodmanService, client: Any, tmp_path: Path, unique_name: str
) -> None:
    (tmp_path / "broken").touch()
    backend, ctx = offline(opt(engine, tmp_path), unique_name)
    with pytest.raises(DockerBackendError, match=r"exited with code 1") as info:
        await backend.start(ctx)
    assert "refusing: broken" in info.value.logs
    await backend.stop(ctx)
    missing = replace(opt(engine, tmp_path, name="pyc-missing-image"),
                      image="localhost/pycluster-no-such-image:1")
    backend, ctx = offline(missing, unique_name)
    with pytest.raises(DockerBackendError, match="is not present"):
        await backend.start(ctx)


@pytest.mark.slow
async def test_stop_with_timeout_and_keep(
    engine: PodmanService, client: Any, tmp_path: Path, unique_name: str
) -> None:
    # `sleep` as PID 1 ignores SIGTERM: stop must escalate to SIGKILL after the timeout.
    o = opt(engine, tmp_path, command="sleep 1000", remove=False, stop_timeout=1)
    backend, ctx = offline(o, unique_name)
    await backend.start(ctx)
    started = time.monotonic()
    await backend.stop(ctx)
    assert time.monotonic() - started < 30
    kept = client.containers.get(backend.name)
    assert kept.status == "exited" and kept.attrs["State"]["ExitCode"] == 137
    # The next activation on this node replaces the kept container.
    await backend.start(ctx)
    assert client.containers.get(backend.name).id != kept.id
    backend.option = replace(backend.option, remove=True)
    await backend.stop(ctx)


async def test_a_foreign_container_with_the_same_name_is_not_touched(
    engine: PodmanService, client: Any, tmp_path: Path, unique_name: str
) -> None:
    foreign = client.containers.run(build_busybox_image(), ["sleep", "1000"], detach=True,
                                    name=f"pyc-foreign-{unique_name}",
                                    labels={"pycluster.test": "docker"})
    backend, ctx = offline(opt(engine, tmp_path, name=foreign.name), unique_name)
    with pytest.raises(DockerBackendError, match="not created by this app"):
        await backend.start(ctx)
    foreign.reload()
    assert foreign.status == "running"


@pytest.mark.slow
async def test_container_that_dies_is_restarted(
    engine: PodmanService, client: Any, platforms: Callable[..., Any], tmp_path: Path
) -> None:
    o = opt(engine, tmp_path, max_restarts=2)
    app = App("svc", o)
    await platforms("n1", app)
    assert await app.wait_for_leadership(60)
    o.backend.container.kill()
    await wait_for(lambda: o.backend.policy.total >= 1, 60, message="backend restarted it")

    async def up() -> bool:
        return (await o.health()).healthy

    await wait_for(up, 60, message="running again")
    h = await o.health()
    assert h.healthy and h.data["status"] == "running"
    assert app.is_active


@pytest.mark.slow
async def test_container_that_cannot_be_restarted_hands_over_to_standby(
    engine: PodmanService, client: Any, platforms: Callable[..., Any], tmp_path: Path
) -> None:
    d1, d2 = tmp_path / "n1", tmp_path / "n2"
    d1.mkdir()
    d2.mkdir()
    o1 = opt(engine, d1, max_restarts=1)
    o2 = opt(engine, d2)
    app1, app2 = App("svc", o1), App("svc", o2)
    await platforms("n1", app1)
    assert await app1.wait_for_leadership(60)
    await platforms("n2", app2)
    (d1 / "broken").touch()
    o1.backend.container.kill()
    # n1 restarts once, the container refuses, n1 steps down; n2 runs its own container.
    assert await app2.wait_for_leadership(90)
    assert (d2 / "epoch").read_text().strip() == str(app2.epoch)
    await wait_for(lambda: not app1.is_active, 30, message="n1 stepped down")
    h = await o2.health()
    assert h.healthy
    rt = app1._runtime
    assert rt is not None
    failed = [e for e in rt.stage_events if e.action == "running" and e.outcome == "failed"]
    assert failed and "restart policy exhausted" in failed[-1].error
