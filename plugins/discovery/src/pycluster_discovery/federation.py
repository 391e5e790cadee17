"""Lookups across platforms (``lookup(..., scope="global")``): platforms joined by NATS leaf
links (or sharing one NATS) answer from their own registries.

Subject: ``_pycluster.services.lookup`` (a plain subject: it crosses leaf links, while each
zone's JetStream, its services bucket included, stays in its zone). Every platform with the
discovery plugin answers once (queue group ``discovery-<platform>``: one of its nodes) with
``{"platform", "zone", "instances": [...]}`` from its own registry. The request is
``{"service", "app", "tags", "healthy_only", "from"}``; the asker collects answers for a short
window (``wait``), like ``pycluster leaf list``.

To name the zones that should have answered and did not, the asker also gathers the zone
documents of ``_pycluster.zones`` (the leaf plugin's responder) in the same window: every
platform that answers it, the leaves a hub remembers and a leaf's hub are known; a known
platform whose zone does not answer is *unreachable* (a cut leaf link: its services are left
out and listed in `GlobalInstances.unreachable`); one whose zone answers but not discovery
runs no discovery plugin (`GlobalInstances.without_discovery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pycluster.kernel.discovery import LOOKUP_SUBJECT, ServiceInstance
from pycluster.kernel.leaf import ZONES_SUBJECT

from .registry import as_dict, decode

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

log = logging.getLogger("pycluster.discovery")

DEFAULT_WAIT = 0.5
"""Seconds a lookup across platforms collects answers."""


@dataclass(frozen=True)
class Unreachable:
    """A platform known to exist (a hub's leaf, a leaf's hub) that did not answer in time:
    its zone is cut off (leaf link down) or too slow. Its services are not in the result."""

    platform: str
    zone: str | None
    reason: str


class GlobalInstances(list[ServiceInstance]):
    """The result of a lookup across platforms: the instances (each with ``platform`` and
    ``zone``), sorted by platform, app and node, plus what could not be asked.

    :ivar platforms: the platforms that answered (this one included).
    :ivar unreachable: known platforms that did not answer (`Unreachable`): their services
        are missing from the list.
    :ivar without_discovery: platforms that answered zone requests but run no discovery.
    """

    def __init__(self, instances: Iterable[ServiceInstance] = (), *,
                 platforms: Iterable[str] = (), unreachable: Iterable[Unreachable] = (),
                 without_discovery: Iterable[str] = ()) -> None:
        super().__init__(instances)
        self.platforms = tuple(platforms)
        self.unreachable = tuple(unreachable)
        self.without_discovery = tuple(without_discovery)

    @property
    def complete(self) -> bool:
        """Whether every known platform answered."""
        return not self.unreachable

    def as_dict(self) -> dict[str, Any]:
        """JSON form: ``instances``, ``platforms``, ``unreachable``, ``without_discovery``."""
        return {"instances": [as_dict(i) for i in self],
                "platforms": list(self.platforms),
                "unreachable": [{"platform": u.platform, "zone": u.zone, "reason": u.reason}
                                for u in self.unreachable],
                "without_discovery": list(self.without_discovery)}


def request_body(service: str | None, app: str | None, tags: Iterable[str],
                 healthy_only: bool, source: str | None) -> bytes:
    """A lookup request."""
    return json.dumps({"service": service, "app": app, "tags": list(tags),
                       "healthy_only": healthy_only, "from": source}).encode()


def parse_request(data: bytes) -> dict[str, Any]:
    """A lookup request's fields (ValueError when it is not one)."""
    body = json.loads(data or b"{}")
    if not isinstance(body, dict):
        raise ValueError("a lookup request is a JSON object")
    tags = body.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("tags must be a list of strings")
    service, app = body.get("service"), body.get("app")
    if not (service is None or isinstance(service, str)) or not (
            app is None or isinstance(app, str)):
        raise ValueError("service and app must be strings")
    return {"service": service, "app": app, "tags": tuple(tags),
            "healthy_only": bool(body.get("healthy_only", True))}


