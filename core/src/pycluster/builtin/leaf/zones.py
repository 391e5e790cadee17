"""Promotion on hub loss: the zone vote over the witness bus, the primary's zone lease, the
partition strategies (`pycluster.kernel.zones` holds the options and the pure rules).

Every zone running an app with `PromoteOnHubFailure` keeps an `AppZone` (the app's ``zone``
handle: ``app.zone.check()``, ``.writable``, ``.epoch``, ``.token``). Its nodes talk to the
other zones over two paths: the platform's own connection (plain subjects cross the leaf links)
and a second connection to the **witness bus**, a nats-server every zone reaches without the
hub. Subjects, ``g`` the app's group:

* ``_pycluster.zv.<g>.hello`` — every voter announces itself each tick (zone, platform, role,
  term, the highest term it voted in): voters learn the zones and the primary's term;
* ``_pycluster.zv.<g>.lease.<platform>`` — a replica pings the primary it follows; the
  primary counts the ping as an acknowledgement unless the pinger voted in a later term;
* ``_pycluster.zv.<g>.vote`` — a candidate's vote request; one node of every zone answers.

Votes are durable in each voter's own zone: the KV bucket ``<platform>_zone_votes`` of the
zone's JetStream domain (key ``<app>.vote.<term>``, created once: compare-and-set), with the
zone's role and term (``<app>.state``), the zones learned (``<app>.known``) and the conflicts
of the autonomous strategy (``<app>.conflict.<n>``). A `WitnessVoter` keeps them in a file.

Size: one protocol (voter, primary lease, candidate, promotion/demotion, strategies, the
witness) whose parts share their state; split, each part would reach into the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from ...kernel.aio import cancel_and_wait
from ...kernel.zones import (
    BOOTSTRAP_TERM,
    Partition,
    PromoteOnHubFailure,
    VoteRequest,
    VoterView,
    ZoneFencedError,
    candidate_term,
    grant_vote,
    lease_holds,
    promotion_wait,
    quorum_size,
)

if TYPE_CHECKING:
    from nats.aio.client import Client

    from ...kernel.app import App
    from ...kernel.platform import Platform

log = logging.getLogger("pycluster.zones")

PLUGIN = "leaf"
AUDIT_CATEGORY = "zone"
ZV_PREFIX = "_pycluster.zv"


def zv_subject(group: str, *tokens: str) -> str:
    """A witness-bus subject of ``group``."""
    return ".".join((ZV_PREFIX, group, *tokens))


def promote_option(app: App) -> PromoteOnHubFailure | None:
    """The app's `PromoteOnHubFailure` option, if any."""
    return next((o for o in app.options if isinstance(o, PromoteOnHubFailure)), None)


def partition_option(app: App) -> Partition:
    """The app's `Partition` option (the fail-safe default when not given)."""
    return next((o for o in app.options if isinstance(o, Partition)), None) or Partition()


