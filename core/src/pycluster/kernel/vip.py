"""Virtual IPs: the protocol of a VIP manager and the registry that plugins fill.

A VIP manager holds an address on the node where its app is active: it acquires the address
(and announces it, e.g. with gratuitous ARP) when the node becomes active, releases it when
the node steps down (before ``ctx.deadline`` when the lease was lost), and checks that it is
still held. Plugins register a manager factory per App option class
(``pycluster_register_vips``).
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


class VipManager(Protocol):
    """What the kernel needs from the manager of one VIP option of one app on this node."""

    async def acquire(self, ctx: Context) -> None:
        """Becoming active: add the address here and announce it."""

    async def release(self, ctx: Context) -> None:
        """Stepping down: remove the address (before ``ctx.deadline`` when one is set)."""

    async def check(self) -> bool:
        """Whether the address is held here now (cheap; never raises)."""


VipFactory = Callable[[Any, "App", "Platform"], VipManager]


@dataclass(frozen=True)
class VipKind:
    """One registered VIP manager: the option class it serves and its factory."""

    option_class: type
    factory: VipFactory
    plugin: str


class VipRegistry:
    """Option classes mapped to VIP manager factories (``pycluster_register_vips``)."""

    def __init__(self) -> None:
        self._kinds: dict[type, VipKind] = {}

    def add(self, option_class: type, factory: VipFactory, plugin: str) -> None:
        """Register ``factory(option, app, platform)`` for options of ``option_class``."""
        if option_class in self._kinds:
            raise ConfigError("vip", option_class.__name__,
                              f"already registered by {self._kinds[option_class].plugin!r}")
        self._kinds[option_class] = VipKind(option_class, factory, plugin)

    def for_option(self, option: object) -> VipKind | None:
        """The manager registered for ``option``'s class (or a base class), if any."""
        for cls in type(option).__mro__:
            if cls in self._kinds:
                return self._kinds[cls]
        return None

    def kinds(self) -> list[VipKind]:
        """Every registered manager."""
        return list(self._kinds.values())
