"""Plugin "systemd": run a systemd unit while the app is active on this node.

Hooks: backend kind "systemd" (the `Systemd` option and its `SystemdBackend` controller: the
kernel turns each option into a BACKEND stage, the app health check ``systemd-<unit>``, the
audit category ``systemd`` and the metrics), the ``systemd:`` config section, and a start-up
check that a systemd manager is reachable (a local systemd, or the command of
``$PYCLUSTER_SYSTEMD_PREFIX``).

Metrics (per app and unit): ``pycluster_systemd_unit_healthy`` (1/0, the last check while
active; absent on a standby) and ``pycluster_systemd_restarts_total`` (restarts by the backend).
"""

from __future__ import annotations

import os
import re
import shutil

from pycluster.kernel.registry import BackendMetrics, BackendRegistry, ConfigRegistry
from pycluster.plugins import hookimpl

from .backend import SystemdBackend
from .options import PREFIX_ENV, Systemd, split_prefix

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


def check_name(option: Systemd, index: int = 0) -> str:
    """The app health check of a `Systemd` option: ``systemd-<unit>`` (``.`` → ``_``)."""
    return "systemd-" + re.sub(r"[^A-Za-z0-9_-]", "_", option.unit)


@hookimpl
def pycluster_register_backends(registry: BackendRegistry) -> None:
    """Backend kind "systemd": per `Systemd` option the kernel builds stage
    ``systemd-<unit>``, app health check ``systemd-<unit>`` (``.`` → ``_``), the audit
    category ``systemd`` and the metrics, around a `SystemdBackend` controller."""
    registry.add(
        PLUGIN, Systemd, SystemdBackend, plugin=PLUGIN,
        stage_name=lambda opt, i: f"systemd-{opt.unit}",
        check_name=check_name,
        audit={
            "started": "the unit (and its requires) started on activation (data: unit, epoch)",
            "stopped": "the unit was stopped on step-down (data: unit, epoch, reason, error)",
            "restarted": "the backend restarted a failed unit while active (data: unit, "
                         "detail)",
            "failed": "the unit kept failing; the node steps down (data: unit, detail, "
                      "journal)",
        },
        metrics=BackendMetrics(
            label="unit", label_of=lambda sup: sup.controller.option.unit,
            healthy=("pycluster_systemd_unit_healthy",
                     "1 when the unit was active at its last check, else 0"),
            restarts=("pycluster_systemd_restarts", "Restarts of failed units by the backend"),
        ),
    )


@hookimpl
def pycluster_config_sections(registry: ConfigRegistry) -> None:
    """The ``systemd:`` section of an app."""
    registry.add(PLUGIN, Systemd)  # the section is the declaration of Systemd


@hookimpl
def pycluster_check() -> str | None:
    """Report when no systemd manager is reachable by default."""
    return missing_dependency()
