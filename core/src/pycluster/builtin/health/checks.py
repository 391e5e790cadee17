"""Health checks (default plugin ``health``): what a check is, its state, ``app.health``.

A check is a function (``async def`` or plain; plain ones run in a thread) that passes by
returning None, True or a dict of details, and fails by returning False or raising. Each check
runs in its own task every ``interval`` seconds, bounded by ``timeout``, and keeps a history of
its recent results::

    @app.on_active
    async def start(ctx): ...

    async def db_ok():
        await db.execute("select 1")

    app.health.register("db", db_ok, interval=5, timeout=2, depends_on=["jetstream"],
                        step_down=True)
    platform.health.register("disk", lambda: shutil.disk_usage("/").free > 1 << 30)

* Names: app checks are reported as ``{app}.{name}``; ``depends_on`` names a check of the same
  app, or a platform check (``nats``, ``jetstream``, ...), registered before. A check whose
  dependency fails is reported as failing ("dependency X is unhealthy") without being called.
* ``failure_threshold``: consecutive failures before the check counts as unhealthy.
* Circuit breaker: after ``breaker_threshold`` consecutive failures the check is not called for
  ``breaker_cooldown`` seconds (it stays unhealthy), then tried once (half-open): a success
  closes the breaker, a failure opens it again.
* A change of status is audited (``health``/``changed``), runs the apps' ``on_health_change``
  hooks (``ctx.extra`` holds check, status, previous, error) and ``on_change`` listeners, and
  calls `pycluster.hookspecs.pycluster_health_changed`.
* ``step_down=True`` (or the ``health_step_down`` setting for every app check): when the check
  turns unhealthy while its app is active here, the instance steps down, and it does not campaign
  again while the check stays unhealthy.

Built-in checks: ``nats`` (connected, round trip), ``jetstream`` (account info) and
``{app}.election`` for every elected app (election loop alive, an active role backed by a valid
lease, no transition stuck).

Layout: this module (checks and their state), `service` (``platform.health``: running the
checks, notifications), `endpoints` (readiness, ``/status``, the HTTP server), `plugin` (its
hooks).

Endpoints (on ``health_addr``): ``GET /health`` is liveness (200 while the platform runs, even
without NATS: restarting would not bring NATS back); ``GET /ready`` is readiness (200 only when
NATS is connected, JetStream answers and every app is settled as active or passive; 503 with
the reasons otherwise); ``GET /status`` is the node's JSON view. ``/metrics`` is served there
too unless ``metrics_addr`` names another address. Under connection loss the endpoints keep
answering from in-process state: ``/ready`` turns 503 at once, and 200 again as soon as the
connection and JetStream are back.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...kernel.errors import ConfigError
from ...kernel.names import validate_ident
from ...kernel.types import Role

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from .service import PlatformHealth

log = logging.getLogger("pycluster.health")

CheckFn = Callable[[], Any]
ChangeListener = Callable[["HealthCheck", "CheckStatus", "CheckStatus"], Any]

BUILTIN_CHECKS = ("nats", "jetstream")


class CheckStatus(enum.StrEnum):
    """Status of a check."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class Breaker(enum.StrEnum):
    """Circuit-breaker state of a check."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CheckResult:
    """One run of a check.

    :ivar ok: whether it passed.
    :ivar at: unix time of the run.
    :ivar latency: seconds the check took (0 when not called).
    :ivar error: why it failed.
    :ivar details: what a passing check returned as a dict.
    :ivar skipped: True when the check was not called (open breaker, failed dependency).
    """

    ok: bool
    at: float
    latency: float
    error: str | None = None
    details: dict[str, Any] | None = None
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {"ok": self.ok, "at": self.at, "latency": round(self.latency, 6),
                "error": self.error, "details": self.details, "skipped": self.skipped}


@dataclass
class CheckSpec:
    """A registered check, before it runs (what ``register`` validated)."""

    name: str
    fn: CheckFn
    interval: float | None = None
    timeout: float | None = None
    depends_on: tuple[str, ...] = ()
    failure_threshold: int = 1
    breaker_threshold: int | None = None
    breaker_cooldown: float | None = None
    step_down: bool = False
    critical: bool = False
    builtin: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def validate_check(name: str, fn: object, interval: float | None, timeout: float | None,
              failure_threshold: int, breaker_threshold: int | None,
              breaker_cooldown: float | None) -> None:
    validate_ident("health check name", name)
    if not callable(fn):
        raise ConfigError(f"health check {name!r}", fn, "the check must be callable")
    for what, v in (("interval", interval), ("timeout", timeout),
                    ("breaker_cooldown", breaker_cooldown)):
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v <= 0):
            raise ConfigError(f"health check {name!r} {what}", v, "must be a positive number")
    if not isinstance(failure_threshold, int) or failure_threshold < 1:
        raise ConfigError(f"health check {name!r} failure_threshold", failure_threshold,
                          "must be an integer >= 1")
    if breaker_threshold is not None and (not isinstance(breaker_threshold, int)
                                          or breaker_threshold < 0):
        raise ConfigError(f"health check {name!r} breaker_threshold", breaker_threshold,
                          "must be an integer >= 0 (0 turns the breaker off)")


class HealthCheck:
    """A running check: its schedule, results, history and breaker."""

    def __init__(self, spec: CheckSpec, full_name: str, app: App | None, *, interval: float,
                 timeout: float, breaker_threshold: int, breaker_cooldown: float,
                 history: int, depends_on: Sequence[str]) -> None:
        self.spec = spec
        self.name = full_name
        self.app = app
        self.interval = interval
        self.timeout = timeout  # may exceed the interval: runs never overlap
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown
        self.depends_on = list(depends_on)
        self.history: collections.deque[CheckResult] = collections.deque(maxlen=history)
        self.status = CheckStatus.UNKNOWN
        self.consecutive_failures = 0
        self.breaker = Breaker.CLOSED
        self.opened_at = 0.0
        self.runs = 0
        self.task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()

    @property
    def last(self) -> CheckResult | None:
        """The latest result."""
        return self.history[-1] if self.history else None

    def as_dict(self, history: bool = False) -> dict[str, Any]:
        """JSON-friendly state (``history`` adds the recent results, newest last)."""
        last = self.last
        d: dict[str, Any] = {
            "status": self.status.value,
            "latency": round(last.latency, 6) if last else None,
            "error": last.error if last else None,
            "at": last.at if last else None,
            "app": self.app.name if self.app is not None else None,
            "interval": self.interval,
            "timeout": self.timeout,
            "depends_on": self.depends_on,
            "consecutive_failures": self.consecutive_failures,
            "breaker": self.breaker.value,
            "critical": self.spec.critical,
            "step_down": self.spec.step_down,
        }
        if last is not None and last.details:
            d["details"] = last.details
        if history:
            d["history"] = [r.as_dict() for r in self.history]
        return d


async def call_check(fn: CheckFn, timeout: float) -> Any:
    """Call a check: awaited if async, in a thread if not; bounded by ``timeout``."""
    async def run() -> Any:
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
                getattr(fn, "__call__", None)):  # noqa: B004 - callable objects too
            result = fn()
        else:
            result = await asyncio.to_thread(fn)
        if inspect.isawaitable(result):
            result = await result
        return result

    async with asyncio.timeout(timeout):
        return await run()


class AppHealth:
    """``app.health``: the app's own checks (registered any time; they run while the app runs
    on this node)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.specs: dict[str, CheckSpec] = {}

    def _service(self) -> PlatformHealth | None:
        """The health service of the app's platform, when registered and the plugin is on."""
        from .service import PlatformHealth

        platform = self.app.platform
        hs = platform.services.get("health") if platform is not None else None
        return hs if isinstance(hs, PlatformHealth) else None

    def register(
        self,
        name: str,
        check: CheckFn,
        *,
        interval: float | None = None,
        timeout: float | None = None,
        depends_on: Iterable[str] = (),
        failure_threshold: int = 1,
        breaker_threshold: int | None = None,
        breaker_cooldown: float | None = None,
        step_down: bool = False,
        critical: bool = False,
    ) -> CheckSpec:
        """Add a check of this app (reported as ``{app}.{name}``).

        :param name: letters, digits, ``-``, ``_``.
        :param check: the check function (see the module docstring).
        :param interval: seconds between runs (default: the ``health_interval`` setting).
        :param timeout: seconds a run may take (default: ``health_timeout``).
        :param depends_on: checks this one needs (same app first, then platform checks).
        :param failure_threshold: consecutive failures before it counts as unhealthy.
        :param breaker_threshold: consecutive failures that open the breaker (0: never).
        :param breaker_cooldown: seconds the breaker stays open.
        :param step_down: step the app down when this check fails while active here.
        :param critical: a failing check also makes ``/ready`` fail.
        """
        validate_check(name, check, interval, timeout, failure_threshold, breaker_threshold,
                  breaker_cooldown)
        if name in self.specs:
            raise ConfigError("health check", f"{self.app.name}.{name}", "already registered")
        deps = tuple(depends_on)
        for dep in deps:
            if dep == name:
                raise ConfigError(f"health check {name!r} depends_on", dep, "depends on itself")
        spec = CheckSpec(name, check, interval, timeout, deps, failure_threshold,
                         breaker_threshold, breaker_cooldown, step_down, critical)
        self.specs[name] = spec
        hs = self._service()
        if hs is not None and self.app.name in hs._app_checks:
            hs._add_app_check(self.app, spec)  # the app already runs here: start it now
        return spec

    def unregister(self, name: str) -> None:
        """Remove a check (stops it if it runs)."""
        self.specs.pop(name, None)
        hs = self._service()
        if hs is not None:
            hs.unregister(f"{self.app.name}.{name}")

    def status(self) -> dict[str, Any]:
        """The app's checks and their state (empty before the app runs here)."""
        hs = self._service()
        if hs is None:
            return {}
        prefix = f"{self.app.name}."
        return {n: c.as_dict() for n, c in hs.checks.items() if n.startswith(prefix)}

    @property
    def healthy(self) -> bool:
        """True when no check of this app is unhealthy."""
        return all(c["status"] != CheckStatus.UNHEALTHY.value for c in self.status().values())




