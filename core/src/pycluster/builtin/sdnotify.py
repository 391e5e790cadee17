"""Default plugin "sdnotify": systemd's notify protocol, without libsystemd.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (and, with ``WatchdogSec=``,
``WATCHDOG_USEC``); a platform created there (``pycluster run``, or a program's own) registers
the plugin's service, which:

* sends ``READY=1`` once the platform is connected, joined and its apps started (as standbys;
  activation follows the election), so that ``systemctl start`` returns when the node is up;
* sends ``STATUS=...`` on every role change ("prod/node-1: web active (epoch 7), db passive"),
  shown by ``systemctl status``;
* from READY on, sends ``WATCHDOG=1`` at once after every lease renewal, and otherwise every
  quarter of the watchdog interval while the event loop runs and no held lease is overdue. A
  node that is paused (SIGSTOP, a frozen VM), deadlocked, blocked in a synchronous call, or
  whose lease loop stalled stops pinging, and systemd kills it (``WatchdogSignal``, SIGABRT by
  default: Python's fault handler, enabled here, writes every thread's traceback to the journal)
  and restarts it (``Restart=on-failure``). Its process backends die with it (fence guard) and a
  standby takes over when the lease expires. A node merely cut off from NATS keeps pinging: it
  fenced itself, and restarting it would not help;
* sends ``STOPPING=1`` when the platform leaves (after its apps stepped down).

Without ``NOTIFY_SOCKET`` the plugin registers no service and sends nothing. A lost datagram
(systemd restarting) is logged once and ignored: notification never blocks the node.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import socket
import sys
import time
from typing import TYPE_CHECKING

from ..kernel.aio import cancel_and_wait, supervise
from ..plugins import hookimpl

if TYPE_CHECKING:
    from ..kernel.app import App
    from ..kernel.platform import Platform
    from ..kernel.services import PlatformServices

log = logging.getLogger("pycluster.sdnotify")

__all__ = ["Notifier", "SystemdIntegration", "watchdog_interval"]


class Notifier:
    """Send sd_notify(3) datagrams to ``NOTIFY_SOCKET`` (a path, or ``@name`` for abstract).

    Example::

        n = Notifier()            # from the environment; disabled when not under systemd
        n.send("READY=1", "STATUS=serving")
    """

    def __init__(self, address: str | None = None) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None = None
        if addr:
            self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False when disabled or it failed."""
        if self.address is None:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(msg, self.address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("systemd notify to %r failed: %s", self.address, exc)
            return False

    def ready(self, status: str = "") -> bool:
        """``READY=1`` (with a status line)."""
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=...``."""
        return self.send(f"STATUS={text}")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``."""
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``."""
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds of ``WatchdogSec=`` for this process (``WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        seconds = int(usec) / 1e6
    except ValueError:
        return None
    return seconds if seconds > 0 else None


class SystemdIntegration:
    """The plugin's service for one platform: status lines, READY, STOPPING and the watchdog."""

    def __init__(self, platform: Platform, notifier: Notifier,
                 interval: float | None = None) -> None:
        self.platform = platform
        self.notifier = notifier
        self.interval = interval
        self.pings = 0
        self._last_ping = 0.0
        self._task: asyncio.Task[None] | None = None
        #: READY was sent: the watchdog pings only from then on (systemd ignores earlier ones,
        #: and a ping must never suggest a node that has not started yet is alive).
        self.ready = False

    def summary(self) -> str:
        """One status line: platform/node and each app's role (and epoch when active)."""
        p = self.platform
        parts = []
        for name, app in p.apps.items():
            role = app.role.value
            parts.append(f"{name} {role}" + (f" (epoch {app.epoch})" if app.is_active else ""))
        return f"{p.name}/{p.node_id}: " + (", ".join(parts) or "no apps")

    # -- the watchdog -------------------------------------------------------------------------

    def stalled(self) -> str | None:
        """Why the node must not ping now (a held lease past its end), or None."""
        now = time.monotonic()
        tolerance = max(1.0, (self.interval or 0) / 4)
        for name, rt in self.platform.runtimes.items():
            deadline = rt.lease_deadline()
            if deadline is not None and now > deadline + tolerance:
                return f"app {name}: lease loop stalled {now - deadline:.1f}s past its deadline"
        return None

    def ping(self) -> None:
        """Send WATCHDOG=1 unless stalled or not ready yet (rate-limited to a tenth of the
        interval)."""
        if self.interval is None or not self.ready:
            return
        now = time.monotonic()
        if now - self._last_ping < self.interval / 10:
            return
        why = self.stalled()
        if why is not None:
            log.error("not pinging the systemd watchdog: %s", why)
            return
        if self.notifier.watchdog():
            self._last_ping = now
            self.pings += 1

    async def _loop(self) -> None:
        assert self.interval is not None
        while True:
            self.ping()
            await asyncio.sleep(self.interval / 4)

    # -- service lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing yet: READY and the watchdog follow once the apps started
        (`announce_ready`)."""

    def announce_ready(self) -> None:
        """Send READY=1 (with the status line) and start the watchdog."""
        self.notifier.ready(self.summary())
        self.ready = True
        if self.interval is not None and self._task is None:
            self._task = supervise("sdnotify:watchdog", self._loop)
        log.info("systemd: READY sent%s", f"; watchdog every {self.interval / 4:.1f}s"
                 if self.interval else "")

    async def stop(self) -> None:
        """Stop the watchdog loop; close the socket."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        self.notifier.close()


def _service(platform: Platform) -> SystemdIntegration | None:
    svc = platform.services.get("sdnotify")
    return svc if isinstance(svc, SystemdIntegration) else None


def _create(platform: Platform, notifier: Notifier) -> SystemdIntegration:
    interval = watchdog_interval()
    if interval is not None:
        faulthandler.enable(file=sys.stderr, all_threads=True)  # a watchdog SIGABRT explains
    notifier.status(f"{platform.name}/{platform.node_id}: starting")
    return SystemdIntegration(platform, notifier, interval)


# -- hooks ------------------------------------------------------------------------------------


@hookimpl
def pycluster_platform_services(platform: Platform, registry: PlatformServices) -> None:
    """Under a ``Type=notify`` unit (``NOTIFY_SOCKET`` set): the notify service."""
    notifier = Notifier()
    if notifier.enabled:
        registry.add("sdnotify", lambda: _create(platform, notifier))


@hookimpl
def pycluster_platform_started(platform: Platform) -> None:
    """READY=1 once connected, joined and the apps started (as standbys)."""
    svc = _service(platform)
    if svc is not None:
        svc.announce_ready()


@hookimpl
def pycluster_role_changed(app: App) -> None:
    """STATUS= on every role change."""
    svc = _service(app.platform) if app.platform is not None else None
    if svc is not None:
        svc.notifier.status(svc.summary())


@hookimpl
def pycluster_lease_renewed(app: App) -> None:
    """WATCHDOG=1 at once after a renewal."""
    svc = _service(app.platform) if app.platform is not None else None
    if svc is not None:
        svc.ping()


@hookimpl
def pycluster_platform_stopping(platform: Platform) -> None:
    """STOPPING=1 once the apps stepped down."""
    svc = _service(platform)
    if svc is not None:
        svc.notifier.stopping(f"{platform.name}/{platform.node_id}: leaving")
