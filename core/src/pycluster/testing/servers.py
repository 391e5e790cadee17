"""Real NATS servers for tests: one JetStream server, or a 3-server cluster with fault injection.

:class:`NatsCluster` partitions servers without root privileges. Every route connection goes
through a :class:`~pycluster.testing.proxy.TcpProxy` (one per ordered pair of servers), and the
servers are told that routes cannot go anywhere else:

- each server solicits its peers only at their proxies (``--routes``);
- each server advertises a *dead* cluster address (``--cluster_advertise``: a port held bound but
  not listening, so connecting is refused), so the addresses that servers gossip to each other
  ("implicit routes") lead nowhere;
- ``--no_advertise`` keeps the cluster's client URLs out of client INFO, so a client connected to
  one server is not silently moved to another.

Cutting the proxies of a server therefore isolates it: its route connections are reset and
cannot be re-established. Clients connect to servers directly (not through proxies), so a
client of the isolated server stays connected to it and sees its writes fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import nats
import nats.errors
from nats.js.api import StorageType, StreamConfig

from pycluster.kernel.embedded import (
    EmbeddedNatsServer,
    NatsServerError,
    find_nats_server,
    free_port,
    ignore_error,
    run_blocking,
)

from .proxy import BackgroundLoop, TcpProxy

__all__ = ["NatsCluster", "NatsServer", "find_nats_server", "free_port"]

_HOST = "127.0.0.1"


class NatsServer(EmbeddedNatsServer):
    """An :class:`~pycluster.embedded.EmbeddedNatsServer` in a temporary directory.

    ``data_dir=None`` creates a temporary directory, removed by :meth:`stop` (not by
    :meth:`restart`, which keeps the JetStream data). Use it as a context manager::

        async with NatsServer() as server:
            nc = await nats.connect(server.url)
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        host: str = _HOST,
        port: int | None = None,
        extra_args: Iterable[str] = (),
        name: str | None = None,
        config_file: str | Path | None = None,
        auth: Mapping[str, str] | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        if data_dir is None:
            data_dir = tempfile.mkdtemp(prefix="pycluster-nats-")
        super().__init__(data_dir, host=host, port=port, extra_args=tuple(extra_args), name=name,
                         config_file=config_file, auth=auth)

    async def start(self, timeout: float = 10.0) -> None:
        """Start and wait until ready; a start that fails removes a temporary data directory
        (a test that never got the server must not leave it behind)."""
        try:
            await super().start(timeout)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the server; a temporary data directory is removed afterwards."""
        await super().stop(timeout)
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


async def _all_or_cancel(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coros`` concurrently; on the first failure cancel the others and raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _dead_port() -> socket.socket:
    """A bound, never-listening socket: connecting to its port is refused, and nobody else can
    bind the port while we hold it (so the advertised address stays dead)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((_HOST, 0))
    return sock


