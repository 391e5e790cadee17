"""Plugin ``ring``: the `Ring` option, its failover stage, key routing, observability.

Hooks: the option and its config section (``ring:``), the ``own``/``release`` app events, a
``ring`` stage in the failover sequence (an active instance joins the ring; stepping down
leaves it, releasing its partitions first), ``pycluster_route_key`` for ``ForKey`` calls, the
``ring`` audit category, ``/status``, and the ``pycluster ring show`` command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from pycluster import Singleton, Stage, StageOrder, hookimpl
from pycluster.kernel.errors import ConfigError

from .options import WEIGHT_LABEL, Ring
from .runtime import PLUGIN, RingMember
from .service import RingService

if TYPE_CHECKING:
    import click

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.context import Context
    from pycluster.kernel.platform import Platform
    from pycluster.kernel.registry import AppEventRegistry, ConfigRegistry, OptionRegistry
    from pycluster.kernel.services import PlatformServices
    from pycluster.kernel.stages import StageRegistry


def ring_option(app: App) -> Ring | None:
    """The app's `Ring` option, if it has one."""
    return next((o for o in app.options if isinstance(o, Ring)), None)


def ring_of(app: App) -> RingMember:
    """The ring of ``app`` on this node: ``owner(key)``, ``owns(key)``, ``partition(key)``,
    ``partitions(node)``, ``assignment()``, ``epoch``, ``wait_stable(timeout)``, ``stats()``.

    :raises RuntimeError: the app has no `Ring` option, or this node is not (yet) an active
        instance of it.
    """
    if ring_option(app) is None:
        raise RuntimeError(f"app {app.name!r} has no Ring option")
    m = app.state(PLUGIN).get("member")
    if not isinstance(m, RingMember):
        raise RuntimeError(f"app {app.name!r}: this node is not an active ring member (yet)")
    return m


def ring_metrics(platform: Platform) -> dict[str, Any] | None:
    """The ring's Prometheus metrics of ``platform`` (None without the metrics plugin)."""
    svc = platform.services.get(PLUGIN)
    return svc.metrics if isinstance(svc, RingService) else None


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `Ring` option."""
    registry.add(Ring, plugin=PLUGIN, handle=("ring", ring_of))


@hookimpl
def pycluster_claim_option(app: App, option: Any) -> bool | None:
    """Claim `Ring` options; refuse Singleton apps and a second Ring."""
    if not isinstance(option, Ring):
        return None
    if isinstance(app.mode, Singleton):
        raise ConfigError(f"App({app.name!r}) Ring", option,
                          "a ring needs several instances: use Spread() or Replicas(n), "
                          "not Singleton")
    if sum(1 for o in app.options if isinstance(o, Ring)) > 1:
        raise ConfigError(f"App({app.name!r}) Ring", option, "give at most one Ring option")
    return True


@hookimpl
def pycluster_app_events(registry: AppEventRegistry) -> None:
    """The ring fires ``on_own`` and ``on_release``."""
    registry.add("own", PLUGIN)
    registry.add("release", PLUGIN)


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """The ring service (metrics, owner caches of remote rings)."""
    registry.add(PLUGIN, lambda: RingService(platform), after=("metrics", "audit"))


@hookimpl
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """Join the ring once active (just before ``on_active``); leave it on stepping down."""
    opt = ring_option(app)
    if opt is None:
        return
    hook_timeout = app.election_options.hook_timeout or platform.settings.hook_timeout
    lease_ttl = app.election_options.lease_ttl or platform.settings.lease_ttl
    release = opt.release_timeout or hook_timeout
    st = app.state(PLUGIN)

    async def activate(ctx: Context) -> None:
        member = RingMember(app, platform, opt)
        st["member"] = member
        await member.start()

    async def deactivate(ctx: Context) -> None:
        member = st.get("member")
        if isinstance(member, RingMember):
            try:
                await member.stop(ctx.deadline)
            finally:
                st.pop("member", None)

    registry.add(Stage(
        name="ring", order=StageOrder.APP_HOOKS - 1, activate=activate, deactivate=deactivate,
        timeout=release + opt.settle + 2 * lease_ttl + 5.0, plugin=PLUGIN,
    ))


@hookimpl
def pycluster_route_key(app_name: str, key: str, platform: Platform) -> str | None:
    """The owner of ``key`` in ring ``app_name`` (this node's ring, or a followed one)."""
    svc = platform.services.get(PLUGIN)
    if not isinstance(svc, RingService):
        return None
    return svc.route(app_name, key)


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``ring`` audit category."""
    registry.add(PLUGIN, {
        "lease_acquired": "this node took a new ownership lease (data: inc)",
        "coordinator": "this node became the ring's coordinator",
        "rebalance": "the coordinator published an assignment (data: members, moved)",
        "own": "this node claimed partitions and runs on_own (data: partitions, epoch)",
        "own_failed": "on_own failed or timed out; the partitions were given back (data: "
                      "partitions, error, backoff)",
        "release": "this node gave partitions up (data: partitions, reason)",
        "release_timeout": "on_release overran its timeout; the node stopped acting for the "
                           "partitions and gave them up anyway (data: partitions, error)",
        "release_failed": "on_release raised; the partitions were given up anyway",
        "drain": "this node was drained: its partitions move to the other members",
        "undrain": "this node takes partitions again after a drain",
        "fenced": "the ownership lease ran out; the node stopped acting for its partitions at "
                  "once (data: reason, partitions)",
    }, plugin=PLUGIN)


@hookimpl
def pycluster_status(platform: Platform) -> dict[str, Any] | None:
    """``/status``: this node's partitions per ring app."""
    out: dict[str, Any] = {}
    for app in platform.apps.values():
        m = app.state(PLUGIN).get("member")
        if isinstance(m, RingMember):
            s = m.stats()
            out[app.name] = {"partitions": s["mine"], "epoch": s["epoch"],
                             "lease_valid": s["lease_valid"], "stable": s["stable"],
                             "members": s["members"]}
    return out or None


class RingSection(BaseModel):
    """The ``ring:`` section of an app in a config file."""

    model_config = ConfigDict(extra="forbid")
    partitions: int = 64
    own_timeout: float | None = None
    release_timeout: float | None = None
    settle: float = 1.0
    min_interval: float = 0.5
    weight_label: str = WEIGHT_LABEL


def ring_from_section(section: RingSection) -> Ring:
    """A `Ring` option from a validated ``ring:`` section."""
    return Ring(**section.model_dump())


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``ring:`` section of an app."""
    registry.add(PLUGIN, RingSection, ring_from_section)


@hookimpl
def pycluster_add_cli_commands(cli: click.Group) -> None:
    """``pycluster ring show APP``."""
    from .cli import ring_group

    cli.add_command(ring_group)
