"""The plugin surface: hook docs, the manager factory, option claiming, CLI listing."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from pycluster import App, Platform, UnclaimedOptionError, hookimpl, hookspecs
from pycluster.plugins import DEFAULT_PLUGINS, create_plugin_manager


def _specs() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("pycluster_")]


def test_every_hook_is_documented_and_marked() -> None:
    names = _specs()
    assert sorted(names) == sorted(hookspecs.__all__)
    for name in names:
        fn = getattr(hookspecs, name)
        assert hasattr(fn, "pycluster_spec"), f"{name} lacks the @hookspec marker"
        doc = inspect.getdoc(fn) or ""
        assert len(doc.splitlines()[0]) > 10, f"{name} has no docstring"
        assert "Called" in doc, f"{name}: docstring must say when it is called"
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{name}: parameter {param} is undocumented"


def test_core_defaults_registered_and_disablable() -> None:
    pm = create_plugin_manager(load_entrypoints=False)
    for name in DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None
        assert pm.infos[name].builtin and pm.infos[name].status == "loaded"
    assert "pycluster_election" in pm.infos["election"].hooks
    pm = create_plugin_manager(load_entrypoints=False, disabled={"process"})
    assert pm.get_plugin("process") is None and pm.infos["process"].status == "disabled"


def test_env_disables_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCLUSTER_DISABLE_PLUGINS", "process, audit")
    pm = create_plugin_manager(load_entrypoints=False)
    assert pm.get_plugin("process") is None and pm.get_plugin("audit") is None


def test_installed_plugin_overrides_core_default() -> None:
    class Custom:
        @hookimpl
        def pycluster_election(self, app: object, platform: object, keys: list[str]) -> str:
            return "custom"

    pm = create_plugin_manager(load_entrypoints=False, extra=[("custom", Custom())])
    assert pm.hook.pycluster_election(app=None, platform=None, keys=["leader"]) == "custom"


def test_unusable_plugin_is_reported() -> None:
    class NeedsEngine:
        @hookimpl
        def pycluster_check(self) -> str:
            return "no container engine at unix:///nowhere.sock"

    pm = create_plugin_manager(load_entrypoints=False, extra=[("needs", NeedsEngine())])
    assert pm.infos["needs"].status == "unusable"
    assert "container engine" in (pm.infos["needs"].reason or "")
    assert pm.problems() == [pm.infos["needs"]]


@dataclass(frozen=True)
class Gadget:
    size: int = 1


def test_unclaimed_option_fails_naming_the_distribution() -> None:
    pm = create_plugin_manager(load_entrypoints=False)
    p = Platform("prod", node_id="n1", plugin_manager=pm)
    with pytest.raises(UnclaimedOptionError, match="Gadget"):
        p.register(App("svc", Gadget()))


def test_claimed_option_and_registered_backend() -> None:
    class GadgetPlugin:
        @hookimpl
        def pycluster_claim_option(self, app: App, option: object) -> bool | None:
            return True if isinstance(option, Gadget) else None

    pm = create_plugin_manager(load_entrypoints=False, extra=[("gadget", GadgetPlugin())])
    p = Platform("prod", node_id="n1", plugin_manager=pm)
    app = p.register(App("svc", Gadget()))
    assert app.options == [Gadget()]
    assert "process" in p.backends.kinds()
    with pytest.raises(Exception, match="installed: process"):
        p.backends.get("dockr")


def test_plugins_command_lists_json() -> None:
    from pycluster.cli.main import cli

    pm = create_plugin_manager()
    result = CliRunner().invoke(cli, ["plugins", "--output", "json"], obj=pm)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    names = {r["name"] for r in rows}
    assert set(DEFAULT_PLUGINS) <= names
    assert all({"distribution", "version", "hooks", "status"} <= set(r) for r in rows)
    text = CliRunner().invoke(cli, ["plugins"], obj=pm)
    assert "election" in text.output and "pycluster-core" in text.output


def test_hooks_reference_is_current() -> None:
    """docs/hooks.md is generated from the hook specs; regenerate it when a hook changes:
    ``pycluster hooks --output markdown > docs/hooks.md``."""
    from pathlib import Path

    from pycluster.hookdoc import render_markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "hooks.md"
    assert doc.read_text() == render_markdown(), "docs/hooks.md is stale: regenerate it"


@pytest.mark.timeout(10)
async def test_call_in_turn_awaits_each_implementation_and_reports_failures() -> None:
    import asyncio

    import pluggy

    from pycluster.plugins import call_in_turn

    order: list[str] = []

    class Slow:
        @hookimpl
        async def pycluster_zone_promote(self, app: object, term: int) -> None:
            order.append("slow:start")
            await asyncio.sleep(0.05)
            order.append("slow:end")

    class Sync:
        @hookimpl
        def pycluster_zone_promote(self, app: object, term: int) -> None:
            order.append(f"sync:{term}")

    class Broken:
        @hookimpl
        def pycluster_zone_promote(self, app: object, term: int) -> None:
            raise RuntimeError("boom")

    class Hanging:
        @hookimpl
        async def pycluster_zone_promote(self, app: object, term: int) -> None:
            await asyncio.sleep(30)

    def manager(*plugins: object) -> pluggy.PluginManager:
        pm = pluggy.PluginManager("pycluster")
        pm.add_hookspecs(hookspecs)
        for p in plugins:
            pm.register(p)
        return pm

    pm = manager(Slow(), Sync())
    # Each result is awaited before the next implementation is called.
    assert await call_in_turn(pm.hook.pycluster_zone_promote, 1.0, "t", app=None, term=7)
    assert order.index("slow:end") < order.index("sync:7") or order.index(
        "sync:7") < order.index("slow:start")
    order.clear()
    pm = manager(Broken(), Hanging(), Sync())
    # A failure and a timeout make it False; the others still run.
    assert not await call_in_turn(pm.hook.pycluster_zone_promote, 0.1, "t", app=None, term=8)
    assert order == ["sync:8"]
