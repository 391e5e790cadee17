"""The kernel and its default plugins: every feature registered through the plugin manager,
every design group a documented hook spec, disabled plugins named in errors, app events nobody
fires refused."""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pycluster import App, ConfigError, Platform, PluginError, Singleton, hookimpl, hookspecs
from pycluster.kernel.registry import AppEventRegistry
from pycluster.plugins import DEFAULT_PLUGINS, ESSENTIAL, create_plugin_manager
from pycluster.testing import wait_for
from pycluster.testing.nodes import NodeCluster

DESIGN_GROUPS = ("election", "placement", "replication", "backends", "vip", "discovery")
DEFAULT_NAMES = ("election", "placement", "process", "rpc", "api", "events", "metrics",
                 "tracing", "audit", "health", "sdnotify", "leaf")
OBSERVABILITY = frozenset({"audit", "metrics", "tracing", "health"})
SERVICES = ("rpc", "api", "events", "health", "audit", "metrics", "tracing", "leaf")
"""The default plugins that register a platform service (sdnotify only under systemd)."""


def _platform(disabled: set[str] | None = None, extra: Any = ()) -> Platform:
    pm = create_plugin_manager(load_entrypoints=False, disabled=disabled, extra=extra)
    return Platform("prod", node_id="n1", plugin_manager=pm)


# -- every default feature through the plugin manager ----------------------------------------


@pytest.mark.timeout(30)
def test_default_plugins_are_the_named_list() -> None:
    assert tuple(DEFAULT_PLUGINS) == DEFAULT_NAMES
    assert {"election", "placement"} <= ESSENTIAL
    pm = create_plugin_manager(load_entrypoints=False)
    for name, module in DEFAULT_PLUGINS.items():
        plugin = pm.get_plugin(name)
        assert plugin is not None and plugin.__name__ == module, name
        assert pm.infos[name].hooks, f"default plugin {name} implements no hook"


@pytest.mark.timeout(30)
def test_platform_services_come_from_the_hook_and_go_with_the_plugin() -> None:
    p = _platform()
    assert set(SERVICES) <= set(p.services)
    for name in SERVICES:
        assert p.services.plugin_of(name) == name
        off = _platform({name})
        assert name not in off.services, f"service {name} exists with its plugin disabled"


@pytest.mark.timeout(30)
def test_essential_plugins_cannot_be_disabled() -> None:
    for name in ESSENTIAL:
        with pytest.raises(PluginError, match="essential"):
            create_plugin_manager(load_entrypoints=False, disabled={name})


@pytest.mark.timeout(60)
def test_plugins_command_lists_every_default_plugin_with_its_hooks() -> None:
    from pycluster.cli.main import cli

    result = CliRunner().invoke(cli, ["plugins", "--output", "json"],
                                obj=create_plugin_manager())
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    for name in DEFAULT_NAMES:
        row = rows[name]
        assert row["builtin"] and row["distribution"] == "pycluster-core", row
        assert row["status"] == "loaded", row
        assert row["hooks"] and all(h in hookspecs.__all__ for h in row["hooks"]), row
    assert "pycluster_election" in rows["election"]["hooks"]
    assert "pycluster_placement_score" in rows["placement"]["hooks"]
    assert "pycluster_register_backends" in rows["process"]["hooks"]
    for name in SERVICES:
        assert "pycluster_platform_services" in rows[name]["hooks"], name


# -- the design groups ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_each_design_group_has_a_documented_hook_spec() -> None:
    reference = (Path(__file__).resolve().parents[2] / "docs" / "hooks.md").read_text()
    for group in DESIGN_GROUPS:
        names = hookspecs.GROUPS.get(group)
        assert names, f"design group {group!r} has no hook spec"
        assert f"\n## {group[:1].upper()}{group[1:]}\n" in reference, group
        for name in names:
            assert name in hookspecs.__all__, name
            fn = getattr(hookspecs, name)
            assert hasattr(fn, "pycluster_spec"), f"{name} lacks the @hookspec marker"
            doc = inspect.getdoc(fn) or ""
            assert "Called" in doc, f"{name}: the docstring must say when it is called"
            assert f"### {name}\n" in reference, f"{name} is missing from docs/hooks.md"
    every = [n for names in hookspecs.GROUPS.values() for n in names]
    assert sorted(every) == sorted(hookspecs.__all__), "a hook outside every group"


# -- disabled plugins --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_disabled_plugin_is_named_by_its_accessor() -> None:
    p = _platform(set(OBSERVABILITY))
    for name in sorted(OBSERVABILITY):
        with pytest.raises(PluginError) as err:
            p.service(name)
        assert err.value.plugin == name and err.value.reason == "disabled"
        assert str(err.value) == f"plugin {name!r} is disabled (PYCLUSTER_DISABLE_PLUGINS)"
    for accessor in ("audit", "health", "metrics"):
        with pytest.raises(PluginError, match=f"plugin '{accessor}' is disabled"):
            getattr(p, accessor)
    events_off = _platform({"events", "api"})
    with pytest.raises(PluginError, match="plugin 'events' is disabled"):
        _ = events_off.events
    with pytest.raises(PluginError, match="plugin 'api' is disabled"):
        events_off.api("other")


