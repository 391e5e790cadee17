"""Replication of an app's data between its instances: the protocol and the registry.

A replicator keeps one app's data (a SQLite database, a directory, ...) on every node that
runs the app: the active instance replicates, standbys follow, and a node that becomes active
catches up and promotes its copy before the backend starts. Plugins register a replicator
factory per App option class (``pycluster_register_replicators``); the option's plugin
implements `Replicator`.

Behaviour a replicator must guarantee: only the current lease holder replicates (it stops
before ``ctx.deadline`` when the lease is lost, and replication writes carry the epoch so that
an older holder's writes are refused), and a returning node catches up from the shared copy
before it could ever replicate again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ConfigError

if TYPE_CHECKING:
    from .app import App
    from .context import Context
    from .platform import Platform


class Replicator(Protocol):
    """What the kernel needs from the replicator of one option of one app on this node."""

    async def catch_up(self, ctx: Context) -> None:
        """Becoming active: bring the local copy up to the last replicated position."""

    async def promote(self, ctx: Context) -> None:
        """Becoming active: make the caught-up copy the primary one (fenced by ``ctx.epoch``)."""

    async def replicate(self, ctx: Context) -> None:
        """Active: start shipping changes (returns once replication runs)."""

    async def stop_replicating(self, ctx: Context) -> None:
        """Stepping down: stop shipping changes before ``ctx.deadline``."""

    async def follow(self, ctx: Context) -> None:
        """Standby: keep a near-real-time copy (returns once following runs)."""

    async def stop(self) -> None:
        """The app stops on this node: stop following or replicating."""

    def lag(self) -> float | None:
        """Seconds this copy is behind the primary (None: unknown or primary)."""

    def position(self) -> Any:
        """The replicated position of this copy (e.g. a transaction id)."""

    def status(self) -> dict[str, Any]:
        """A JSON-friendly status (shown in ``/status``)."""


ReplicatorFactory = Callable[[Any, "App", "Platform"], Replicator]


@dataclass(frozen=True)
class ReplicatorKind:
    """One registered replicator: the option class it serves and its factory."""

    option_class: type
    factory: ReplicatorFactory
    plugin: str


class ReplicatorRegistry:
    """Option classes mapped to replicator factories (``pycluster_register_replicators``)."""

    def __init__(self) -> None:
        self._kinds: dict[type, ReplicatorKind] = {}

    def add(self, option_class: type, factory: ReplicatorFactory, plugin: str) -> None:
        """Register ``factory(option, app, platform)`` for options of ``option_class``."""
        if option_class in self._kinds:
            raise ConfigError("replicator", option_class.__name__,
                              f"already registered by {self._kinds[option_class].plugin!r}")
        self._kinds[option_class] = ReplicatorKind(option_class, factory, plugin)

    def for_option(self, option: object) -> ReplicatorKind | None:
        """The replicator registered for ``option``'s class (or a base class), if any."""
        for cls in type(option).__mro__:
            if cls in self._kinds:
                return self._kinds[cls]
        return None

    def kinds(self) -> list[ReplicatorKind]:
        """Every registered replicator."""
        return list(self._kinds.values())
