"""Typed registries that registration hooks fill (tox's register-object shape).

`OptionKindRegistry` is the one shape of the registries mapping App option classes to what
serves them: backends (here), replicators (`pycluster.kernel.replication`) and VIP managers
(`pycluster.kernel.vip`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from .errors import ConfigError


class OptionRegistry:
    """Option classes that plugins define, mapped to the plugin name, and the app attributes
    (handles) they give the apps that use them."""

    def __init__(self) -> None:
        self._by_class: dict[type, str] = {}
        self._handles: dict[str, tuple[type, Callable[[Any], Any]]] = {}

    def add(self, option_class: type, plugin: str, *,
            handle: tuple[str, Callable[[Any], Any]] | None = None) -> None:
        """Declare that ``plugin`` defines ``option_class``.

        :param handle: ``(attribute, factory)``: an app with an option of this class gets the
            attribute (``cache.ring``), whose value is ``factory(app)``. The attribute may not
            shadow one of `App`'s own, nor be claimed by two option classes.
        """
        self._by_class[option_class] = plugin
        if handle is not None:
            from .app import App

            name, factory = handle
            if not name.isidentifier() or name.startswith("_") or hasattr(App, name):
                raise ValueError(f"option handle {name!r} of {option_class.__name__}: not a "
                                 "public identifier, or an attribute App already has")
            other = self._handles.get(name)
            if other is not None and other[0] is not option_class:
                raise ValueError(f"option handle {name!r} is claimed by both "
                                 f"{other[0].__name__} and {option_class.__name__}")
            self._handles[name] = (option_class, factory)

    def handle(self, app: Any, name: str) -> Any:
        """The value of the app attribute ``name`` that an option of ``app`` gives it.

        :raises AttributeError: no option class registers ``name``, or ``app`` has no option
            of that class.
        """
        entry = self._handles.get(name)
        if entry is None or not any(isinstance(o, entry[0]) for o in app.options):
            raise AttributeError(f"App {app.name!r} has no attribute {name!r}")
        return entry[1](app)

    def plugin_for(self, option: object) -> str | None:
        """The plugin that declared the option's class (or a base class), if any."""
        for cls in type(option).__mro__:
            if cls in self._by_class:
                return self._by_class[cls]
        return None


@dataclass(frozen=True)
class OptionKind:
    """One registered kind of an option-kind registry: the App option class it serves, the
    factory building what serves one option of one app on this node, and the plugin.

    :ivar option_class: the App option class (its subclasses match too).
    :ivar factory: ``factory(option, app, platform)``.
    :ivar plugin: the plugin that registered it.
    """

    option_class: type
    factory: Callable[..., Any]
    plugin: str


K = TypeVar("K", bound=OptionKind)


class OptionKindRegistry(Generic[K]):
    """App option classes mapped to the kind serving them: the shared shape of the backend,
    replicator and VIP registries (a registration hook fills it once per platform; the kernel
    matches every option of an app against it and builds one object per matched option).

    A subclass names what it registers (`what`, for errors) and adds its own ``add``; kinds
    are keyed by their option class unless `key` says otherwise, and a key registered twice
    is refused unless `replaceable`.
    """

    what: ClassVar[str] = "option kind"
    """What the registry holds, as errors name it (``"replicator"``)."""
    replaceable: ClassVar[bool] = False
    """Whether registering a key again replaces the kind (else: `ConfigError`)."""

    def __init__(self) -> None:
        self._kinds: dict[Hashable, K] = {}

    def key(self, kind: K) -> Hashable:
        """The key ``kind`` is registered under (its option class)."""
        return kind.option_class

    def register(self, kind: K) -> K:
        """Add ``kind``; returns it.

        :raises ConfigError: its key is registered already (and the registry is not
            `replaceable`), naming the plugin that holds it.
        """
        key = self.key(kind)
        old = self._kinds.get(key)
        if old is not None and not self.replaceable:
            label = key.__name__ if isinstance(key, type) else str(key)
            raise ConfigError(self.what, label, f"already registered by {old.plugin!r}")
        self._kinds[key] = kind
        return kind

    def for_option(self, option: object) -> K | None:
        """The kind serving ``option``: the first registered for its class, else for the
        nearest base class; None when nothing serves it."""
        for cls in type(option).__mro__:
            for kind in self._kinds.values():
                if kind.option_class is cls:
                    return kind
        return None

    def matches(self, options: Iterable[object]) -> list[tuple[K, object]]:
        """``(kind, option)`` of every option served here, in option order."""
        out = []
        for opt in options:
            kind = self.for_option(opt)
            if kind is not None:
                out.append((kind, opt))
        return out

    def build(self, app: Any, platform: Any) -> list[tuple[K, object, Any]]:
        """``(kind, option, built)`` of every option of ``app`` served here, in option order,
        ``built`` being ``kind.factory(option, app, platform)``."""
        return [(kind, opt, kind.factory(opt, app, platform))
                for kind, opt in self.matches(app.options)]

    def all(self) -> list[K]:
        """Every registered kind, in registration order."""
        return list(self._kinds.values())

    def __len__(self) -> int:
        return len(self._kinds)


BackendFactory = Callable[..., Any]
"""``factory(option, app, platform)`` -> a `pycluster.backend.Controller`."""


