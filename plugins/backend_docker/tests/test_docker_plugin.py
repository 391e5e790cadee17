"""The docker plugin without an engine: options, config section, hooks, start-up check."""

from __future__ import annotations

import logging

import pytest

import pycluster_docker.plugin as docker_plugin
from pycluster import App, OnNodes, Platform
from pycluster.cli.config_apps import build_app
from pycluster.kernel import backends
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.registry import ConfigRegistry
from pycluster.kernel.settings import AppConfig
from pycluster.kernel.stages import StageOrder
from pycluster.plugins import create_plugin_manager
from pycluster_docker import Docker
from pycluster_docker.backend import ExecHealth, engine_url
from pycluster_docker.options import normalize_ports, normalize_volumes, restart_policy

pytestmark = pytest.mark.timeout(60)


def test_ports_volumes_and_restart_policy_are_normalised() -> None:
    assert normalize_ports({8080: 18080, "53/udp": "127.0.0.1:5353", "9000": None}) == {
        "8080/tcp": 18080, "53/udp": ("127.0.0.1", 5353), "9000/tcp": None}
    assert normalize_volumes({"/srv/data": "/data", "cache": "/cache:ro"}) == [
        "/srv/data:/data", "cache:/cache:ro"]
    assert restart_policy("on-failure:3") == {"Name": "on-failure", "MaximumRetryCount": 3}
    assert restart_policy(None) is None
    for bad_ports in ({"http": 80}, {80: 70000}, {80: "host:x"}):
        with pytest.raises(ConfigError, match=r"Docker\.ports"):
            normalize_ports(bad_ports)
    with pytest.raises(ConfigError, match="absolute"):
        normalize_volumes({"/srv": "data"})
    with pytest.raises(ConfigError, match="restart_policy"):
        restart_policy("sometimes")


def test_option_validation() -> None:
    opt = Docker("localhost/app:1", command="sh -c 'sleep 1'", cpus=0.5, memory="64m",
                 healthcheck="test -f /ok", health_interval=0.5)
    assert opt.argv() == ["sh", "-c", "sleep 1"]
    hc = opt.healthcheck_spec()
    assert hc is not None and hc["test"] == ["CMD-SHELL", "test -f /ok"]
    assert hc["interval"] == 500_000_000
    assert Docker("x", healthcheck=["/bin/check", "--fast"]).healthcheck_spec()["test"] == [
        "CMD", "/bin/check", "--fast"]  # type: ignore[index]
    for kwargs, field in (({"image": "has space"}, "image"), ({"name": "-bad"}, "name"),
                          ({"command": ""}, "command"), ({"memory": "lots"}, "memory"),
                          ({"memory": 1024}, "memory"), ({"cpus": 0}, "cpus"),
                          ({"env": {"A=B": "c"}}, "env"), ({"health_retries": 0}, "retries"),
                          ({"stop_timeout": -1}, "stop_timeout")):
        kwargs.setdefault("image", "img")
        with pytest.raises(ConfigError, match=field):
            Docker(**kwargs)  # type: ignore[arg-type]


def test_exec_health_commands() -> None:
    assert ExecHealth.command(["CMD-SHELL", "curl -f localhost"]) == [
        "/bin/sh", "-c", "curl -f localhost"]
    assert ExecHealth.command(["CMD", "/bin/true"]) == ["/bin/true"]


def test_engine_url_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_url("unix:///x.sock") == "unix:///x.sock"
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    assert engine_url(None) == "tcp://127.0.0.1:2375"


def test_config_section_builds_the_option() -> None:
    reg = ConfigRegistry()
    docker_plugin.pycluster_config_sections(registry=reg)
    cfg = AppConfig.model_validate({"name": "web", "docker": {
        "image": "nginx:1.27", "ports": {"80": 8080}, "env": {"A": "1"}, "memory": "256m",
        "restart_policy": "on-failure:2", "remove": False}})
    app = build_app(cfg, reg)
    opt = next(o for o in app.options if isinstance(o, Docker))
    assert opt.port_bindings() == {"80/tcp": 8080} and opt.memory == "256m" and not opt.remove
    bad = AppConfig.model_validate({"name": "web", "docker": {"image": "x", "port": 1}})
    with pytest.raises(ConfigError, match=r"apps\.web\.docker\.port"):
        build_app(bad, reg)


def test_option_is_claimed_and_becomes_a_backend_stage() -> None:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("docker", docker_plugin)])
    p = Platform("unit", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    a, b = Docker("img-a"), Docker("img-b")
    app = p.register(App("svc", a, b))
    assert p.backends.get("docker").option_class is Docker
    assert {"docker-0", "docker-1"} <= set(app.health.specs)
    stages = backends.stages(p, app)
    assert [s.name for s in stages] == ["docker-0", "docker-1"]
    assert all(s.order == StageOrder.BACKEND for s in stages)
    assert a.backend.name == "pycluster-unit-svc-n1"


async def test_missing_engine_is_reported_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nats_url: str,
    unique_name: str,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    caplog.set_level(logging.WARNING, logger="pycluster")
    p = Platform(unique_name, node_id="n1", nats_url=nats_url)  # plugins from entry points
    info = p.pm.infos["docker"]
    assert (info.status, info.distribution, info.version) == ("unusable", "pycluster-docker",
                                                              "0.1.0")
    assert info.reason is not None and "unix:///nonexistent/docker.sock" in info.reason
    await p.start()
    await p.stop()
    assert "unusable" not in caplog.text  # no app of this node uses docker: not worth a word
    # An app that uses it (placed elsewhere: nothing is started here) makes it worth a warning.
    p = Platform(unique_name, node_id="n1", nats_url=nats_url)
    p.register(App("web", Docker("bb:latest"), OnNodes("elsewhere")))
    await p.start()
    await p.stop()
    assert (f"plugin docker (pycluster-docker 0.1.0), used by app(s) web, is unusable here: "
            f"{info.reason}") in caplog.text
