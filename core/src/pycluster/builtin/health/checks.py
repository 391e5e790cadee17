"""Health checks and the health endpoints (``/health``, ``/ready``, ``/status``).

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
import contextlib
import enum
import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...httpserver import HttpServer, Request, Response
from ...kernel.aio import cancel_and_wait, supervise
from ...kernel.context import Context
from ...kernel.errors import ConfigError
from ...kernel.names import validate_ident
from ...kernel.settings import server_address
from ...kernel.types import Role
from ...plugins import call_notify

if TYPE_CHECKING:
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform

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


def _validate(name: str, fn: object, interval: float | None, timeout: float | None,
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


async def _call(fn: CheckFn, timeout: float) -> Any:
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

    return await asyncio.wait_for(run(), timeout)


class AppHealth:
    """``app.health``: the app's own checks (registered any time; they run while the app runs
    on this node)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.specs: dict[str, CheckSpec] = {}

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
        _validate(name, check, interval, timeout, failure_threshold, breaker_threshold,
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
        platform = self.app.platform
        hs = platform.services.get("health") if platform is not None else None
        if isinstance(hs, PlatformHealth) and self.app.name in hs._app_checks:
            hs._add_app_check(self.app, spec)  # the app already runs here: start it now
        return spec

    def unregister(self, name: str) -> None:
        """Remove a check (stops it if it runs)."""
        self.specs.pop(name, None)
        platform = self.app.platform
        hs = platform.services.get("health") if platform is not None else None
        if isinstance(hs, PlatformHealth):
            hs.unregister(f"{self.app.name}.{name}")

    def status(self) -> dict[str, Any]:
        """The app's checks and their state (empty before the app runs here)."""
        platform = self.app.platform
        hs = platform.services.get("health") if platform is not None else None
        if not isinstance(hs, PlatformHealth):
            return {}
        prefix = f"{self.app.name}."
        return {n: c.as_dict() for n, c in hs.checks.items() if n.startswith(prefix)}

    @property
    def healthy(self) -> bool:
        """True when no check of this app is unhealthy."""
        return all(c["status"] != CheckStatus.UNHEALTHY.value for c in self.status().values())


class PlatformHealth:
    """``platform.health``: every check of this node, the change notifications and the
    health HTTP endpoints."""

    name = "health"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        s = platform.settings
        self.interval = float(getattr(s, "health_interval", 5.0))
        self.timeout = float(getattr(s, "health_timeout", 2.0))
        self.history_size = int(getattr(s, "health_history", 10))
        self.breaker_threshold = int(getattr(s, "health_breaker_threshold", 5))
        self.breaker_cooldown = float(getattr(s, "health_breaker_cooldown", 30.0))
        self.step_down_all = bool(getattr(s, "health_step_down", False))
        self.checks: dict[str, HealthCheck] = {}
        self._platform_specs: dict[str, CheckSpec] = {}
        self._app_checks: dict[str, list[str]] = {}
        self._listeners: list[ChangeListener] = []
        self._server: HttpServer | None = None
        self._running = False
        self._probe_at = 0.0
        self._builtin()
        platform.pm.hook.pycluster_health_checks(platform=platform, health=self)

    # -- registration --------------------------------------------------------------------------

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
        """Add a platform-level check (same parameters as `AppHealth.register`; ``step_down``
        steps down every app active here while it fails). Dependencies must exist already."""
        _validate(name, check, interval, timeout, failure_threshold, breaker_threshold,
                  breaker_cooldown)
        if name in self._platform_specs or name in self.checks:
            raise ConfigError("health check", name, "already registered")
        deps = tuple(depends_on)
        for dep in deps:
            if dep not in self.checks:
                raise ConfigError(f"health check {name!r} depends_on", dep,
                                  f"no such check (registered: {', '.join(sorted(self.checks))})")
        spec = CheckSpec(name, check, interval, timeout, deps, failure_threshold,
                         breaker_threshold, breaker_cooldown, step_down, critical)
        self._platform_specs[name] = spec
        self._install(spec, name, None, deps)
        return spec

    def unregister(self, name: str) -> None:
        """Stop and remove check ``name`` (its full name)."""
        self._platform_specs.pop(name, None)
        chk = self.checks.pop(name, None)
        if chk is not None and chk.task is not None:
            chk.task.cancel()
        for names in self._app_checks.values():
            if name in names:
                names.remove(name)

    def on_change(self, listener: ChangeListener) -> ChangeListener:
        """Call ``listener(check, previous, status)`` (sync or async) on every status change."""
        self._listeners.append(listener)
        return listener

    def _install(self, spec: CheckSpec, full: str, app: App | None, deps: Sequence[str]) -> None:
        bt = spec.breaker_threshold
        if bt is None:
            bt = 0 if spec.builtin else self.breaker_threshold
        chk = HealthCheck(
            spec, full, app, interval=spec.interval or self.interval,
            timeout=spec.timeout or self.timeout, breaker_threshold=bt,
            breaker_cooldown=spec.breaker_cooldown or self.breaker_cooldown,
            history=self.history_size, depends_on=deps,
        )
        self.checks[full] = chk
        if self._running:
            chk.task = supervise(f"health:{full}", functools.partial(self._loop, chk))

    def _add_app_check(self, app: App, spec: CheckSpec) -> None:
        full = f"{app.name}.{spec.name}"
        if full in self.checks:
            raise ConfigError("health check", full, "already registered (names are per app; "
                              "'election' is built in)")
        deps = []
        for dep in spec.depends_on:
            if f"{app.name}.{dep}" in self.checks:
                deps.append(f"{app.name}.{dep}")
            elif dep in self.checks:
                deps.append(dep)
            else:
                raise ConfigError(
                    f"health check {full!r} depends_on", dep,
                    f"no such check (registered: {', '.join(sorted(self.checks))}); register "
                    "dependencies first")
        self._install(spec, full, app, deps)
        self._app_checks.setdefault(app.name, []).append(full)

    # -- built-in checks -----------------------------------------------------------------------

    def _builtin(self) -> None:
        async def nats_check() -> dict[str, Any]:
            nc = self.platform.nc
            if nc is None or not nc.is_connected:
                raise ConnectionError("not connected to NATS")
            control = getattr(self.platform, "nc_control", None)
            if control is not None and not control.is_connected:
                raise ConnectionError("the control connection (election, membership) is down")
            started = time.monotonic()
            await nc.flush()  # bounded by the check's timeout
            # host:port only: a URL may carry a password (nats://user:pass@host).
            return {"server": server_address(nc.connected_url),
                    "control_server": server_address(control.connected_url)
                    if control is not None else None,
                    "rtt": round(time.monotonic() - started, 6)}

        async def jetstream_check() -> dict[str, Any]:
            js = self.platform.js
            if js is None:
                raise ConnectionError("not connected")
            info = await js.account_info()
            return {"streams": info.streams, "consumers": info.consumers}

        for name, fn, deps in (("nats", nats_check, ()), ("jetstream", jetstream_check, ("nats",))):
            spec = CheckSpec(name, fn, depends_on=deps, builtin=True)
            self._platform_specs[name] = spec
            self._install(spec, name, None, deps)

    def _election_check(self, rt: AppRuntime) -> CheckSpec:
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

    # -- running -------------------------------------------------------------------------------

    async def _loop(self, chk: HealthCheck) -> None:
        while True:
            try:
                await self.run_check(chk)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug in bookkeeping kill the schedule
                log.exception("health check %s: bookkeeping failed", chk.name)
            await asyncio.sleep(chk.interval)

    async def run(self, name: str) -> CheckResult:
        """Run check ``name`` now (full name) and return its result."""
        chk = self.checks.get(name)
        if chk is None:
            raise ConfigError("health check", name,
                              f"no such check (registered: {', '.join(sorted(self.checks))})")
        return await self.run_check(chk)

    async def run_check(self, chk: HealthCheck) -> CheckResult:
        """One run of ``chk``: dependencies, breaker, call, bookkeeping, notifications."""
        async with chk.lock:
            result = await self._execute(chk)
            self._record(chk, result)
            return result

    async def _execute(self, chk: HealthCheck) -> CheckResult:
        now = time.time()
        for dep in chk.depends_on:
            d = self.checks.get(dep)
            if d is not None and d.status is CheckStatus.UNHEALTHY:
                return CheckResult(False, now, 0.0, f"dependency {dep} is unhealthy",
                                   skipped=True)
        if chk.breaker is Breaker.OPEN:
            wait = chk.opened_at + chk.breaker_cooldown - time.monotonic()
            if wait > 0:
                return CheckResult(
                    False, now, 0.0, f"circuit open after {chk.consecutive_failures} "
                    f"consecutive failures; next try in {wait:.1f}s", skipped=True)
            chk.breaker = Breaker.HALF_OPEN
        started = time.monotonic()
        try:
            value = await _call(chk.spec.fn, chk.timeout)
        except TimeoutError:
            return CheckResult(False, now, time.monotonic() - started,
                               f"timed out after {chk.timeout}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return CheckResult(False, now, time.monotonic() - started,
                               f"{type(exc).__name__}: {exc}".rstrip(": "))
        latency = time.monotonic() - started
        if value is False:
            return CheckResult(False, now, latency, "check returned False")
        details = value if isinstance(value, dict) else (
            {"message": value} if isinstance(value, str) else None)
        return CheckResult(True, now, latency, details=details)

    def _record(self, chk: HealthCheck, result: CheckResult) -> None:
        chk.history.append(result)
        chk.runs += 1
        m = self.platform.services.get("metrics")
        if m is not None and not result.skipped:
            m.health_check_duration.labels(chk.name).observe(result.latency)  # type: ignore[attr-defined]
        previous = chk.status
        if result.ok:
            chk.consecutive_failures = 0
            if chk.breaker is not Breaker.CLOSED:
                log.info("health check %s: breaker closed", chk.name)
            chk.breaker = Breaker.CLOSED
            chk.status = CheckStatus.HEALTHY
        else:
            if not (result.skipped and chk.breaker is Breaker.OPEN):
                chk.consecutive_failures += 1
            if chk.breaker is Breaker.HALF_OPEN or (
                    chk.breaker_threshold and chk.breaker is Breaker.CLOSED
                    and chk.consecutive_failures >= chk.breaker_threshold and not result.skipped):
                log.warning("health check %s: breaker open for %.0fs after %d failures",
                            chk.name, chk.breaker_cooldown, chk.consecutive_failures)
                chk.breaker = Breaker.OPEN
                chk.opened_at = time.monotonic()
            if chk.consecutive_failures >= chk.spec.failure_threshold or result.skipped:
                chk.status = CheckStatus.UNHEALTHY
        if chk.status is not previous:
            self._changed(chk, previous, chk.status, result)
        if chk.status is CheckStatus.UNHEALTHY:
            self._hold_campaign(chk)

    # -- notifications -------------------------------------------------------------------------

    def _changed(self, chk: HealthCheck, previous: CheckStatus, status: CheckStatus,
                 result: CheckResult) -> None:
        p = self.platform
        level = logging.INFO if status is CheckStatus.HEALTHY else logging.WARNING
        log.log(level, "health check %s: %s -> %s%s", chk.name, previous.value, status.value,
                f" ({result.error})" if result.error else "")
        if not (previous is CheckStatus.UNKNOWN and status is CheckStatus.HEALTHY):
            audit = p.services.get("audit")
            if audit is not None:
                audit.log("health", "changed",  # type: ignore[attr-defined]
                          {"check": chk.name, "status": status.value,
                           "previous": previous.value, "error": result.error}, app=chk.app)
        extra = {"check": chk.name, "status": status.value, "previous": previous.value,
                 "error": result.error}
        apps = [chk.app] if chk.app is not None else list(p.apps.values())
        from ...kernel.coordinator import run_hooks

        for app in apps:
            rt = p.runtimes.get(app.name)
            if rt is None or not app.hooks("health_change"):
                continue
            ctx = Context(app=app, platform=p, node_id=p.node_id, epoch=app.epoch,
                          leader=app.leader, reason=f"health {chk.name}: {status.value}",
                          extra=dict(extra))
            p.spawn(run_hooks(app.hooks("health_change"), ctx, rt.hook_timeout,
                              "on_health_change", False), f"{app.name}:health_change")
        for listener in self._listeners:
            try:
                res = listener(chk, previous, status)
            except Exception:
                log.exception("health listener failed")
                continue
            if inspect.isawaitable(res):
                p.spawn(call_notify([res], p.settings.hook_timeout, "health listener"),
                        "health:listener")
        p.notify(p.pm.hook.pycluster_health_changed(
            platform=p, check=chk.name, status=status.value, previous=previous.value,
            app=chk.app), "health_changed")
        if status is CheckStatus.UNHEALTHY:
            self._maybe_step_down(chk)

    def _steps_down(self, chk: HealthCheck) -> bool:
        return chk.spec.step_down or (self.step_down_all and chk.app is not None
                                      and not chk.spec.builtin)

    def _affected(self, chk: HealthCheck) -> list[AppRuntime]:
        p = self.platform
        apps = [chk.app] if chk.app is not None else list(p.apps.values())
        out = []
        for app in apps:
            rt = p.runtimes.get(app.name)
            if rt is not None and rt.election is not None:
                out.append(rt)
        return out

    def _maybe_step_down(self, chk: HealthCheck) -> None:
        if not self._steps_down(chk):
            return
        for rt in self._affected(chk):
            if not rt.app.is_active:
                continue
            epoch = rt.app.epoch
            log.warning("app %s: health check %s failed while active; stepping down",
                        rt.app.name, chk.name)
            audit = self.platform.services.get("audit")
            if audit is not None:
                audit.log("health", "step_down", {"check": chk.name, "epoch": epoch},  # type: ignore[attr-defined]
                          app=rt.app)
            cooldown = max(rt.cooldown, chk.interval * 2)
            self.platform.spawn(rt.app.step_down(cooldown=cooldown),
                                f"{rt.app.name}:health_step_down")

    def _hold_campaign(self, chk: HealthCheck) -> None:
        """While a step-down check fails, this node does not campaign for its apps."""
        if not self._steps_down(chk):
            return
        for rt in self._affected(chk):
            if rt.election is not None and not rt.app.is_active:
                rt.election.pause_campaign(time.monotonic() + chk.interval * 2)

    # -- state ---------------------------------------------------------------------------------

    def gauge_values(self) -> list[tuple[str, int]]:
        """``(check, 1|0)`` for every check with a result (the ``pycluster_health`` gauge)."""
        return [(n, 1 if c.status is CheckStatus.HEALTHY else 0)
                for n, c in sorted(self.checks.items()) if c.status is not CheckStatus.UNKNOWN]

    @property
    def healthy(self) -> bool:
        """True when no check is unhealthy."""
        return all(c.status is not CheckStatus.UNHEALTHY for c in self.checks.values())

    def status(self, history: bool = False) -> dict[str, dict[str, Any]]:
        """Every check's state by name."""
        return {n: c.as_dict(history) for n, c in sorted(self.checks.items())}

    async def readiness(self) -> tuple[bool, list[str]]:
        """``(ready, reasons)``: NATS connected, JetStream reachable, apps settled, critical
        checks passing. Probes JetStream at once (at most once a second) when its last result
        is not a recent success, so readiness returns promptly after a reconnect."""
        p = self.platform
        reasons: list[str] = []
        if not p._running:
            reasons.append("the platform is not running")
        if p.nc is None or not p.nc.is_connected:
            reasons.append("not connected to NATS")
        else:
            js = self.checks.get("jetstream")
            if js is not None:
                last = js.last
                fresh = last is not None and last.ok and time.time() - last.at < 2 * js.interval
                if not fresh and time.monotonic() - self._probe_at >= 1.0:
                    self._probe_at = time.monotonic()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(self.run_check(js), js.timeout + 0.5)
                    last = js.last
                    fresh = last is not None and last.ok
                if not fresh:
                    err = last.error if last is not None else "not checked yet"
                    reasons.append(f"JetStream not reachable ({err})")
        for name in p.apps:
            rt = p.runtimes.get(name)
            if rt is None:
                continue  # not placed on this node: nothing to settle
            if rt.role not in (Role.ACTIVE, Role.PASSIVE):
                reasons.append(f"app {name} is {rt.role.value}")
            elif rt.role is Role.ACTIVE and not rt.is_active:
                reasons.append(f"app {name} is active without a valid lease")
        for n, c in sorted(self.checks.items()):
            if c.spec.critical and c.status is CheckStatus.UNHEALTHY:
                reasons.append(f"critical check {n} is unhealthy")
            elif c.spec.builtin and c.app is not None and c.status is CheckStatus.UNHEALTHY:
                err = c.last.error if c.last is not None else None
                reasons.append(f"check {n} is unhealthy ({err})")
        return not reasons, reasons

    def node_status(self, history: bool = False) -> dict[str, Any]:
        """The ``/status`` document (without readiness)."""
        p = self.platform
        base = p.status()
        now = time.monotonic()
        for name, info in base.get("apps", {}).items():
            rt = p.runtimes.get(name)
            info["lease_age"] = None
            info["lease_remaining"] = None
            info["active_since"] = None
            if rt is None:
                info["placed"] = False
                continue
            info["placed"] = True
            el = rt.election
            deadline = el.lease_deadline() if el is not None else None
            if el is not None and deadline is not None and el.is_leader:
                ttl, margin = el.lease_ttl, el.fence_margin
                info["lease_remaining"] = round(max(0.0, deadline - now), 3)
                info["lease_age"] = round(max(0.0, ttl - margin - (deadline - now)), 3)
            elif el is not None and rt.leader is not None:
                # A standby: how long ago the leader's lease was last seen renewed.
                metrics = p.services.get("metrics")
                seen = metrics.last_seen(name, rt.leader) if metrics is not None else None  # type: ignore[attr-defined]
                if seen is not None:
                    info["lease_age"] = round(max(0.0, now - seen), 3)
            if rt.role is Role.ACTIVE:
                for at, role, _epoch, _why in reversed(rt.history):
                    if role != Role.ACTIVE.value:
                        break
                    info["active_since"] = at
            info["last_transition"] = rt.last_transition
        base["uptime"] = round(time.time() - p.started_at, 3) if p.started_at else None
        base["checks"] = self.status(history)
        base["healthy"] = self.healthy
        audit = p.services.get("audit")
        if audit is not None:
            base["audit"] = {"queued": len(audit._queue),  # type: ignore[attr-defined]
                             "written": audit.written,  # type: ignore[attr-defined]
                             "dropped": audit.dropped}  # type: ignore[attr-defined]
        base["plugins_status"] = self._plugin_status()
        return base

    def _plugin_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for impl in self.platform.pm.hook.pycluster_status.get_hookimpls():
            try:
                value = impl.function(platform=self.platform)
            except Exception as exc:
                value = {"error": f"{type(exc).__name__}: {exc}"}
            if value is not None:
                out[impl.plugin_name] = value
        return out

    # -- HTTP ----------------------------------------------------------------------------------

    async def handle_health(self, request: Request) -> Response:
        """``GET /health``: liveness."""
        p = self.platform
        failing = sorted(n for n, c in self.checks.items() if c.status is CheckStatus.UNHEALTHY)
        body = {"status": "ok" if p._running else "stopping", "node": p.node_id,
                "platform": p.name, "failing_checks": failing}
        return Response.json(body, 200 if p._running else 503)

    async def handle_ready(self, request: Request) -> Response:
        """``GET /ready``: readiness."""
        ready, reasons = await self.readiness()
        return Response.json({"ready": ready, "node": self.platform.node_id,
                              "reasons": reasons}, 200 if ready else 503)

    async def handle_status(self, request: Request) -> Response:
        """``GET /status`` (``?history=1`` adds each check's recent results)."""
        history = (request.param("history") or "") not in ("", "0", "false", "no")
        doc = self.node_status(history)
        doc["ready"], doc["not_ready"] = await self.readiness()
        return Response.json(doc)

    @property
    def url(self) -> str | None:
        """``http://host:port`` of the health server while it runs."""
        return self._server.url if self._server is not None else None

    # -- service lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the checks and the HTTP server on ``health_addr``."""
        self._running = True
        for chk in self.checks.values():
            if chk.task is None:
                chk.task = supervise(f"health:{chk.name}", functools.partial(self._loop, chk))
        s = self.platform.settings
        if s.health_addr:
            server = HttpServer(s.health_addr, name="health")
            server.route("/health", self.handle_health)
            server.route("/ready", self.handle_ready)
            server.route("/status", self.handle_status)
            metrics = self.platform.services.get("metrics")
            if metrics is not None and s.metrics_addr in (None, s.health_addr) and getattr(
                    metrics, "enabled", True):
                server.route("/metrics", metrics.handle_metrics)  # type: ignore[attr-defined]
            await server.start()
            self._server = server

    async def app_started(self, rt: AppRuntime) -> None:
        """Start the app's checks (and its built-in election check)."""
        app = rt.app
        self._app_checks.setdefault(app.name, [])
        if rt.election is not None:
            self._add_app_check(app, self._election_check(rt))
        own: AppHealth | None = app.__dict__.get("_health")
        if own is not None:
            for spec in own.specs.values():
                self._add_app_check(app, spec)

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Stop the app's checks."""
        for full in self._app_checks.pop(rt.app.name, []):
            chk = self.checks.pop(full, None)
            if chk is not None and chk.task is not None:
                await cancel_and_wait(chk.task)

    async def stop(self) -> None:
        """Stop the HTTP server and every check."""
        self._running = False
        if self._server is not None:
            await self._server.stop()
            self._server = None
        tasks = [c.task for c in self.checks.values() if c.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for c in self.checks.values():
            c.task = None
