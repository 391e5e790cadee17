r"""Virtual IPs: the protocol of a VIP manager and the registry that plugins fill.

A VIP manager holds an address on the node where its app is active: it acquires the address
(and announces it, e.g. with gratuitous ARP) when the node becomes active, releases it when
the node steps down (before ``ctx.deadline`` when the lease was lost), and checks that it is
still held. Plugins register a manager factory per App option class
(``pycluster_register_vips``); for every option of an app matched in that registry the kernel
builds the manager when the app starts on this node and adds its stage ``vip-<address>``
(`StageOrder.VIP`: acquired after promotion and before the backend starts, released after the
backend stopped), then ``close``\ s it when the app stops here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .registry import OptionKind, OptionKindRegistry
from .stages import Stage, StageOrder, StageRegistry

if TYPE_CHECKING:
    from .app import App
    from .context import Context
    from .platform import Platform


class VipManager(Protocol):
    """What the kernel needs from the manager of one VIP option of one app on this node.

    ``acquire`` and ``release`` are bounded by ``timeout`` (the app's hook timeout when None);
    ``release`` additionally by the lease's end (``ctx.deadline``) when the lease was lost, so
    it must be local and quick: the address is gone before another node can be elected.
    """

    @property
    def address(self) -> str:
        """The address (the stage is named ``vip-<address>``)."""

    @property
    def timeout(self) -> float | None:
        """Seconds ``acquire`` and ``release`` may take (None: the app's hook timeout)."""

    @property
    def held(self) -> bool:
        """Whether this node holds the address now (from memory)."""

    async def acquire(self, ctx: Context) -> None:
        """Becoming active (epoch ``ctx.epoch``): add the address here and announce it; keep
        it (heal, re-announce) until `release`. Raises when the address cannot be added."""

    async def release(self, ctx: Context) -> None:
        """Stepping down: stop watching and remove the address (before ``ctx.deadline`` when
        one is set). Never raises for an address that is already gone."""

    async def check(self) -> Any:
        """Check the address on this node now (present, link up, no conflict); returns a
        status object, never raises."""

    async def close(self) -> None:
        """The app stops on this node: release what is left (sockets, tasks)."""


VipFactory = Callable[[Any, "App", "Platform"], VipManager]


@dataclass(frozen=True)
class VipKind(OptionKind):
    """One registered VIP manager: the option class it serves and its factory."""


class VipRegistry(OptionKindRegistry[VipKind]):
    """Option classes mapped to VIP manager factories (``pycluster_register_vips``)."""

    what = "vip"

    def add(self, option_class: type, factory: VipFactory, plugin: str) -> None:
        """Register ``factory(option, app, platform)`` for options of ``option_class``."""
        self.register(VipKind(option_class, factory, plugin))

    def kinds(self) -> list[VipKind]:
        """Every registered manager."""
        return self.all()


@dataclass(frozen=True)
class AppVip:
    """A VIP manager built for one option of an app on this node."""

    option: object
    plugin: str
    manager: VipManager


def build_vips(app: App, platform: Platform) -> list[AppVip]:
    """A manager for every option of ``app`` matched in the platform's VIP registry."""
    return [AppVip(opt, kind.plugin, manager)
            for kind, opt, manager in platform.vips.build(app, platform)]


def vip_stages(vips: list[AppVip], registry: StageRegistry) -> None:
    """The stage ``vip-<address>`` (`StageOrder.VIP`) of each manager."""
    for av in vips:
        m = av.manager
        registry.add(Stage(f"vip-{m.address}", StageOrder.VIP, m.acquire, m.release,
                           timeout=m.timeout, plugin=av.plugin))