@pytest.mark.timeout(30)
def test_app_needing_a_disabled_plugin_is_refused_naming_it() -> None:
    app = App("svc", Singleton())

    @app.rpc.handler("ping")
    async def ping() -> str:
        return "pong"

    with pytest.raises(PluginError, match="plugin 'rpc' is disabled"):
        _platform({"rpc"}).register(app)


@pytest.mark.timeout(30)
async def test_singleton_runs_without_observability_plugins(make_platform: Any) -> None:
    apps = [App("svc", Singleton()) for _ in range(2)]
    platforms = [await make_platform(f"n{i + 1}", app, disabled_plugins=OBSERVABILITY,
                                     lease_ttl=1.0, heartbeat_interval=0.25)
                 for i, app in enumerate(apps)]
    await wait_for(lambda: sum(a.is_active for a in apps) == 1, timeout=20)
    first = next(i for i, a in enumerate(apps) if a.is_active)
    with pytest.raises(PluginError, match="plugin 'audit' is disabled"):
        _ = platforms[first].audit
    await platforms[first].stop()
    await wait_for(lambda: apps[1 - first].is_active, timeout=20)


# -- app events --------------------------------------------------------------------------------


class _Ring:
    """Stands for a ring plugin: it declares that it fires ``own`` and ``release``."""

    @hookimpl
    def pycluster_app_events(self, registry: AppEventRegistry) -> None:
        registry.add("own", "ring")
        registry.add("release", "ring")


def _owning_app() -> App:
    app = App("svc", Singleton())

    @app.on_own
    async def took(ctx: Any) -> None:
        return None

    return app


@pytest.mark.timeout(30)
def test_on_own_without_a_ring_plugin_is_refused_at_register() -> None:
    with pytest.raises(ConfigError, match="no installed plugin fires 'own' events"):
        _platform().register(_owning_app())
    app = _platform(extra=[("ring", _Ring())]).register(_owning_app())
    assert app.name == "svc"


# -- notification hooks reach what other plugins run -----------------------------------------


class _OwnProcess:
    """Stands for a plugin that runs a process backend in a stage of its own (as the SQLite
    plugin runs Litestream), and counts the lease renewals it is told about."""

    def __init__(self) -> None:
        self.backend: Any = None
        self.renewals = 0

    @hookimpl
    def pycluster_stages(self, app: App, platform: Platform, registry: Any) -> None:
        from pycluster import Process, Stage, StageOrder
        from pycluster.builtin.process import ProcessBackend

        sleeper = Process([sys.executable, "-c", "import time; time.sleep(120)"], grace=1)
        self.backend = ProcessBackend(sleeper, app, platform, stage="own")
        registry.add(Stage("own", StageOrder.BACKEND + 1, self.backend.start, self.backend.stop,
                           timeout=30, plugin="own"))

    @hookimpl
    def pycluster_lease_renewed(self, app: App, deadline: float) -> None:
        self.renewals += 1


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_renewals_reach_the_guard_of_a_process_another_plugin_runs(
        make_platform: Any) -> None:
    own = _OwnProcess()
    app = App("svc", Singleton())
    await make_platform("n1", app, extra_plugins=[("own", own)], lease_ttl=1.0,
                        heartbeat_interval=0.25)
    await wait_for(lambda: app.is_active, timeout=20)
    pid = own.backend._child.pid
    start = own.renewals
    # Several lease terms: a guard that missed the renewals would have stopped the process at
    # the first deadline (and the backend would have restarted it).
    await wait_for(lambda: own.renewals >= start + 12, timeout=30)
    assert own.backend._child.pid == pid and own.backend._child.running
    assert own.backend.restarts == 0 and own.backend.last_exit is None
    assert (await own.backend.health()).healthy


# -- end to end: node processes with the observability plugins disabled -----------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_singleton_fails_over_with_observability_disabled(
        nats_url: str, unique_name: str, tmp_path: Path, make_platform: Any) -> None:
    off = ",".join(sorted(OBSERVABILITY))
    c = NodeCluster(unique_name, [nats_url], tmp_path, lease_ttl=1.0, heartbeat=0.25,
                    env={"PYCLUSTER_DISABLE_PLUGINS": off})
    try:
        await c.start()
        leader = await c.wait_for_leader(20)
        # The node processes really run without the plugins: their membership records say so.
        observer = await make_platform("observer")
        assert observer.membership is not None
        members = observer.membership.members
        await wait_for(lambda: all(n in members for n in c.nodes), timeout=20)
        for node in c.nodes:
            plugins = set(members[node].get("plugins") or {})
            assert not plugins & OBSERVABILITY, (node, plugins)
            assert {"election", "placement", "process"} <= plugins, (node, plugins)
        epoch = c.role(leader)[1]
        c.kill(leader)
        new = await c.wait_for_leader(20, exclude=[leader], min_epoch=(epoch or 0) + 1)
        assert new != leader
        await asyncio.sleep(0.5)
        assert c.leader_count() == 1
        await c.stop()
        assert c.overlaps() == [], f"two nodes active at once: {c.overlaps()}"
    finally:
        c.stop_sync()


@pytest.mark.timeout(30)
async def test_service_discovery_api_names_the_missing_plugin(make_platform: Any) -> None:
    """Without a discovery plugin, ``platform.services.lookup`` says which plugin it needs."""
    p = await make_platform("n1", disabled_plugins=["discovery"])
    with pytest.raises(PluginError, match="discovery"):
        await p.services.lookup("http")
