"""`SystemdBackend`: the controller behind a `Systemd` option.

It drives ``systemctl`` and ``journalctl`` through a command prefix (nothing locally, or
``ssh host`` / ``podman exec NAME``), not D-Bus: the same code reaches a local manager, a
remote host and a container, needs no D-Bus library or socket forwarding, and the journal —
which is not on the systemd D-Bus API — comes through the same path.

Behaviour:
* start: ``set-environment`` of the epoch (optional), then for each unit (``requires`` first):
  refuse a unit systemd does not know, ``reset-failed`` a failed one, ``systemctl start`` (it
  returns when the start job finished; for ``Type=notify`` that is READY=1), then check it is
  active. A failure raises `SystemdUnitError` with the unit's recent journal lines.
* supervision while active: ``systemctl show`` every ``check_interval``. A unit in a transient
  state (``activating``, e.g. systemd's own ``Restart=`` back-off) is given ``start_timeout``; a
  unit failed or inactive is restarted by policy (only while the lease is valid); past the
  policy the node steps down (`AppRuntime.report_failure`). Restarts and failures are audited
  (category ``systemd``). This is the shared `pycluster.backend.Supervisor`; the probe
  (`SystemdBackend.probe`) feeds the app's health check ``{app}.systemd-<unit>`` and the
  metrics.
* stop: ``systemctl stop`` bounded by the lease deadline; if that does not finish, ``systemctl
  kill --signal=SIGKILL`` so the service cannot outlive the lease (fencing).
* the fence: once the unit is active, a `pycluster.backend.LeaseFence` (a fence guard process)
  gets every lease renewal; if the node is SIGKILLed or paused past the lease, the guard runs
  ``systemctl kill --signal=SIGKILL UNIT`` then ``systemctl stop UNIT`` (through the prefix) on
  its own, before another node can win the lease. A graceful stop releases the guard first.
* Loss of the NATS connection does not touch the unit; the coordinator stops it when the lease
  is lost. Loss of the prefix's transport (ssh down, container gone) shows as an unhealthy
  probe and is handled like a failed unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pycluster.backend import (
    BackendError,
    BackendHealth,
    Controller,
    LeaseFence,
    RestartPolicy,
    scrubbed_environ,
)
from pycluster.kernel.context import Context

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

    from .options import Systemd

log = logging.getLogger("pycluster.systemd")

PROPERTIES = ("LoadState", "ActiveState", "SubState", "Result", "Type", "MainPID", "NRestarts",
              "ExecMainStatus", "StatusText")
_TRANSIENT = ("activating", "deactivating", "reloading")
_CALL_TIMEOUT = 30.0
_FENCE_ACTION_TIMEOUT = 10.0  # bound of each fence action (systemctl kill, systemctl stop)


class SystemdUnitError(BackendError):
    """A unit could not be started, stopped or queried; carries its recent journal lines.

    :ivar unit: the unit. :ivar action: start, stop, show, ... :ivar journal: recent lines.
    """

    def __init__(self, app: str, unit: str, action: str, reason: str,
                 journal: list[str] | None = None) -> None:
        self.unit = unit
        self.action = action
        self.journal = list(journal or [])
        text = f"{action} failed: {reason}"
        if self.journal:
            text += "\n  recent journal:\n    " + "\n    ".join(self.journal)
        super().__init__(app, f"systemd unit {unit}", text)
        self.reason = reason


class SystemdBackend(Controller):
    """Start, stop and probe one systemd unit (and the units it requires); the shared
    `pycluster.backend.Supervisor` does the rest (restarts, fence, audit, metrics)."""

    kind = "systemd"
    check_timeout = 30.0

    def __init__(self, option: Systemd, app: App, platform: Platform) -> None:
        super().__init__(option, app, platform)
        self.option: Systemd = option
        self.prefix = option.argv_prefix()
        self.policy = RestartPolicy(option.max_restarts, option.restart_backoff,
                                    option.restart_window)
        self.check_interval = option.check_interval
        self.settle_timeout = option.start_timeout  # systemd's own Restart= at work
        # Each unit may take start_timeout (or stop_timeout), plus a few systemctl calls.
        units = 1 + len(option.requires)
        self.stage_timeout = units * (max(option.start_timeout, option.stop_timeout) + 10.0)
        unit = option.unit
        self._fence = LeaseFence(app.name, platform, action_timeout=_FENCE_ACTION_TIMEOUT,
                                 actions=[self._argv("systemctl", "kill", "--signal=SIGKILL",
                                                     unit),
                                          self._argv("systemctl", "stop", unit)])

    def fence(self) -> LeaseFence:
        """The guard that kills the unit if this node dies or stops renewing its lease."""
        return self._fence

    def describe(self) -> str:
        """``unit NAME``."""
        return f"unit {self.option.unit}"

    def identity(self) -> dict[str, object]:
        """``{"unit": NAME}`` in every audit entry."""
        return {"unit": self.option.unit}

    async def diagnostics(self) -> dict[str, list[str]]:
        """The unit's recent journal lines."""
        return {"journal": await self.journal()}

    # -- commands --------------------------------------------------------------------------

    def _argv(self, tool: str, *args: str) -> list[str]:
        return [*self.prefix, tool, *(["--user"] if self.option.user else []), *args]

    async def _run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        try:
            # systemctl (or its prefix: ssh, podman exec) is the node's own tool and may need
            # SSH_AUTH_SOCK or XDG_RUNTIME_DIR, but never the node's NATS credentials.
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=scrubbed_environ(),
            )
        except OSError as exc:
            raise SystemdUnitError(self.app.name, self.option.unit, argv[len(self.prefix)],
                                   f"cannot run {argv[0]!r}: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                out, err = await proc.communicate()
        except BaseException:
            # Timed out or cancelled (lease lost): do not leave the command running.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        return (proc.returncode or 0, out.decode(errors="replace"),
                err.decode(errors="replace"))

    async def systemctl(self, *args: str, timeout: float = _CALL_TIMEOUT) -> tuple[int, str, str]:
        """Run ``systemctl ARGS`` through the prefix; (exit code, stdout, stderr)."""
        return await self._run(self._argv("systemctl", *args), timeout)

    async def show(self, unit: str) -> dict[str, str]:
        """Selected properties of ``unit`` (`PROPERTIES`)."""
        rc, out, err = await self.systemctl("show", unit, "--property=" + ",".join(PROPERTIES))
        if rc != 0:
            raise SystemdUnitError(self.app.name, unit, "show",
                                   (err or out).strip() or f"exit {rc}")
        props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        return props

    async def journal(self, unit: str | None = None, lines: int | None = None) -> list[str]:
        """Recent journal lines of ``unit`` (best effort: [] when unavailable)."""
        n = self.option.journal_lines if lines is None else lines
        if n <= 0:
            return []
        argv = self._argv("journalctl", "-u", unit or self.option.unit, "-n", str(n),
                          "--no-pager", "-o", "short-iso")
        try:
            rc, out, _ = await self._run(argv, _CALL_TIMEOUT)
        except (SystemdUnitError, TimeoutError):
            return []
        return out.splitlines()[-n:] if rc == 0 else []

    async def _fail(self, unit: str, action: str, reason: str) -> SystemdUnitError:
        return SystemdUnitError(self.app.name, unit, action, reason, await self.journal(unit))

    # -- start -------------------------------------------------------------------------------

    async def _start_unit(self, unit: str) -> None:
        props = await self.show(unit)
        if props.get("LoadState") in ("not-found", "error", "bad-setting", "masked"):
            raise await self._fail(unit, "start", f"LoadState={props.get('LoadState')}")
        if props.get("ActiveState") == "failed":
            await self.systemctl("reset-failed", unit)
        try:
            rc, out, err = await self.systemctl("start", unit, timeout=self.option.start_timeout)
        except TimeoutError:
            raise await self._fail(unit, "start",
                                   f"not started within {self.option.start_timeout}s") from None
        if rc != 0:
            raise await self._fail(unit, "start", (err or out).strip() or f"exit {rc}")
        props = await self.show(unit)
        if props.get("ActiveState") != "active":
            raise await self._fail(unit, "start", _describe(props))
        log.info("app %s: unit %s is active (%s)", self.app.name, unit, _describe(props))

    async def start(self, ctx: Context) -> BackendHealth:
        """Start the required units, then the unit; return once it is active."""
        if self.option.epoch_variable:
            await self.systemctl("set-environment", f"{self.option.epoch_variable}={ctx.epoch}")
        for unit in (*self.option.requires, self.option.unit):
            await self._start_unit(unit)
        return BackendHealth(True, "active")

    async def restart(self, ctx: Context) -> BackendHealth:
        """Start the failed unit again (its requires are left as they are)."""
        try:
            await self._start_unit(self.option.unit)
        except TimeoutError as exc:
            raise await self._fail(self.option.unit, "start", f"timed out: {exc}") from None
        return BackendHealth(True, "active")

    # -- stop --------------------------------------------------------------------------------

    async def _stop_unit(self, unit: str, ctx: Context) -> None:
        timeout = max(ctx.remaining(self.option.stop_timeout), 0.5)
        try:
            rc, out, err = await self.systemctl("stop", unit, timeout=timeout)
            if rc != 0:
                log.error("app %s: systemctl stop %s: %s", self.app.name, unit,
                          (err or out).strip())
            else:
                return
        except TimeoutError:
            log.error("app %s: unit %s did not stop within %.1fs; killing it", self.app.name,
                      unit, timeout)
        rc, out, err = await self.systemctl("kill", "--signal=SIGKILL", unit)
        if rc != 0:
            raise await self._fail(unit, "stop", (err or out).strip() or f"exit {rc}")

    async def stop(self, ctx: Context) -> dict[str, object]:
        """Stop the unit, then (``stop_requires``) the required units in reverse order."""
        units = [self.option.unit]
        if self.option.stop_requires:
            units += list(reversed(self.option.requires))
        errors = []
        for unit in units:
            try:
                await self._stop_unit(unit, ctx)
            except SystemdUnitError as exc:
                errors.append(exc)
        log.info("app %s: unit %s stopped", self.app.name, self.option.unit)
        if errors:
            raise errors[0]
        return {"error": None}

    # -- health ------------------------------------------------------------------------------

    async def probe(self) -> BackendHealth:
        """Healthy while the unit is active; ``data`` holds its systemd properties; a unit
        systemd itself is (re)starting is `BackendHealth.settling`."""
        try:
            props = await self.show(self.option.unit)
        except (SystemdUnitError, TimeoutError) as exc:
            return BackendHealth(False, f"cannot query systemd: {exc}")
        state = props.get("ActiveState")
        return BackendHealth(state == "active", _describe(props),
                             dict(props, restarts=self.policy.total),
                             settling=state in _TRANSIENT)


def _describe(props: dict[str, str]) -> str:
    text = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
    if props.get("Result") not in (None, "", "success"):
        text += f" result={props['Result']}"
    if props.get("ExecMainStatus") not in (None, "", "0"):
        text += f" status={props['ExecMainStatus']}"
    if props.get("StatusText"):
        text += f" ({props['StatusText']})"
    return text