class Voter:
    """What every voter does (a zone's `AppZone`, a `WitnessVoter`): answer vote requests
    with the rules of `grant_vote`, announce itself, learn the zones and the primary's term,
    ping the primary it follows."""

    role = "replica"

    def __init__(self, *, zone: str, platform: str, group: str, detection: float,
                 quorum: str | int, zones: int | None, tick: float | None = None) -> None:
        self.zone = zone
        self.platform_name = platform
        self.group = group
        self.detection = detection
        self.quorum = quorum
        self.expected_zones = zones
        self.tick = tick or min(1.0, max(0.1, detection / 10))
        self.term = 0  # the highest primary term seen (own term when primary)
        self.primary_platform: str | None = None
        self.primary_zone: str | None = None
        self.votes: dict[int, str] = {}
        self.known: dict[str, dict[str, Any]] = {}
        self.last_heard: float | None = None  # monotonic: the followed primary last answered
        self.started = time.monotonic()
        self.conns: list[Client] = []
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._vote_lock = asyncio.Lock()
        self._cooldown_until = 0.0  # monotonic: no candidacy before
        self.loaded = True  # the durable votes are read (a zone reads them at start)

    # -- state ------------------------------------------------------------------------------

    @property
    def max_voted(self) -> int:
        """The highest term this zone voted in (0: none)."""
        return max(self.votes, default=0)

    @property
    def is_primary(self) -> bool:
        """Whether this zone is the primary."""
        return self.role == "primary"

    def known_count(self) -> int:
        """The voting zones counted for a quorum: the given number, or the zones learned."""
        learned = len(set(self.known) | {self.zone})
        return max(self.expected_zones or 0, learned)

    def silent_for(self) -> float:
        """Seconds since the followed primary last answered (since start if never)."""
        if self.is_primary:
            return 0.0
        return time.monotonic() - (self.last_heard or self.started)

    def position(self) -> int | None:
        """This zone's replicated position (None: unknown)."""
        return None

    def view(self) -> VoterView:
        """The voter's view for `grant_vote`."""
        return VoterView(zone=self.zone, votes=dict(self.votes), primary_term_seen=self.term,
                         primary_platform=self.primary_platform, silent_for=self.silent_for(),
                         is_primary=self.is_primary, position=self.position())

    def hello(self) -> dict[str, Any]:
        """The announcement of this voter."""
        return {"zone": self.zone, "platform": self.platform_name, "role": self.role,
                "term": self.term, "voted": self.max_voted, "primary": self.primary_platform}

    # -- storage (overridden) ---------------------------------------------------------------

    async def store_vote(self, term: int, zone: str) -> str:
        """Record the vote of ``term`` for ``zone`` unless one exists; return the recorded
        candidate (compare-and-set)."""
        return self.votes.setdefault(term, zone)

    async def store_known(self) -> None:
        """Persist the learned zones."""

    # -- lifecycle --------------------------------------------------------------------------

    async def start_voting(self, conns: list[Client]) -> None:
        """Subscribe on every connection and start ticking."""
        self.conns = conns
        for nc in conns:
            self._subs.append(await nc.subscribe(zv_subject(self.group, "vote"),
                                                 queue=f"zv-{self.platform_name}",
                                                 cb=self._on_vote))
            self._subs.append(await nc.subscribe(zv_subject(self.group, "hello"),
                                                 cb=self._on_hello))
        self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                            name=f"zone-vote-{self.group}")

    async def stop_voting(self) -> None:
        """Stop ticking and answering."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("zone vote %s: tick failed", self.group)
            await asyncio.sleep(self.tick)

    async def step(self) -> None:
        """One tick: announce, ping the primary."""
        await self._publish_all(zv_subject(self.group, "hello"), self.hello())
        if not self.is_primary and self.primary_platform is not None:
            await self.ping_primary()

    async def _publish_all(self, subject: str, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        for nc in self.conns:
            if nc.is_connected:
                with contextlib.suppress(Exception):
                    await nc.publish(subject, data)

    async def ping_primary(self) -> None:
        """Ping the followed primary on every path; an answer renews ``last_heard``."""
        assert self.primary_platform is not None
        subject = zv_subject(self.group, "lease", self.primary_platform)
        body = json.dumps({"zone": self.zone, "platform": self.platform_name,
                           "term": self.term, "voted": self.max_voted}).encode()

        async def one(nc: Client) -> dict[str, Any] | None:
            if not nc.is_connected:
                return None
            try:
                msg = await nc.request(subject, body, timeout=max(0.2, self.tick))
                doc: dict[str, Any] = json.loads(msg.data)
                return doc
            except (nats.errors.Error, ValueError, TimeoutError):
                return None

        for doc in await asyncio.gather(*(one(nc) for nc in self.conns)):
            if doc and doc.get("role") == "primary":
                term = int(doc.get("term", 0))
                if term >= self.term:
                    self.last_heard = time.monotonic()
                    await self.learn_primary(term, str(doc.get("platform")), doc.get("zone"))

    async def learn_primary(self, term: int, platform: str, zone: Any) -> None:
        """A primary with ``term`` exists: follow it when its term is the highest seen."""
        if term > self.term or (term == self.term and self.primary_platform is None):
            self.term = term
            self.primary_platform = platform
            self.primary_zone = str(zone) if zone is not None else None
            self.last_heard = time.monotonic()

    # -- answering --------------------------------------------------------------------------

    async def _on_hello(self, msg: Msg) -> None:
        try:
            doc = json.loads(msg.data)
            zone = str(doc["zone"])
        except (ValueError, KeyError, TypeError):
            return
        if zone == self.zone:  # another node of this zone: not a zone to count
            if doc.get("role") == "primary" and doc.get("platform") == self.platform_name:
                await self.learn_primary(int(doc.get("term") or 0), self.platform_name, zone)
            return
        new = zone not in self.known
        self.known[zone] = {"platform": doc.get("platform"), "role": doc.get("role"),
                            "term": doc.get("term"), "seen": time.time()}
        if new:
            await self.store_known()
        if doc.get("role") == "primary":
            await self.on_primary_hello(int(doc.get("term") or 0), str(doc.get("platform")),
                                        zone)

    async def on_primary_hello(self, term: int, platform: str, zone: str) -> None:
        """A primary announced itself."""
        if platform == self.primary_platform and term == self.term:
            self.last_heard = time.monotonic()
        await self.learn_primary(term, platform, zone)

    async def _on_vote(self, msg: Msg) -> None:
        try:
            req = VoteRequest.from_dict(json.loads(msg.data))
        except ValueError:
            return
        granted, reason = await self.decide(req)
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps({
                    "zone": self.zone, "platform": self.platform_name, "term": req.term,
                    "granted": granted, "reason": reason, "voted": self.max_voted,
                    "primary_term": self.term, "position": self.position(),
                    "role": self.role}).encode())

    async def decide(self, req: VoteRequest) -> tuple[bool, str]:
        """Apply the grant rules and record a grant durably before answering."""
        async with self._vote_lock:
            if not self.loaded:
                return False, "this zone's recorded votes are not read yet"
            granted, reason = grant_vote(self.view(), req, self.detection)
            if req.pre:
                return granted, reason
            if granted and req.term not in self.votes:
                try:
                    recorded = await self.store_vote(req.term, req.zone)
                except Exception as exc:  # no durable record, no vote
                    return False, f"could not record the vote: {exc}"
                self.votes[req.term] = recorded
                if recorded != req.zone:
                    return False, f"voted for {recorded} in term {req.term}"
            if granted:
                log.info("zone %s grants term %d to %s", self.zone, req.term, req.zone)
                if req.zone != self.zone:  # give that candidate time to win before our own
                    self._cooldown_until = max(self._cooldown_until,
                                               time.monotonic() + self.detection)
            return granted, reason


# -- a zone of the app --------------------------------------------------------------------------


class AppZone(Voter):
    """The ``zone`` handle of an app with `PromoteOnHubFailure` (``app.zone``): this zone's
    role (``primary`` or ``replica``), term and write permission.

    Write only after ``check()`` (or while ``writable``) and tag writes with ``token`` (the
    term, then the local election epoch: compare them as a tuple).
    """

    def __init__(self, app: App, platform: Platform, option: PromoteOnHubFailure,
                 role: str) -> None:
        zone = platform.settings.zone or platform.name
        super().__init__(zone=zone, platform=platform.name, group=option.group or app.name,
                         detection=option.detection, quorum=option.quorum, zones=option.zones)
        self.app = app
        self.platform = platform
        self.option = option
        self.strategy = partition_option(app)
        self.role = role
        self.acks: dict[str, float] = {}  # zone -> monotonic time of its last counted ping
        self.blocked: dict[str, float] = {}  # pings not counted: the pinger voted later
        self.lease_lost_at: float | None = None  # monotonic
        self._held = False  # the lease held since this zone became primary
        self.promoted_at: float | None = None  # monotonic: writes wait until then
        self._conflict_from: float | None = None  # wall time an autonomous window began
        self.conflicts: list[dict[str, Any]] = []
        self._campaigning = False
        self.history: list[dict[str, Any]] = []
        self._kv: Any = None
        self._witness: Client | None = None
        self.on_tick: Callable[[], None] | None = None
        self._campaign_task: asyncio.Task[bool] | None = None
        self._replica_task: asyncio.Task[None] | None = None
        # Set while the replica plugin turns this zone's copy into the primary's: no writes.
        self.converting = False
        # The replica plugin's promote hook failed or timed out on this node: its copy is not
        # the primary's, so this node does not write (until it is demoted or promoted again).
        self.conversion_failed = False
        if role == "primary":
            self.term = BOOTSTRAP_TERM
            self.primary_platform = platform.name
            self.primary_zone = zone

    # -- the public face --------------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The term this zone is primary with (None while a replica)."""
        return self.term if self.is_primary else None

    @property
    def token(self) -> tuple[int, int] | None:
        """The fencing token of writes: (term, local election epoch), None while not
        writable."""
        if not self.writable:
            return None
        return (self.term, self.app.epoch or 0)

    @property
    def lease_valid(self) -> bool:
        """Whether a quorum of zones acknowledged this primary within the detection time."""
        return self.is_primary and lease_holds(self.acks, time.monotonic(), self.detection,
                                               self.known_count(), self.quorum)

    @property
    def writable(self) -> bool:
        """Whether this node may write for the app now: the zone's primary, holding its zone
        lease (or within its autonomous window), and the app's local leader."""
        return self._write_reason() is None

    def _write_reason(self) -> str | None:
        if not self.is_primary:
            return (f"this zone is a replica (primary: {self.primary_platform or '?'}, "
                    f"term {self.term})")
        now = time.monotonic()
        if self.promoted_at is not None and now < self.promoted_at:
            return "promotion in progress (waiting out the old primary's lease)"
        if self.converting:
            return "promotion in progress (the replica plugin is promoting this zone's copy)"
        if self.conversion_failed:
            return ("the replica plugin's promotion failed on this node (see its log): its "
                    "copy is not the primary's")
        if not self.app.is_active:
            return "this node is not the app's active instance"
        if self.lease_valid:
            return None
        if (self.strategy.strategy == "autonomous" and self.lease_lost_at is not None
                and now - self.lease_lost_at < self.strategy.autonomous_for):
            return None
        return (f"zone lease lost: fewer than {quorum_size(self.known_count(), self.quorum)} "
                f"of {self.known_count()} zones acknowledged this primary within "
                f"{self.detection:g}s")

    def check(self) -> tuple[int, int]:
        """Raise `ZoneFencedError` unless this node may write; return the fencing token."""
        reason = self._write_reason()
        if reason is not None:
            raise ZoneFencedError(self.app.name, self.zone, reason)
        return (self.term, self.app.epoch or 0)

    def status(self) -> dict[str, Any]:
        """``/status`` and ``partition status``: role, term, writable, lease, zones, votes."""
        now = time.monotonic()
        state = ("primary" if self.is_primary and self.lease_valid else
                 "fenced" if self.is_primary and not self.writable else
                 "autonomous" if self.is_primary else "replica")
        return {"app": self.app.name, "zone": self.zone, "platform": self.platform_name,
                "role": self.role, "state": state, "term": self.term,
                "writable": self.writable, "primary": self.primary_platform,
                "primary_zone": self.primary_zone, "strategy": self.strategy.strategy,
                "lease_valid": self.lease_valid,
                "acks": {z: round(now - t, 3) for z, t in sorted(self.acks.items())},
                "known_zones": self.known_count(),
                "quorum": quorum_size(self.known_count(), self.quorum),
                "silent_for": round(self.silent_for(), 3), "voted": self.max_voted,
                "conflicts": len(self.conflicts)}

    # -- storage ----------------------------------------------------------------------------

    async def _bucket(self) -> Any:
        if self._kv is None:
            js = self.platform.js
            assert js is not None
            name = f"{self.platform.name}_zone_votes"
            try:
                self._kv = await js.key_value(name)
            except Exception:
                self._kv = await js.create_key_value(
                    bucket=name, history=1,
                    replicas=max(1, int(getattr(self.platform.settings, "stream_replicas",
                                                1) or 1)))
        return self._kv

    def _key(self, *tokens: str) -> str:
        return ".".join((self.app.name, *tokens))

    async def load(self) -> bool:
        """Read this zone's votes, role, term, known zones and conflicts from its bucket.
        Until that succeeded the zone neither votes nor campaigns (it could forget a vote);
        returns whether it did."""
        try:
            kv = await self._bucket()
            try:
                keys = await kv.keys()
            except nats.js.errors.NoKeysError:
                keys = []
            for key in keys:
                if not key.startswith(self.app.name + "."):
                    continue
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue
                if entry.value is None:
                    continue
                doc = json.loads(entry.value)
                rest = key[len(self.app.name) + 1:]
                if rest.startswith("vote."):
                    self.votes[int(rest[5:])] = str(doc["zone"])
                elif rest == "state":
                    self.role = doc["role"]
                    self.term = max(self.term, int(doc["term"]))
                    self.primary_platform = doc.get("primary")
                    self.primary_zone = doc.get("primary_zone")
                elif rest == "known":
                    for z in doc:
                        self.known.setdefault(z, {})
                elif rest.startswith("conflict."):
                    self.conflicts.append(doc)
        except Exception as exc:
            log.warning("app %s: zone votes not readable yet (%s); not voting until they are",
                        self.app.name, exc)
            return False
        self.loaded = True
        return True

    async def store_vote(self, term: int, zone: str) -> str:
        """Create ``<app>.vote.<term>`` in this zone's bucket (once: compare-and-set)."""
        kv = await self._bucket()
        key = self._key("vote", str(term))
        try:
            await kv.create(key, json.dumps({"zone": zone, "at": time.time()}).encode())
            return zone
        except nats.js.errors.KeyWrongLastSequenceError:
            entry = await kv.get(key)
            return str(json.loads(entry.value or b"{}").get("zone"))

    async def store_known(self) -> None:
        """Persist the learned zones."""
        with contextlib.suppress(Exception):
            kv = await self._bucket()
            await kv.put(self._key("known"), json.dumps(sorted(self.known)).encode())

    async def _store_state(self) -> None:
        kv = await self._bucket()
        await kv.put(self._key("state"), json.dumps({
            "role": self.role, "term": self.term, "primary": self.primary_platform,
            "primary_zone": self.primary_zone, "at": time.time()}).encode())

    async def _store_conflict(self, doc: dict[str, Any]) -> None:
        self.conflicts.append(doc)
        with contextlib.suppress(Exception):
            kv = await self._bucket()
            await kv.put(self._key("conflict", str(len(self.conflicts))),
                         json.dumps(doc).encode())

    def position(self) -> int | None:
        """This zone's replicated position (``pycluster_zone_position``)."""
        try:
            pos = self.platform.pm.hook.pycluster_zone_position(app=self.app)
        except Exception:
            log.exception("app %s: pycluster_zone_position failed", self.app.name)
            return None
        return None if pos is None else int(pos)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the durable state, connect to the witness bus, start voting."""
        self.loaded = False
        await self.load()
        conns: list[Client] = []
        url = self.option.vote_url or self.platform.settings.zone_vote_url
        if url:
            self._witness = await nats.connect(
                url, name=f"{self.platform.node_id}-zone-vote", max_reconnect_attempts=-1,
                reconnect_time_wait=0.25, connect_timeout=2, allow_reconnect=True)
            conns.append(self._witness)
        else:
            log.warning("app %s: no witness bus (zone_vote_url): votes travel over the leaf "
                        "links only, and a leaf cut from the hub cannot win a majority",
                        self.app.name)
        assert self.platform.nc is not None
        conns.append(self.platform.nc)
        await self.start_voting(conns)
        for nc in conns:
            self._subs.append(await nc.subscribe(
                zv_subject(self.group, "lease", self.platform_name), cb=self._on_ping))
        self._audit("started", {"role": self.role, "term": self.term})

    async def _replica_promoted(self, term: int) -> None:
        self.converting = True  # should this node take over locally meanwhile: no writes
        try:
            ok = await self._plugin_hook(self.platform.pm.hook.pycluster_zone_promote,
                                         "promoted", dict(app=self.app, term=term))
            self.conversion_failed = not ok
        finally:
            self.converting = False

    async def _plugin_hook(self, hook: Any, event: str, kwargs: dict[str, Any]) -> bool:
        """Call every implementation of a zone hook in turn (`call_in_turn`): whether every
        one succeeded."""
        from ...plugins import call_in_turn

        return await call_in_turn(hook, self.platform.settings.hook_timeout,
                                  f"app {self.app.name}: zone {event}", **kwargs)

    async def stop(self) -> None:
        """Stop voting; close the witness connection."""
        if self._campaign_task is not None:
            await cancel_and_wait(self._campaign_task)
        if self._replica_task is not None:
            await cancel_and_wait(self._replica_task)
        await self.stop_voting()
        if self._witness is not None:
            with contextlib.suppress(Exception):
                await self._witness.close()
            self._witness = None

    # -- the primary's lease ----------------------------------------------------------------

    async def _on_ping(self, msg: Msg) -> None:
        try:
            doc = json.loads(msg.data)
            zone, voted = str(doc["zone"]), int(doc.get("voted") or 0)
            term = int(doc.get("term") or 0)
        except (ValueError, KeyError, TypeError):
            return
        if term > self.term:
            # The pinger follows this platform at a term this node has not heard of: another
            # node of this zone won it.
            await self.learn_primary(term, self.platform_name, self.zone)
            self.term = max(self.term, term)
        if self.is_primary:
            if voted > self.term:
                self.blocked[zone] = time.monotonic()  # it voted for a rival: not an ack
            else:
                self.acks[zone] = time.monotonic()
                self.blocked.pop(zone, None)
        # Only the app's active instance answers: "the primary answered" means the app runs
        # there, not merely that one of the zone's nodes is up.
        if msg.reply and self.app.is_active:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps({
                    "role": self.role, "term": self.term, "platform": self.platform_name,
                    "zone": self.zone, "primary": self.primary_platform}).encode())

    async def learn_primary(self, term: int, platform: str, zone: Any) -> None:
        """Follow a higher term; when it is this zone's own (another node of the zone won it),
        this node knows its zone is primary (a local failover keeps the zone's term)."""
        if platform == self.platform_name and term > self.term and not self.is_primary:
            self.role = "primary"
            self.term = term
            self.primary_platform = platform
            self.primary_zone = self.zone
            self.lease_lost_at = None
            self._held = False
            # The replica plugin turns this node's copy too (it follows the winner's new
            # data); in the background: this runs in a subscription callback.
            self._replica_task = asyncio.get_running_loop().create_task(
                self._replica_promoted(term), name=f"zone-promoted-{self.group}")
            return
        await super().learn_primary(term, platform, zone)

    def hello(self) -> dict[str, Any]:
        """The announcement; a primary zone's node that is not the app's active instance
        does not claim the primary role (its hello only keeps it known)."""
        doc = super().hello()
        if self.is_primary and not self.app.is_active:
            doc["role"] = "primary-standby"
        return doc

    async def on_primary_hello(self, term: int, platform: str, zone: str) -> None:
        """A primary announced itself: a primary with a higher term than ours demotes us."""
        if self.is_primary and platform != self.platform_name and term > self.term:
            await self.demote(platform, term, zone, "a primary with a higher term announced "
                              "itself")
            return
        await super().on_primary_hello(term, platform, zone)

    async def step(self) -> None:
        """One tick: announce, ping or keep the lease, campaign when the primary is lost."""
        if not self.loaded and not await self.load():
            return
        await super().step()
        if self.on_tick is not None:
            self.on_tick()
        if self.primary_platform is None:
            hub = self._hub_platform()
            if hub is not None and hub != self.platform_name:
                self.primary_platform = hub  # follow the hub until a primary announces
        now = time.monotonic()
        if self.is_primary:
            self._watch_lease(now)
            if (not self.lease_valid and self._eligible() and self._blocked_majority(now)
                    and now >= self._cooldown_until and not self._campaigning):
                self._spawn_campaign("renew: zones voted in a later term")
        elif (self._eligible() and self.primary_platform is not None
              and self.silent_for() >= self.detection and now >= self._cooldown_until
              and not self._campaigning):
            self._spawn_campaign(None, delay=random.uniform(0, self._spread))

    @property
    def _spread(self) -> float:
        """The range of the random delay before a candidacy: two leaves that noticed the
        silence on the same tick ask at different moments, the later one hears the earlier
        one's request first and grants it instead of splitting the vote."""
        return min(1.0, max(0.3, self.detection / 4))

    def _spawn_campaign(self, why: str | None, delay: float = 0.0) -> None:
        # In the background: announcing and answering pings go on while it waits.
        self._campaigning = True

        async def run() -> bool:
            try:
                if delay:
                    await asyncio.sleep(delay)
                if why is not None:
                    return await self.campaign(why)
                # Still silent, still no rival's request granted meanwhile?
                if (self.is_primary or self.silent_for() < self.detection
                        or time.monotonic() < self._cooldown_until or not self._eligible()):
                    return False
                return await self.campaign(f"primary {self.primary_platform} silent for "
                                           f"{self.silent_for():.1f}s")
            finally:
                self._campaigning = False

        self._campaign_task = asyncio.get_running_loop().create_task(
            run(), name=f"zone-campaign-{self.group}")

    def _hub_platform(self) -> str | None:
        from .service import ZoneService

        svc = self.platform.services.get(PLUGIN)
        return svc.hub.platform if isinstance(svc, ZoneService) else None

    def _eligible(self) -> bool:
        """Only the app's active instance of this zone campaigns."""
        return self.app.is_active

    def _blocked_majority(self, now: float) -> bool:
        fresh = {z for z, t in {**self.acks, **self.blocked}.items()
                 if now - t < self.detection}
        return 1 + len(fresh) >= quorum_size(self.known_count(), self.quorum)

    def _watch_lease(self, now: float) -> None:
        valid = self.lease_valid
        if valid:
            self._held = True
            if self.lease_lost_at is not None:
                self.lease_lost_at = None
                self._audit("lease_regained", {"term": self.term})
            self._end_conflict()
            return
        if not self._held:
            return  # never held since it started or was promoted: nothing lost, no window
        if self.lease_lost_at is None:
            self.lease_lost_at = now
            self._audit("fenced" if self.strategy.strategy != "autonomous" else
                        "autonomous", {"term": self.term,
                                       "acks": sorted(self.acks),
                                       "quorum": quorum_size(self.known_count(), self.quorum)})
            log.warning("app %s zone %s: zone lease lost (term %d): %s", self.app.name,
                        self.zone, self.term, self.strategy.strategy)
            if self.strategy.strategy == "autonomous":
                self._conflict_from = time.time()
        elif (self.strategy.strategy == "autonomous" and self._conflict_from is not None
              and now - self.lease_lost_at >= self.strategy.autonomous_for):
            self._end_conflict()

    def _end_conflict(self, rival: int | None = None) -> None:
        if self._conflict_from is None:
            return
        doc = {"app": self.app.name, "zone": self.zone, "platform": self.platform_name,
               "epoch": self.term, "from": self._conflict_from, "to": time.time(),
               "rival_term": rival}
        self._conflict_from = None
        self._audit("conflict", doc)
        asyncio.get_running_loop().create_task(self._store_conflict(doc))

    # -- campaigning ------------------------------------------------------------------------

    async def campaign(self, why: str) -> bool:
        """Ask every zone for its vote; with a majority (and, coordinated, an approval), wait
        out the old primary's lease and promote. Returns whether this zone promoted."""
        self._campaigning = True
        try:
            return await self._campaign(why)
        finally:
            self._campaigning = False
            self._cooldown_until = max(self._cooldown_until,
                                       time.monotonic() + self.detection / 2)

    async def _tally(self, req: VoteRequest) -> tuple[dict[str, float], dict[str, Any],
                                                     list[dict[str, Any]]]:
        answers = await self._collect(req)
        grants = {self.zone: time.monotonic()}
        positions: dict[str, Any] = {self.zone: req.position}
        for doc in answers:
            zone = str(doc.get("zone"))
            if doc.get("granted") and doc.get("term") == req.term:
                grants.setdefault(zone, time.monotonic())
                positions[zone] = doc.get("position")
            if zone not in self.known and zone != self.zone:
                self.known[zone] = {"platform": doc.get("platform"), "role": doc.get("role")}
        return grants, positions, answers

    async def _campaign(self, why: str) -> bool:
        term = candidate_term(self.term, self.max_voted)
        pre = VoteRequest(self.zone, self.platform_name, term, self.position(), pre=True)
        if not (await self.decide(pre))[0]:
            return False
        grants, _, answers = await self._tally(pre)
        need = quorum_size(self.known_count(), self.quorum)
        if len(grants) < need:
            log.info("zone %s: pre-vote for term %d: %d of %d zones would grant", self.zone,
                     term, len(grants), need)
            return False
        req = VoteRequest(self.zone, self.platform_name, term, self.position())
        granted, reason = await self.decide(req)
        if not granted:
            log.info("zone %s: no candidacy for term %d: %s", self.zone, term, reason)
            return False
        log.warning("app %s zone %s campaigns for term %d (%s)", self.app.name, self.zone,
                    term, why)
        grants, positions, answers = await self._tally(req)
        need = quorum_size(self.known_count(), self.quorum)
        data = {"term": term, "voters": sorted(grants), "need": need,
                "known": self.known_count(), "positions": positions, "reason": why,
                "refusals": {str(d.get("zone")): d.get("reason") for d in answers
                             if not d.get("granted")}}
        if len(grants) < need or self.max_voted > term:
            # (It also granted a later term meanwhile: that candidacy supersedes this one.)
            self._audit("campaign_lost", data)
            log.info("zone %s lost term %d: %d of %d grants", self.zone, term, len(grants),
                     need)
            return False
        if self.strategy.strategy == "coordinated":
            approved = self.platform.pm.hook.pycluster_approve_promotion(
                app=self.app, term=term, zone=self.zone)
            if approved is not True:
                self._audit("promotion_refused", {**data, "approved": approved})
                log.warning("zone %s won term %d but no approver said yes (coordinated)",
                            self.zone, term)
                return False
        # Every voter of the majority stopped acknowledging the old primary when it granted:
        # once the old primary's lease has run out there, it is fenced.
        wait = promotion_wait(self.detection)
        was_primary = self.is_primary
        self.promoted_at = time.monotonic() + wait
        # Until the replica plugins' promote hooks return (the sleep below may end after
        # promoted_at: the state is stored first).
        self.converting = not was_primary
        self.acks = dict(grants)
        self.acks.pop(self.zone, None)
        self.role = "primary"
        self.term = term
        self.primary_platform = self.platform_name
        self.primary_zone = self.zone
        self.lease_lost_at = None
        self._held = False
        await self._store_state()
        self._audit("won", {**data, "wait": wait})
        await asyncio.sleep(wait)
        if not self.is_primary or self.term != term:
            return False  # a higher term appeared meanwhile: demoted already
        if self.max_voted > term:  # it granted a later candidacy meanwhile: step aside
            self.role = "replica"
            self.primary_platform = None
            self.last_heard, self.started = None, time.monotonic()
            self.promoted_at = None
            self.converting = False
            await self._store_state()
            self._audit("campaign_lost", {**data, "superseded_by": self.max_voted})
            return False
        await self._promoted(term, data, renewed=was_primary)
        return True

    async def operator_promote(self, force: bool = False) -> bool:
        """``pycluster leaf promote``: campaign now (the voters' rules still apply), or with
        ``force`` take the next term without a majority (the operator's vote)."""
        if self.is_primary and self.lease_valid:
            return True
        if not force:
            return await self.campaign("operator asked")
        term = candidate_term(self.term, self.max_voted)
        recorded = await self.store_vote(term, self.zone)
        if recorded != self.zone:
            return False
        self.votes[term] = recorded
        data = {"term": term, "voters": [self.zone], "forced": True, "reason": "operator"}
        wait = promotion_wait(self.detection)
        self.role, self.term = "primary", term
        self.primary_platform, self.primary_zone = self.platform_name, self.zone
        self.promoted_at = time.monotonic() + wait
        self.converting = True
        self.acks.clear()
        self.lease_lost_at = None
        self._held = False
        await self._store_state()
        self._audit("won", {**data, "wait": wait})
        await asyncio.sleep(wait)
        if not self.is_primary or self.term != term:
            return False
        await self._promoted(term, data, renewed=False)
        return True

    async def step_back(self, why: str) -> None:
        """``pycluster leaf demote``: stop being primary without a successor (the other zones
        elect one after the detection time)."""
        if not self.is_primary:
            return
        self.role = "replica"
        self.converting = self.conversion_failed = False
        self.primary_platform = None
        self.last_heard = None
        self.started = time.monotonic()
        self.acks.clear()
        with contextlib.suppress(Exception):
            await self._store_state()
        self._audit("demoted", {"term": self.term, "old_term": self.term, "primary": None,
                                "reason": why})
        await self._notify(self.platform.pm.hook.pycluster_zone_demote, "demoted",
                           dict(app=self.app, primary_platform="", term=self.term), self.term,
                           "")

    async def _collect(self, req: VoteRequest) -> list[dict[str, Any]]:
        answers: dict[str, dict[str, Any]] = {}
        body = json.dumps(req.as_dict()).encode()
        subs = []
        everyone = asyncio.Event()  # a majority granted, or every zone answered: done
        try:
            for nc in self.conns:
                if not nc.is_connected:
                    continue
                inbox = nc.new_inbox()

                async def on_msg(msg: Msg) -> None:
                    with contextlib.suppress(ValueError, AttributeError):
                        doc = json.loads(msg.data)
                        zone = str(doc.get("zone"))
                        if zone not in answers or doc.get("granted"):
                            answers[zone] = doc
                        others = set(answers) - {self.zone}
                        granted = sum(1 for z in others if answers[z].get("granted")
                                      and answers[z].get("term") == req.term)
                        if (len(others) >= self.known_count() - 1
                                or 1 + granted >= quorum_size(self.known_count(),
                                                              self.quorum)):
                            everyone.set()

                subs.append(await nc.subscribe(inbox, cb=on_msg))
                with contextlib.suppress(Exception):
                    await nc.publish(zv_subject(self.group, "vote"), body, reply=inbox)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.5, 2 * self.tick)):
                    await everyone.wait()
        finally:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        answers.pop(self.zone, None)
        return list(answers.values())

    async def _promoted(self, term: int, data: dict[str, Any], renewed: bool) -> None:
        # The app writes only once the replica plugin's copy is the primary's (its promote
        # hook returned): a write before would land in a replica it is still restoring.
        self.converting = not renewed
        self.promoted_at = None
        try:
            log.warning("app %s: zone %s is primary with term %d", self.app.name, self.zone,
                        term)
            self._audit("renewed" if renewed else "promoted", data)
            await self._publish_all(zv_subject(self.group, "hello"), self.hello())
            if renewed:
                return
            await self._notify(self.platform.pm.hook.pycluster_zone_promote, "promoted",
                               dict(app=self.app, term=term), term, self.platform_name,
                               after_plugins=self._converted)
        finally:
            self.converting = False

    def _converted(self, ok: bool) -> None:
        self.conversion_failed = not ok
        self.converting = False
        if not ok:
            self._audit("promotion_failed", {"term": self.term})
            log.error("app %s zone %s: the replica plugin's promotion failed (term %d): this "
                      "node does not write; demote the zone (pycluster leaf demote) or fix and "
                      "restart it", self.app.name, self.zone, self.term)

    async def demote(self, platform: str, term: int, zone: str | None, why: str) -> None:
        """Another platform is primary with the higher ``term``: stop writing at once, record
        it, tell the replica plugin and the app."""
        if not self.is_primary or term <= self.term:
            return
        old = self.term
        self.role = "replica"
        self.promoted_at = None
        self.converting = self.conversion_failed = False
        self._end_conflict(rival=term)
        self.term = term
        self.primary_platform = platform
        self.primary_zone = zone
        self.last_heard = time.monotonic()
        self.acks.clear()
        log.warning("app %s zone %s demoted: %s is primary with term %d (ours was %d)",
                    self.app.name, self.zone, platform, term, old)
        for c in self.conflicts:
            if c.get("rival_term") is None:
                c["rival_term"] = term
        with contextlib.suppress(Exception):
            await self._store_state()
        self._audit("demoted", {"term": term, "old_term": old, "primary": platform,
                                "reason": why})
        await self._notify(self.platform.pm.hook.pycluster_zone_demote, "demoted",
                           dict(app=self.app, primary_platform=platform, term=term), term,
                           platform)

    async def _notify(self, hook: Any, event: str, kwargs: dict[str, Any], term: int,
                      leader: str, after_plugins: Callable[[bool], None] | None = None
                      ) -> None:
        from ...kernel.context import Context
        from ...kernel.coordinator import run_hooks
        from ...kernel.stages import StageAction, StageEvent, StageOutcome
        from ...plugins import call_each

        timeout = self.platform.settings.hook_timeout
        started = time.monotonic()
        ok = await self._plugin_hook(hook, event, kwargs)
        if after_plugins is not None:
            after_plugins(ok)  # before the app's own hooks: on_promoted may write
        # The zone's change of role as a stage call of its own (audit, metrics, spans).
        ev = StageEvent(app=self.app.name, stage="zone", plugin=PLUGIN,
                        action=StageAction.ACTIVATE if event == "promoted"
                        else StageAction.DEACTIVATE,
                        outcome=StageOutcome.OK if ok else StageOutcome.FAILED, epoch=term,
                        duration=time.monotonic() - started)
        call_each(self.platform.pm.hook.pycluster_stage_event, "stage event", app=self.app,
                  event=ev)
        ctx = Context(app=self.app, platform=self.platform, node_id=self.platform.node_id,
                      epoch=term, leader=leader, reason=event)
        await run_hooks(self.app.hooks(event), ctx, timeout, event, raise_errors=False)

    def _audit(self, action: str, data: dict[str, Any]) -> None:
        self.history.append({"event": action, "at": time.time(), **{
            k: v for k, v in data.items() if k in ("term", "acks", "old_term", "primary")}})
        audit = self.platform.services.get("audit")
        if audit is None:
            return
        with contextlib.suppress(Exception):
            audit.log(AUDIT_CATEGORY, action, {"zone": self.zone, **data}, app=self.app.name)


