"""Plugin "systemd": run a systemd unit while the app is active on this node.

Hooks: the `Systemd` option class and its claim (which also registers the app health check
``systemd-<unit>``), backend kind "systemd", one BACKEND stage per `Systemd` option, the
``systemd:`` config section, the audit category ``systemd``, metrics, and a start-up check that
a systemd manager is reachable (a local systemd, or the command of ``$PYCLUSTER_SYSTEMD_PREFIX``).

Metrics (per app and unit): ``pycluster_systemd_unit_healthy`` (1/0, the last check while
active; absent on a standby) and ``pycluster_systemd_restarts_total`` (restarts by the backend).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import TYPE_CHECKING

from pycluster.backend import backend_stage
from pycluster.kernel.registry import BackendRegistry, ConfigRegistry, OptionRegistry
from pycluster.kernel.stages import StageRegistry
from pycluster.pluginkit import BackendCollector, backend_health_check, claim_with_health_check
from pycluster.plugins import hookimpl

from .backend import SystemdBackend
from .options import PREFIX_ENV, Systemd, SystemdSection, split_prefix, systemd_from_section

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pycluster.builtin.audit.log import AuditCategoryRegistry
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

PLUGIN = "systemd"


def missing_dependency() -> str | None:
    """Why the default systemd manager cannot be reached from here (None when it can)."""
    try:
        prefix = split_prefix(None)
    except ValueError as exc:
        return f"${PREFIX_ENV} is not valid shell words: {exc}"
    if prefix:
        if shutil.which(prefix[0]) is None:
            return f"${PREFIX_ENV} runs {prefix[0]!r}, which is not installed"
        return None
    if shutil.which("systemctl") is None:
        return "systemctl is not installed"
    if not os.path.isdir("/run/systemd/system"):
        return (f"systemd is not the init system here (/run/systemd/system is missing); set "
                f"${PREFIX_ENV} (e.g. 'ssh host') or Systemd(prefix=...) to reach a systemd "
                "elsewhere")
    return None


@hookimpl
def pycluster_register_options(registry: OptionRegistry) -> None:
    """The `Systemd` option."""
    registry.add(Systemd, plugin=PLUGIN)


@hookimpl
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "systemd"."""
    registry.add(PLUGIN, Systemd, SystemdBackend, plugin=PLUGIN)


def check_name(option: Systemd) -> str:
    """The app health check of a `Systemd` option: ``systemd-<unit>`` (``.`` → ``_``)."""
    return "systemd-" + re.sub(r"[^A-Za-z0-9_-]", "_", option.unit)


@hookimpl
def pycluster_claim_option(app: App, option: object) -> bool | None:
    """Claim `Systemd` options; the unit's health becomes an app health check."""
    return claim_with_health_check(
        app, option, Systemd, lambda a, o: check_name(o),
        lambda o: backend_health_check(lambda: o._backend, lambda b: f"unit {o.unit}"),
        timeout=30.0)


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``systemd:`` section of an app."""
    registry.add(PLUGIN, SystemdSection, systemd_from_section)


@hookimpl
def pycluster_stages(app: App, platform: Platform, registry: StageRegistry) -> None:
    """A BACKEND stage per `Systemd` option."""
    for opt in (o for o in app.options if isinstance(o, Systemd)):
        name = f"systemd-{opt.unit}"
        backend = SystemdBackend(opt, app, platform, stage=name)
        # Each unit may take start_timeout (or stop_timeout), plus a few systemctl calls.
        units = 1 + len(opt.requires)
        timeout = units * (max(opt.start_timeout, opt.stop_timeout) + 10.0)
        registry.add(backend_stage(name, backend, plugin=PLUGIN, timeout=timeout))


@hookimpl
def pycluster_audit_categories(registry: AuditCategoryRegistry) -> None:
    """The ``systemd`` audit category."""
    registry.add(PLUGIN, {
        "started": "the unit (and its requires) started on activation (data: unit, epoch)",
        "stopped": "the unit was stopped on step-down (data: unit, epoch, reason, error)",
        "restarted": "the backend restarted a failed unit while active (data: unit, detail)",
        "failed": "the unit kept failing; the node steps down (data: unit, detail, journal)",
    }, plugin=PLUGIN)


@hookimpl
def pycluster_register_metrics(registry: CollectorRegistry, platform: Platform) -> None:
    """``pycluster_systemd_unit_healthy`` and ``pycluster_systemd_restarts_total``."""
    registry.register(BackendCollector(
        platform, Systemd, label="unit", label_of=lambda opt, b: opt.unit,
        healthy=("pycluster_systemd_unit_healthy",
                 "1 when the unit was active at its last check, else 0"),
        restarts=("pycluster_systemd_restarts", "Restarts of failed units by the backend"),
    ))


@hookimpl
def pycluster_check() -> str | None:
    """Report when no systemd manager is reachable by default."""
    return missing_dependency()