@dataclass(frozen=True)
class BackendMetrics:
    """Per-backend metrics of a kind, labelled ``app`` and ``label``.

    :ivar label: the second label's name (``"unit"``, ``"container"``).
    :ivar label_of: its value for a supervisor (``lambda s: s.controller.option.unit``).
    :ivar healthy: ``(name, help)`` of the gauge (1/0, the last check while started; absent
        where the backend does not run).
    :ivar restarts: ``(name, help)`` of the counter (restarts by the supervisor; Prometheus
        adds ``_total``).
    """

    label: str
    label_of: Callable[[Any], str]
    healthy: tuple[str, str]
    restarts: tuple[str, str]


@dataclass(frozen=True, kw_only=True)
class BackendKind(OptionKind):
    """A registered backend kind: everything the kernel needs to turn an option of
    ``option_class`` into a BACKEND stage, an app health check, metrics and audit entries.

    :ivar kind: the kind (``"docker"``); stage and check names default to ``{kind}-{i}``.
    :ivar option_class: the App option class users pass to ``App(...)``.
    :ivar factory: ``factory(option, app, platform)`` returns the controller
        (`pycluster.backend.Controller`).
    :ivar plugin: the plugin that registered it (default: the kind).
    :ivar stage_name: ``(option, index)`` -> the stage name (index among the app's options
        of this kind).
    :ivar check_name: ``(option, index)`` -> the app health check's name (default: the stage
        name).
    :ivar audit: ``{action: description}`` of the audit category named like the kind (None:
        no audit entries); the supervisor writes started, stopped, restarted, failed.
    :ivar metrics: the kind's healthy/restarts metrics (None: none).
    """

    kind: str
    stage_name: Callable[[Any, int], str] | None = None
    check_name: Callable[[Any, int], str] | None = None
    audit: Mapping[str, str] | None = None
    metrics: BackendMetrics | None = None

    def stage_of(self, option: object, index: int) -> str:
        """The stage name of the ``index``-th option of this kind of an app."""
        return self.stage_name(option, index) if self.stage_name else f"{self.kind}-{index}"

    def check_of(self, option: object, index: int) -> str:
        """The app health check name of the ``index``-th option of this kind."""
        return self.check_name(option, index) if self.check_name else self.stage_of(option,
                                                                                     index)


class BackendRegistry(OptionKindRegistry[BackendKind]):
    """Backend kinds ("process", "systemd", "docker", ...): the kernel reads it to build each
    app's BACKEND stages, health checks, metrics and audit entries. Keyed by the kind's name;
    registering a name again replaces the kind."""

    what = "backend"
    replaceable = True

    def key(self, kind: BackendKind) -> Hashable:
        """A backend kind is registered under its name."""
        return kind.kind

    def add(self, kind: str, option_class: type, factory: BackendFactory, plugin: str = "", *,
            stage_name: Callable[[Any, int], str] | None = None,
            check_name: Callable[[Any, int], str] | None = None,
            audit: Mapping[str, str] | None = None,
            metrics: BackendMetrics | None = None) -> None:
        """Register a backend kind (see `BackendKind` for the parameters)."""
        self.register(BackendKind(option_class=option_class, factory=factory,
                                  plugin=plugin or kind, kind=kind, stage_name=stage_name,
                                  check_name=check_name, audit=audit, metrics=metrics))

    def get(self, kind: str) -> BackendKind:
        """The registered kind, or `ConfigError` listing the installed kinds."""
        try:
            return self._kinds[kind]
        except KeyError:
            installed = ", ".join(self.kinds()) or "none"
            raise ConfigError(
                "backend", kind, f"no backend {kind!r}; installed: {installed}"
            ) from None

    def kinds(self) -> list[str]:
        """Installed kinds, sorted."""
        return sorted(k.kind for k in self._kinds.values())

    def all(self) -> list[BackendKind]:
        """Installed kinds, sorted by name."""
        return sorted(self._kinds.values(), key=lambda k: k.kind)


@dataclass
class ConfigSection:
    """A plugin's config-file section: an option class declared with
    `pycluster.kernel.declare.option` (``to_option`` None: the section is parsed by the
    declaration itself), or a pydantic model and the function building the option."""

    name: str
    model: type
    to_option: Callable[[Any], object] | None = None

    def build(self, raw: object, where: str) -> object:
        """The App option of the section's value ``raw`` (``where``: its path, for errors).

        :raises ConfigError: naming the field and the value.
        """
        from pydantic import BaseModel, ValidationError

        from .declare import parse_section

        if self.to_option is None:
            return parse_section(self.model, raw, where)
        assert issubclass(self.model, BaseModel)
        try:
            model = self.model.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            raise ConfigError(f"{where}.{loc}".rstrip("."), err.get("input"),
                              err["msg"]) from None
        return self.to_option(model)


class ConfigRegistry:
    """Config-file sections added by plugins (named after the plugin, or after an option
    class the plugin registers)."""

    def __init__(self) -> None:
        self.sections: dict[str, ConfigSection] = {}

    def add(self, name: str, model: type,
            to_option: Callable[[Any], object] | None = None) -> None:
        """Add section ``name``: ``model`` is the option class (declared with
        `pycluster.kernel.declare.option`: the section has its fields), or a pydantic model
        validating the section with ``to_option`` building the App option from it."""
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
