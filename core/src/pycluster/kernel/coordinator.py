"""The coordinator: runs one app's failover sequence on this node.

Becoming active: win the election, then every stage in ascending order (plugins join at their
`StageOrder`: catch-up, promote, VIP, backend, replication, snapshots), then the app's
``on_active`` hooks. Stepping down runs the completed stages in reverse, then ``on_passive``.

Policies:
* Every stage and hook has a timeout (the stage's own or the app's ``hook_timeout``).
* A stage or ``on_active`` hook that fails or times out is handled by the stage's
  `FailurePolicy`: STEP_DOWN (the default: undo what ran in reverse order, release the lease,
  back off (doubling, capped) and campaign again later), RETRY (undo the stage, run it again a
  few times, then STEP_DOWN) or CONTINUE (optional stages). A node is never "leader but not
  really active": ``app.is_active`` turns True only after the whole sequence completed.
* A stage's ``deactivate`` that fails or times out is logged and reported; the reverse sequence
  goes on (a step-down never hangs), each call bounded by the lease's end when it was lost.
* A component that fails while active (a backend that cannot be restarted) calls
  `AppRuntime.report_failure`: the node steps down with back-off so that a standby takes over.
* Everything that happens is reported through notification hooks, never to listeners kept
  here: every stage call as a `StageEvent` (``pycluster_stage_event``: audit, metrics, spans),
  role changes (``pycluster_role_transition``, ``pycluster_role_changed``), lease renewals
  (``pycluster_lease_renewed``: fence guards, the systemd watchdog), the observed leader and
  its signs of life, and every app hook run (``pycluster_app_hook_call``).
* Losing the lease (taken over, renewal failures, paused past the lease) interrupts activation
  and deactivates against the lease's end (``ctx.deadline``).
* Transitions are serialised: one worker reconciles the wanted role with the current one.

Size: one state machine (the worker that reconciles the wanted role) and the stage runner
it drives; their invariants span the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from ..plugins import call_each
from . import backends
from .aio import cancel_and_wait, supervise
from .context import Context
from .errors import ConfigError
from .names import validate_ident
from .replication import AppReplicator, build_replicators, replication_stages
from .stages import (
    FailurePolicy,
    Stage,
    StageAction,
    StageEvent,
    StageOrder,
    StageOutcome,
    StageRegistry,
)
from .types import Role
from .vip import AppVip, build_vips, vip_stages

if TYPE_CHECKING:
    from .app import App
    from .election import Election
    from .kv import AppKV
    from .locks import LockService
    from .platform import Platform

log = logging.getLogger("pycluster.coordinator")

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


def check_step_down(app: str, leader: str, members: Mapping[str, Any],
                    successor: str | None, cooldown: float | None,
                    max_cooldown: float | None = None) -> None:
    """Refuse a step-down that cannot do what it asks, with a `ConfigError` saying why.

    Checked where a step-down is asked for (the CLI, `App.step_down`) and where it is executed
    (the leader, on its control subject). A negative cooldown means nothing; a successor that
    is not a live node able to lead ``app`` would never take over (the old leader would win
    again with a new epoch: a pointless restart of its backends), and neither would naming the
    leader itself.

    :param leader: the node stepping down (the current leader).
    :param members: live node records by node id (`Membership.members`), each with ``apps``.
    :param max_cooldown: the longest cooldown accepted (the leader knows its lease:
        ``max(60, 10 x lease_ttl)``); a longer one would keep the node out of the election
        for good.
    """
    if cooldown is not None and (isinstance(cooldown, bool) or not isinstance(cooldown, int | float)
                                 or not math.isfinite(cooldown) or cooldown < 0):
        raise ConfigError("cooldown", cooldown, "must be a number of seconds >= 0")
    if cooldown is not None and max_cooldown is not None and cooldown > max_cooldown:
        raise ConfigError("cooldown", cooldown, f"must be at most {max_cooldown:g} seconds")
    if successor is None:
        return
    if not isinstance(successor, str):
        raise ConfigError("successor", successor, "must be a node id (a string)")
    validate_ident("successor", successor)
    if successor == leader:
        raise ConfigError("successor", successor,
                          f"is the node stepping down (the leader of app {app!r}); it would "
                          "only win again with a new epoch: name another node, or none")
    rec = members.get(successor)
    if rec is None:
        live = ", ".join(sorted(n for n in members if n != leader)) or "none"
        raise ConfigError("successor", successor,
                          f"is not a live node of this platform (other live nodes: {live})")
    apps = rec.get("apps") if isinstance(rec, Mapping) else None
    state = apps.get(app) if isinstance(apps, Mapping) else None
    state = state if isinstance(state, Mapping) else {}
    if state.get("eligible") is not True:
        raise ConfigError("successor", successor,
                          f"does not run app {app!r} (not registered there, or its placement "
                          "excludes that node)")
    if state.get("no_failover", False) is not False:
        raise ConfigError("successor", successor, f"never leads app {app!r} (no_failover)")


A, Out = StageAction, StageOutcome


async def _bounded(aw: Awaitable[None], timeout: float) -> None:
    """Await ``aw`` within ``timeout`` seconds (`TimeoutError` after)."""
    async with asyncio.timeout(timeout):
        await aw


async def _noop(ctx: Context) -> None:
    return None


class StageFailed(Exception):
    """A stage or hook failed or timed out during activation."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")


