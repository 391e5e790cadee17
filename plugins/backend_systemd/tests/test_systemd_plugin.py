"""The systemd plugin without a systemd: options, config section, hooks, start-up check."""

from __future__ import annotations

import logging
import os

import pytest

import pycluster_systemd.plugin as systemd_plugin
from pycluster import App, OnNodes, Platform
from pycluster.cli.config_apps import build_app
from pycluster.kernel import backends
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.registry import ConfigRegistry
from pycluster.kernel.settings import AppConfig
from pycluster.kernel.stages import StageOrder
from pycluster.plugins import create_plugin_manager
from pycluster_systemd import Systemd
from pycluster_systemd.backend import RestartPolicy
from pycluster_systemd.options import PREFIX_ENV

pytestmark = pytest.mark.timeout(60)


def test_unit_names_are_validated_and_completed() -> None:
    assert Systemd("convex").unit == "convex.service"
    assert Systemd("db.socket").unit == "db.socket"
    assert Systemd("getty@tty1").unit == "getty@tty1.service"
    assert Systemd("a", requires="b").requires == ("b.service",)
    for bad in ("", "-rf", "a b", "x;y", "a/b"):
        with pytest.raises(ConfigError, match=r"Systemd\.unit"):
            Systemd(bad)
    with pytest.raises(ConfigError, match=r"Systemd\.requires"):
        Systemd("a", requires=["a.service"])
    with pytest.raises(ConfigError, match="start_timeout"):
        Systemd("a", start_timeout=0)
    with pytest.raises(ConfigError, match="epoch_variable"):
        Systemd("a", epoch_variable="1BAD")
    with pytest.raises(ConfigError, match="prefix"):
        Systemd("a", prefix="ssh 'unterminated")


def test_prefix_from_option_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PREFIX_ENV, raising=False)
    assert Systemd("a").argv_prefix() == ()
    assert Systemd("a", prefix="ssh -q db1").argv_prefix() == ("ssh", "-q", "db1")
    monkeypatch.setenv(PREFIX_ENV, "podman exec sd1")
    assert Systemd("a").argv_prefix() == ("podman", "exec", "sd1")
    assert Systemd("a", prefix=[]).argv_prefix() == ()


def test_restart_policy_window_and_backoff() -> None:
    pol = RestartPolicy(2, 1.0, 300.0)
    assert pol.next_delay() == 1.0
    assert pol.next_delay() == 2.0
    assert pol.next_delay() is None
    pol.reset()
    assert pol.next_delay() == 1.0
    assert pol.total == 3


def test_config_section_builds_the_option() -> None:
    reg = ConfigRegistry()
    systemd_plugin.pycluster_config_sections(registry=reg)
    cfg = AppConfig.model_validate({"name": "web", "systemd": {
        "unit": "nginx", "requires": ["php-fpm"], "prefix": "ssh web1", "max_restarts": 5}})
    app = build_app(cfg, reg)
    opt = next(o for o in app.options if isinstance(o, Systemd))
    assert opt.unit == "nginx.service" and opt.requires == ("php-fpm.service",)
    assert opt.argv_prefix() == ("ssh", "web1") and opt.max_restarts == 5
    bad = AppConfig.model_validate({"name": "web", "systemd": {"unit": "x", "colour": "red"}})
    with pytest.raises(ConfigError, match=r"apps\.web\.systemd\.colour"):
        build_app(bad, reg)


def test_option_is_claimed_and_becomes_a_backend_stage() -> None:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("systemd", systemd_plugin)])
    p = Platform("unit", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    opt = Systemd("main", requires=["dep"])
    app = p.register(App("svc", opt))
    assert p.backends.get("systemd").option_class is Systemd
    assert "systemd-main_service" in app.health.specs
    (stage,) = backends.stages(p, app)
    assert stage.order == StageOrder.BACKEND and stage.plugin == "systemd"
    assert stage.name == "systemd-main.service"
    assert stage.extra["backend"].controller is opt.backend


async def test_missing_systemd_is_reported_at_start_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, nats_url: str,
    unique_name: str,
) -> None:
    monkeypatch.setenv(PREFIX_ENV, "/nonexistent/ssh host")
    caplog.set_level(logging.WARNING, logger="pycluster")
    p = Platform(unique_name, node_id="n1", nats_url=nats_url)  # plugins from entry points
    info = p.pm.infos["systemd"]
    assert (info.status, info.distribution, info.version) == ("unusable", "pycluster-systemd",
                                                              "0.1.0")
    assert info.reason == f"${PREFIX_ENV} runs '/nonexistent/ssh', which is not installed"
    await p.start()
    await p.stop()
    assert "unusable" not in caplog.text  # no app of this node uses systemd: not worth a word
    # An app that uses it (placed elsewhere: nothing is started here) makes it worth a warning.
    p = Platform(unique_name, node_id="n1", nats_url=nats_url)
    p.register(App("web", Systemd("web-backend"), OnNodes("elsewhere")))
    await p.start()
    await p.stop()
    assert (f"plugin systemd (pycluster-systemd 0.1.0), used by app(s) web, is unusable here: "
            f"{info.reason}") in caplog.text
    monkeypatch.setenv(PREFIX_ENV, "")
    if os.path.isdir("/run/systemd/system"):
        return  # this machine runs systemd: nothing is missing
    assert "not the init system" in (systemd_plugin.missing_dependency() or "")
