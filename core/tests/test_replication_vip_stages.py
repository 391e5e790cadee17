"""The kernel turns options matched in the replicator and VIP registries into failover stages
(no plugin builds them itself), and an option's handle finds its app through `app_of`."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import pytest

from pycluster import App, ConfigError, Platform, Singleton
from pycluster.kernel.app import app_of
from pycluster.kernel.context import Context
from pycluster.kernel.replication import (
    ReplicationState,
    ReplicationStep,
    ReplicatorRegistry,
    build_replicators,
    replication_stages,
)
from pycluster.kernel.stages import FailurePolicy, StageOrder, StageRegistry
from pycluster.kernel.vip import VipRegistry, build_vips, vip_stages
from pycluster.plugins import create_plugin_manager, hookimpl

pytestmark = pytest.mark.timeout(30)


@dataclass(frozen=True)
class Data:
    path: str


@dataclass(frozen=True)
class Addr:
    address: str


class Snaps:
    async def start(self, ctx: Context) -> None: ...
    async def stop(self, ctx: Context) -> None: ...


class Rep:
    name = "data"

    def __init__(self, option: Data, app: App, platform: Platform, snaps: bool = True) -> None:
        self.option, self.snaps = option, Snaps() if snaps else None

    def timeout(self, step: ReplicationStep) -> float | None:
        return {ReplicationStep.CATCH_UP: 7.0, ReplicationStep.PROMOTE: 8.0}.get(step)

    def snapshots(self) -> Snaps | None:
        return self.snaps

    async def follow(self, ctx: Context) -> None: ...
    async def catch_up(self, ctx: Context) -> None: ...
    async def promote(self, ctx: Context) -> None: ...
    async def replicate(self, ctx: Context) -> None: ...
    async def stop_replicating(self, ctx: Context) -> None: ...
    async def demote(self, ctx: Context) -> None: ...
    async def stop(self) -> None: ...
    def state(self) -> ReplicationState: return ReplicationState.STANDBY
    def lag(self) -> float | None: return 0.5
    def position(self) -> int | None: return 3
    def status(self) -> dict[str, Any]: return {}
    async def check(self) -> dict[str, Any]: return {}


class Vip:
    def __init__(self, option: Addr, app: App, platform: Platform) -> None:
        self.address, self.timeout, self.held = option.address, 3.0, False

    async def acquire(self, ctx: Context) -> None: ...
    async def release(self, ctx: Context) -> None: ...
    async def check(self) -> Any: return None
    async def close(self) -> None: ...


class Plugin:
    @hookimpl
    def pycluster_register_replicators(self, registry: ReplicatorRegistry) -> None:
        registry.add(Data, Rep, plugin="data")

    @hookimpl
    def pycluster_register_vips(self, registry: VipRegistry) -> None:
        registry.add(Addr, Vip, plugin="addr")

    @hookimpl
    def pycluster_claim_option(self, app: App, option: object) -> bool | None:
        return True if isinstance(option, Data | Addr) else None


def platform() -> Platform:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("data", Plugin())])
    return Platform("unit", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)


def test_matched_options_become_the_kernels_stages() -> None:
    p = platform()
    data = Data("/d")
    app = p.register(App("a", Singleton(), data, Addr("10.0.0.9")))
    assert p.app_of(data) is app and platform().app_of(data) is None
    reg = StageRegistry()
    reps, vips = build_replicators(app, p), build_vips(app, p)
    replication_stages(reps, reg)
    vip_stages(vips, reg)
    got = [(s.name, s.order, s.plugin, s.timeout, s.on_failure) for s in reg.ordered()]
    step_down = FailurePolicy.STEP_DOWN
    assert got == [
        ("data-catchup", StageOrder.CATCH_UP, "data", 7.0, step_down),
        ("data-promote", StageOrder.PROMOTE, "data", 8.0, step_down),
        ("vip-10.0.0.9", StageOrder.VIP, "addr", 3.0, step_down),
        ("data-replicate", StageOrder.REPLICATE, "data", None, step_down),
        ("data-snapshots", StageOrder.SNAPSHOTS, "data", None, FailurePolicy.CONTINUE),
    ]
    rep = reps[0].replicator
    assert isinstance(rep, Rep)
    by_name = {s.name: s for s in reg.ordered()}
    # The undo of catch-up is following again; of promotion, demotion; of replication, stop.
    assert by_name["data-catchup"].deactivate == rep.follow
    assert by_name["data-promote"].deactivate == rep.demote
    assert by_name["data-replicate"].deactivate == rep.stop_replicating


def test_a_replicator_without_snapshots_has_no_snapshot_stage() -> None:
    p = platform()
    app = p.register(App("a", Singleton(), Data("/d")))
    reg = StageRegistry()
    reps = build_replicators(app, p)
    assert isinstance(reps[0].replicator, Rep)
    reps[0].replicator.snaps = None
    replication_stages(reps, reg)
    assert [s.name for s in reg.ordered()] == ["data-catchup", "data-promote", "data-replicate"]


def test_an_option_class_is_served_by_one_plugin() -> None:
    reg = ReplicatorRegistry()
    reg.add(Data, Rep, plugin="data")
    with pytest.raises(ConfigError, match="already registered by 'data'"):
        reg.add(Data, Rep, plugin="other")
    vips = VipRegistry()
    vips.add(Addr, Vip, plugin="addr")
    with pytest.raises(ConfigError, match="already registered"):
        vips.add(Addr, Vip, plugin="other")


def test_the_three_registries_share_one_option_kind_registry() -> None:
    """Backends, replicators and VIP managers are matched the same way: by the option's class,
    else its nearest registered base class, in option order."""
    from pycluster.kernel.registry import BackendRegistry, OptionKindRegistry

    class SubData(Data):
        pass

    reps, vips, backends = ReplicatorRegistry(), VipRegistry(), BackendRegistry()
    assert all(isinstance(r, OptionKindRegistry) for r in (reps, vips, backends))
    reps.add(Data, Rep, plugin="data")
    vips.add(Addr, Vip, plugin="addr")
    backends.add("addr", Addr, Vip)
    opts = [Addr("10.0.0.1"), SubData("/s"), object(), Data("/d")]
    assert [(k.plugin, o) for k, o in reps.matches(opts)] == [("data", opts[1]),
                                                              ("data", opts[3])]
    assert [o for _, o in vips.matches(opts)] == [opts[0]]
    assert backends.for_option(opts[0]) is backends.get("addr")
    assert backends.get("addr").plugin == "addr"
    # A backend kind registered again under its name replaces the first.
    backends.add("addr", Data, Rep, plugin="other")
    assert backends.kinds() == ["addr"] and backends.for_option(opts[0]) is None
    assert backends.for_option(opts[1]) is backends.get("addr")
    with pytest.raises(ConfigError, match="no backend 'nope'; installed: addr"):
        backends.get("nope")


def test_app_of_binds_an_option_to_its_first_live_app() -> None:
    opt = Data("/x")
    assert app_of(opt) is None
    first = App("first", opt)
    second = App("second", opt)
    assert app_of(opt) is first and app_of(Data("/x")) is None  # identity, not equality
    del first
    gc.collect()
    assert app_of(opt) is None  # the binding lives as long as the app
    third = App("third", opt)
    assert app_of(opt) is third and second.options == [opt]


def test_option_handles_are_registered_app_attributes() -> None:
    """An option class registered with a handle gives its apps an attribute; no shadowing of
    App's own attributes, no two classes claiming one name."""
    from pycluster.kernel.registry import OptionRegistry

    class Tag:
        pass

    class Other:
        pass

    reg = OptionRegistry()
    reg.add(Tag, "tag", handle=("tag", lambda app: ("tag of", app.name)))
    with pytest.raises(ValueError, match="already has"):
        reg.add(Other, "other", handle=("state", lambda app: None))
    with pytest.raises(ValueError, match="claimed by both"):
        reg.add(Other, "other", handle=("tag", lambda app: None))
    app = App("tagged", Tag())
    assert reg.handle(app, "tag") == ("tag of", "tagged")
    with pytest.raises(AttributeError, match="no attribute 'tag'"):
        reg.handle(App("plain"), "tag")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        reg.handle(app, "nope")
