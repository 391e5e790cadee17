"""A witness bus and a witness voter for tests of promotion on hub loss, zones of node
processes (`ZoneNodes`), and the checker of the external record of zone writes.

Example::

    async with Witness("convex", tmp_path, detection=2.0, zones=4) as witness:
        # zones connect to it: PromoteOnHubFailure(vote_url=witness.url) (or through a
        # TcpProxy in front of witness.server.port, to cut a zone off the witness bus)
        ...

`Write` and `assert_single_writer`: an external record of the writes each zone's app made
(zone, term, wall time), and the check that no two zones ever wrote as primary at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from pycluster.builtin.leaf.zones import WitnessVoter
from pycluster.kernel.leaf import HubListen, LeafOf, leafnode_config

from .nodes import NodeCluster
from .proxy import TcpProxy
from .servers import NatsServer, free_port

if TYPE_CHECKING:
    from pycluster.kernel.platform import Platform

__all__ = ["LeafZones", "Witness", "Write", "ZoneNodes", "ZoneWrite", "assert_single_writer",
           "read_zone_writes", "single_writer_violations"]


class Witness:
    """A plain nats-server (the witness bus) and a `WitnessVoter` of ``group`` on it.

    :param group: the app group (the app name).
    :param state_dir: where the voter keeps its votes.
    :param detection: ``PromoteOnHubFailure.detection`` of the app.
    :param zones: ``PromoteOnHubFailure.zones`` of the app.
    :param zone: the voter's zone name.
    """

    def __init__(self, group: str, state_dir: str | Path, *, detection: float = 30.0,
                 zones: int | None = None, zone: str = "witness",
                 tick: float | None = None) -> None:
        self.server = NatsServer()
        self.group = group
        self.state_dir = Path(state_dir)
        self.detection = detection
        self.zones = zones
        self.zone = zone
        self.tick = tick
        self.voter: WitnessVoter | None = None

    @property
    def url(self) -> str:
        """The witness bus's client URL."""
        return self.server.url

    async def start(self) -> None:
        """Start the bus and the voter."""
        await self.server.start()
        await self.start_voter()

    async def start_voter(self, url: str | None = None) -> WitnessVoter:
        """Start the voter (again, after `stop_voter`: it reloads its votes), on ``url``
        (default: the bus directly)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.voter = WitnessVoter(url or self.url, self.group,
                                  self.state_dir / f"{self.group}.json", zone=self.zone,
                                  detection=self.detection, zones=self.zones, tick=self.tick)
        await self.voter.start()
        return self.voter

    async def stop_voter(self) -> None:
        """Stop the voter (the bus keeps running)."""
        if self.voter is not None:
            await self.voter.stop()
            self.voter = None

    async def stop(self) -> None:
        """Stop the voter and the bus."""
        await self.stop_voter()
        await self.server.stop()

    async def __aenter__(self) -> Witness:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


@dataclass(frozen=True)
class ZoneWrite:
    """One write of a zone's app, as recorded outside every zone (``--write-record`` of the
    node program): after ``app.zone.check()`` passed, with its fencing token."""

    zone: str
    node: str
    term: int
    epoch: int
    t: float  # wall clock

    @property
    def token(self) -> tuple[int, int]:
        """The fencing token (term, local epoch)."""
        return (self.term, self.epoch)


def read_zone_writes(directory: str | Path) -> list[ZoneWrite]:
    """Every write recorded in ``directory`` (``{zone}-{node}.jsonl`` files), by time; a
    torn last line (a killed process) is skipped."""
    out = []
    for path in sorted(Path(directory).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                d = json.loads(line)
                out.append(ZoneWrite(str(d["zone"]), str(d["node"]), int(d["term"]),
                                     int(d["epoch"]), float(d["t"])))
    return sorted(out, key=lambda w: w.t)


def single_writer_violations(writes: Iterable[ZoneWrite]) -> list[str]:
    """What contradicts "one writer at a time" in an external record (empty: none).

    Each term belongs to one zone; each fencing token (term, local epoch) to one node; and
    once a token's first write happened, nobody writes with a lower token any more (an old
    primary zone after the new term began, an old active node of a zone after its local
    failover).
    """
    ws = sorted(writes, key=lambda w: w.t)
    bad: list[str] = []
    zone_of: dict[int, str] = {}
    node_of: dict[tuple[int, int], str] = {}
    for w in ws:
        z = zone_of.setdefault(w.term, w.zone)
        if z != w.zone:
            bad.append(f"term {w.term} written by zones {z} and {w.zone} ({w.node} at {w.t:.3f})")
        owner = node_of.setdefault(w.token, f"{w.zone}/{w.node}")
        if owner != f"{w.zone}/{w.node}":
            bad.append(f"token {w.token} written by {owner} and {w.zone}/{w.node} at {w.t:.3f}")
    highest: ZoneWrite | None = None  # the highest token written so far, in time order
    for w in ws:
        if highest is not None and w.token < highest.token:
            bad.append(f"{w.zone}/{w.node} wrote with token {w.token} at {w.t:.3f}, after "
                       f"{highest.zone}/{highest.node} began token {highest.token} at "
                       f"{highest.t:.3f}")
        if highest is None or w.token > highest.token:
            highest = w
    return bad


class ZoneNodes:
    """A hub zone and leaf zones of node processes, each zone its own nats-server (the leaf
    links through `TcpProxy`), a `Witness` that every zone reaches through its own proxy, and
    ``size`` node processes per zone running ``app`` with `PromoteOnHubFailure`; every write
    the app makes goes to the external record (`writes`).

    :param workdir: where configurations, node state, logs and the record go.
    :param prefix: prefixed to each zone's name to make its platform name (unique per test).
    :param zones: zone names, the hub's first.
    :param node_args: extra node-program arguments per zone.

    Example::

        async with ZoneNodes(tmp_path, unique_name, detection=5.0) as zn:
            zn.cut_zone("hq")
            ...
            assert single_writer_violations(zn.writes()) == []
    """

    def __init__(self, workdir: str | Path, prefix: str, *, zones: tuple[str, ...] = (
                 "hq", "z1", "z2"), size: int = 2, app: str = "convex",
                 detection: float = 5.0, lease_ttl: float = 2.0, heartbeat: float = 0.5,
                 act_interval: float = 0.1,
                 node_args: dict[str, list[str]] | None = None) -> None:
        self.workdir = Path(workdir)
        self.zones = zones
        self.hub = zones[0]
        self.record = self.workdir / "writes"
        self.witness = Witness(app, self.workdir / "witness", detection=detection,
                               zones=len(zones) + 1)
        self._hub_port = free_port()
        self.links = {z: TcpProxy("127.0.0.1", self._hub_port, name=f"link-{z}")
                      for z in zones[1:]}
        self.votes: dict[str, TcpProxy] = {}
        self.servers: dict[str, NatsServer] = {}
        self.clusters: dict[str, NodeCluster] = {}
        self._spec = (prefix, size, app, detection, lease_ttl, heartbeat, act_interval,
                      node_args or {})

    async def start(self, timeout: float = 60.0) -> None:
        """Start the witness, the proxies, the servers, then every zone's nodes."""
        prefix, size, app, detection, lease_ttl, heartbeat, act, extra = self._spec
        await self.witness.start()
        for z in self.zones:
            self.votes[z] = TcpProxy("127.0.0.1", self.witness.server.port, name=f"vote-{z}")
        for proxy in (*self.links.values(), *self.votes.values()):
            await proxy.start()
        for z in self.zones:
            conf = self.workdir / f"{z}.conf"
            conf.write_text(leafnode_config(z, hub=HubListen(
                host="127.0.0.1", port=self._hub_port, allow_anonymous=True,
                no_advertise=True)) if z == self.hub else leafnode_config(z, leaf=LeafOf(
                    f"nats-leaf://127.0.0.1:{self.links[z].port}", reconnect=0.25)))
            self.servers[z] = NatsServer(config_file=conf)
            await self.servers[z].start()
        for z in self.zones:
            self.clusters[z] = NodeCluster(
                f"{z}{prefix}", [self.servers[z].url], self.workdir / z, size=size, app=app,
                lease_ttl=lease_ttl, heartbeat=heartbeat, extra_args=[
                    "--zone", z, "--zone-role", "hub" if z == self.hub else "leaf",
                    "--promote-detection", str(detection),
                    "--promote-zones", str(len(self.zones) + 1),
                    "--vote-url", f"nats://127.0.0.1:{self.votes[z].port}",
                    "--write-record", str(self.record), "--act-interval", str(act),
                    *extra.get(z, [])])
            await self.clusters[z].start(timeout=timeout)

    async def stop(self) -> None:
        """Stop the nodes, the servers, the witness and the proxies; safe after a failed
        start."""
        for c in self.clusters.values():
            await c.stop()
        for s in self.servers.values():
            await s.stop()
        await self.witness.stop()
        for proxy in (*self.links.values(), *self.votes.values()):
            await proxy.close()

    def writes(self) -> list[ZoneWrite]:
        """The external record so far, by time."""
        return read_zone_writes(self.record)

    def cut_zone(self, zone: str) -> None:
        """Cut ``zone`` off everything: its leaf link(s) (the hub: every leaf's) and its path
        to the witness bus. Its own server stays reachable from the test."""
        for proxy in (self.links.values() if zone == self.hub else [self.links[zone]]):
            proxy.cut()
        self.votes[zone].cut()

    def heal(self) -> None:
        """Restore every link."""
        for proxy in (*self.links.values(), *self.votes.values()):
            proxy.restore()

    async def __aenter__(self) -> ZoneNodes:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


