"""Typed registries that registration hooks fill (tox's register-object shape)."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ..backend import Backend
    from .context import Context as StageContext


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


class StageOrder(enum.IntEnum):
    """Positions of the failover sequence (DESIGN §5); plugins pick one or a value between."""

    CATCH_UP = 100
    PROMOTE = 200
    VIP = 300
    BACKEND = 400
    REPLICATE = 500
    SNAPSHOTS = 600
    APP_HOOKS = 1000


class FailurePolicy(enum.StrEnum):
    """What the coordinator does when a stage's ``activate`` fails or times out.

    Every failure is logged and reported to the app runtime's stage listeners (audit, metrics).
    """

    STEP_DOWN = "step_down"
    """Undo the stages that ran (reverse order), release the lease, back off (doubling, capped)
    and campaign again, so that another node takes over. The default."""
    RETRY = "retry"
    """Undo this stage alone and run it again, up to ``Stage.retries`` times with a doubling
    ``Stage.retry_delay``; then as STEP_DOWN."""
    CONTINUE = "continue"
    """Carry on with the next stage (for optional stages: discovery, snapshots). The failed
    stage's ``deactivate`` still runs on step-down."""


@dataclass
class Stage:
    """One step of the failover sequence for one app.

    ``activate`` runs when the node becomes active (ascending ``order``); ``deactivate`` runs
    when it steps down (descending), only for stages whose ``activate`` completed or started.
    ``timeout`` bounds each call (default: the app's hook timeout); ``on_failure`` says what a
    failed or timed-out ``activate`` leads to (see `FailurePolicy`). A failed ``deactivate`` is
    logged and reported, and the reverse sequence goes on: it never blocks a step-down.
    """

    name: str
    order: int
    activate: Callable[[StageContext], Awaitable[None]]
    deactivate: Callable[[StageContext], Awaitable[None]]
    timeout: float | None = None
    plugin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    on_failure: FailurePolicy = FailurePolicy.STEP_DOWN
    retries: int = 0
    retry_delay: float = 1.0

    def __post_init__(self) -> None:
        try:
            self.on_failure = FailurePolicy(self.on_failure)
        except ValueError:
            choices = ", ".join(p.value for p in FailurePolicy)
            raise ConfigError(f"Stage({self.name!r}).on_failure", self.on_failure,
                              f"must be one of {choices}") from None
        if self.retries < 0 or self.retry_delay < 0:
            raise ConfigError(f"Stage({self.name!r}).retries", (self.retries, self.retry_delay),
                              "retries and retry_delay must not be negative")


class StageRegistry:
    """The stages of one app's failover sequence."""

    def __init__(self) -> None:
        self._stages: list[Stage] = []

    def add(self, stage: Stage) -> None:
        """Add a stage; names must be unique per app."""
        if any(s.name == stage.name for s in self._stages):
            raise ConfigError("stage", stage.name, "a stage of this name is already registered")
        self._stages.append(stage)

    def ordered(self) -> list[Stage]:
        """Stages in activation order (stable for equal orders)."""
        return sorted(self._stages, key=lambda s: s.order)
