"""The coordinator: runs one app's failover sequence on this node.

Becoming active: win the election, then every stage in ascending order (plugins join at their
`StageOrder`: catch-up, promote, VIP, backend, replication, snapshots), then the app's
``on_active`` hooks. Stepping down runs the completed stages in reverse, then ``on_passive``.

Policies:
* Every stage and hook has a timeout (the stage's own or the app's ``hook_timeout``).
* A stage or ``on_active`` hook that fails or times out: undo what ran (reverse order), release
  the lease, back off (doubling, capped) and campaign again later. A node is never "leader but
  not really active": ``app.is_active`` turns True only after the whole sequence completed.
* Losing the lease (taken over, renewal failures, paused past the lease) interrupts activation
  and deactivates against the lease's end (``ctx.deadline``).
* Transitions are serialised: one worker reconciles the wanted role with the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .context import Context
from .registry import Stage, StageOrder, StageRegistry
from .types import Role

if TYPE_CHECKING:
    from .app import App
    from .election import Election
    from .kv import AppKV
    from .locks import LockService
    from .platform import Platform

log = logging.getLogger("pycluster.coordinator")

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0


class StageFailed(Exception):
    """A stage or hook failed or timed out during activation."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")


async def run_hooks(
    hooks: list[Callable[..., Awaitable[Any]]], ctx: Context, timeout: float, what: str,
    raise_errors: bool,
) -> None:
    """Run app hooks in registration order, each bounded by ``timeout``."""
    for fn in hooks:
        try:
            await asyncio.wait_for(fn(ctx), timeout)
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
        self.platform.pm.hook.pycluster_stages(app=self.app, platform=self.platform, registry=reg)

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
            ttl = getattr(self.election, "lease_ttl", 10.0)
            margin = getattr(self.election, "fence_margin", 1.0)
            self._lease_deadline = time.monotonic() + margin + max(0.0, -ttl % 1.0)
        self._changed.set()
        if self._stage_task is not None and not self._stage_task.done():
            self._stage_task.cancel()  # interrupt a running activation stage at once

    def observed(self, leader: str | None, epoch: int | None) -> None:
        """Election callback: the observed leader changed."""
        if (leader, epoch) == (self._obs_leader, self._obs_epoch):
            return
        self._obs_leader, self._obs_epoch = leader, epoch
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
        self._set_role(Role.PASSIVE, None, "started")
        await run_hooks(self.app.hooks("passive"), self.ctx("started"), self.hook_timeout,
                        "on_passive", False)
        self._worker = asyncio.create_task(self._work(), name=f"coordinator:{self.app.name}")
        if self.election is not None:
            self.election.set_listener(self)
            await self.election.start()
        else:
            self._want_active, self._want_reason = True, "spread"
            self._changed.set()

    async def stop(self) -> None:
        """Graceful leave: deactivate, hand the lease over at once, ``on_stop``."""
        self._stopping = True
        self._want_active, self._want_reason = False, "node leaving"
        self._changed.set()
        if self.role in (Role.ACTIVE, Role.ACTIVATING):
            await self._wait_role_settled()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self.role is Role.ACTIVE:  # the worker was cancelled mid-way
            await self._deactivate("node leaving")
        if self.election is not None:
            await self.election.stop(release=True)
        await run_hooks(self.app.hooks("stop"), self.ctx("stop"), self.hook_timeout,
                        "on_stop", False)
        self._set_role(Role.STOPPED, None, "stopped")

    async def _wait_role_settled(self) -> None:
        """Wait until the worker has brought the role to passive (bounded by the hooks' time)."""
        deadline = time.monotonic() + self.hook_timeout * (len(self.stages) + 1)
        while self.role in (Role.ACTIVE, Role.ACTIVATING, Role.DEACTIVATING):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._role_event.clear()
            self._changed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._role_event.wait(), min(left, 0.5))

    async def step_down(self, successor: str | None, cooldown: float | None) -> None:
        """Graceful handover: deactivate while still holding the lease, then release it."""
        if self.election is None:
            return
        cd = self.cooldown if cooldown is None else cooldown
        self.election.pause_campaign(time.monotonic() + cd)
        self._want_active, self._want_reason = False, "stepped down"
        self._changed.set()
        await self._wait_role_settled()
        await self.election.step_down(successor=successor, cooldown=cd)

    async def wait_active(self, timeout: float | None) -> bool:
        """Wait until active."""
        try:
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
            results = self.platform.pm.hook.pycluster_role_changed(
                app=self.app, role=role.value, epoch=epoch, leader=self.leader
            )
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
                timeout = stage.timeout or self.hook_timeout
                self._stage_task = asyncio.ensure_future(
                    asyncio.wait_for(stage.activate(ctx), timeout)
                )
                try:
                    await self._stage_task
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    raise StageFailed(stage.name, RuntimeError("leadership lost")) from None
                except StageFailed:
                    raise
                except TimeoutError as exc:
                    raise StageFailed(stage.name, TimeoutError(f"timed out after {timeout}s")) from exc
                except Exception as exc:
                    raise StageFailed(stage.name, exc) from exc
        except StageFailed as exc:
            log.error("app %s: activation failed at %s; stepping down, retry in %.1fs",
                      self.app.name, exc, self._backoff)
            self.platform.transition(self.app, "activation_failed", epoch, str(exc))
            await self._undo(ctx, f"activation failed: {exc}")
            self._set_role(Role.PASSIVE, epoch, f"activation failed: {exc}")
            if self.election is not None and self._want_active:
                backoff = self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                self._want_active = False
                self.election.pause_campaign(time.monotonic() + backoff)
                await self.election.step_down(cooldown=backoff)
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

    async def _undo(self, ctx: Context, reason: str) -> None:
        ctx.reason = reason
        ctx.deadline = self._lease_deadline
        for stage in reversed(self._activated):
            timeout = ctx.remaining(stage.timeout or self.hook_timeout)
            try:
                await asyncio.wait_for(stage.deactivate(ctx), max(timeout, 0.05))
            except Exception:
                log.exception("app %s: undoing stage %s failed", self.app.name, stage.name)
        self._activated = []

    async def _deactivate(self, reason: str) -> None:
        epoch = self.active_epoch
        self._set_role(Role.DEACTIVATING, epoch, reason)
        ctx = self.ctx(reason)
        ctx.epoch = epoch
        await self._undo(ctx, reason)
        self._set_role(Role.PASSIVE, epoch, reason)
        await run_hooks(self.app.hooks("passive"), self.ctx(reason), self.hook_timeout,
                        "on_passive", False)
