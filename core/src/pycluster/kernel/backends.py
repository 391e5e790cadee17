"""The kernel's side of backends: the backend registry turned into stages, checks and metrics.

A backend plugin registers one thing (``pycluster_register_backends``: a kind, its option
class and its controller factory, see `pycluster.kernel.registry.BackendKind`). For every App
option of a registered class the kernel

* claims the option at ``platform.register`` (no ``pycluster_claim_option`` needed),
* builds the controller (``factory(option, app, platform)``) and wraps it in the shared
  `pycluster.backend.Supervisor`, kept in the app's plugin state
  (``app.state(kind.plugin)["backends"]``: ``(option, supervisor)`` pairs in option order),
* registers the app health check (``{kind}-{i}`` unless the kind names it otherwise),
* adds the BACKEND stage of the failover sequence (`stages`, from the coordinator),
* hands lease renewals to the supervisors (`renewed`),
* exports the kind's healthy/restarts metrics (`BackendCollector`, from the metrics plugin)
  and declares its audit category (from the audit plugin).

The option object holds no runtime state: a handle on it (``opt.health()``) finds its
supervisor with `supervisor_of`, through the app the option was registered with
(`pycluster.kernel.app.app_of`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .stages import Stage, StageOrder

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from ..backend import Supervisor
    from .app import App
    from .platform import Platform
    from .registry import BackendKind

STATE_KEY = "backends"
"""The key of the ``(option, supervisor)`` list in ``app.state(kind.plugin)``."""


def attach(platform: Platform, app: App) -> None:
    """Build the supervisors of ``app``'s backend options and register their health checks
    (at ``platform.register``)."""
    from ..backend import Supervisor

    matched = platform.backends.matches(app.options)
    for kind in platform.backends.all():
        opts = [o for k, o in matched if k is kind]
        if not opts:
            continue
        pairs: list[tuple[object, Supervisor]] = []
        for i, opt in enumerate(opts):
            controller = kind.factory(opt, app, platform)
            sup = Supervisor(controller, stage=kind.stage_of(opt, i),
                             audit=kind.kind if kind.audit is not None else None)
            pairs.append((opt, sup))
            check = kind.check_of(opt, i)
            if check not in app.health.specs:
                app.health.register(check, _check(sup),
                                    interval=controller.check_interval or 5.0,
                                    timeout=controller.check_timeout)
        app.state(kind.plugin)[STATE_KEY] = pairs


def supervisors(platform: Platform, app: App) -> list[tuple[BackendKind, object, Supervisor]]:
    """``(kind, option, supervisor)`` of every backend option of ``app``, in kind order."""
    out = []
    for kind in platform.backends.all():
        for opt, sup in app.state(kind.plugin).get(STATE_KEY, ()):
            out.append((kind, opt, sup))
    return out


def supervisor_of(option: object) -> Supervisor | None:
    """The supervisor of a backend option on this node (None: the option is not part of a
    registered app, or its kind is not installed)."""
    from .app import app_of

    app = app_of(option)
    if app is None or app.platform is None:
        return None
    for _, opt, sup in supervisors(app.platform, app):
        if opt is option:
            return sup
    return None


def stages(platform: Platform, app: App) -> list[Stage]:
    """The BACKEND stages of ``app`` (one per backend option), for the coordinator."""
    out = []
    for kind, _, sup in supervisors(platform, app):
        out.append(Stage(name=sup.stage, order=StageOrder.BACKEND, activate=sup.start,
                         deactivate=sup.stop, timeout=sup.controller.stage_timeout,
                         plugin=kind.plugin, extra={"backend": sup}))
    return out


def renewed(platform: Platform, app: App, deadline: float) -> None:
    """Hand the app's new lease deadline to its started backends (their fence guards)."""
    for _, _, sup in supervisors(platform, app):
        sup.renewed(deadline)


def _check(sup: Supervisor) -> Any:
    """The app health check of one backend: ``standby`` where it does not run here, else its
    health (an unhealthy one raises, naming the service)."""

    async def check() -> dict[str, Any]:
        if not sup.running:
            return {"state": "standby"}  # nothing runs here to check
        h = await sup.health()
        if not h.healthy:
            raise RuntimeError(f"{sup.controller.describe()} is {h.detail}")
        return {"state": h.detail, **h.data}

    return check


class BackendCollector:
    """Scrape-time metrics of every backend kind that declares them (`BackendMetrics`):
    per app and backend a ``healthy`` gauge (the last check while started; absent where the
    backend does not run) and a ``restarts`` counter (the restart policy's total)."""

    def __init__(self, platform: Platform) -> None:
        self.platform = platform

    def collect(self) -> Iterator[Metric]:
        """The families of each kind with metrics, from the supervisors' current state."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for kind in self.platform.backends.all():
            spec = kind.metrics
            if spec is None:
                continue
            labels = ["app", spec.label]
            healthy = GaugeMetricFamily(*spec.healthy, labels=labels)
            restarts = CounterMetricFamily(*spec.restarts, labels=labels)
            for app in self.platform.apps.values():
                for _, sup in app.state(kind.plugin).get(STATE_KEY, ()):
                    values = [app.name, spec.label_of(sup)]
                    restarts.add_metric(values, sup.policy.total)
                    if sup.running and sup.last_health is not None:
                        healthy.add_metric(values, 1.0 if sup.last_health.healthy else 0.0)
            yield healthy
            yield restarts
