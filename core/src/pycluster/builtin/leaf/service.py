"""The zone service: who this platform is among zones, the hub link, and the zones seen.

Subjects (plain NATS subjects cross leaf links; JetStream stays in each zone's domain):

* ``_pycluster.zones`` — every platform answers once (queue group ``zone-<platform>``) with its
  zone document: ``leaf list`` gathers the answers of every zone it can reach;
* ``_pycluster.hub`` — the hub platform answers (queue group ``hub``); a leaf platform's nodes
  ask it every ``interval`` seconds with their own zone document: the answer's round trip is
  the link's RTT (``pycluster_leaf_rtt_seconds``), no answer marks the link down, and the hub
  remembers each leaf it heard from (up while heard within three intervals);
* ``{platform}._.zone.ping`` — one node of that platform answers (queue group ``zone``):
  ``leaf ping``, ``platform.remote(name).ping()``, and the check a failed cross-zone call
  makes to tell "the zone is unreachable" from "the app does not answer there".

A zone document: ``platform``, ``zone``, ``domain`` (its JetStream domain), ``role``
(``hub``, ``leaf`` or ``zone``: neither configured here), ``node`` (the answering node),
``hub`` (for a leaf: ``platform``, ``up``, ``rtt``, ``since``) and, on the hub, ``leaves``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.aio.msg import Msg

from ...kernel.aio import cancel_and_wait
from ...kernel.leaf import HUB_SUBJECT, ZONES_SUBJECT, zone_domain
from ...kernel.names import platform_subject, validate_ident
from ..rpc.wire import running_nodes

if TYPE_CHECKING:
    from prometheus_client import Gauge, Histogram

    from ...kernel.platform import Platform
    from .remote import RemotePlatform
    from .zones import AppZone

log = logging.getLogger("pycluster.leaf")

PLUGIN = "leaf"
DEFAULT_INTERVAL = 2.0
DOWN_AFTER = 3  # intervals without news before a link or a leaf counts as down ...
DOWN_MIN = 2.0  # ... and at least these seconds (a busy host answers late, not never)


def zone_control_subject(platform: str, what: str) -> str:
    """The subject every node of ``platform`` hears ``partition``/``promote``/``demote``
    requests on (only the node that can act answers)."""
    return platform_subject(validate_ident("platform", platform), "zone", what)


def zone_ping_subject(platform: str) -> str:
    """The subject one node of ``platform`` answers zone pings on."""
    return platform_subject(validate_ident("platform", platform), "zone", "ping")


@dataclass
class LeafMetrics:
    """The plugin's Prometheus metrics of one platform (created by the metrics plugin)."""

    rtt: Histogram
    call: Histogram
    link_up: Gauge
    zones: Gauge
    partition_state: Gauge | None = None
    partition_writable: Gauge | None = None
    partition_term: Gauge | None = None
    partition_conflicts: Gauge | None = None


# Filled by ``pycluster_register_metrics`` (the metrics service is built before ours).
METRICS: weakref.WeakKeyDictionary[Platform, LeafMetrics] = weakref.WeakKeyDictionary()


@dataclass
class HubLink:
    """A leaf platform's view of its hub."""

    platform: str | None = None
    zone: str | None = None
    up: bool = False
    rtt: float | None = None
    since: float | None = None  # when ``up`` last changed (wall clock)
    last_answer: float | None = None  # monotonic

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"platform": self.platform, "zone": self.zone, "up": self.up, "rtt": self.rtt,
                "since": self.since}


@dataclass
class SeenLeaf:
    """A leaf platform the hub heard from."""

    doc: dict[str, Any]
    last: float  # monotonic
    first: float = field(default_factory=time.time)