# -- the witness ----------------------------------------------------------------------------


class WitnessVoter(Voter):
    """A voter that runs no app: it casts its vote on the witness bus and keeps its votes in
    a local file (``pycluster witness``, `pycluster.testing.zones.Witness`).

    :param url: the witness bus.
    :param group: the app group it votes for (``PromoteOnHubFailure.group``, default the app
        name).
    :param state_file: where the votes and the learned zones are kept (fsynced).
    """

    role = "witness"

    def __init__(self, url: str, group: str, state_file: str | Path, *, zone: str = "witness",
                 detection: float = 30.0, quorum: str | int = "majority",
                 zones: int | None = None, tick: float | None = None) -> None:
        super().__init__(zone=zone, platform=f"witness-{zone}", group=group,
                         detection=detection, quorum=quorum, zones=zones, tick=tick)
        self.url = url
        self.state_file = Path(state_file)
        self.nc: Client | None = None

    def _load(self) -> None:
        if self.state_file.exists():
            doc = json.loads(self.state_file.read_text() or "{}")
            self.votes = {int(k): str(v) for k, v in doc.get("votes", {}).items()}
            self.known = {z: {} for z in doc.get("known", [])}
            self.term = int(doc.get("term", 0))
            self.primary_platform = doc.get("primary")

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"votes": {str(k): v for k, v in self.votes.items()},
                       "known": sorted(self.known), "term": self.term,
                       "primary": self.primary_platform}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_file)

    async def store_vote(self, term: int, zone: str) -> str:
        """Record the vote in the state file (once per term)."""
        recorded = self.votes.setdefault(term, zone)
        await asyncio.to_thread(self._save)
        return recorded

    async def store_known(self) -> None:
        """Persist the learned zones."""
        await asyncio.to_thread(self._save)

    async def start(self) -> None:
        """Connect to the witness bus and vote."""
        self._load()
        self.nc = await nats.connect(self.url, name=f"pycluster-witness-{self.zone}",
                                     max_reconnect_attempts=-1, reconnect_time_wait=0.25,
                                     connect_timeout=2)
        await self.start_voting([self.nc])

    async def stop(self) -> None:
        """Stop voting and disconnect."""
        await self.stop_voting()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None

