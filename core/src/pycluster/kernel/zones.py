"""Promotion on hub loss: the `PromoteOnHubFailure` and `Partition` options, `ZoneFencedError`,
and the pure rules of the zone vote (granting, terms, quorum, the primary's zone lease).

One app runs in several platforms (one per zone). Exactly one zone is its **primary** at a
time (at first the hub, at term 1); the others are replicas. The zones vote over a path that
does not run through the hub (the witness bus: see ``docs/multizone.md``). The runtime lives in
the ``leaf`` plugin (`pycluster.builtin.leaf.zones`); this module holds what needs no NATS, so
that it is unit-tested alone.

Safety in one paragraph: a candidate needs grants from a majority of the known zones (the hub
and the witness count; the primary never grants to a rival); a voter that granted term ``T``
never again acknowledges a primary with a lower term; the primary is writable only while a
majority of zones (itself included) acknowledged it within ``detection`` seconds; and the
candidate starts writing only ``detection`` + a margin after it collected its majority, by
when every acknowledgement those voters gave the old primary has expired there. Two
majorities share a zone, so the old primary has fenced itself before the new one writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .declare import option
from .errors import ConfigError, PyclusterError

__all__ = [
    "BOOTSTRAP_TERM",
    "STRATEGIES",
    "Partition",
    "PromoteOnHubFailure",
    "VoteRequest",
    "VoterView",
    "ZoneFencedError",
    "candidate_term",
    "grant_vote",
    "lease_holds",
    "promotion_wait",
    "quorum_size",
]

BOOTSTRAP_TERM = 1
"""The term of the hub before any promotion: every promoted term is above it."""

STRATEGIES = ("fail-safe", "autonomous", "coordinated")
"""The partition strategies of `Partition`."""


@option(eq=False)
class PromoteOnHubFailure:
    """Let a leaf zone take this app over when the hub zone is lost (give the same option to
    the app in every zone: hub, leaves).

    :param detection: seconds the primary must be unreachable before a zone votes or campaigns;
        also the primary's zone lease (it stops writing when a majority of zones has not
        acknowledged it for that long).
    :param quorum: ``"majority"`` (of the known zones, hub and witness included) or a number
        of zones (at least a majority of the known zones is always required).
    :param vote_url: the witness bus (a nats-server every zone reaches without the hub);
        default: the platform's ``zone_vote_url`` setting.
    :param group: the name the zones of this app share on the witness bus (default: the app
        name).
    :param zones: the number of voting zones (hub, leaves, witness). Recommended: without it
        the zones are learned from the witness bus (and remembered), and a zone that has not
        heard from every other one yet counts a smaller majority.

    Example: ``App("convex", Singleton(), PromoteOnHubFailure(detection=30))``
    """

    detection: float = 30.0
    quorum: str | int = "majority"
    vote_url: str | None = None
    group: str | None = None
    zones: int | None = None

    def __post_init__(self) -> None:
        if self.zones is not None and not 2 <= self.zones <= 64:
            raise ConfigError("PromoteOnHubFailure.zones", self.zones,
                              "the number of voting zones: 2 to 64")
        if not self.detection > 0:
            raise ConfigError("PromoteOnHubFailure.detection", self.detection,
                              "must be positive (seconds)")
        q = self.quorum
        if isinstance(q, str) and q != "majority":
            raise ConfigError("PromoteOnHubFailure.quorum", q,
                              'give "majority" or a number of zones (at least 2)')
        if isinstance(q, int) and (isinstance(q, bool) or q < 2):
            raise ConfigError("PromoteOnHubFailure.quorum", q,
                              "a number of zones must be at least 2")
        if self.vote_url is not None and not self.vote_url.startswith(
                ("nats://", "tls://", "ws://", "wss://")):
            raise ConfigError("PromoteOnHubFailure.vote_url", self.vote_url,
                              "a NATS client URL (nats://host:4222) of the witness bus")
        if self.group is not None and not self.group.replace("-", "").replace(
                "_", "").isalnum():
            raise ConfigError("PromoteOnHubFailure.group", self.group,
                              "letters, digits, '-' or '_' (a subject token)")


@option(eq=False)
class Partition:
    """What the app does while its zone has lost the majority.

    :param strategy: ``fail-safe`` (default: stop writing at once, keep serving reads),
        ``autonomous`` (keep writing for at most ``autonomous_for`` seconds, then read-only;
        each such window is recorded as a conflict for reconciliation) or ``coordinated``
        (like fail-safe, and a promotion also needs an approver's yes:
        ``pycluster_approve_promotion``).
    :param autonomous_for: the longest write window of the ``autonomous`` strategy.

    Example: ``App("shop", Singleton(), PromoteOnHubFailure(), Partition("autonomous", 60))``
    """

    strategy: str = "fail-safe"
    autonomous_for: float = 60.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError("Partition.strategy", self.strategy,
                              f"one of {', '.join(STRATEGIES)}")
        if not self.autonomous_for > 0:
            raise ConfigError("Partition.autonomous_for", self.autonomous_for,
                              "must be positive (seconds)")


class ZoneFencedError(PyclusterError):
    """This zone may not write for the app: it is a replica, or the primary lost its zone
    lease (``app.zone.check()``)."""

    def __init__(self, app: str, zone: str | None, reason: str) -> None:
        self.app = app
        self.zone = zone
        self.reason = reason
        super().__init__(f"app {app!r} in zone {zone or '-'} may not write: {reason}")


# -- the pure rules ----------------------------------------------------------------------------


def quorum_size(known: int, quorum: str | int = "majority") -> int:
    """Grants needed among ``known`` zones: a strict majority, or ``quorum`` when larger."""
    majority = known // 2 + 1
    return max(majority, quorum) if isinstance(quorum, int) else majority


def candidate_term(primary_term_seen: int, max_voted: int) -> int:
    """The term a candidate proposes: above every primary term it saw and every term it voted
    in."""
    return max(primary_term_seen, max_voted, BOOTSTRAP_TERM) + 1


def promotion_wait(detection: float) -> float:
    """Seconds a candidate waits after its majority before writing: the old primary's zone
    lease (``detection``) plus a margin for clock rates and acknowledgements in flight."""
    return detection + max(1.0, 0.2 * detection)


def lease_holds(acks: Mapping[str, float], now: float, detection: float, known: int,
                quorum: str | int = "majority") -> bool:
    """Whether a primary holds its zone lease: itself plus the zones that acknowledged it
    within ``detection`` seconds (``acks``: zone -> monotonic time) make a quorum."""
    fresh = sum(1 for t in acks.values() if now - t < detection)
    return 1 + fresh >= quorum_size(known, quorum)


@dataclass(frozen=True)
class VoteRequest:
    """A candidate's request: its zone and platform, the term, its replicated position; a
    pre-vote first (``pre``: answered by the same rules, recorded by nobody), so that a zone
    cut off from the others does not raise its term, nor stop acknowledging its primary, by
    candidacies it cannot win."""

    zone: str
    platform: str
    term: int
    position: int | None = None
    pre: bool = False  # a pre-vote: "would you grant?", recorded by nobody

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"zone": self.zone, "platform": self.platform, "term": self.term,
                "position": self.position, "pre": self.pre}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> VoteRequest:
        """Parse (``ValueError`` when malformed)."""
        try:
            pos = doc.get("position")
            return cls(str(doc["zone"]), str(doc["platform"]), int(doc["term"]),
                       None if pos is None else int(pos), bool(doc.get("pre", False)))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"bad vote request: {exc}") from None


@dataclass(frozen=True)
class VoterView:
    """What a voter knows when a request arrives.

    :ivar zone: the voter's zone.
    :ivar votes: the terms it voted in (term -> the candidate's zone).
    :ivar primary_term_seen: the highest primary term it saw (its own, if it is primary).
    :ivar primary_platform: the primary it follows (or is).
    :ivar silent_for: seconds since that primary last answered it (0 when it is the primary).
    :ivar is_primary: this zone is the writable primary.
    :ivar position: its own replicated position (None: unknown).
    """

    zone: str
    votes: Mapping[int, str]
    primary_term_seen: int
    primary_platform: str | None
    silent_for: float
    is_primary: bool = False
    position: int | None = None


def grant_vote(view: VoterView, req: VoteRequest, detection: float) -> tuple[bool, str]:
    """Whether ``view``'s zone grants ``req``, and why (or why not).

    (a) at most one candidate per term, and never a term at or below one it voted in for
    another zone; (b) the primary has been unreachable from this voter too for ``detection``
    seconds, and a primary never grants to a rival; (c) the candidate is at least as caught up
    as the voter; (d) the term is above every primary term the voter saw.
    """
    already = view.votes.get(req.term)
    if already is not None:
        return (already == req.zone,
                "already granted" if already == req.zone else f"voted for {already} in term "
                f"{req.term}")
    higher = [t for t in view.votes if t > req.term]
    if higher:
        return False, f"voted in a later term {max(higher)}"
    if req.term <= view.primary_term_seen:
        return False, f"term {req.term} is not above primary term {view.primary_term_seen}"
    if req.zone == view.zone:
        return True, "own candidacy"
    if view.is_primary:
        return False, "this zone is the primary: it never votes for a rival"
    # The primary this voter follows may renew its own term (it lost its lease to votes that
    # never made a winner); anyone else only once that primary has been silent long enough.
    if req.platform != view.primary_platform and view.silent_for < detection:
        return False, (f"the primary {view.primary_platform} answered {view.silent_for:.1f}s "
                       f"ago (detection {detection:g}s)")
    if (view.position is not None and req.position is not None
            and req.position < view.position):
        return False, f"candidate position {req.position} is behind this zone's {view.position}"
    if view.position is not None and req.position is None:
        return False, "candidate has no position while this zone has one"
    return True, "granted"
