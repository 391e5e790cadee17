"""Several "hosts" on one machine: network namespaces joined by a private bridge.

``NetNamespaces(count)`` creates ``count`` host namespaces and one "switch" namespace holding a
Linux bridge; each host has an ``eth0`` veth whose peer is a port of that bridge. Every link and
address lives inside namespaces created here: the root namespace (the machine's own network) is
never touched. Hosts get addresses in ``10.213.<subnet>.0/24``; only those addresses (and
loopback) are ever targets.

Partitions: :meth:`NetNamespaces.link_down` takes the host's switch port down (a pulled cable:
the host's ``eth0`` loses carrier), :meth:`NetNamespaces.link_up` restores it.

Needs root and iproute2 (``.ci/install-system.sh``).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = ["NetNamespaceError", "NetNamespaces", "netns_available"]

_IFACE = "eth0"
_BRIDGE = "br0"
_HOST_OFFSET = 10


class NetNamespaceError(RuntimeError):
    """Creating or driving a network namespace failed."""


def _ip(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise NetNamespaceError(
            f"ip {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Tell whether network namespaces with veth pairs and a bridge work here; reason when not.

    Probes for real (creates and deletes a throw-away namespace). Cached for the process's life.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 ('ip') is not installed (run .ci/install-system.sh)"
    probe = f"pycprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (NetNamespaceError, OSError, subprocess.TimeoutExpired) as exc:
        return False, f"'ip netns add' does not work here: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", probe, "link", "set", "v0", "master", "br0")
    except (NetNamespaceError, subprocess.TimeoutExpired) as exc:
        return False, f"veth pairs or bridges do not work in a namespace here: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return True, ""


class NetNamespaces:
    """``count`` host namespaces connected through a bridge in a private "switch" namespace.

    Use as a context manager or call :meth:`create` / :meth:`cleanup`::

        with NetNamespaces(3) as net:
            a, b, c = net.hosts
            net.run(a, "ping", "-c1", net.ip(b))

    Namespace names are ``pyc<random>h<i>`` for hosts and ``pyc<random>sw`` for the switch,
    so concurrent test runs never collide. Host ``i`` (from 0) has address
    ``10.213.<subnet>.<10+i>/24`` on :attr:`iface`; loopback is up in every host namespace.
    """

    iface: str = _IFACE
    """Name of each host's interface towards the switch."""

    def __init__(self, count: int = 2, *, subnet: int = 1) -> None:
        """Prepare (but do not create) ``count`` hosts on ``10.213.<subnet>.0/24``."""
        if not 1 <= count <= 200:
            raise ValueError("count must be between 1 and 200")
        if not 0 <= subnet <= 255:
            raise ValueError("subnet must be between 0 and 255")
        self.prefix = f"pyc{secrets.token_hex(3)}"
        self.network = ipaddress.IPv4Network(f"10.213.{subnet}.0/24")
        self.switch = f"{self.prefix}sw"
        self.hosts: list[str] = [f"{self.prefix}h{i}" for i in range(count)]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []

    def address(self, host_part: int) -> str:
        """Return ``10.213.<subnet>.<host_part>`` (e.g. for a virtual IP, use 200 and up)."""
        return str(self.network.network_address + host_part)

    def ip(self, ns: str) -> str:
        """Return the address of host namespace ``ns`` (without prefix length)."""
        return self.address(_HOST_OFFSET + self._index(ns))

    def _index(self, ns: str) -> int:
        try:
            return self.hosts.index(ns)
        except ValueError:
            raise NetNamespaceError(f"{ns!r} is not a host namespace of this set") from None

    def _port(self, ns: str) -> str:
        return f"p{self._index(ns)}"

    def create(self) -> NetNamespaces:
        """Create the namespaces, the bridge and the veth pairs, and assign addresses."""
        ok, reason = netns_available()
        if not ok:
            raise NetNamespaceError(reason)
        try:
            for ns in (self.switch, *self.hosts):
                _ip("netns", "add", ns)
                self._created.append(ns)
            _ip("-n", self.switch, "link", "add", _BRIDGE, "type", "bridge", "stp_state", "0")
            _ip("-n", self.switch, "link", "set", _BRIDGE, "up")
            plen = self.network.prefixlen
            for ns in self.hosts:
                port = self._port(ns)
                _ip(
                    "-n",
                    self.switch,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    self.iface,
                    "netns",
                    ns,
                )
                _ip("-n", self.switch, "link", "set", port, "master", _BRIDGE)
                _ip("-n", self.switch, "link", "set", port, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{self.ip(ns)}/{plen}", "dev", self.iface)
                _ip("-n", ns, "link", "set", self.iface, "up")
        except BaseException:
            self.cleanup()
            raise
        return self

    def run(
        self,
        ns: str,
        *cmd: str,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside namespace ``ns`` (``ip netns exec``) and return it, output captured.

        With ``check`` a non-zero exit raises :class:`NetNamespaceError`.
        """
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise NetNamespaceError(
                f"[{ns}] {' '.join(cmd)}: exit {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()}"
            )
        return proc

    def popen(self, ns: str, cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` inside ``ns`` in the background; :meth:`cleanup` kills it by PID.

        Keyword arguments go to :class:`subprocess.Popen` (e.g. ``stdout``, ``env``, ``cwd``).
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def mac(self, ns: str) -> str:
        """Return the MAC address of ``ns``'s interface towards the switch."""
        out = _ip("-n", ns, "-o", "link", "show", self.iface).stdout
        parts = out.split()
        return parts[parts.index("link/ether") + 1]

    def add_address(self, ns: str, addr: str) -> None:
        """Add ``addr`` (e.g. a virtual IP from :meth:`address`) to ``ns``'s interface."""
        self._check_target(addr)
        _ip("-n", ns, "addr", "add", f"{addr}/{self.network.prefixlen}", "dev", self.iface)

    def del_address(self, ns: str, addr: str) -> None:
        """Remove ``addr`` from ``ns``'s interface."""
        _ip("-n", ns, "addr", "del", f"{addr}/{self.network.prefixlen}", "dev", self.iface)

    def _check_target(self, addr: str) -> None:
        if ipaddress.IPv4Address(addr) not in self.network:
            raise NetNamespaceError(f"{addr} is outside this set's network {self.network}")

    def link_down(self, ns: str) -> None:
        """Cut ``ns`` off the switch (its bridge port goes down; its ``eth0`` loses carrier)."""
        _ip("-n", self.switch, "link", "set", self._port(ns), "down")

    def link_up(self, ns: str) -> None:
        """Reconnect ``ns`` to the switch after :meth:`link_down`."""
        _ip("-n", self.switch, "link", "set", self._port(ns), "up")

    def cleanup(self) -> None:
        """Kill processes started with :meth:`popen` (by PID) and delete every namespace made here.

        Deleting a namespace destroys the veths and the bridge inside it. Safe to call twice.
        """
        procs, self._procs = self._procs, []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        created, self._created = self._created, []
        for ns in reversed(created):
            _ip("netns", "del", ns, check=False)

    def __enter__(self) -> NetNamespaces:
        """Create the namespaces (if needed) and return this object."""
        if not self._created:
            self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Delete everything created."""
        self.cleanup()