class ZoneService:
    """The ``leaf`` plugin's service (``platform.service("leaf")``).

    :ivar interval: seconds between a leaf's checks of its hub link.
    """

    name = PLUGIN

    def __init__(self, platform: Platform, interval: float = DEFAULT_INTERVAL) -> None:
        self.platform = platform
        self.interval = interval
        s = platform.settings
        self.zone = s.zone
        self.domain = zone_domain(s.name, s.zone, s.jetstream_domain)
        self.role = ("hub" if s.hub is not None else "leaf" if s.leaf is not None
                     else s.zone_role or "zone")
        self.hub = HubLink()
        self.leaves: dict[str, SeenLeaf] = {}
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None
        self._remotes: dict[str, RemotePlatform] = {}
        self._wake = asyncio.Event()
        self.app_zones: dict[str, AppZone] = {}

    @property
    def configured(self) -> bool:
        """Whether any zone setting is given (``zone``, ``jetstream_domain``, ``hub``,
        ``leaf``, ``zone_role``)."""
        s = self.platform.settings
        return bool(s.zone or s.jetstream_domain or s.hub or s.leaf or s.zone_role)

    @property
    def down_after(self) -> float:
        """Seconds without news before a link or a leaf counts as down."""
        return max(DOWN_MIN, DOWN_AFTER * self.interval)

    @property
    def metrics(self) -> LeafMetrics | None:
        """The metrics (None when the metrics plugin is disabled)."""
        return METRICS.get(self.platform)

    # -- the documents ------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """This platform's zone document, as this node knows it."""
        doc: dict[str, Any] = {"platform": self.platform.name, "zone": self.zone,
                               "domain": self.domain, "role": self.role,
                               "node": self.platform.node_id}
        if self.role == "leaf":
            doc["hub"] = self.hub.as_dict()
        if self.role == "hub":
            doc["leaves"] = self.leaves_view()
        return doc

    def leaves_view(self) -> list[dict[str, Any]]:
        """The leaves the hub heard from: their zone document, ``up``, ``last_seen`` (seconds
        ago)."""
        now = time.monotonic()
        out = []
        for name, seen in sorted(self.leaves.items()):
            age = now - seen.last
            out.append({"platform": name, "zone": seen.doc.get("zone"),
                        "domain": seen.doc.get("domain"), "rtt": seen.doc.get("rtt"),
                        "up": age < self.down_after, "last_seen": round(age, 3)})
        return out

    def status(self) -> dict[str, Any]:
        """The ``/status`` view (with ``partition``: each promotable app's zone state)."""
        doc = self.document()
        doc.pop("node", None)
        if self.app_zones:
            doc["partition"] = self.partition_view()
        return doc

    def partition_view(self) -> dict[str, Any]:
        """Each app with `PromoteOnHubFailure`: role, state, term, writable, lease, votes."""
        return {name: z.status() for name, z in sorted(self.app_zones.items())}

    def update_partition_metrics(self) -> None:
        """Refresh the ``pycluster_partition_*`` gauges."""
        m = self.metrics
        if m is None or m.partition_state is None:
            return
        states = ("replica", "primary", "fenced", "autonomous")
        for name, z in self.app_zones.items():
            st = z.status()
            for state in states:
                m.partition_state.labels(app=name, state=state).set(
                    1 if st["state"] == state else 0)
            if m.partition_writable is not None:
                m.partition_writable.labels(app=name).set(1 if st["writable"] else 0)
            if m.partition_term is not None:
                m.partition_term.labels(app=name).set(st["term"])
            if m.partition_conflicts is not None:
                m.partition_conflicts.labels(app=name).set(st["conflicts"])

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Answer zone requests; on a leaf, start checking the hub link."""
        nc = self.platform.nc
        assert nc is not None
        p = self.platform.name
        self._subs.append(await nc.subscribe(ZONES_SUBJECT, queue=f"zone-{p}",
                                             cb=self._on_zones))
        self._subs.append(await nc.subscribe(zone_ping_subject(p), queue="zone",
                                             cb=self._on_ping))
        if self.role == "hub":
            self._subs.append(await nc.subscribe(HUB_SUBJECT, queue="hub", cb=self._on_hub))
        if self.role == "leaf":
            self._task = asyncio.get_running_loop().create_task(self._watch_hub(),
                                                                name="leaf-hub-link")
        m = self.metrics
        if m is not None:
            m.link_up.set(0)
        await self._start_app_zones()
        if self.app_zones:
            for what in ("partition", "promote", "demote"):
                self._subs.append(await nc.subscribe(zone_control_subject(p, what),
                                                     cb=self._on_control))

    async def _on_control(self, msg: Msg) -> None:
        what = msg.subject.rsplit(".", 1)[-1]
        try:
            body = json.loads(msg.data) if msg.data else {}
        except ValueError:
            body = {}
        if what == "partition":
            conflicts = [c for z in self.app_zones.values() for c in z.conflicts]
            await self._reply(msg, {"platform": self.platform.name, "zone": self.zone,
                                    "apps": self.partition_view(), "conflicts": conflicts})
            return
        z = self.app_zones.get(str(body.get("app")))
        if z is None:
            await self._reply(msg, {"error": f"no app {body.get('app')!r} with "
                                             "PromoteOnHubFailure on this platform"})
            return
        if not z.app.is_active:
            return  # the active instance answers
        if what == "demote":
            await z.step_back("operator demoted the zone")
            await self._reply(msg, z.status())
            return
        promoted = await z.operator_promote(force=bool(body.get("force")))
        await self._reply(msg, {**z.status(), "promoted": promoted,
                                "reason": "forced" if body.get("force") else "vote"})

    async def _start_app_zones(self) -> None:
        from .zones import AppZone, promote_option

        for app in list(self.platform.apps.values()):
            opt = promote_option(app)
            if opt is None:
                continue
            z = AppZone(app, self.platform, opt,
                        "primary" if self.role == "hub" else "replica")
            z.on_tick = self.update_partition_metrics
            app.state(PLUGIN)["zone"] = z
            self.app_zones[app.name] = z
            await z.start()

    async def stop(self) -> None:
        """Stop answering and checking."""
        for z in self.app_zones.values():
            with contextlib.suppress(Exception):
                await z.stop()
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()

    # -- answering ----------------------------------------------------------------------------

    async def _reply(self, msg: Msg, doc: dict[str, Any]) -> None:
        if msg.reply:
            with contextlib.suppress(Exception):
                await msg.respond(json.dumps(doc).encode())

    async def _on_zones(self, msg: Msg) -> None:
        await self._reply(msg, self.document())

    async def _on_ping(self, msg: Msg) -> None:
        doc = self.document()
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            app = json.loads(msg.data).get("app") if msg.data else None
            if isinstance(app, str) and self.platform.membership is not None:
                doc["instances"] = running_nodes(self.platform.membership.members, app)
        await self._reply(msg, doc)

    async def _on_hub(self, msg: Msg) -> None:
        try:
            leaf = json.loads(msg.data) if msg.data else {}
        except ValueError:
            leaf = {}
        name = leaf.get("platform") if isinstance(leaf, dict) else None
        if isinstance(name, str) and name != self.platform.name:
            old = self.leaves.get(name)
            self.leaves[name] = SeenLeaf(leaf, time.monotonic(),
                                         old.first if old else time.time())
        self._count_zones()
        await self._reply(msg, self.document())

    def _count_zones(self) -> None:
        m = self.metrics
        if m is None:
            return
        view = self.leaves_view()
        up = sum(1 for v in view if v["up"])
        m.zones.labels(state="up").set(up)
        m.zones.labels(state="down").set(len(view) - up)

    # -- the hub link (leaf) ------------------------------------------------------------------

    async def check_hub(self, timeout: float = 1.0) -> HubLink:
        """Ask the hub once; update the link state and metrics. Never raises."""
        nc = self.platform.nc
        link = self.hub
        doc = self.document()
        doc.pop("hub", None)
        doc["rtt"] = link.rtt
        started = time.monotonic()
        answer: dict[str, Any] | None = None
        # Nobody interested (the leaf link is gone, or no hub platform runs): down at once; a
        # lost answer counts only after a few intervals without any.
        gone = False
        try:
            if nc is None:
                raise ConnectionError("not connected")
            msg = await nc.request(HUB_SUBJECT, json.dumps(doc).encode(), timeout=timeout)
            answer = json.loads(msg.data)
        except nats.errors.NoRespondersError:
            gone = True
        except (nats.errors.Error, ConnectionError, ValueError, TimeoutError):
            answer = None
        now = time.monotonic()
        m = self.metrics
        if answer is not None:
            rtt = now - started
            link.rtt = rtt
            link.last_answer = now
            link.platform = answer.get("platform")
            link.zone = answer.get("zone")
            if m is not None:
                m.rtt.labels(remote=str(link.platform)).observe(rtt)
        up = answer is not None or (not gone and link.last_answer is not None
                                    and now - link.last_answer < self.down_after)
        if up != link.up or link.since is None:
            if link.since is not None or not up:
                log.log(logging.INFO if up else logging.WARNING,
                        "leaf link to hub %s is %s", link.platform or "?",
                        "up" if up else "down")
            link.up = up
            link.since = time.time()
        if m is not None:
            m.link_up.set(1 if up else 0)
        return link

    def poke(self) -> None:
        """Check the hub link now (e.g. this node's connection came back)."""
        self._wake.set()

    async def _watch_hub(self) -> None:
        while True:
            await self.check_hub(min(1.0, self.interval))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()

    # -- other zones --------------------------------------------------------------------------

    def remote(self, name: str) -> RemotePlatform:
        """The handle of platform ``name`` in another zone (see `RemotePlatform`)."""
        from .remote import RemotePlatform

        r = self._remotes.get(name)
        if r is None:
            r = self._remotes[name] = RemotePlatform(self, name)
        return r


async def gather_zones(nc: Any, wait: float = 1.0) -> list[dict[str, Any]]:
    """Ask every reachable platform for its zone document; collect answers for ``wait``
    seconds (one per platform; sorted by platform)."""
    inbox = nc.new_inbox()
    found: dict[str, dict[str, Any]] = {}
    started = time.monotonic()

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(ValueError, AttributeError):
            doc = json.loads(msg.data)
            doc["rtt"] = round(time.monotonic() - started, 6)
            found.setdefault(str(doc.get("platform")), doc)

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(ZONES_SUBJECT, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return [found[k] for k in sorted(found)]


async def ping_zone(nc: Any, platform: str, timeout: float = 2.0,
                    app: str | None = None) -> dict[str, Any]:
    """Ping ``platform``'s zone responder once: its zone document with ``rtt`` (seconds).

    Raises ``nats.errors.NoRespondersError`` (nobody of that platform is reachable) or
    ``nats.errors.TimeoutError``.
    """
    body = json.dumps({"app": app}).encode() if app else b""
    started = time.monotonic()
    msg = await nc.request(zone_ping_subject(platform), body, timeout=timeout)
    doc: dict[str, Any] = json.loads(msg.data)
    doc["rtt"] = time.monotonic() - started
    return doc