class _LeaseLost(StageFailed):
    """The lease was lost while a stage ran (`AppRuntime.lost` cancelled it)."""


async def run_hooks(
    hooks: list[Callable[..., Awaitable[Any]]], ctx: Context, timeout: float, what: str,
    raise_errors: bool,
) -> None:
    """Run app hooks in registration order, each bounded by ``timeout`` and wrapped in the
    context managers of ``pycluster_app_hook_call`` (spans, durations, failure records)."""
    hook_call = ctx.platform.pm.hook.pycluster_app_hook_call
    for fn in hooks:
        try:
            with contextlib.ExitStack() as stack:
                for cm in call_each(hook_call, what, app=ctx.app, hook=what,
                                    function=fn.__name__):
                    stack.enter_context(cm)
                async with asyncio.timeout(timeout):  # wait_for can swallow a cancel on 3.11
                    await fn(ctx)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"{what} hook {fn.__name__} timed out after {timeout}s")
            if raise_errors:
                raise StageFailed(f"{what}:{fn.__name__}", exc) from exc
            log.exception("app %s: %s hook %s failed", ctx.app.name, what, fn.__name__)


class AppRuntime:
    """The per-node state machine of one app (what ``App`` delegates to once started)."""

    def __init__(
        self,
        app: App,
        platform: Platform,
        *,
        election: Election | None,
        kv: AppKV,
        locks: LockService,
        hook_timeout: float,
        cooldown: float,
    ) -> None:
        self.app = app
        self.platform = platform
        self.election = election
        self.kv = kv
        self.locks = locks
        self.hook_timeout = hook_timeout
        self.cooldown = cooldown
        self.role = Role.STOPPED
        self.stages: list[Stage] = []
        self.active_epoch: int | None = None
        self.last_transition: dict[str, Any] = {}
        self.history: list[tuple[float, str, int | None, str]] = []  # (wall time, role, epoch, why)
        self._want_active = False
        self._want_reason = ""
        self._lease_deadline: float | None = None
        self._activated: list[Stage] = []
        self._changed = asyncio.Event()
        self._active_event = asyncio.Event()
        self._role_event = asyncio.Event()  # set on every role change
        self._worker: asyncio.Task[None] | None = None
        self._backoff = BACKOFF_START
        self._stopping = False
        self._obs_leader: str | None = None
        self._obs_epoch: int | None = None
        self._stage_task: asyncio.Future[None] | None = None
        self._release_task: asyncio.Future[None] | None = None
        self.stage_events: list[StageEvent] = []  # the last 200, for status and tests
        self._hooks = platform.pm.hook
        # The app's options matched in the replicator and VIP registries (kernel/replication.py,
        # kernel/vip.py): built here, driven at their stages, stopped with the app.
        self.replicators: list[AppReplicator] = build_replicators(app, platform)
        self.vips: list[AppVip] = build_vips(app, platform)

    # -- state -------------------------------------------------------------------------------

    @property
    def is_active(self) -> bool:
        """Active, and (when elected) still within the lease."""
        if self.role is not Role.ACTIVE:
            return False
        return self.election is None or self.election.is_leader

    @property
    def leader(self) -> str | None:
        """Observed leader."""
        if self.election is None:
            return self.platform.node_id if self.role is Role.ACTIVE else None
        return self.election.leader

    @property
    def epoch(self) -> int | None:
        """Current epoch (ours when active)."""
        if self.election is None:
            return None
        return self.election.epoch

    def state(self, plugin: str) -> dict[str, Any]:
        """Per-app plugin state: ``app.state(plugin)`` (see `pycluster.kernel.app.App.state`)."""
        return self.app.state(plugin)

    def ctx(self, reason: str = "", deadline: float | None = None) -> Context:
        """A context for hooks and stages."""
        return Context(
            app=self.app, platform=self.platform, node_id=self.platform.node_id,
            epoch=self.active_epoch if self.role is not Role.PASSIVE else self.epoch,
            leader=self.leader, reason=reason, deadline=deadline,
        )

    # -- building ----------------------------------------------------------------------------

    def build_stages(self) -> None:
        """Collect the failover stages from plugins, plus the app's own hooks stage."""
        reg = StageRegistry()
        replication_stages(self.replicators, reg)
        vip_stages(self.vips, reg)
        self.platform.pm.hook.pycluster_stages(app=self.app, platform=self.platform, registry=reg)
        for stage in backends.stages(self.platform, self.app):  # the backend registry's kinds
            reg.add(stage)

        async def activate(ctx: Context) -> None:
            await run_hooks(self.app.hooks("active"), ctx, self.hook_timeout, "on_active", True)

        async def deactivate(ctx: Context) -> None:
            return None  # on_passive runs after the whole reverse sequence

        reg.add(Stage("app-hooks", StageOrder.APP_HOOKS, activate, deactivate, plugin="core"))
        self.stages = reg.ordered()

    # -- election listener -------------------------------------------------------------------

    def elected(self, key: str, epoch: int) -> None:
        """Election callback: we won."""
        self._want_active, self._want_reason = True, f"elected ({key})"
        self._lease_deadline = None
        self._changed.set()

    def lost(self, key: str, epoch: int, reason: str) -> None:
        """Election callback: lease gone; deactivate before the lease's server-side end."""
        self._want_active, self._want_reason = False, reason
        if self.election is not None:
            ttl, margin = self.election.lease_ttl, self.election.fence_margin
            self._lease_deadline = time.monotonic() + margin + max(0.0, -ttl % 1.0)
        self._changed.set()
        self._interrupt_activation()

    def renewed(self, deadline: float) -> None:
        """Election callback: the lease was won or renewed; ``deadline`` is its local end."""
        backends.renewed(self.platform, self.app, deadline)  # their fence guards
        call_each(self._hooks.pycluster_lease_renewed, "lease renewed", app=self.app,
                  deadline=deadline)

    def leader_alive(self, leader: str, epoch: int | None) -> None:
        """Election callback: a sign of life of the holder (another node) was seen."""
        call_each(self._hooks.pycluster_leader_alive, "leader alive", app=self.app,
                  leader=leader, epoch=epoch)

    def lease_deadline(self) -> float | None:
        """Monotonic instant at which this node's lease ends (None: no lease, or no election)."""
        return self.election.lease_deadline() if self.election is not None else None

    @property
    def fence_margin(self) -> float:
        """Seconds between the local lease deadline and the earliest takeover by another node."""
        return self.election.fence_margin if self.election is not None else 0.0

    def observed(self, leader: str | None, epoch: int | None) -> None:
        """Election callback: the observed leader changed."""
        if (leader, epoch) == (self._obs_leader, self._obs_epoch):
            return
        self._obs_leader, self._obs_epoch = leader, epoch
        call_each(self._hooks.pycluster_leader_observed, "leader observed", app=self.app,
                  leader=leader, epoch=epoch)
        ctx = self.ctx("leader changed")
        ctx.leader, ctx.epoch = leader, epoch
        self.platform.spawn(
            run_hooks(self.app.hooks("leader_change"), ctx, self.hook_timeout,
                      "on_leader_change", False),
            f"{self.app.name}:leader_change",
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Run ``on_start``, settle as passive, then campaign (or activate, for Spread)."""
        self.build_stages()
        await run_hooks(self.app.hooks("start"), self.ctx("start"), self.hook_timeout,
                        "on_start", False)
        for ar in self.replicators:  # standby until elected
            await self._bounded_call(ar.replicator.follow(self.ctx("start")),
                                     f"replicator {ar.replicator.name}: follow")
        self._set_role(Role.PASSIVE, None, "started")
        await run_hooks(self.app.hooks("passive"), self.ctx("started"), self.hook_timeout,
                        "on_passive", False)
        # Its state (role, stages run so far) is not to be trusted after a crash: the node
        # leaves (its lease is released) rather than restart it.
        self._worker = supervise(f"coordinator:{self.app.name}", self._work, restart=False,
                                 on_fatal=self._worker_died, logger=log)
        if self.election is not None:
            self.election.set_listener(self)
            await self.election.start()
        else:
            self.want_spread(self.platform.placement.may_run_spread(self.app), "spread")

    def want_spread(self, active: bool, reason: str) -> None:
        """A Spread instance (no election): be active or not, as placement decides now."""
        if self.election is not None or self._stopping or active == self._want_active:
            return
        self._want_active, self._want_reason = active, reason
        self._changed.set()
        if not active:
            self._interrupt_activation()

    def _worker_died(self, name: str, exc: BaseException) -> None:
        """The worker crashed: give the lease up at once (no node renews a lease while its
        instance cannot act or step down), then fail the node (it leaves, exits non-zero)."""
        self._stopping = True
        if self.election is not None:
            self.election.pause_campaign(math.inf)
            self._release_task = asyncio.ensure_future(self.election.stop(release=True))
        self.platform.task_failed(name, exc)

    def _interrupt_activation(self) -> None:
        """Cancel a running activation stage: the role is no longer wanted (lease lost, the
        node leaves or steps down), so waiting out e.g. a backend's start timeout is pointless."""
        if self._stage_task is not None and not self._stage_task.done():
            self._stage_task.cancel()

    async def stop(self) -> None:
        """Graceful leave: deactivate, hand the lease over at once, ``on_stop``."""
        self._stopping = True
        self._want_active, self._want_reason = False, "node leaving"
        self._changed.set()
        self._interrupt_activation()
        if self.role in (Role.ACTIVE, Role.ACTIVATING):
            await self._wait_role_settled()
        await cancel_and_wait(self._worker)
        if self.role is Role.ACTIVE:  # the worker was cancelled mid-way (or died)
            try:
                await self._deactivate("node leaving")
            except Exception:
                log.exception("app %s: deactivating on leave failed", self.app.name)
        if self.election is not None:
            await self.election.stop(release=True)
        await run_hooks(self.app.hooks("stop"), self.ctx("stop"), self.hook_timeout,
                        "on_stop", False)
        for ar in self.replicators:
            await self._bounded_call(ar.replicator.stop(), f"replicator {ar.replicator.name}: stop")
        for av in self.vips:
            await self._bounded_call(av.manager.close(), f"vip {av.manager.address}: close")
        self._set_role(Role.STOPPED, None, "stopped")

    async def _bounded_call(self, aw: Awaitable[None], what: str) -> None:
        """Await a replicator's or VIP manager's call outside the stages: bounded by the hook
        timeout, a failure logged (the app still starts or stops)."""
        try:
            await _bounded(aw, self.hook_timeout)
        except Exception:
            log.exception("app %s: %s failed", self.app.name, what)

    async def _wait_role_settled(self) -> None:
        """Wait until the worker has brought the role to passive (bounded by the hooks' time)."""
        deadline = time.monotonic() + self.hook_timeout * (len(self.stages) + 1)
        while self.role in (Role.ACTIVE, Role.ACTIVATING, Role.DEACTIVATING):
            if self._worker is not None and self._worker.done():
                return  # nobody left to settle it
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._role_event.clear()
            self._changed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._role_event.wait()

    async def step_down(self, successor: str | None, cooldown: float | None) -> None:
        """Graceful handover: deactivate while still holding the lease, then release it.

        Raises `ConfigError` before doing anything when the request cannot work (see
        `check_step_down`).
        """
        membership = self.platform.membership
        members = membership.members if membership is not None else {}
        cap = self.election.max_cooldown if self.election is not None else None
        try:
            check_step_down(self.app.name, self.platform.node_id, members, successor, cooldown,
                            cap)
        except ConfigError as exc:
            if exc.field != "successor" or membership is None:
                raise
            await membership.refresh_view()  # the view may lag a node that has just started
            check_step_down(self.app.name, self.platform.node_id, membership.members,
                            successor, cooldown, cap)
        if self.election is None:
            return
        cd = self.cooldown if cooldown is None else cooldown
        # A soft cooldown where the election has one: it never leaves the app leaderless.
        self.election.cool_down(time.monotonic() + cd)
        self._want_active, self._want_reason = False, "stepped down"
        self._changed.set()
        self._interrupt_activation()
        await self._wait_role_settled()
        await self.election.step_down(successor=successor, cooldown=cd)

    async def wait_active(self, timeout: float | None) -> bool:
        """Wait until active."""
        try:
            # wait_for rather than asyncio.timeout: its inner task makes the caller resume a
            # few loop iterations after the activation, once the tasks the activation started
            # (the leader route's subscription and its flush to the server) have run.
            await asyncio.wait_for(self._active_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.is_active

    # -- the worker --------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._want_active and self.role is Role.PASSIVE and not self._stopping:
                await self._activate(self._want_reason)
            elif not self._want_active and self.role is Role.ACTIVE:
                await self._deactivate(self._want_reason)

    def _set_role(self, role: Role, epoch: int | None, reason: str) -> None:
        # In this task, before the transition's stages run (a span opened here is theirs).
        call_each(self._hooks.pycluster_role_transition, f"{self.app.name}: role_transition",
                  app=self.app, runtime=self, role=role, epoch=epoch, reason=reason)
        self.role = role
        self._role_event.set()
        self.history.append((time.time(), role.value, epoch, reason))
        del self.history[:-100]
        self.last_transition = {"role": role.value, "epoch": epoch, "reason": reason,
                                "at": time.time()}
        if role is Role.ACTIVE:
            self._active_event.set()
        else:
            self._active_event.clear()
        if role in (Role.ACTIVE, Role.PASSIVE, Role.STOPPED):
            results = call_each(self._hooks.pycluster_role_changed,
                                f"{self.app.name}: role_changed", app=self.app, role=role.value,
                                epoch=epoch, leader=self.leader, reason=reason)
            self.platform.notify(results, f"{self.app.name}: role_changed")
            self.platform.transition(self.app, role.value, epoch, reason)

    async def _activate(self, reason: str) -> None:
        epoch = self.epoch
        self.active_epoch = epoch
        self._set_role(Role.ACTIVATING, epoch, reason)
        ctx = self.ctx(reason)
        ctx.epoch = epoch
        self._activated = []
        started = time.monotonic()
        try:
            for stage in self.stages:
                if not self._want_active:
                    raise StageFailed(stage.name, RuntimeError("leadership lost during activation"))
                self._activated.append(stage)
                await self._activate_stage(stage, ctx)
        except StageFailed as exc:
            log.error("app %s: activation failed at %s; stepping down, retry in %.1fs",
                      self.app.name, exc, self._backoff)
            self.platform.transition(self.app, "activation_failed", epoch, str(exc))
            call_each(self._hooks.pycluster_activation_failed, "activation failed",
                      app=self.app, epoch=epoch, error=str(exc))
            await self._undo(ctx, f"activation failed: {exc}")
            self._set_role(Role.PASSIVE, epoch, f"activation failed: {exc}")
            if self.election is not None and self._want_active:
                backoff = self._next_backoff()
                self._want_active = False
                self.election.pause_campaign(time.monotonic() + backoff)
                await self.election.step_down(cooldown=backoff)
            elif self.election is None and self._want_active:
                self._reactivate_later(self._next_backoff(), "retry after failed activation")
            await run_hooks(self.app.hooks("passive"), self.ctx("activation failed"),
                            self.hook_timeout, "on_passive", False)
            return
        if not self._want_active or (self.election is not None and not self.election.is_leader):
            # Lost the lease during the last stage: undo.
            await self._undo(ctx, "lease lost during activation")
            self._set_role(Role.PASSIVE, epoch, "lease lost during activation")
            await run_hooks(self.app.hooks("passive"), self.ctx("lease lost"),
                            self.hook_timeout, "on_passive", False)
            return
        self._set_role(Role.ACTIVE, epoch, reason)
        log.info("app %s: active on %s (epoch %s) after %.3fs", self.app.name,
                 self.platform.node_id, epoch, time.monotonic() - started)
        self._backoff = BACKOFF_START

    def _next_backoff(self) -> float:
        """The back-off to apply now; the next one doubles (capped)."""
        backoff = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return backoff

    def _report(self, stage: Stage, action: StageAction, outcome: StageOutcome,
                epoch: int | None, started: float, attempt: int = 1,
                policy: FailurePolicy | Literal[""] = "", error: str = "",
                backoff: float | None = None) -> None:
        ev = StageEvent(self.app.name, stage.name, stage.plugin, action, outcome, epoch,
                        time.monotonic() - started, attempt, policy, error, backoff)
        self.stage_events.append(ev)
        del self.stage_events[:-200]
        call_each(self._hooks.pycluster_stage_event, "stage event", app=self.app, event=ev)

    async def _interruptible(self, stage: Stage, aw: Awaitable[None]) -> None:
        """Await ``aw`` as the current stage task, which `lost` cancels at once."""
        self._stage_task = asyncio.ensure_future(aw)
        try:
            await self._stage_task
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise _LeaseLost(stage.name, RuntimeError("leadership lost")) from None

    async def _activate_stage(self, stage: Stage, ctx: Context) -> None:
        """Run one stage's ``activate`` under its timeout and failure policy."""
        attempt = 0
        while True:
            attempt += 1
            timeout = stage.timeout or self.hook_timeout
            started = time.monotonic()
            try:
                await self._interruptible(stage, _bounded(stage.activate(ctx), timeout))
                self._report(stage, A.ACTIVATE, Out.OK, ctx.epoch, started, attempt)
                return
            except _LeaseLost:
                self._report(stage, A.ACTIVATE, Out.CANCELLED, ctx.epoch, started, attempt,
                             error="leadership lost")
                raise
            except StageFailed as exc:  # an on_active hook (run_hooks) failed or timed out
                failure = exc
                outcome = Out.TIMEOUT if isinstance(exc.cause, TimeoutError) else Out.FAILED
            except TimeoutError as exc:
                failure = StageFailed(stage.name, TimeoutError(f"timed out after {timeout}s"))
                failure.__cause__, outcome = exc, Out.TIMEOUT
            except Exception as exc:
                failure, outcome = StageFailed(stage.name, exc), Out.FAILED
                failure.__cause__ = exc
            policy = stage.on_failure
            if policy is FailurePolicy.RETRY and attempt <= stage.retries and self._want_active:
                delay = stage.retry_delay * 2 ** (attempt - 1)
                self._report(stage, A.ACTIVATE, outcome, ctx.epoch, started, attempt,
                             FailurePolicy.RETRY, str(failure.cause))
                log.warning("app %s: %s; retry %d/%d in %.1fs", self.app.name, failure,
                            attempt, stage.retries, delay)
                await self._deactivate_stage(stage, ctx)
                await self._interruptible(stage, asyncio.sleep(delay))
                continue
            if policy is FailurePolicy.CONTINUE:
                self._report(stage, A.ACTIVATE, outcome, ctx.epoch, started, attempt,
                             FailurePolicy.CONTINUE, str(failure.cause))
                log.warning("app %s: %s; continuing (policy continue)", self.app.name, failure)
                return
            self._report(stage, A.ACTIVATE, outcome, ctx.epoch, started, attempt,
                         FailurePolicy.STEP_DOWN, str(failure.cause), self._backoff)
            raise failure

    async def _deactivate_stage(self, stage: Stage, ctx: Context) -> None:
        """Run one stage's ``deactivate``, bounded by its timeout and the lease's end."""
        if self._lease_deadline is not None:
            ctx.deadline = self._lease_deadline  # the lease was lost meanwhile
        timeout = max(ctx.remaining(stage.timeout or self.hook_timeout), 0.05)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await stage.deactivate(ctx)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # A stray cancellation from inside the stage must not kill the worker.
            log.error("app %s: undoing stage %s was cancelled", self.app.name, stage.name)
            self._report(stage, A.DEACTIVATE, Out.FAILED, ctx.epoch, started, error="cancelled")
        except TimeoutError:
            log.error("app %s: undoing stage %s timed out after %.2fs", self.app.name,
                      stage.name, timeout)
            self._report(stage, A.DEACTIVATE, Out.TIMEOUT, ctx.epoch, started,
                         error=f"timed out after {timeout:.2f}s")
        except Exception as exc:
            log.exception("app %s: undoing stage %s failed", self.app.name, stage.name)
            self._report(stage, A.DEACTIVATE, Out.FAILED, ctx.epoch, started,
                         error=f"{type(exc).__name__}: {exc}")
        else:
            self._report(stage, A.DEACTIVATE, Out.OK, ctx.epoch, started)

    async def _undo(self, ctx: Context, reason: str) -> None:
        ctx.reason = reason
        ctx.deadline = self._lease_deadline
        for stage in reversed(self._activated):
            await self._deactivate_stage(stage, ctx)
        self._activated = []

    def report_failure(self, stage: str, reason: str) -> None:
        """A stage's component failed while active and cannot recover (e.g. a backend that
        exhausted its restarts): step down with back-off so that a standby takes over.

        Safe to call from any task of the event loop; a no-op unless active or activating.

        :param stage: the stage name (``Stage.name``).
        :param reason: why, for logs and audit.
        """
        if self.role not in (Role.ACTIVE, Role.ACTIVATING) or self._stopping:
            return
        found = next((s for s in self.stages if s.name == stage), None)
        backoff = self._next_backoff()
        log.error("app %s: stage %s failed while active (%s); stepping down for %.1fs",
                  self.app.name, stage, reason, backoff)
        if found is None:  # reported under the name given
            found = Stage(stage, 0, _noop, _noop, plugin="")
        self._report(found, A.RUNNING, Out.FAILED, self.active_epoch, time.monotonic(),
                     policy=FailurePolicy.STEP_DOWN, error=reason, backoff=backoff)
        self.platform.transition(self.app, "stage_failed", self.active_epoch,
                                 f"{stage}: {reason}")
        if self.election is not None:
            self.platform.spawn(self.step_down(None, backoff), f"{self.app.name}:failed")
            return
        # No election (Spread): deactivate, then activate again after the back-off.
        self._want_active, self._want_reason = False, f"{stage} failed: {reason}"
        self._changed.set()
        self._reactivate_later(backoff, "retry after failure")

    def _reactivate_later(self, backoff: float, reason: str) -> None:
        """Spread apps (no election to campaign in): want to be active again after a delay."""
        self._want_active = False

        async def again() -> None:
            await asyncio.sleep(backoff)
            if not self._stopping:
                self._want_active, self._want_reason = True, reason
                self._changed.set()

        self.platform.spawn(again(), f"{self.app.name}:retry")

    async def _deactivate(self, reason: str) -> None:
        epoch = self.active_epoch
        self._set_role(Role.DEACTIVATING, epoch, reason)
        ctx = self.ctx(reason)
        ctx.epoch = epoch
        await self._undo(ctx, reason)
        self._set_role(Role.PASSIVE, epoch, reason)
        await run_hooks(self.app.hooks("passive"), self.ctx(reason), self.hook_timeout,
                        "on_passive", False)
