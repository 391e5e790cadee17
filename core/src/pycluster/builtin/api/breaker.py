"""A circuit breaker per target app of the API bus.

States: *closed* (calls go through; consecutive failures are counted), *open* (after
``failure_threshold`` consecutive failures: calls fail at once with `CircuitOpenError`, without
sending), *half-open* (``reset_timeout`` seconds later: ``half_open_probes`` probe calls go
through; a success closes the circuit, a failure opens it again for another ``reset_timeout``).

A failure is a sign that the target cannot answer: a timeout, no instance, a lost connection,
or a remote error whose code is in ``trip_codes`` (by default the server-side deadline and
overload codes). An ordinary handler exception is an answer, so it counts as a success unless
``trip_on_remote_errors`` is set. A cancelled call counts as neither.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ...kernel.errors import (
    CallTimeoutError,
    CircuitOpenError,
    ConfigError,
    NoInstanceError,
    RemoteError,
)


class BreakerState(enum.StrEnum):
    """The state of a circuit."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class BreakerPolicy:
    """When a circuit opens and how it recovers.

    :param failure_threshold: consecutive failures that open the circuit.
    :param reset_timeout: seconds the circuit stays open before probing.
    :param half_open_probes: calls let through at once while half-open.
    :param trip_on_remote_errors: count every remote handler exception as a failure.
    :param trip_codes: remote error codes that count as failures anyway.
    """

    failure_threshold: int = 5
    reset_timeout: float = 5.0
    half_open_probes: int = 1
    trip_on_remote_errors: bool = False
    trip_codes: frozenset[str] = field(
        default_factory=lambda: frozenset({"deadline_exceeded", "overloaded"})
    )

    def __post_init__(self) -> None:
        if not isinstance(self.failure_threshold, int) or self.failure_threshold < 1:
            raise ConfigError("failure_threshold", self.failure_threshold, "must be an int >= 1")
        if not self.reset_timeout > 0:
            raise ConfigError("reset_timeout", self.reset_timeout, "must be positive")
        if not isinstance(self.half_open_probes, int) or self.half_open_probes < 1:
            raise ConfigError("half_open_probes", self.half_open_probes, "must be an int >= 1")

    def is_failure(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the target could not answer."""
        if isinstance(exc, RemoteError):
            return self.trip_on_remote_errors or exc.code in self.trip_codes
        return isinstance(exc, CallTimeoutError | NoInstanceError | TimeoutError | ConnectionError)


class CircuitBreaker:
    """The circuit of one target app.

    Use ``probe = breaker.before_call()`` (raises `CircuitOpenError` while open), then exactly
    one of ``success(probe)``, ``failure(probe)`` or ``abandon(probe)``.
    """

    def __init__(
        self, app: str, policy: BreakerPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.policy = policy or BreakerPolicy()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probes = 0

    @property
    def state(self) -> BreakerState:
        """The current state (an open circuit turns half-open when its timeout passed)."""
        if (self._state is BreakerState.OPEN
                and self._clock() - self._opened_at >= self.policy.reset_timeout):
            self._state = BreakerState.HALF_OPEN
            self._probes = 0
        return self._state

    def before_call(self) -> bool:
        """Admit a call or raise `CircuitOpenError`; returns True for a half-open probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return False
        if state is BreakerState.HALF_OPEN and self._probes < self.policy.half_open_probes:
            self._probes += 1
            return True
        retry = self.policy.reset_timeout - (self._clock() - self._opened_at)
        raise CircuitOpenError(self.app, self.failures, max(0.0, retry))

    def success(self, probe: bool = False) -> None:
        """The call got an answer: close the circuit."""
        self._state = BreakerState.CLOSED
        self.failures = 0
        self._probes = 0

    def failure(self, probe: bool = False) -> None:
        """The call failed (see `BreakerPolicy.is_failure`)."""
        self.failures += 1
        if probe or self._state is BreakerState.HALF_OPEN or (
            self.failures >= self.policy.failure_threshold
        ):
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probes = 0

    def abandon(self, probe: bool = False) -> None:
        """The call ended without a verdict (cancelled): free its probe slot."""
        if probe and self._probes > 0:
            self._probes -= 1

    def record(self, probe: bool, exc: BaseException | None) -> None:
        """Record an outcome: None or a remote answer is a success, a failure per the policy
        counts, anything else (a local error such as an oversized payload) is no verdict."""
        if exc is not None and self.policy.is_failure(exc):
            self.failure(probe)
        elif exc is None or isinstance(exc, RemoteError):
            self.success(probe)
        else:
            self.abandon(probe)
