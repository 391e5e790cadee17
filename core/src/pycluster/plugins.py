"""The plugin-manager factory: the default plugins from an explicit list, then entry points.

The core is a kernel (`pycluster.kernel`) plus default plugins (`DEFAULT_PLUGINS`): modules of
hook implementations registered through the same hooks a third-party plugin uses, like
pytest's ``default_plugins``. Each is marked ``trylast`` where it provides a default, so an
installed plugin implementing the same hook is asked first; an installed plugin of the same
name replaces it. Any of them but the `ESSENTIAL` ones can be disabled by name, and the node
still runs without it (an API that needs it fails with a `PluginError` naming it).

Built on demand (never at import), so tests create a manager per test with autoload off.
Every plugin has one name, used everywhere: entry-point name = registration name = config
section = service name = the name in ``PYCLUSTER_DISABLE_PLUGINS``.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata as md
import inspect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
from pluggy import HookCaller

from . import hookspecs
from .kernel.errors import PluginError
from .kernel.types import PluginStatus

log = logging.getLogger("pycluster.plugins")

hookimpl = pluggy.HookimplMarker("pycluster")
"""Decorator marking a plugin function as a pycluster hook implementation."""

ENTRY_POINT_GROUP = "pycluster"

DEFAULT_PLUGINS: dict[str, str] = {
    "election": "pycluster.builtin.election.plugin",
    "placement": "pycluster.builtin.placement",
    "process": "pycluster.builtin.process",
    "rpc": "pycluster.builtin.rpc.plugin",
    "api": "pycluster.builtin.api.plugin",
    "events": "pycluster.builtin.events.plugin",
    "metrics": "pycluster.builtin.metrics.plugin",
    "tracing": "pycluster.builtin.tracing.plugin",
    "audit": "pycluster.builtin.audit.plugin",
    "health": "pycluster.builtin.health.plugin",
    "sdnotify": "pycluster.builtin.sdnotify",
    "leaf": "pycluster.builtin.leaf.plugin",
}
"""The default plugins, name -> module, registered in this order before entry points."""

ESSENTIAL: frozenset[str] = frozenset({"election", "placement"})
"""Default plugins that cannot be disabled (an installed plugin of the same name may replace
one): without an election or placement no app can run."""


@dataclass
class PluginInfo:
    """What the manager knows of one plugin."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    status: PluginStatus = PluginStatus.LOADED
    reason: str | None = None
    hooks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``pycluster plugins --output json`` and node records)."""
        return {
            "name": self.name,
            "module": self.module,
            "distribution": self.distribution,
            "version": self.version,
            "builtin": self.builtin,
            "status": self.status,
            "reason": self.reason,
            "hooks": self.hooks,
        }


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers each plugin's origin and status."""

    def __init__(self) -> None:
        super().__init__("pycluster")
        self.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}

    def plugin_set(self) -> dict[str, str]:
        """Name → version of the usable plugins (advertised in node records)."""
        return {
            i.name: i.version or "" for i in self.infos.values() if i.status is PluginStatus.LOADED
        }

    def problems(self) -> list[PluginInfo]:
        """Plugins that failed to load or are unusable here."""
        bad = (PluginStatus.FAILED, PluginStatus.UNUSABLE)
        return [i for i in self.infos.values() if i.status in bad]