def answer_body(platform: str, zone: str | None, instances: Iterable[ServiceInstance]) -> bytes:
    """A platform's answer."""
    return json.dumps({"platform": platform, "zone": zone,
                       "instances": [as_dict(i) for i in instances]}, default=str).encode()


async def gather(nc: NATS, subject: str, body: bytes, wait: float) -> list[dict[str, Any]]:
    """Publish ``body`` on ``subject`` with a reply inbox and collect the JSON answers for
    ``wait`` seconds (the first answer of each platform; malformed ones are skipped)."""
    inbox = nc.new_inbox()
    found: dict[str, dict[str, Any]] = {}

    async def on_msg(msg: Msg) -> None:
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            doc = json.loads(msg.data)
            if isinstance(doc, dict) and isinstance(doc.get("platform"), str):
                found.setdefault(doc["platform"], doc)

    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(subject, body, reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return [found[k] for k in sorted(found)]


def _instances(doc: dict[str, Any]) -> list[ServiceInstance]:
    """The instances of a platform's answer, each with that platform and zone."""
    platform, zone = doc["platform"], doc.get("zone")
    out = []
    for raw in doc.get("instances") or ():
        inst = decode(json.dumps(raw).encode()) if isinstance(raw, dict) else None
        if inst is not None:
            out.append(replace(inst, platform=platform, zone=zone))
    return out


def _known(zone_docs: list[dict[str, Any]]) -> dict[str, str | None]:
    """Every platform the zone documents name (answering or not) -> its zone."""
    known: dict[str, str | None] = {}
    for doc in zone_docs:
        known.setdefault(doc["platform"], doc.get("zone"))
        hub = doc.get("hub")
        if isinstance(hub, dict) and isinstance(hub.get("platform"), str):
            known.setdefault(hub["platform"], hub.get("zone"))
        for leaf in doc.get("leaves") or ():
            if isinstance(leaf, dict) and isinstance(leaf.get("platform"), str):
                known.setdefault(leaf["platform"], leaf.get("zone"))
    return known


async def lookup_global(nc: NATS, service: str | None, *, app: str | None = None,
                        tags: Iterable[str] = (), healthy_only: bool = True,
                        wait: float = DEFAULT_WAIT, local: str | None = None,
                        local_zone: str | None = None,
                        local_lookup: Callable[[], Awaitable[list[ServiceInstance]]]
                        | None = None) -> GlobalInstances:
    """Ask every reachable platform for the instances of ``service`` (None: every service).

    :param local: this platform's name: its instances come from ``local_lookup`` (its own
        view or bucket, no round trip) instead of an answer; its zone is ``local_zone``, else
        the one its zone document names.
    """
    tags = tuple(tags)
    body = request_body(service, app, tags, healthy_only, local)
    answers, zone_docs = await asyncio.gather(
        gather(nc, LOOKUP_SUBJECT, body, wait), gather(nc, ZONES_SUBJECT, b"", wait))
    by_platform = {d["platform"]: d for d in answers}
    zones_answered = {d["platform"] for d in zone_docs}
    known = _known(zone_docs)
    instances: list[ServiceInstance] = []
    if local is not None and local_lookup is not None:
        by_platform.pop(local, None)
        zone = local_zone if local_zone is not None else known.get(local)
        instances += [replace(i, platform=local, zone=zone) for i in await local_lookup()]
    for doc in by_platform.values():
        instances += _instances(doc)
    answered = {*by_platform, *([local] if local is not None else [])}
    unreachable = [Unreachable(p, z, "no answer (its zone is unreachable: leaf link down?)")
                   for p, z in sorted(known.items())
                   if p not in answered and p not in zones_answered]
    without = sorted(p for p in zones_answered if p not in answered)
    instances.sort(key=lambda i: (i.platform or "", i.app, i.service, i.node))
    for u in unreachable:
        log.info("discovery: lookup of %s across platforms: %s (zone %s) did not answer",
                 service, u.platform, u.zone)
    return GlobalInstances(instances, platforms=sorted(answered), unreachable=unreachable,
                           without_discovery=without)
