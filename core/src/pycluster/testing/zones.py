"""A witness bus and a witness voter for tests of promotion on hub loss, and the checker of
the external record of zone writes.

Example::

    async with Witness("convex", tmp_path, detection=2.0, zones=4) as witness:
        # zones connect to it: PromoteOnHubFailure(vote_url=witness.url) (or through a
        # TcpProxy in front of witness.server.port, to cut a zone off the witness bus)
        ...
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pycluster.builtin.leaf.zones import WitnessVoter

from .servers import NatsServer

__all__ = ["Witness", "ZoneWrite", "read_zone_writes", "single_writer_violations"]


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