def disabled_from_env() -> set[str]:
    """Plugin names listed in ``PYCLUSTER_DISABLE_PLUGINS`` (comma or space separated)."""
    raw = os.environ.get("PYCLUSTER_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.replace(",", " ").split() if p.strip()}


def _core_version() -> str | None:
    try:
        return md.version("pycluster-core")
    except md.PackageNotFoundError:
        return None


def _hooks_of(pm: PluginManager, plugin: object) -> list[str]:
    callers = pm.get_hookcallers(plugin) or []
    return sorted(c.name for c in callers)


def create_plugin_manager(
    *,
    load_entrypoints: bool = True,
    disabled: Iterable[str] | None = None,
    extra: Iterable[tuple[str, object]] = (),
) -> PluginManager:
    """Build a plugin manager.

    :param load_entrypoints: load plugins of the ``pycluster`` entry-point group (tests may turn
        this off and register tiny plugins through ``extra``).
    :param disabled: plugin names not to register; defaults to ``PYCLUSTER_DISABLE_PLUGINS``.
    :param extra: ``(name, plugin_object)`` pairs registered after the core defaults.
    """
    pm = PluginManager()
    off = set(disabled) if disabled is not None else disabled_from_env()
    essential = sorted(off & ESSENTIAL)
    if essential:
        raise PluginError(essential[0], "pycluster-core", _core_version(), "essential",
                          message=f"plugin {essential[0]!r} is essential and cannot be disabled "
                          f"(PYCLUSTER_DISABLE_PLUGINS); the essential plugins are "
                          f"{', '.join(sorted(ESSENTIAL))}")
    version = _core_version()

    for name, modname in DEFAULT_PLUGINS.items():
        info = PluginInfo(name, modname, "pycluster-core", version, builtin=True)
        pm.infos[name] = info
        if name in off:
            info.status = PluginStatus.DISABLED
            continue
        pm.register(importlib.import_module(modname), name=name)

    if load_entrypoints:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else None
            dver = ep.dist.version if ep.dist else None
            info = PluginInfo(ep.name, ep.value, dist, dver)
            if ep.name in pm.infos:
                # An installed plugin of the same name replaces a core default.
                old = pm.get_plugin(ep.name)
                if old is not None:
                    pm.unregister(old)
            pm.infos[ep.name] = info
            if ep.name in off:
                info.status = PluginStatus.DISABLED
                continue
            try:
                plugin = ep.load()
                pm.register(plugin, name=ep.name)
            except Exception as exc:  # a broken plugin must not take the node down
                info.status = PluginStatus.FAILED
                info.reason = f"{type(exc).__name__}: {exc}"
                log.error("plugin %s (%s %s) failed to load: %s", ep.name, dist, dver, info.reason)

    for name, plugin in extra:
        if name in off:
            continue
        pm.register(plugin, name=name)
        mod = plugin.__name__ if isinstance(plugin, ModuleType) else type(plugin).__module__
        pm.infos.setdefault(name, PluginInfo(name, mod))

    pm.check_pending()

    for impl in pm.hook.pycluster_check.get_hookimpls():
        checked = pm.infos.get(impl.plugin_name)
        try:
            reason = impl.function()
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
        if reason and checked is not None:
            checked.status = PluginStatus.UNUSABLE
            checked.reason = str(reason)
            # Reported at WARNING by Platform.start() and by `pycluster plugins`; a CLI command
            # that does not use the plugin should not print it.
            log.debug(
                "plugin %s (%s %s) is unusable here: %s",
                checked.name, checked.distribution, checked.version, reason,
            )

    for info in pm.infos.values():
        plugin = pm.get_plugin(info.name)
        if plugin is not None:
            info.hooks = _hooks_of(pm, plugin)

    if os.environ.get("PYCLUSTER_TRACE_HOOKS"):
        tracer = logging.getLogger("pycluster.hooks")
        pm.trace.root.setwriter(lambda msg: tracer.debug(msg.rstrip()))
        pm.enable_tracing()
    return pm


def call_each(caller: HookCaller, what: str = "", /, **kwargs: Any) -> list[Any]:
    """Call a notification hook implementation by implementation, in pluggy's order: one that
    raises is logged (with ``what``) and the others still run. Returns the non-None results."""
    results = []
    for impl in reversed(caller.get_hookimpls()):
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception:
            log.exception("%s: plugin %s failed in %s", what or caller.name, impl.plugin_name,
                          caller.name)
            continue
        if res is not None:
            results.append(res)
    return results


async def call_in_turn(caller: HookCaller, timeout: float, what: str = "", /,
                       **kwargs: Any) -> bool:
    """Call a hook's implementations one at a time, in pluggy's order, awaiting each one's
    result (bounded by ``timeout``) before calling the next. Failures and timeouts are logged
    with ``what`` and the others still run. Returns whether every implementation succeeded:
    for hooks whose callers must know (a zone promotion that failed in some plugin leaves the
    node unwritable)."""
    ok = True
    for impl in reversed(caller.get_hookimpls()):
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
            if inspect.isawaitable(res):
                async with asyncio.timeout(timeout):
                    await res
        except Exception:  # TimeoutError included
            ok = False
            log.exception("%s: plugin %s failed in %s", what or caller.name, impl.plugin_name,
                          caller.name)
    return ok


async def call_notify(results: Iterable[Any], timeout: float, what: str) -> None:
    """Await every awaitable among notification-hook results, each bounded by ``timeout``.

    Failures and timeouts are logged with ``what``, never raised: a notification never blocks
    the failover sequence.
    """
    for r in results:
        if inspect.isawaitable(r):
            try:
                async with asyncio.timeout(timeout):
                    await r
            except TimeoutError:
                log.error("%s: hook timed out after %.1fs", what, timeout)
            except Exception:
                log.exception("%s: hook failed", what)


def distribution_of(obj: object) -> str | None:
    """The distribution that ships the module defining ``obj``'s class (for error messages)."""
    top = type(obj).__module__.split(".")[0]
    try:
        dists = md.packages_distributions().get(top)
    except Exception:
        return None
    return dists[0] if dists else None