def election_check(rt: AppRuntime) -> CheckSpec:
    """The built-in check ``{app}.election`` of an elected app on this node: the election
    loop runs, an active role is backed by a valid lease, no transition is stuck, and a live
    leader was seen within a lease."""
    held_inactive: list[float] = []  # since when this node holds the lease, not active

    async def election_check() -> dict[str, Any]:
        budget = rt.hook_timeout * (len(rt.stages) + 2)
        el = rt.election
        assert el is not None
        now = time.monotonic()
        lease = el.lease_ttl
        if el.stopped:
            raise RuntimeError("the election loop has stopped")
        if rt.role is Role.ACTIVE and not el.is_leader:
            raise RuntimeError("active without a valid lease (stepping down)")
        if rt.role in (Role.ACTIVATING, Role.DEACTIVATING):
            since = rt.last_transition.get("at", time.time())
            if time.time() - since > budget:
                raise RuntimeError(f"{rt.role.value} for {time.time() - since:.0f}s")
        # Holding the lease while the app is not active: activation stuck (or not begun).
        if el.is_leader and rt.role is not Role.ACTIVE:
            held_inactive[:] = held_inactive[:1] or [now]
            if now - held_inactive[0] > budget:
                raise RuntimeError(f"holds the lease but the app is {rt.role.value} for "
                                   f"{now - held_inactive[0]:.0f}s")
        else:
            held_inactive.clear()
        # No live leader seen for more than a lease.
        seen = el.leader_seen
        margin = el.stale_margin
        if now - seen > lease + margin:
            raise RuntimeError(f"no live leader seen for {now - seen:.1f}s (lease "
                               f"{lease:g}s)")
        return {"role": rt.role.value, "leader": el.leader, "epoch": el.epoch,
                "is_leader": el.is_leader, "leader_seen_ago": round(now - seen, 3)}

    return CheckSpec("election", election_check, builtin=True)

