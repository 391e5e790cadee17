"""Apps declared in a config file, turned into `App` objects.

Example (YAML)::

    name: prod
    node_id: node-1
    nats_url: nats://127.0.0.1:4222
    apps:
      - name: web
        mode: singleton
        on_label: {tier: web}
        process: {command: "python -m http.server 8000", grace: 5}

A key other than the known fields names a plugin section (``docker:``, ``vip:``, ...), validated
by the model that plugin registered (`pycluster.hookspecs.pycluster_config_sections`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..kernel.app import App
from ..kernel.errors import ConfigError
from ..kernel.options import AvoidLabel, Election, OnLabel, OnNodes, Replicas, Singleton, Spread
from ..kernel.platform import Platform
from ..kernel.registry import ConfigRegistry
from ..kernel.settings import AppConfig, load_settings
from ..plugins import PluginManager


def build_app(cfg: AppConfig, sections: ConfigRegistry) -> App:
    """One `App` from its config entry."""
    opts: list[Any] = []
    if cfg.mode == "spread":
        opts.append(Spread())
    elif cfg.mode == "replicas":
        if cfg.replicas is None:
            raise ConfigError(f"apps.{cfg.name}.replicas", None, "required for mode replicas")
        opts.append(Replicas(cfg.replicas))
    else:
        opts.append(Singleton())
    if cfg.on_nodes:
        opts.append(OnNodes(*cfg.on_nodes))
    for k, v in (cfg.on_label or {}).items():
        opts.append(OnLabel(k, v))
    for k, v in (cfg.avoid_label or {}).items():
        opts.append(AvoidLabel(k, v))
    opts.append(Election(lease_ttl=cfg.lease_ttl, heartbeat_interval=cfg.heartbeat_interval,
                         priority=cfg.priority, no_failover=cfg.no_failover,
                         hook_timeout=cfg.hook_timeout))
    for name, raw in (cfg.model_extra or {}).items():
        section = sections.sections.get(name)
        if section is None:
            known = ", ".join(sorted(sections.sections)) or "none"
            raise ConfigError(f"apps.{cfg.name}.{name}", raw,
                              f"no plugin provides this section (installed: {known})")
        opts.append(section.build(raw, f"apps.{cfg.name}.{name}"))
    return App(cfg.name, *opts)


def _sections(pm: PluginManager) -> ConfigRegistry:
    reg = ConfigRegistry()
    pm.hook.pycluster_config_sections(registry=reg)  # "process" comes from the core plugin
    return reg


def apps_from_config(path: str | Path, pm: PluginManager) -> list[App]:
    """The apps of a config file."""
    settings = load_settings(path)
    reg = _sections(pm)
    return [build_app(cfg, reg) for cfg in settings.apps]


def platform_from_config(path: str | Path, pm: PluginManager) -> Platform:
    """A platform with every app of a config file registered."""
    platform = Platform(config_file=path, plugin_manager=pm)
    reg = _sections(pm)
    for cfg in platform.settings.apps:
        platform.register(build_app(cfg, reg))
    return platform