class NatsCluster:
    """``size`` nats-server processes forming one JetStream cluster on 127.0.0.1.

    Fault injection (``i`` is a server index, 0-based):

    - :meth:`partition` isolates servers from the others (all their route links are reset and
      refused), :meth:`heal` restores every link; :meth:`cut_link`/:meth:`restore_link` act on
      one pair;
    - :meth:`kill` (SIGKILL), :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT),
      :meth:`restart` (same ports, same store directory), :meth:`stop_server`.

    Proxies run on a private event loop thread, so every method works from sync and async
    tests alike; ``start``/``stop``/``restart`` have ``*_sync`` variants.

    Example::

        async with NatsCluster() as cluster:
            nc = await nats.connect(cluster.url(0))
            cluster.partition(0)   # writes through server 0 now fail
            cluster.heal()
    """

    def __init__(
        self,
        size: int = 3,
        base_dir: str | Path | None = None,
        name: str | None = None,
        monitoring: bool = True,
        server_config: Callable[[int], str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size
        self.name = name or f"pc{uuid.uuid4().hex[:8]}"
        self._own_dir = base_dir is None
        self.base_dir = Path(
            tempfile.mkdtemp(prefix="pycluster-natscluster-") if base_dir is None else base_dir
        )
        self.monitoring = monitoring
        # Extra configuration text of server i (e.g. a leafnodes block), given as ``-c``.
        self.server_config = server_config
        self.servers: list[EmbeddedNatsServer] = []
        self.cluster_ports: list[int] = []
        self.monitor_ports: list[int] = []
        self._dead: list[socket.socket] = []
        self._loop: BackgroundLoop | None = None
        # _proxies[(i, j)]: server i's route to server j.
        self._proxies: dict[tuple[int, int], TcpProxy] = {}
        self._started = False

    # -- addresses --------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of all servers (index order)."""
        return [s.url for s in self.servers]

    def url(self, i: int) -> str:
        """Client URL of server ``i``."""
        return self.servers[i].url

    def server_name(self, i: int) -> str:
        """The ``server_name`` of server ``i`` (as JetStream reports it, e.g. stream leader)."""
        return f"{self.name}-n{i}"

    def index_of(self, server_name: str) -> int:
        """The index of the server called ``server_name`` (inverse of :meth:`server_name`)."""
        for i in range(self.size):
            if self.server_name(i) == server_name:
                return i
        raise KeyError(server_name)

    def proxy(self, i: int, j: int) -> TcpProxy:
        """The proxy carrying server ``i``'s route to server ``j``."""
        return self._proxies[(i, j)]

    def __len__(self) -> int:
        return self.size

    # -- lifecycle --------------------------------------------------------------------------

    async def _make_proxies(self) -> dict[tuple[int, int], TcpProxy]:
        proxies: dict[tuple[int, int], TcpProxy] = {}
        for i in range(self.size):
            for j in range(self.size):
                if i != j:
                    proxy = TcpProxy(_HOST, self.cluster_ports[j], name=f"n{i}->n{j}")
                    await proxy.start()
                    proxies[(i, j)] = proxy
        return proxies

    def _setup(self) -> None:
        """Pick ports, start the proxies, build the server objects (no process yet)."""
        self.cluster_ports = [free_port(_HOST) for _ in range(self.size)]
        self.monitor_ports = [free_port(_HOST) for _ in range(self.size)]
        self._dead = [_dead_port() for _ in range(self.size)]
        self._loop = BackgroundLoop(name=f"pycluster-{self.name}-proxies")
        self._proxies = self._loop.run(self._make_proxies())
        for i in range(self.size):
            config = None
            if self.server_config is not None:
                config = self.base_dir / f"n{i}.conf"
                self.base_dir.mkdir(parents=True, exist_ok=True)
                config.write_text(self.server_config(i))
            self.servers.append(
                EmbeddedNatsServer(self.base_dir / f"n{i}", host=_HOST, name=self.server_name(i),
                                   config_file=config)
            )
            self.servers[i].extra_args = self._server_args(i)

    def _server_args(self, i: int) -> tuple[str, ...]:
        routes = ",".join(
            f"nats://{_HOST}:{self._proxies[(i, j)].port}" for j in range(self.size) if j != i
        )
        args = [
            "--cluster_name", self.name,
            "--cluster", f"nats://{_HOST}:{self.cluster_ports[i]}",
            "--cluster_advertise", f"{_HOST}:{self._dead[i].getsockname()[1]}",
            "--no_advertise=true",
        ]  # fmt: skip
        if routes:
            args += ["--routes", routes]
        if self.monitoring:
            args += ["-m", str(self.monitor_ports[i])]
        return tuple(args)

    def _new_ports(self, i: int) -> None:
        """Give server ``i`` fresh ports (it lost one to another process before binding it)."""
        self.servers[i].port = free_port(_HOST)
        self.cluster_ports[i] = free_port(_HOST)
        self.monitor_ports[i] = free_port(_HOST)
        self.servers[i].extra_args = self._server_args(i)
        assert self._loop is not None
        upstream = [self._proxies[(j, i)] for j in range(self.size) if j != i]

        def retarget() -> None:
            for proxy in upstream:
                proxy.target_port = self.cluster_ports[i]

        self._loop.call(retarget)

    async def start(self, timeout: float = 30.0) -> None:
        """Start every server and wait until the cluster is ready (see :meth:`wait_ready`).

        A server that exits while the cluster forms (typically: a port picked for it was taken
        by another process in between) is started again on new ports, up to twice.
        """
        if self._started:
            raise RuntimeError(f"cluster {self.name} already started")
        self._started = True
        find_nats_server()  # fail with the install hint before creating anything
        try:
            self._setup()
            for attempt in range(3):
                for server in self.servers:
                    if not server.running:
                        server.spawn()
                try:
                    await self.wait_ready(timeout, indices=range(self.size))
                    return
                except NatsServerError:
                    exited = [i for i, server in enumerate(self.servers) if not server.running]
                    if not exited or attempt == 2:
                        raise
                    for i in exited:
                        self._new_ports(i)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout: float = 30.0, indices: Iterable[int] | None = None) -> None:
        """Wait until each server in ``indices`` (default: each running one) is a working
        cluster member; a server named in ``indices`` that is down fails the wait.

        JetStream must answer through it (so it sees a meta leader). With monitoring on, it
        must also have routes to every running server it is not partitioned from, and the meta
        leader must count it as a current peer. When every server runs and no link is cut, a
        stream with one replica per server must also be placeable (before that, creating an R3
        stream fails with "no suitable peers for placement").
        """
        if indices is None:
            targets = [i for i in range(self.size) if self.servers[i].running]
        else:  # named explicitly: a server that is down is an error, not skipped
            targets = list(indices)
        deadline = time.monotonic() + timeout
        await _all_or_cancel([self.servers[i].wait_ready(timeout) for i in targets])
        if self.monitoring:
            for i in targets:
                await self._wait_member(i, deadline, timeout)
        if all(s.running for s in self.servers) and not any(
            p.is_cut for p in self._proxies.values()
        ):
            await self._wait_placement(deadline, timeout)

    def _check_alive(self, i: int) -> None:
        server = self.servers[i]
        if not server.running:
            code = server.returncode
            raise NatsServerError(server.url, f"exited with code {code}", server.log_tail())

    async def _wait_member(self, i: int, deadline: float, timeout: float) -> None:
        while True:
            self._check_alive(i)
            missing = await self._not_yet_member(i)
            if not missing:
                return
            if time.monotonic() > deadline:
                raise NatsServerError(
                    self.url(i),
                    f"not a full cluster member after {timeout:.1f}s: {missing}",
                    self.servers[i].log_tail(),
                )
            await asyncio.sleep(0.05)

    async def _wait_placement(self, deadline: float, timeout: float) -> None:
        """Place (then delete) a memory stream with one replica per server.

        The meta leader places streams only on peers it has heard from since they (re)joined:
        a restarted server, or one whose route flapped, is "offline" for placement for a while
        even though routes and raft look fine; probing with the real operation is exact.
        """
        probe = f"PYCLUSTER_READY_{uuid.uuid4().hex[:8]}"
        config = StreamConfig(
            name=probe,
            subjects=[f"_pycluster.ready.{probe}"],
            num_replicas=self.size,
            storage=StorageType.MEMORY,
        )
        nc = await nats.connect(servers=self.urls, error_cb=ignore_error)
        try:
            js = nc.jetstream(timeout=2.0)
            last: Exception | None = None
            while True:
                for i in range(self.size):
                    self._check_alive(i)
                try:
                    await js.add_stream(config)
                    break
                except Exception as exc:  # not placeable yet, or no answer yet
                    last = exc
                if time.monotonic() > deadline:
                    raise NatsServerError(
                        self.url(0),
                        f"cannot place an R{self.size} stream after {timeout:.1f}s: {last!r}",
                        self.servers[0].log_tail(),
                    )
                await asyncio.sleep(0.05)
            # A failed delete only leaves a tiny memory stream behind: not worth failing for.
            with contextlib.suppress(nats.errors.Error):
                await js.delete_stream(probe)
        finally:
            await nc.close()

    async def _not_yet_member(self, i: int) -> str:
        """What server ``i`` still lacks to be a full member ('' when nothing)."""
        expected = {
            self.server_name(j)
            for j in range(self.size)
            if j != i and self.servers[j].running and not self._link_cut(i, j)
        }
        peers = await self.route_peers(i)
        if not expected <= peers:
            return f"no route to {sorted(expected - peers)}"
        leader = await self.meta_leader(i)
        if leader is None:
            return "no meta leader"
        if leader == self.server_name(i):
            return ""
        try:
            meta = (await self.monitor(self.index_of(leader), "jsz"))["meta_cluster"]
        except (OSError, KeyError, ValueError) as exc:
            return f"meta leader {leader} unreadable: {exc!r}"
        current = {r["name"] for r in meta.get("replicas") or [] if r.get("current")}
        return "" if self.server_name(i) in current else f"not current on meta leader {leader}"

    async def meta_leader(self, i: int) -> str | None:
        """The JetStream meta leader that server ``i`` knows of (None: none, or unreachable)."""
        try:
            meta = (await self.monitor(i, "jsz")).get("meta_cluster") or {}
        except (OSError, ValueError):
            return None
        leader = meta.get("leader")
        return str(leader) if leader else None

    async def stop(self) -> None:
        """Stop every server (SIGTERM, then SIGKILL), the proxies, and remove a temp directory."""
        await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)
        if self._loop is not None:
            loop, proxies = self._loop, list(self._proxies.values())

            async def close_all() -> None:
                await asyncio.gather(*(p.close() for p in proxies), return_exceptions=True)

            try:
                loop.run(close_all(), timeout=10)
            finally:
                loop.close()
            self._loop = None
        for sock in self._dead:
            sock.close()
        self._dead = []
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def start_sync(self, timeout: float = 30.0) -> None:
        """Blocking :meth:`start`."""
        run_blocking(self.start(timeout))

    def stop_sync(self) -> None:
        """Blocking :meth:`stop`."""
        run_blocking(self.stop())

    # -- partitions -------------------------------------------------------------------------

    def _link_cut(self, i: int, j: int) -> bool:
        return self._proxies[(i, j)].is_cut and self._proxies[(j, i)].is_cut

    def _set_links(self, pairs: Iterable[tuple[int, int]], cut: bool) -> None:
        proxies = [p for i, j in pairs for p in (self._proxies[(i, j)], self._proxies[(j, i)])]
        if self._loop is None:
            raise RuntimeError(f"cluster {self.name} is not started")

        def apply() -> None:
            for proxy in proxies:
                if cut:
                    proxy.cut()
                else:
                    proxy.restore()

        self._loop.call(apply)

    def partition(self, *indices: int) -> None:
        """Isolate the servers ``indices`` from the others: every route link between the two
        sides is reset now and refused until :meth:`heal`. Links inside a side stay up.

        ``partition(0)`` isolates server 0: its clients' JetStream writes fail (no quorum),
        while the other two elect new stream leaders where needed and continue.
        """
        side = set(indices)
        if not side or not side <= set(range(self.size)):
            raise ValueError(f"indices must be a non-empty subset of 0..{self.size - 1}: {indices}")
        self._set_links([(i, j) for i in side for j in range(self.size) if j not in side], True)

    def heal(self) -> None:
        """Restore every route link (servers reconnect within about a second)."""
        self._set_links([(i, j) for i in range(self.size) for j in range(i + 1, self.size)], False)

    def cut_link(self, i: int, j: int) -> None:
        """Reset and refuse the route link between servers ``i`` and ``j`` (both directions)."""
        self._set_links([(i, j)], True)

    def restore_link(self, i: int, j: int) -> None:
        """Restore the route link between servers ``i`` and ``j``."""
        self._set_links([(i, j)], False)

    # -- process faults ---------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """SIGKILL server ``i`` (a crash)."""
        self.servers[i].kill()

    def pause(self, i: int) -> None:
        """SIGSTOP server ``i`` (a hung host: sockets stay open, nothing answers)."""
        self.servers[i].pause()

    def resume(self, i: int) -> None:
        """SIGCONT server ``i``."""
        self.servers[i].resume()

    async def stop_server(self, i: int, timeout: float = 5.0) -> None:
        """Stop server ``i`` gracefully (SIGTERM: it hands its stream leaderships over)."""
        await self.servers[i].stop(timeout)

    async def restart(self, i: int, timeout: float = 30.0) -> None:
        """Restart server ``i`` on the same ports and store directory (starts it if it is
        down) and wait until it is back in the cluster."""
        await self.servers[i].stop()
        self.servers[i].spawn()
        await self.wait_ready(timeout, indices=[i])

    def restart_sync(self, i: int, timeout: float = 30.0) -> None:
        """Blocking :meth:`restart`."""
        run_blocking(self.restart(i, timeout))

    # -- introspection (monitoring endpoint) ------------------------------------------------

    def monitor_url(self, i: int, endpoint: str = "varz") -> str:
        """URL of server ``i``'s HTTP monitoring ``endpoint`` (``varz``, ``jsz``, ``routez``...)."""
        if not self.monitoring:
            raise RuntimeError("cluster started with monitoring=False")
        return f"http://{_HOST}:{self.monitor_ports[i]}/{endpoint}"

    async def monitor(self, i: int, endpoint: str = "varz", timeout: float = 2.0) -> Any:
        """GET server ``i``'s monitoring ``endpoint`` and return the decoded JSON."""
        url = self.monitor_url(i, endpoint)

        def get() -> Any:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return json.loads(resp.read())

        return await asyncio.to_thread(get)

    async def route_peers(self, i: int) -> set[str]:
        """Names of the servers that server ``i`` has a route connection to right now."""
        try:
            routez = await self.monitor(i, "routez")
        except OSError:
            return set()
        return {r.get("remote_name", "") for r in routez.get("routes") or []} - {""}

    # -- context managers -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __enter__(self) -> Self:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} size={self.size} urls={self.urls}>"
