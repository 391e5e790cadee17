"""The failover sequence's building blocks: stages, their order and failure policies, and the
events the coordinator reports for each stage call (``pycluster_stage_event``)."""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    from .context import Context as StageContext


class StageOrder(enum.IntEnum):
    """Positions of the failover sequence; plugins pick one or a value between."""

    CATCH_UP = 100
    PROMOTE = 200
    VIP = 300
    BACKEND = 400
    REPLICATE = 500
    SNAPSHOTS = 600
    APP_HOOKS = 1000


class FailurePolicy(enum.StrEnum):
    """What the coordinator does when a stage's ``activate`` fails or times out.

    Every failure is logged and reported through ``pycluster_stage_event`` (audit, metrics).
    """

    STEP_DOWN = "step_down"
    """Undo the stages that ran (reverse order), release the lease, back off (doubling, capped)
    and campaign again, so that another node takes over. The default."""
    RETRY = "retry"
    """Undo this stage alone and run it again, up to ``Stage.retries`` times with a doubling
    ``Stage.retry_delay``; then as STEP_DOWN."""
    CONTINUE = "continue"
    """Carry on with the next stage (for optional stages: discovery, snapshots). The failed
    stage's ``deactivate`` still runs on step-down."""


@dataclass
class Stage:
    """One step of the failover sequence for one app.

    ``activate`` runs when the node becomes active (ascending ``order``); ``deactivate`` runs
    when it steps down (descending), only for stages whose ``activate`` completed or started.
    ``timeout`` bounds each call (default: the app's hook timeout); ``on_failure`` says what a
    failed or timed-out ``activate`` leads to (see `FailurePolicy`). A failed ``deactivate`` is
    logged and reported, and the reverse sequence goes on: it never blocks a step-down.
    """

    name: str
    order: int
    activate: Callable[[StageContext], Awaitable[None]]
    deactivate: Callable[[StageContext], Awaitable[None]]
    timeout: float | None = None
    plugin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    on_failure: FailurePolicy = FailurePolicy.STEP_DOWN
    retries: int = 0
    retry_delay: float = 1.0

    def __post_init__(self) -> None:
        try:
            self.on_failure = FailurePolicy(self.on_failure)
        except ValueError:
            choices = ", ".join(p.value for p in FailurePolicy)
            raise ConfigError(f"Stage({self.name!r}).on_failure", self.on_failure,
                              f"must be one of {choices}") from None
        if self.retries < 0 or self.retry_delay < 0:
            raise ConfigError(f"Stage({self.name!r}).retries", (self.retries, self.retry_delay),
                              "retries and retry_delay must not be negative")


class StageRegistry:
    """The stages of one app's failover sequence."""

    def __init__(self) -> None:
        self._stages: list[Stage] = []

    def add(self, stage: Stage) -> None:
        """Add a stage; names must be unique per app."""
        if any(s.name == stage.name for s in self._stages):
            raise ConfigError("stage", stage.name, "a stage of this name is already registered")
        self._stages.append(stage)

    def ordered(self) -> list[Stage]:
        """Stages in activation order (stable for equal orders)."""
        return sorted(self._stages, key=lambda s: s.order)


class StageAction(enum.StrEnum):
    """What a reported stage call did."""

    ACTIVATE = "activate"
    """The stage's ``activate`` ran (the node is becoming active)."""
    DEACTIVATE = "deactivate"
    """The stage's ``deactivate`` ran (the node steps down, leaves, or undoes a failure)."""
    RUNNING = "running"
    """The stage's component failed while active (`AppRuntime.report_failure`)."""


class StageOutcome(enum.StrEnum):
    """How a reported stage call ended."""

    OK = "ok"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    """Cancelled because the lease was lost meanwhile."""


@dataclass
class StageEvent:
    """One call of a stage of the failover sequence (``pycluster_stage_event``).

    :ivar action: activate, deactivate or running (a failure while active).
    :ivar outcome: ok, failed, timeout or cancelled (lease lost).
    :ivar policy: on a failure, what follows (a `FailurePolicy`); empty otherwise.
    :ivar backoff: for ``step_down``, the seconds this node stays out of the election.
    """

    app: str
    stage: str
    plugin: str
    action: StageAction
    outcome: StageOutcome
    epoch: int | None
    duration: float
    attempt: int = 1
    policy: FailurePolicy | Literal[""] = ""
    error: str = ""
    backoff: float | None = None
    at: float = field(default_factory=time.time)
