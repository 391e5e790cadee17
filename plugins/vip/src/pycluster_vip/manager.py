"""`VipManager`: acquire, release, watch and check one virtual IP on this node.

Netlink (pyroute2) adds and removes the address; gratuitous ARP goes out on a raw socket
(`pycluster_vip.arp`); no command is shelled out.

Behaviour:
The kernel builds one manager per `VIP` option of an app when the app starts here (the plugin
registers it with ``pycluster_register_vips``), calls `VipManager.acquire` and
`VipManager.release` at its stage ``vip-<address>`` and `VipManager.close` when the app stops.

* Acquire (VIP stage, before the backend): add the address (already present is fine), send the
  first announcement at once and the remaining ``arp_count - 1`` rounds in the background, then
  watch netlink: the link coming back up (a heal) triggers a re-announcement, the address
  disappearing is re-added and announced. Every ``check_interval`` a check runs; an ARP
  conflict (another host answering for the address) is audited and answered with an
  announcement.
* Release (stepping down, after the backend stopped): stop watching, remove the address.
  Removal is local and quick, so it fits in a lease-deadline deactivation (self-fencing).
* Connection loss to NATS does not touch the address by itself: the coordinator releases it
  when the lease is lost (before another node can be elected), never later.
* A node that crashed keeps the address on its interface; when it comes back and settles as a
  standby the stale address is removed (``release_stale``). Until then the new holder's
  gratuitous ARP has already moved the segment's caches to the new holder.
* Every change is an audit entry of category ``vip`` (``platform.audit``, the stream
  ``{platform}_audit``), also logged on ``pycluster.vip`` and kept in `VipManager.events`.
  `VipManager.health` feeds the app health check ``vip-<address>`` and the metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pycluster.backend import BackendHealth
from pycluster.kernel.context import Context
from pycluster.kernel.errors import PyclusterError

from .arp import ArpSocket

if TYPE_CHECKING:
    from pycluster.kernel.app import App
    from pycluster.kernel.platform import Platform

    from .options import VIP

log = logging.getLogger("pycluster.vip")

_UP_STATES = ("UP", "UNKNOWN")  # UNKNOWN: links without operstate support (e.g. some tunnels)
_MAX_EVENTS = 200


class VipError(PyclusterError):
    """Acquiring, releasing or checking a virtual IP failed; names the address and why."""

    def __init__(self, address: str, interface: str, action: str, reason: str) -> None:
        self.address = address
        self.interface = interface
        self.action = action
        self.reason = reason
        super().__init__(f"VIP {address} on {interface}: {action} failed: {reason}")


@dataclass
class VipStatus:
    """The result of `VipManager.check`."""

    address: str
    interface: str
    held: bool
    present: bool
    link_up: bool
    conflict: list[str] = field(default_factory=list)
    peer_answers: bool | None = None
    healthy: bool = False
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


async def _collect(result: Any) -> list[Any]:
    """pyroute2 answers with a list or an async iterator, depending on the request."""
    if hasattr(result, "__aiter__"):
        return [m async for m in result]
    return list(result)


class VipManager:
    """Controls one `VIP` on this node.

    Example (standalone; the plugin normally drives it from the failover sequence)::

        mgr = VipManager(VIP("10.213.1.200/24", "eth0", netns="blue"))
        await mgr.acquire()
        print(await mgr.check())
        await mgr.release()
        await mgr.close()

    :param option: the `VIP` option.
    :param app: the app it belongs to (for audit records and health hooks), if any.
    :param platform: its platform, if any.
    """

    def __init__(self, option: VIP, app: App | None = None,
                 platform: Platform | None = None) -> None:
        self.option = option
        self.app = app
        self.platform = platform
        self.address = option.address
        self.held = False
        self.events: list[dict[str, Any]] = []
        self.announcements = 0
        self.last_status: VipStatus | None = None
        self._ipr: Any = None
        self._arp: ArpSocket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()

    @property
    def timeout(self) -> float:
        """Seconds acquire and release may take: netlink and one ARP send; the bound only
        guards a hung netlink."""
        return 10.0 + self.option.probe_timeout

    # -- plumbing ------------------------------------------------------------------------------

    def _error(self, action: str, reason: str) -> VipError:
        return VipError(self.address, self._where(), action, reason)

    def _where(self) -> str:
        ns = f" (netns {self.option.netns})" if self.option.netns else ""
        return f"{self.option.interface}{ns}"

    async def _nl(self) -> Any:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            self._ipr = AsyncIPRoute(netns=self.option.netns) if self.option.netns \
                else AsyncIPRoute()
        return self._ipr

    async def _link(self) -> tuple[int, str, str]:
        """Index, MAC and operational state of the interface."""
        ipr = await self._nl()
        found = await ipr.link_lookup(ifname=self.option.interface)
        if not found:
            raise self._error("lookup", "no such interface")
        msgs = await _collect(await ipr.link("get", index=found[0]))
        msg = msgs[0]
        return int(found[0]), str(msg.get("address") or ""), str(msg.get("operstate") or "")

    async def _present(self, index: int) -> bool:
        ipr = await self._nl()
        for msg in await _collect(await ipr.addr("dump", index=index)):
            if msg.get("index") not in (None, index) or msg.get("family") != socket.AF_INET:
                continue
            if (msg.get("local") or msg.get("address")) == self.address:
                return True
        return False

    async def _add(self, index: int) -> bool:
        """Add the address; False when it was already there."""
        ipr = await self._nl()
        kw: dict[str, Any] = {"index": index, "address": self.address,
                              "prefixlen": self.option.prefixlen}
        if self.option.label:
            kw["label"] = self.option.label
        try:
            await ipr.addr("add", **kw)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                return False
            raise self._error("add", f"{type(exc).__name__}: {exc}") from exc
        return True

    async def _delete(self, index: int) -> bool:
        """Remove the address; False when it was not there."""
        ipr = await self._nl()
        try:
            await ipr.addr("del", index=index, address=self.address,
                           prefixlen=self.option.prefixlen)
        except Exception as exc:
            if getattr(exc, "code", None) in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                return False
            raise self._error("remove", f"{type(exc).__name__}: {exc}") from exc
        return True

    async def _arp_socket(self, mac: str) -> ArpSocket:
        if self._arp is None:
            self._arp = await ArpSocket.open(self.option.interface, mac, self.option.netns)
        return self._arp

    def audit(self, action: str, **fields: Any) -> dict[str, Any]:
        """Record an audit entry ``vip``/``action``: in the platform's audit trail (when there
        is a platform), in the log, and in `events`. Never raises."""
        data: dict[str, Any] = {"address": self.address, "interface": self.option.interface,
                                "netns": self.option.netns, **fields}
        rec = {"action": action, "t": time.time(), **data}
        self.events.append(rec)
        del self.events[:-_MAX_EVENTS]
        log.debug("audit vip/%s %s", action, data)
        if self.platform is not None:
            try:
                self.platform.audit.log("vip", action, data, app=self.app)
            except Exception:
                log.debug("audit vip/%s not written", action, exc_info=True)
        return rec

    # -- acquire / release ---------------------------------------------------------------------

    async def acquire(self, ctx: Context | None = None) -> None:
        """Add the address, announce it, and start watching it."""
        async with self._lock:
            index, mac, state = await self._link()
            added = await self._add(index)
            self.held = True
            self.audit("acquired", epoch=ctx.epoch if ctx else None, mac=mac,
                       already_present=not added, link=state)
            log.info("VIP %s acquired on %s (mac %s)", self.address, self._where(), mac)
            if self.option.arp_count > 0:
                try:
                    await self._announce_once(mac)
                except OSError as exc:  # a down link: the heal will re-announce
                    log.warning("VIP %s: gratuitous ARP failed: %s", self.address, exc)
                if self.option.arp_count > 1:
                    self._tasks.append(asyncio.create_task(
                        self._announce_rounds(mac, self.option.arp_count - 1), name="vip:garp"))
            self._tasks.append(asyncio.create_task(self._watch(index), name="vip:watch"))
            self._tasks.append(asyncio.create_task(self._periodic(), name="vip:check"))

    async def release(self, ctx: Context | None = None) -> None:
        """Stop watching and remove the address (quick: a local netlink call)."""
        async with self._lock:
            await self._cancel_tasks()
            was_held, self.held = self.held, False
            try:
                index, _, _ = await self._link()
                removed = await self._delete(index)
            finally:
                self._close_arp()
            if was_held or removed:
                self.audit("released", epoch=ctx.epoch if ctx else None,
                           reason=ctx.reason if ctx else "", was_present=removed)
                log.info("VIP %s released from %s", self.address, self._where())

    async def remove_stale(self) -> bool:
        """Remove the address if it is on the interface while this node does not hold it
        (left behind by a crashed process). Returns True when something was removed."""
        async with self._lock:
            if self.held:
                return False
            try:
                index, _, _ = await self._link()
                if not await self._present(index):
                    return False
                removed = await self._delete(index)
            except VipError as exc:
                log.warning("%s", exc)
                return False
            if removed:
                self.audit("stale_removed")
                log.warning("VIP %s was still on %s without being held here; removed it",
                            self.address, self._where())
            return removed

    async def close(self) -> None:
        """Release resources (netlink and ARP sockets, tasks); the address is left as is."""
        await self._cancel_tasks()
        self._close_arp()
        if self._ipr is not None:
            with contextlib.suppress(Exception):
                self._ipr.close()
            self._ipr = None

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _close_arp(self) -> None:
        if self._arp is not None:
            self._arp.close()
            self._arp = None

    # -- announcing ------------------------------------------------------------------------------

    async def _announce_once(self, mac: str) -> None:
        arp = await self._arp_socket(mac)
        await arp.announce(self.address)
        self.announcements += 1

    async def _announce_rounds(self, mac: str, rounds: int) -> None:
        for _ in range(rounds):
            await asyncio.sleep(self.option.arp_interval)
            if not self.held:
                return
            try:
                await self._announce_once(mac)
            except OSError as exc:
                log.warning("VIP %s: gratuitous ARP failed: %s", self.address, exc)

    async def announce(self, reason: str = "requested") -> None:
        """Announce the address now: one round at once, the rest of ``arp_count`` in the
        background. Does nothing unless the address is held."""
        if not self.held:
            return
        _, mac, _ = await self._link()
        self.audit("announced", reason=reason)
        await self._announce_once(mac)
        if self.option.arp_count > 1:
            self._tasks.append(asyncio.create_task(
                self._announce_rounds(mac, self.option.arp_count - 1), name="vip:garp"))

    # -- watching ------------------------------------------------------------------------------

    async def _watch(self, index: int) -> None:
        """React to netlink events: link up after down → re-announce; address gone → re-add."""
        from pyroute2 import AsyncIPRoute
        from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK

        ev = AsyncIPRoute(netns=self.option.netns) if self.option.netns else AsyncIPRoute()
        try:
            await ev.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
            _, _, state = await self._link()
            up = state in _UP_STATES
            while self.held:
                for msg in await _collect(ev.get()):
                    if msg.get("index") != index:
                        continue
                    kind = msg.get("event")
                    if kind == "RTM_NEWLINK":
                        now_up = msg.get("operstate") in _UP_STATES
                        if now_up and not up:
                            self.audit("link_up")
                            await self._restore_and_announce("link up (heal)")
                        elif up and not now_up:
                            self.audit("link_down", operstate=msg.get("operstate"))
                        up = now_up
                    elif kind == "RTM_DELADDR" and (
                        (msg.get("local") or msg.get("address")) == self.address
                    ):
                        await self._restore_and_announce("address removed by someone else")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("VIP %s: netlink watch failed; periodic checks continue", self.address)
        finally:
            with contextlib.suppress(Exception):
                ev.close()

    async def _restore_and_announce(self, reason: str) -> None:
        if not self.held:
            return
        try:
            index, mac, _ = await self._link()
            if await self._add(index):
                self.audit("restored", reason=reason)
            self.audit("announced", reason=reason)
            await self._announce_once(mac)
            if self.option.arp_count > 1:
                self._tasks.append(asyncio.create_task(
                    self._announce_rounds(mac, self.option.arp_count - 1), name="vip:garp"))
        except (VipError, OSError) as exc:
            log.warning("VIP %s: could not restore/announce (%s): %s", self.address, reason, exc)

    async def _periodic(self) -> None:
        last_refresh = time.monotonic()
        healthy: bool | None = None
        while self.held:
            await asyncio.sleep(self.option.check_interval)
            if not self.held:
                return
            try:
                status = await self.check()
            except Exception as exc:
                status = VipStatus(self.address, self._where(), True, False, False,
                                   detail=f"check failed: {exc}")
            if status.held and not status.present:
                await self._restore_and_announce("address missing at check")
            elif status.conflict:
                self.audit("conflict", macs=status.conflict)
                await self._restore_and_announce("another host answered for the address")
            refresh = self.option.refresh_interval
            if refresh is not None and time.monotonic() - last_refresh >= refresh:
                last_refresh = time.monotonic()
                await self._restore_and_announce("refresh")
            if status.healthy != healthy:
                if healthy is not None:
                    self.audit("health", healthy=status.healthy, detail=status.detail)
                healthy = status.healthy

    # -- checking ------------------------------------------------------------------------------

    async def check(self) -> VipStatus:
        """Present on the interface? Link up? With ``probe="arp"``: does another host answer
        ARP for the address (a conflict), and does ``peer`` answer ARP sent from it?"""
        index, mac, state = await self._link()
        present = await self._present(index)
        status = VipStatus(self.address, self._where(), self.held, present, state in _UP_STATES)
        problems: list[str] = []
        if self.option.probe == "arp" and status.link_up:
            opened = self._arp is None
            arp = await self._arp_socket(mac)
            try:
                timeout = self.option.probe_timeout
                status.conflict = sorted(await arp.request(self.address, "0.0.0.0", timeout))
                if self.option.peer and present:
                    answered = await arp.request(self.option.peer, self.address, timeout)
                    status.peer_answers = bool(answered)
            finally:
                if opened and not self.held:
                    self._close_arp()
        if self.held:
            if not present:
                problems.append("address missing")
            if not status.link_up:
                problems.append(f"link {state.lower() or 'unknown'}")
            if status.conflict:
                problems.append(f"also answered by {', '.join(status.conflict)}")
            if status.peer_answers is False:
                problems.append(f"peer {self.option.peer} does not answer")
            status.healthy = not problems
            status.detail = "; ".join(problems) or f"held on {self._where()}"
        else:
            status.healthy = True
            status.detail = "not held here" + (" (but present!)" if present else "")
        self.last_status = status
        return status

    async def health(self) -> BackendHealth:
        """The check as a `BackendHealth` (what health checks and metrics read)."""
        try:
            st = await self.check()
        except Exception as exc:
            return BackendHealth(False, f"check failed: {exc}")
        return BackendHealth(st.healthy, st.detail, st.as_dict())
