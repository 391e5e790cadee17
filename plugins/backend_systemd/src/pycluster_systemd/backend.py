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
  (category ``systemd``). `SystemdBackend.health` feeds the app's health check
  ``{app}.systemd-<unit>`` and the metrics.
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
import time
from typing import TYPE_CHECKING

from pycluster.backend import (
    BackendError,
    BackendHealth,
    LeaseFence,
    RestartPolicy,
    scrubbed_environ,
)
from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.context import Context

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.coordinator import AppRuntime
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


class SystemdBackend:
    """Start, stop and watch one systemd unit (and the units it requires)."""

    def __init__(self, option: Systemd, app: App, platform: Platform, stage: str = "") -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.stage = stage or f"systemd-{option.unit}"
        self.prefix = option.argv_prefix()
        self.policy = RestartPolicy(option.max_restarts, option.restart_backoff,
                                    option.restart_window)
        self.last_health: BackendHealth | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = True
        self.running = False
        unit = option.unit
        self.fence = LeaseFence(app.name, platform, action_timeout=_FENCE_ACTION_TIMEOUT,
                                actions=[self._argv("systemctl", "kill", "--signal=SIGKILL", unit),
                                         self._argv("systemctl", "stop", unit)])
        option._backend = self

    def _runtime(self) -> AppRuntime | None:
        return self.platform.runtimes.get(self.app.name)

    def _lease_ok(self) -> bool:
        rt = self._runtime()
        return rt is None or rt.election is None or rt.election.is_leader

    def audit(self, action: str, **data: object) -> None:
        """Write an audit entry of category ``systemd`` (best effort)."""
        try:
            self.platform.audit.log("systemd", action, dict(data, unit=self.option.unit),
                                    app=self.app)
        except Exception:
            log.debug("audit %s not written", action, exc_info=True)

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
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
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

    async def start(self, ctx: Context) -> None:
        """Start the required units, then the unit; return once it is active."""
        self._stopping = False
        self.policy.reset()
        if self.option.epoch_variable:
            await self.systemctl("set-environment", f"{self.option.epoch_variable}={ctx.epoch}")
        for unit in (*self.option.requires, self.option.unit):
            await self._start_unit(unit)
        await self.fence.start()  # from now on the unit cannot outlive the lease
        self.last_health = BackendHealth(True, "active")
        self.running = True
        self.audit("started", epoch=ctx.epoch)
        self._task = asyncio.create_task(self._supervise(), name=f"systemd:{self.option.unit}")

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

    async def stop(self, ctx: Context) -> None:
        """Stop the unit, then (``stop_requires``) the required units in reverse order."""
        self._stopping = True
        self.running = False
        await self.fence.release()  # a graceful stop: the guard must not act meanwhile
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
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
        self.audit("stopped", epoch=ctx.epoch, reason=ctx.reason,
                   error=str(errors[0]) if errors else None)
        if errors:
            raise errors[0]

    # -- health and supervision --------------------------------------------------------------

    async def health(self) -> BackendHealth:
        """Healthy while the unit is active; ``data`` holds its systemd properties."""
        try:
            props = await self.show(self.option.unit)
        except (SystemdUnitError, TimeoutError) as exc:
            return BackendHealth(False, f"cannot query systemd: {exc}")
        return BackendHealth(props.get("ActiveState") == "active", _describe(props),
                             dict(props, restarts=self.policy.total))

    async def _supervise(self) -> None:
        transient_since: float | None = None
        while not self._stopping:
            await asyncio.sleep(self.option.check_interval)
            if self._stopping:
                return
            h = await self.health()
            self.last_health = h
            if h.healthy:
                transient_since = None
                continue
            state = str(h.data.get("ActiveState", ""))
            if state in _TRANSIENT:
                # systemd is (re)starting it itself: give it the start timeout.
                transient_since = transient_since or time.monotonic()
                if time.monotonic() - transient_since < self.option.start_timeout:
                    continue
            transient_since = None
            if not self._lease_ok():
                return  # the coordinator is stopping it
            journal = await self.journal()
            delay = self.policy.next_delay()
            if delay is None:
                reason = (f"unit {self.option.unit} is {h.detail}; restart policy exhausted "
                          f"({self.option.max_restarts} in {self.option.restart_window:.0f}s)")
                log.error("app %s: %s; stepping down. Recent journal:\n%s", self.app.name,
                          reason, "\n".join(journal))
                self.audit("failed", detail=h.detail, journal=journal[-5:])
                rt = self._runtime()
                if rt is not None:
                    rt.report_failure(self.stage, reason)
                return
            log.warning("app %s: unit %s is %s; restarting in %.1fs. Recent journal:\n%s",
                        self.app.name, self.option.unit, h.detail, delay, "\n".join(journal))
            await asyncio.sleep(delay)
            if self._stopping or not self._lease_ok():
                return
            try:
                await self._start_unit(self.option.unit)
                await self.fence.start()  # re-armed if it fenced meanwhile
                self.audit("restarted", detail=h.detail, restarts=self.policy.total)
            except (SystemdUnitError, TimeoutError) as exc:
                log.error("app %s: restart failed: %s", self.app.name, exc)


def _describe(props: dict[str, str]) -> str:
    text = f"{props.get('ActiveState', '?')}/{props.get('SubState', '?')}"
    if props.get("Result") not in (None, "", "success"):
        text += f" result={props['Result']}"
    if props.get("ExecMainStatus") not in (None, "", "0"):
        text += f" status={props['ExecMainStatus']}"
    if props.get("StatusText"):
        text += f" ({props['StatusText']})"
    return text
