"""Small helpers shared by plugins that add an App option with a supervised controller.

A plugin such as ``docker``, ``systemd`` or ``vip`` claims its option class, turns the
controller's state into an app health check and exports per-controller metrics at scrape time.
These helpers are that common code; the plugin keeps its own names (check names, metric names,
labels), so using them changes nothing a user sees.

* `claim_with_health_check`: the body of a ``pycluster_claim_option`` hook.
* `backend_health_check`: an app health check that reuses a supervised backend's last probe.
* `BackendCollector`: a Prometheus collector with a "healthy" gauge and a "restarts" counter per
  backend of one option class.

Nothing here talks to NATS: a health check reads the controller's last answer (or probes it),
so a lost NATS connection does not change what it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .backend import BackendHealth, RestartPolicy

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from .kernel.app import App
    from .kernel.platform import Platform

__all__ = [
    "BackendCollector",
    "CheckedOption",
    "SupervisedBackend",
    "backend_health_check",
    "claim_with_health_check",
]


class CheckedOption(Protocol):
    """An App option whose controller is checked every ``check_interval`` seconds."""

    @property
    def check_interval(self) -> float:
        """Seconds between checks of the controller while active."""


class SupervisedBackend(Protocol):
    """A backend that supervises its service while active and keeps the last probe."""

    @property
    def running(self) -> bool:
        """True while it is active on this node (started and not stopped)."""

    @property
    def last_health(self) -> BackendHealth | None:
        """The supervisor's last probe (None before the first one)."""

    @property
    def policy(self) -> RestartPolicy:
        """Its restart policy (``policy.total`` counts the restarts it made)."""

    async def health(self) -> BackendHealth:
        """Probe the service now: cheap, never raises."""


OptionT = TypeVar("OptionT", bound=CheckedOption)


def claim_with_health_check(
    app: App,
    option: object,
    kind: type[OptionT],
    name: Callable[[App, OptionT], str],
    check: Callable[[OptionT], Callable[[], Any]],
    *,
    timeout: float,
) -> bool | None:
    """Claim ``option`` when it is a ``kind`` and register its app health check once.

    Use it as the whole body of a ``pycluster_claim_option`` hook.

    :param app: the app the option was passed to.
    :param option: the option offered to the hook.
    :param kind: the option class this plugin owns.
    :param name: the check's name for ``(app, option)``, e.g. ``"docker-0"``.
    :param check: builds the check function for the option.
    :param timeout: seconds one run of the check may take.
    :returns: None when the option is not a ``kind`` (not ours), else True.
    """
    if not isinstance(option, kind):
        return None
    check_name = name(app, option)
    if check_name not in app.health.specs:
        app.health.register(check_name, check(option), interval=option.check_interval,
                            timeout=timeout)
    return True


def backend_health_check(
    backend: Callable[[], SupervisedBackend | None],
    describe: Callable[[Any], str],
) -> Callable[[], Any]:
    """An app health check for a supervised backend.

    It reports ``{"state": "standby"}`` where the backend is not active (nothing runs here to
    check), otherwise the supervisor's last probe (or a fresh one before the first): its
    ``detail`` as ``state`` plus its ``data``; an unhealthy probe raises
    ``RuntimeError("<describe(backend)> is <detail>")``.

    :param backend: returns the option's backend (None before the app's stages are built).
    :param describe: names the service for the error, e.g. ``lambda b: f"unit {b.unit}"``.
    """

    async def check() -> dict[str, Any]:
        b = backend()
        if b is None or not b.running:
            return {"state": "standby"}  # nothing to check where the service does not run
        # The backend's supervisor probes every check_interval; reuse its last answer.
        h = b.last_health or await b.health()
        if not h.healthy:
            raise RuntimeError(f"{describe(b)} is {h.detail}")
        return {"state": h.detail, **h.data}

    return check


class BackendCollector:
    """Scrape-time metrics of the platform's backends of one option class.

    Per app and backend: a gauge ``healthy`` (1/0, the last check while active; absent where
    the backend is not running) and a counter ``restarts`` (``backend.policy.total``).

    :param platform: the platform whose apps are scanned at each scrape.
    :param kind: the option class; its instances hold the backend in ``_backend``.
    :param label: the name of the second label (after ``app``), e.g. ``"container"``.
    :param label_of: the label's value for ``(option, backend)``.
    :param healthy: ``(name, help)`` of the gauge.
    :param restarts: ``(name, help)`` of the counter (Prometheus adds ``_total``).
    """

    def __init__(
        self,
        platform: Platform,
        kind: type[Any],
        *,
        label: str,
        label_of: Callable[[Any, Any], str],
        healthy: tuple[str, str],
        restarts: tuple[str, str],
    ) -> None:
        self.platform = platform
        self.kind = kind
        self.label = label
        self.label_of = label_of
        self.healthy = healthy
        self.restarts = restarts

    def collect(self) -> Iterator[Metric]:
        """The two metric families, built from the backends' current state."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels = ["app", self.label]
        healthy = GaugeMetricFamily(*self.healthy, labels=labels)
        restarts = CounterMetricFamily(*self.restarts, labels=labels)
        for app in self.platform.apps.values():
            for opt in (o for o in app.options if isinstance(o, self.kind)):
                b: SupervisedBackend | None = opt._backend
                if b is None:
                    continue
                values = [app.name, self.label_of(opt, b)]
                restarts.add_metric(values, b.policy.total)
                if b.running and b.last_health is not None:
                    healthy.add_metric(values, 1.0 if b.last_health.healthy else 0.0)
        yield healthy
        yield restarts