@dataclass
class Write:
    """One write an in-process app made after ``app.zone.check()`` passed, recorded outside
    every zone (the zone stands for the writer: one active instance per zone in those tests)."""

    zone: str
    term: int
    at: float  # wall clock, once the write is done


def assert_single_writer(writes: Iterable[Write]) -> None:
    """`single_writer_violations` of in-process writes, as an assertion."""
    bad = single_writer_violations(ZoneWrite(w.zone, w.zone, w.term, 0, w.at) for w in writes)
    assert not bad, "; ".join(bad)


class LeafZones:
    """A hub platform and leaf platforms in this process, each zone its embedded nats-server,
    every leaf link through its own `TcpProxy` (``cut(i)`` / ``heal()`` without root).

    :param make: builds a platform: ``make(name, zone, **settings)`` with ``hub=`` or
        ``leaf=`` among the settings (add apps, a plugin manager, timing there).
    :param prefix: appended to ``hub`` / ``edge<i>`` to make unique platform names.
    :param leaves: how many leaf zones (named ``z1``, ``z2``, ...; the hub's zone is ``hq``).
    :param interval: the zone service's check interval (seconds; short in tests).

    Example::

        async with LeafZones(lambda n, z, **kw: Platform(n, zone=z, **kw), unique_name) as lz:
            lz.cut(0)       # the first leaf's link
    """

    user, password = "leaf", "leaf-link-secret"

    def __init__(self, make: Callable[..., Platform], prefix: str, leaves: int = 2,
                 interval: float = 0.25) -> None:
        self._make, self._prefix, self._count, self.interval = make, prefix, leaves, interval
        self.hub: Platform | None = None
        self.leaves: list[Platform] = []
        self.proxies: list[TcpProxy] = []
        self._started: list[Platform] = []

    async def start(self) -> None:
        """Build and start the hub, the proxies and the leaves (each platform as it is built)."""
        port = free_port()
        # Leaves reach the hub only through their proxy (which a test cuts).
        self.hub = self._make(f"hub{self._prefix}"[:30], "hq", hub=HubListen(
            host="127.0.0.1", port=port, user=self.user, password=SecretStr(self.password),
            no_advertise=True))
        self.proxies = [TcpProxy("127.0.0.1", port, name=f"leaf{i}")
                        for i in range(1, self._count + 1)]
        for proxy in self.proxies:
            await proxy.start()
        self.leaves = [self._make(f"edge{i}{self._prefix}"[:30], f"z{i}", leaf=LeafOf(
            f"nats-leaf://127.0.0.1:{proxy.port}", user=self.user,
            password=SecretStr(self.password),
            reconnect=0.25)) for i, proxy in enumerate(self.proxies, 1)]
        for p in (self.hub, *self.leaves):
            self.zone_service(p).interval = self.interval
            await p.start()
            self._started.append(p)

    async def stop(self) -> None:
        """Stop what was started, leaves first; safe after a failed start."""
        for p in reversed(self._started):
            await p.stop()
        self._started = []
        for proxy in self.proxies:
            await proxy.close()

    def cut(self, leaf: int) -> None:
        """Cut the link of ``leaves[leaf]``."""
        self.proxies[leaf].cut()

    def heal(self) -> None:
        """Restore every leaf link."""
        for proxy in self.proxies:
            proxy.restore()

    @staticmethod
    def zone_service(p: Platform) -> Any:
        """The platform's ``leaf`` plugin service (`ZoneService`)."""
        from pycluster.builtin.leaf.service import ZoneService

        svc = p.service("leaf")
        assert isinstance(svc, ZoneService), "the leaf plugin is not running"
        return svc

    async def __aenter__(self) -> LeafZones:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

