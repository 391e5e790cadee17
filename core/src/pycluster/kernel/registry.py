"""Typed registries that registration hooks fill (tox's register-object shape)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..backend import Backend


class OptionRegistry:
    """Option classes that plugins define, mapped to the plugin name."""

    def __init__(self) -> None:
        self._by_class: dict[type, str] = {}

    def add(self, option_class: type, plugin: str) -> None:
        """Declare that ``plugin`` defines ``option_class``."""
        self._by_class[option_class] = plugin

    def plugin_for(self, option: object) -> str | None:
        """The plugin that declared the option's class (or a base class), if any."""
        for cls in type(option).__mro__:
            if cls in self._by_class:
                return self._by_class[cls]
        return None


BackendFactory = Callable[..., "Backend"]


@dataclass
class BackendKind:
    """A registered backend kind."""

    kind: str
    option_class: type
    factory: BackendFactory
    plugin: str


class BackendRegistry:
    """Backend kinds ("process", "systemd", "docker", ...) and their controller factories."""

    def __init__(self) -> None:
        self._kinds: dict[str, BackendKind] = {}

    def add(self, kind: str, option_class: type, factory: BackendFactory, plugin: str = "") -> None:
        """Register a backend kind; ``factory(option, app, platform)`` returns a controller."""
        self._kinds[kind] = BackendKind(kind, option_class, factory, plugin or kind)

    def get(self, kind: str) -> BackendKind:
        """The registered kind, or `ConfigError` listing the installed kinds."""
        try:
            return self._kinds[kind]
        except KeyError:
            installed = ", ".join(sorted(self._kinds)) or "none"
            raise ConfigError(
                "backend", kind, f"no backend {kind!r}; installed: {installed}"
            ) from None

    def for_option(self, option: object) -> BackendKind | None:
        """The kind whose option class matches ``option``, if any."""
        for k in self._kinds.values():
            if isinstance(option, k.option_class):
                return k
        return None

    def kinds(self) -> list[str]:
        """Installed kinds, sorted."""
        return sorted(self._kinds)


@dataclass
class ConfigSection:
    """A plugin's config-file section."""

    name: str
    model: type[BaseModel]
    to_option: Callable[[Any], object]


class ConfigRegistry:
    """Config-file sections added by plugins (section name = plugin name)."""

    def __init__(self) -> None:
        self.sections: dict[str, ConfigSection] = {}

    def add(self, name: str, model: type[BaseModel], to_option: Callable[[Any], object]) -> None:
        """Add section ``name`` validated by ``model``; ``to_option`` builds the App option."""
        self.sections[name] = ConfigSection(name, model, to_option)


class AppEventRegistry:
    """The app events (``App.on_<event>`` hooks) that installed plugins fire, by plugin.

    The kernel fires ``active``, ``passive``, ``leader_change``, ``start``, ``stop``,
    ``member_join`` and ``member_leave`` itself; other events are declared by the plugin that
    fires them (``pycluster_app_events``), and ``platform.register(app)`` refuses an app with
    hooks for an event that nothing installed fires.
    """

    def __init__(self) -> None:
        self.events: dict[str, str] = {}

    def add(self, event: str, plugin: str) -> None:
        """Declare that ``plugin`` fires ``event`` (e.g. ``"own"`` for a ring plugin)."""
        self.events.setdefault(event, plugin)

    def fired_by(self, event: str) -> str | None:
        """The plugin that fires ``event``, if any."""
        return self.events.get(event)
