"""``platform.health``: running the checks of this node, their notifications (audit through
the audit plugin, ``on_health_change`` hooks, ``pycluster_health_changed``) and step-downs of
apps whose checks fail (see `pycluster.builtin.health.checks` for what a check is)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ...kernel import natsutil
from ...kernel.aio import TaskSet, cancel_and_wait, sleep_aligned
from ...kernel.context import Context
from ...kernel.coordinator import run_hooks
from ...kernel.errors import ConfigError
from ...kernel.settings import server_address
from ...plugins import call_each, call_notify
from .checks import (
    AppHealth,
    Breaker,
    ChangeListener,
    CheckFn,
    CheckResult,
    CheckSpec,
    CheckStatus,
    HealthCheck,
    call_check,
    election_check,
    validate_check,
)
from .endpoints import HealthEndpoints

if TYPE_CHECKING:
    from ...httpserver import HttpServer
    from ...kernel.app import App
    from ...kernel.coordinator import AppRuntime
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.health")

PLUGIN = "health"


class PlatformHealth(HealthEndpoints):
    """``platform.health`` (the health plugin's service): every check of this node, the change
    notifications and the health HTTP endpoints."""

    name = "health"

    def __init__(self, platform: Platform) -> None:
        self.platform = platform
        s = platform.settings
        self.interval = float(s.health_interval)
        self.timeout = float(s.health_timeout)
        self.history_size = int(s.health_history)
        self.breaker_threshold = int(s.health_breaker_threshold)
        self.breaker_cooldown = float(s.health_breaker_cooldown)
        self.step_down_all = bool(s.health_step_down)
        self.checks: dict[str, HealthCheck] = {}
        self._platform_specs: dict[str, CheckSpec] = {}
        self._app_checks: dict[str, list[str]] = {}
        self._listeners: list[ChangeListener] = []
        self._server: HttpServer | None = None
        self._running = False
        self._tasks = TaskSet("health")
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
        validate_check(name, check, interval, timeout, failure_threshold, breaker_threshold,
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
        if self._running and self._tasks.running:
            chk.task = self._tasks.spawn(f"health:{full}", functools.partial(self._loop, chk))

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
            control = self.platform.nc_control
            if control is not None and not control.is_connected:
                raise ConnectionError("the control connection (election, membership) is down")
            started = time.monotonic()
            await natsutil.flush(nc)  # bounded by the check's timeout
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


    # -- running -------------------------------------------------------------------------------

    async def _loop(self, chk: HealthCheck) -> None:
        while True:
            try:
                await self.run_check(chk)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let a bug in bookkeeping kill the schedule
                log.exception("health check %s: bookkeeping failed", chk.name)
            await sleep_aligned(chk.interval)

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
            value = await call_check(chk.spec.fn, chk.timeout)
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
        m = self.platform.services.get("metrics")  # its public metrics, when enabled
        if m is not None and not result.skipped:
            m.health_check_duration.labels(chk.name).observe(result.latency)
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
        extra = {"check": chk.name, "status": status.value, "previous": previous.value,
                 "error": result.error}
        apps = [chk.app] if chk.app is not None else list(p.apps.values())
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
        p.notify(call_each(p.pm.hook.pycluster_health_changed, "health_changed", platform=p,
                           check=chk.name, status=status.value, previous=previous.value,
                           app=chk.app, error=result.error), "health_changed")
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
            audit = self.platform.services.get("audit")  # its public API, when enabled
            if audit is not None:
                audit.log("health", "step_down", {"check": chk.name, "epoch": epoch}, app=rt.app)
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


    # -- service lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the checks, the status requests over NATS and the HTTP server on
        ``health_addr``."""
        self._running = True
        await self._tasks.open()
        for chk in self.checks.values():
            if chk.task is None:
                chk.task = self._tasks.spawn(f"health:{chk.name}",
                                             functools.partial(self._loop, chk))
        await self._serve_nats()
        await self._serve_http()

    async def app_started(self, rt: AppRuntime) -> None:
        """Start the app's checks (and its built-in election check)."""
        app = rt.app
        self._app_checks.setdefault(app.name, [])
        if rt.election is not None:
            self._add_app_check(app, election_check(rt))
        own = app.state(PLUGIN).get("handle")  # checks declared with app.health
        declared = own.specs if isinstance(own, AppHealth) else {}
        for spec in declared.values():
            self._add_app_check(app, spec)
        # Each replicator of the app (kernel/replication.py) is checked through its protocol:
        # the check ``<name>`` (a standby too far behind, replication not running when active).
        for ar in rt.replicators:
            name = ar.replicator.name
            if name not in declared:
                self._add_app_check(app, CheckSpec(name, ar.replicator.check, interval=5.0,
                                                   timeout=5.0, failure_threshold=2))

    async def app_stopped(self, rt: AppRuntime) -> None:
        """Stop the app's checks."""
        for full in self._app_checks.pop(rt.app.name, []):
            chk = self.checks.pop(full, None)
            if chk is not None and chk.task is not None:
                await cancel_and_wait(chk.task)

    async def stop(self) -> None:
        """Stop the HTTP server and every check."""
        self._running = False
        await self._stop_nats()
        await self._stop_http()
        await self._tasks.close()  # every check's loop, in one task group
        for c in self.checks.values():
            c.task = None

