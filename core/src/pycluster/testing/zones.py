"""A witness bus and a witness voter for tests of promotion on hub loss.

Example::

    async with Witness("convex", tmp_path, detection=2.0, zones=4) as witness:
        # zones connect to it: PromoteOnHubFailure(vote_url=witness.url) (or through a
        # TcpProxy in front of witness.server.port, to cut a zone off the witness bus)
        ...

`Write` and `assert_single_writer`: an external record of the writes each zone's app made
(zone, term, wall time), and the check that no two zones ever wrote as primary at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pycluster.builtin.leaf.zones import WitnessVoter

from .servers import NatsServer

__all__ = ["Witness", "Write", "assert_single_writer"]


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


@dataclass
class Write:
    """One write an app made after ``app.zone.check()`` passed, recorded outside every zone."""

    zone: str
    term: int
    at: float  # wall clock, once the write is done


def assert_single_writer(writes: Iterable[Write]) -> None:
    """Every term was written by one zone only, and no zone wrote with an older term after a
    newer term's first write."""
    writes = list(writes)
    by_term: dict[int, set[str]] = {}
    first: dict[int, float] = {}
    for w in writes:
        by_term.setdefault(w.term, set()).add(w.zone)
        first[w.term] = min(first.get(w.term, w.at), w.at)
    for term, writers in by_term.items():
        assert len(writers) == 1, f"term {term} written by {writers}"
    for w in writes:
        for term, t in first.items():
            if term > w.term:
                assert w.at < t, (f"{w.zone} wrote with term {w.term} at {w.at} after term "
                                  f"{term} began at {t}")
