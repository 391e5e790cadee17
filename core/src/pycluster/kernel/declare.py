"""Options declared once: an App option class is a frozen pydantic dataclass, and its
config-file section is derived from the same declaration.

Example (a third-party option)::

    from pycluster.kernel.declare import option

    @option(eq=False)
    class Echo:
        path: str
        interval: float = 1.0

        def __post_init__(self) -> None:
            if self.interval <= 0:
                raise ConfigError("Echo.interval", self.interval, "must be > 0")

and in the plugin ``registry.add("echo", Echo)`` (``pycluster_config_sections``): the app
section ``echo: {path: /tmp/x}`` of a config file builds ``Echo(path="/tmp/x")``.

* Construction validates the fields' types (a list given for a ``tuple[str, ...]`` becomes a
  tuple) and then runs ``__post_init__`` (further checks; a normalised value is stored with
  ``object.__setattr__``). Any error is a `ConfigError` naming ``Class.field`` and the value:
  a ``ConfigError`` raised by ``__post_init__`` as it is, a type error as
  ``ConfigError("Class.field", value, pydantic's message)``.
* A config-file section is validated by the same declaration (`parse_section`): unknown keys,
  type errors and ``__post_init__``'s errors about a field name ``apps.<app>.<section>.<field>``
  and the value.
* Instances are frozen: runtime state never lives on an option. A plugin keeps what it knows
  of an option in ``app.state(plugin)`` and finds the app with
  `pycluster.kernel.app.app_of`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from .errors import ConfigError

T = TypeVar("T")

__all__ = ["is_declared", "option", "parse_section"]

_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def _config_error(prefix: str, exc: ValidationError, fields: list[str]) -> ConfigError:
    """The `ConfigError` for a validation error: the one ``__post_init__`` raised, or one
    naming ``prefix.field`` and the value."""
    err = exc.errors()[0]
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, ConfigError):
        return inner
    loc = [fields[x] if isinstance(x, int) and x < len(fields) else str(x) for x in err["loc"]]
    where = ".".join([prefix, *loc[:1], *[str(x) for x in loc[1:]]])
    value = err.get("input")
    return ConfigError(where, value, str(err["msg"]))


@overload
def option(cls: type[T], /) -> type[T]: ...


@overload
def option(*, eq: bool = True, frozen: bool = True) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def option(cls: type[T] | None = None, /, *, eq: bool = True, frozen: bool = True) -> Any:
    """Declare an App option class (a frozen pydantic dataclass; see the module docstring).

    :param eq: compare by value (True) or by identity (False: for options that name one
        thing on a node, such as a unit or a container, where two equal declarations in one
        app are still two backends).
    :param frozen: False only for an option whose plugin still keeps runtime state on it
        (a transition: new options are frozen).
    """

    def wrap(c: type[T]) -> type[T]:
        dc: Any = pydantic_dataclass(c, frozen=frozen, eq=eq, config=_CONFIG)
        names = [f.name for f in dataclasses.fields(dc) if f.init]
        prefix = c.__name__
        init = dc.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise _config_error(prefix, exc, names) from None

        dc.__init__ = __init__
        dc.__pycluster_option__ = True
        return dc  # type: ignore[no-any-return]

    return wrap if cls is None else wrap(cls)


def is_declared(cls: type) -> bool:
    """Whether ``cls`` was declared with `option` (its config section can be derived)."""
    return bool(getattr(cls, "__pycluster_option__", False))


_ADAPTERS: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _ADAPTERS.get(cls)
    if adapter is None:
        adapter = _ADAPTERS[cls] = TypeAdapter(cls)
    return adapter


def parse_section(cls: type[T], raw: object, where: str) -> T:
    """Build an option of class ``cls`` (declared with `option`) from a config-file section.

    :param raw: the section's value (a mapping of field names).
    :param where: the section's path in the file (``apps.web.docker``), for errors.
    :raises ConfigError: naming ``where.field`` and the value, or ``__post_init__``'s error.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    try:
        adapter: TypeAdapter[T] = _adapter(cls)
        return adapter.validate_python(raw)
    except ValidationError as exc:
        err = _config_error(where, exc, names)
        own = f"{cls.__name__}."
        if err.field.startswith(own):  # __post_init__'s error: name the section's key
            err = ConfigError(f"{where}.{err.field[len(own):]}", err.value, err.reason)
        raise err from None
