"""A witness bus and a witness voter for tests of promotion on hub loss.

Example::

    async with Witness("convex", tmp_path, detection=2.0, zones=4) as witness:
        # zones connect to it: PromoteOnHubFailure(vote_url=witness.url) (or through a
        # TcpProxy in front of witness.server.port, to cut a zone off the witness bus)
        ...
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from pycluster.builtin.leaf.zones import WitnessVoter

from .servers import NatsServer

__all__ = ["Witness"]


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
