"""The coordinator's failover sequence and its failure policies, with in-process platforms on a
real NATS server and a tiny plugin whose stages record what they are asked to do."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from pycluster import App, ConfigError, Context, Singleton, Spread, Stage, StageOrder, hookimpl
from pycluster.kernel import coordinator as coordinator_mod
from pycluster.kernel.stages import FailurePolicy, StageEvent
from pycluster.testing import wait_for

pytestmark = pytest.mark.timeout(90)


@dataclass
class Spec:
    """How one recorded stage behaves."""

    name: str
    order: int
    fail_on: set[str] = field(default_factory=set)  # nodes where activate raises
    fail_times: int = 0  # activate raises the first N times (on any node)
    hang_on: set[str] = field(default_factory=set)  # nodes where activate never returns
    undo_fails: bool = False
    undo_hangs: bool = False
    timeout: float | None = None
    on_failure: FailurePolicy = FailurePolicy.STEP_DOWN
    retries: int = 0
    retry_delay: float = 1.0


class Recorder:
    """A plugin adding stages that append ``(node, app, action, stage, epoch)`` to ``calls``."""

    def __init__(self, calls: list[tuple[Any, ...]], *specs: Spec) -> None:
        self.calls = calls
        self.specs = specs
        self.activations: dict[str, int] = {}

    def _stage(self, spec: Spec, app: App) -> Stage:
        async def activate(ctx: Context) -> None:
            self.calls.append((ctx.node_id, app.name, "activate", spec.name, ctx.epoch))
            n = self.activations[spec.name] = self.activations.get(spec.name, 0) + 1
            if ctx.node_id in spec.hang_on:
                await asyncio.sleep(3600)
            if ctx.node_id in spec.fail_on or n <= spec.fail_times:
                raise RuntimeError(f"{spec.name} broken on {ctx.node_id}")

        async def deactivate(ctx: Context) -> None:
            self.calls.append((ctx.node_id, app.name, "deactivate", spec.name, ctx.epoch))
            if spec.undo_hangs:
                await asyncio.sleep(3600)
            if spec.undo_fails:
                raise RuntimeError(f"{spec.name} cannot be undone")

        return Stage(spec.name, spec.order, activate, deactivate, timeout=spec.timeout,
                     plugin="recorder", on_failure=spec.on_failure, retries=spec.retries,
                     retry_delay=spec.retry_delay)

    @hookimpl
    def pycluster_stages(self, app: App, platform: Any, registry: Any) -> None:
        for spec in self.specs:
            registry.add(self._stage(spec, app))


def recorded_app(calls: list[tuple[Any, ...]], name: str = "svc") -> App:
    """An app whose on_active / on_passive hooks are recorded too."""
    app = App(name, Singleton())

    @app.on_active
    async def active(ctx: Context) -> None:
        calls.append((ctx.node_id, name, "activate", "on_active", ctx.epoch))

    @app.on_passive
    async def passive(ctx: Context) -> None:
        calls.append((ctx.node_id, name, "passive", "on_passive", ctx.epoch))

    @app.on_stop
    async def stop(ctx: Context) -> None:
        calls.append((ctx.node_id, name, "stop", "on_stop", ctx.epoch))

    return app


def steps(calls: list[tuple[Any, ...]], node: str, app: str = "svc",
          actions: tuple[str, ...] = ("activate", "deactivate", "passive")) -> list[str]:
    return [f"{c[2]}:{c[3]}" for c in calls if c[0] == node and c[1] == app and c[2] in actions]


SEQUENCE = [
    Spec("replication", StageOrder.REPLICATE),  # registered out of order on purpose
    Spec("catch-up", StageOrder.CATCH_UP),
    Spec("vip", StageOrder.VIP),
    Spec("backend", StageOrder.BACKEND),
]


async def test_order_on_activation_and_reverse_on_step_down(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[("rec", Recorder(calls, *SEQUENCE))])
    await wait_for(lambda: app.is_active, 15)
    epoch = app.epoch
    assert steps(calls, "n1") == [
        "passive:on_passive",  # settles as standby first
        "activate:catch-up", "activate:vip", "activate:backend", "activate:replication",
        "activate:on_active",
    ]
    # Every stage saw the fencing token of this leadership.
    assert {c[4] for c in calls if c[2] == "activate"} == {epoch}
    del calls[:]
    await app.step_down(cooldown=30)
    assert steps(calls, "n1") == [
        "deactivate:replication", "deactivate:backend", "deactivate:vip", "deactivate:catch-up",
        "passive:on_passive",
    ]
    assert {c[4] for c in calls if c[2] == "deactivate"} == {epoch}
    rt = p.runtimes["svc"]
    assert [(e.stage, e.action, e.outcome) for e in rt.stage_events[-5:]] == [
        ("app-hooks", "deactivate", "ok"), ("replication", "deactivate", "ok"),
        ("backend", "deactivate", "ok"), ("vip", "deactivate", "ok"),
        ("catch-up", "deactivate", "ok"),
    ]


async def test_failing_stage_undoes_in_reverse_steps_down_and_other_takes_over(
    make_platform: Any,
) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP), Spec("backend", StageOrder.BACKEND, fail_on={"n1"}),
             Spec("replication", StageOrder.REPLICATE)]
    a1, a2 = recorded_app(calls), recorded_app(calls)
    p1 = await make_platform("n1", a1, extra_plugins=[("rec", Recorder(calls, *specs))])
    rt = p1.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "failed" for e in rt.stage_events), 15)
    await make_platform("n2", a2, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a2.is_active, 15)
    # n1: VIP and backend ran, the backend failed: both undone in reverse, replication never ran.
    assert steps(calls, "n1")[:6] == [
        "passive:on_passive", "activate:vip", "activate:backend",
        "deactivate:backend", "deactivate:vip", "passive:on_passive",
    ]
    assert not a1.is_active
    failed = [e for e in rt.stage_events if e.outcome == "failed"]
    assert failed[0].stage == "backend" and failed[0].policy == "step_down"
    assert failed[0].backoff == coordinator_mod.BACKOFF_START
    assert "broken on n1" in failed[0].error
    # n2 ran the whole sequence with a newer epoch: the fencing token moved on.
    assert steps(calls, "n2")[-4:] == ["activate:vip", "activate:backend",
                                        "activate:replication", "activate:on_active"]
    e1 = next(c[4] for c in calls if c[0] == "n1" and c[2] == "activate")
    e2 = next(c[4] for c in calls if c[0] == "n2" and c[2] == "activate")
    assert e2 > e1 and a2.epoch == e2


@pytest.mark.slow
async def test_back_off_doubles_after_each_failed_activation(
    make_platform: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coordinator_mod, "BACKOFF_START", 0.3)
    calls: list[tuple[Any, ...]] = []
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[
        ("rec", Recorder(calls, Spec("backend", StageOrder.BACKEND, fail_on={"n1"})))])
    rt = p.runtimes["svc"]

    def failures() -> list[StageEvent]:
        return [e for e in rt.stage_events if e.outcome == "failed"]

    await wait_for(lambda: len(failures()) >= 4, 30)
    f = failures()
    assert [e.backoff for e in f[:4]] == [0.3, 0.6, 1.2, 2.4]
    # Each retry came no sooner than the back-off of the failure before it.
    for prev, nxt in itertools.pairwise(f[:4]):
        assert nxt.at - prev.at >= prev.backoff * 0.9  # type: ignore[operator]
    assert not app.is_active


async def test_spread_app_retries_a_failed_activation_after_the_back_off(
    make_platform: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(coordinator_mod, "BACKOFF_START", 0.2)
    calls: list[tuple[Any, ...]] = []
    app = App("svc", Spread())
    p = await make_platform("n1", app, extra_plugins=[
        ("rec", Recorder(calls, Spec("backend", StageOrder.BACKEND, fail_times=2)))])
    await wait_for(lambda: app.is_active, 15)
    evs = [(e.outcome, e.backoff) for e in p.runtimes["svc"].stage_events
           if e.action == "activate"]
    assert evs[:2] == [("failed", 0.2), ("failed", 0.4)]
    assert steps(calls, "n1") == ["activate:backend", "deactivate:backend"] * 2 + [
        "activate:backend"]


@pytest.mark.slow
async def test_hanging_stage_times_out_and_is_undone(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP),
             Spec("backend", StageOrder.BACKEND, hang_on={"n1"}, timeout=0.5)]
    a1, a2 = recorded_app(calls), recorded_app(calls)
    p1 = await make_platform("n1", a1, extra_plugins=[("rec", Recorder(calls, *specs))])
    rt = p1.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "timeout" for e in rt.stage_events), 15)
    ev = next(e for e in rt.stage_events if e.outcome == "timeout")
    assert (ev.stage, ev.action, ev.policy) == ("backend", "activate", "step_down")
    assert "timed out after 0.5s" in ev.error
    await wait_for(lambda: "deactivate:vip" in steps(calls, "n1"), 10)
    assert steps(calls, "n1")[1:5] == ["activate:vip", "activate:backend",
                                       "deactivate:backend", "deactivate:vip"]
    await make_platform("n2", a2, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a2.is_active, 15)
    assert not a1.is_active


async def test_retry_policy_retries_the_stage_then_succeeds(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    vip = Spec("vip", StageOrder.VIP, fail_times=2, on_failure=FailurePolicy.RETRY, retries=3,
               retry_delay=0.1)
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[
        ("rec", Recorder(calls, Spec("catch-up", StageOrder.CATCH_UP), vip))])
    await wait_for(lambda: app.is_active, 15)
    assert steps(calls, "n1") == [
        "passive:on_passive", "activate:catch-up",
        "activate:vip", "deactivate:vip",  # failed once: undone alone, retried
        "activate:vip", "deactivate:vip",  # failed twice
        "activate:vip", "activate:on_active",
    ]
    evs = [(e.attempt, e.outcome, e.policy) for e in p.runtimes["svc"].stage_events
           if e.stage == "vip" and e.action == "activate"]
    assert evs == [(1, "failed", "retry"), (2, "failed", "retry"), (3, "ok", "")]


async def test_retry_policy_exhausted_steps_down(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    vip = Spec("vip", StageOrder.VIP, fail_on={"n1"}, on_failure=FailurePolicy.RETRY,
               retries=1, retry_delay=0.05)
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[("rec", Recorder(calls, vip))])
    rt = p.runtimes["svc"]
    await wait_for(lambda: any(e.policy == "step_down" for e in rt.stage_events), 15)
    evs = [(e.attempt, e.policy) for e in rt.stage_events if e.stage == "vip"
           and e.action == "activate"]
    assert evs[:2] == [(1, "retry"), (2, "step_down")]
    await wait_for(lambda: steps(calls, "n1")[-1:] == ["passive:on_passive"], 10)
    assert not app.is_active


async def test_continue_policy_carries_on_past_an_optional_stage(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP),
             Spec("snapshots", StageOrder.SNAPSHOTS, fail_on={"n1"},
                  on_failure=FailurePolicy.CONTINUE)]
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: app.is_active, 15)
    assert steps(calls, "n1")[1:] == ["activate:vip", "activate:snapshots", "activate:on_active"]
    ev = next(e for e in p.runtimes["svc"].stage_events if e.stage == "snapshots")
    assert (ev.outcome, ev.policy) == ("failed", "continue")
    del calls[:]
    await app.step_down(cooldown=30)
    assert steps(calls, "n1") == ["deactivate:snapshots", "deactivate:vip", "passive:on_passive"]


async def test_failed_or_hanging_undo_does_not_block_the_step_down(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP),
             Spec("backend", StageOrder.BACKEND, undo_fails=True),
             Spec("replication", StageOrder.REPLICATE, undo_hangs=True, timeout=0.5)]
    a1, a2 = recorded_app(calls), recorded_app(calls)
    p1 = await make_platform("n1", a1, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a1.is_active, 15)
    await make_platform("n2", a2, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a2.leader == "n1", 10)
    del calls[:]
    await a1.step_down(cooldown=30)
    assert steps(calls, "n1") == ["deactivate:replication", "deactivate:backend",
                                  "deactivate:vip", "passive:on_passive"]
    evs = {e.stage: e.outcome for e in p1.runtimes["svc"].stage_events
           if e.action == "deactivate"}
    assert evs == {"app-hooks": "ok", "replication": "timeout", "backend": "failed", "vip": "ok"}
    await wait_for(lambda: a2.is_active, 15)


async def test_lease_taken_over_interrupts_a_running_stage(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP),
             Spec("backend", StageOrder.BACKEND, hang_on={"n1"}, timeout=60)]
    app = recorded_app(calls)
    p = await make_platform("n1", app, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: "activate:backend" in steps(calls, "n1"), 15)
    # Someone else's write replaces the lease (as a takeover would): the next renewal fails its
    # compare-and-set, the node loses the lease and must abandon the activation at once.
    assert p.js is not None
    kv = await p.js.key_value(f"{p.name}_svc_election")
    await kv.put("leader", b'{"node":"intruder"}')
    rt = p.runtimes["svc"]
    await wait_for(lambda: any(e.outcome == "cancelled" for e in rt.stage_events), 15)
    await wait_for(lambda: "deactivate:vip" in steps(calls, "n1"), 10)
    assert steps(calls, "n1")[1:5] == ["activate:vip", "activate:backend",
                                       "deactivate:backend", "deactivate:vip"]
    assert not app.is_active


async def test_report_failure_while_active_steps_down_to_the_standby(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    specs = [Spec("vip", StageOrder.VIP), Spec("backend", StageOrder.BACKEND)]
    a1, a2 = recorded_app(calls), recorded_app(calls)
    p1 = await make_platform("n1", a1, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a1.is_active, 15)
    await make_platform("n2", a2, extra_plugins=[("rec", Recorder(calls, *specs))])
    await wait_for(lambda: a2.leader == "n1", 10)
    p1.runtimes["svc"].report_failure("backend", "service crashed for good")
    await wait_for(lambda: a2.is_active, 15)
    assert "deactivate:vip" in steps(calls, "n1")
    ev = next(e for e in p1.runtimes["svc"].stage_events if e.action == "running")
    assert (ev.stage, ev.outcome, ev.policy, ev.error) == (
        "backend", "failed", "step_down", "service crashed for good")


async def test_graceful_shutdown_runs_the_reverse_sequence_for_every_active_app(
    make_platform: Any,
) -> None:
    calls: list[tuple[Any, ...]] = []
    apps = [recorded_app(calls, "alpha"), recorded_app(calls, "beta")]
    p = await make_platform("n1", *apps, start=False,
                            extra_plugins=[("rec", Recorder(calls, *SEQUENCE))])
    await p.start()
    try:
        await wait_for(lambda: all(a.is_active for a in apps), 15)
    finally:
        del calls[:]
        await p.stop()
    reverse = ["deactivate:replication", "deactivate:backend", "deactivate:vip",
               "deactivate:catch-up", "passive:on_passive", "stop:on_stop"]
    every = ("activate", "deactivate", "passive", "stop")
    assert steps(calls, "n1", "alpha", every) == reverse
    assert steps(calls, "n1", "beta", every) == reverse
    # Apps leave one after the other, the last registered first.
    assert [c[1] for c in calls][:1] == ["beta"] and calls[-1][1] == "alpha"


class Observer:
    """A plugin that records stage events and lease renewals through their hooks."""

    def __init__(self) -> None:
        self.seen: list[StageEvent] = []
        self.renewals: list[float] = []

    @hookimpl
    def pycluster_stage_event(self, app: App, event: StageEvent) -> None:
        self.seen.append(event)

    @hookimpl
    def pycluster_lease_renewed(self, app: App, deadline: float) -> None:
        self.renewals.append(deadline)


async def test_hooks_see_stage_events_and_lease_renewals(make_platform: Any) -> None:
    calls: list[tuple[Any, ...]] = []
    app = recorded_app(calls)
    obs = Observer()
    p = await make_platform("n1", app, start=False,
                            extra_plugins=[("rec", Recorder(calls, Spec("vip", StageOrder.VIP))),
                                           ("obs", obs)])
    seen, renewals = obs.seen, obs.renewals
    await p.start()
    rt = p.runtimes["svc"]
    await wait_for(lambda: app.is_active, 15)
    await wait_for(lambda: len(renewals) >= 3, 10)
    assert renewals == sorted(renewals) and renewals[-1] > time.monotonic()
    assert rt.lease_deadline() is not None and rt.fence_margin > 0
    assert [(e.stage, e.outcome) for e in seen if e.action == "activate"][:1] == [("vip", "ok")]


def test_stage_policy_is_validated() -> None:
    async def noop(ctx: Context) -> None:
        return None

    assert Stage("s", 1, noop, noop, on_failure="retry").on_failure is FailurePolicy.RETRY  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be one of step_down, retry, continue"):
        Stage("s", 1, noop, noop, on_failure="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must not be negative"):
        Stage("s", 1, noop, noop, retries=-1)
