"""Read-only views of a platform from NATS, and control requests (for the CLI)."""

from __future__ import annotations

import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from .. import natsutil as nu
from ..connection import connect
from ..errors import NotLeaderError, PyclusterError
from ..names import validate_ident
from ..platform import stepdown_subject
from ..settings import load_settings


async def _connect(nats_url: str, platform: str) -> NATS:
    s = load_settings(name=platform, node_id="cli", nats_url=nats_url)
    return await connect(s)


async def read_status(nats_url: str, platform: str) -> dict[str, Any]:
    """Nodes (live records) and apps (leader lease, epoch, where active)."""
    validate_ident("platform", platform)
    nc = await _connect(nats_url, platform)
    try:
        js = nc.jetstream()
        try:
            records = await nu.live_values(js, f"{platform}_platform", "nodes.")
        except nats.js.errors.NotFoundError:
            records = {}
        nodes: list[dict[str, Any]] = [records[k] for k in sorted(records)]
        apps: dict[str, dict[str, Any]] = {}
        for rec in nodes:
            for name, a in (rec.get("apps") or {}).items():
                entry = apps.setdefault(name, {"app": name, "mode": a.get("mode"),
                                               "active_on": [], "standby_on": []})
                if a.get("role") == "active":
                    entry["active_on"].append(rec["node_id"])
                elif a.get("role") == "passive":
                    entry["standby_on"].append(rec["node_id"])
        for name, entry in apps.items():
            msg = await nu.last_msg(js, f"{platform}_{name}_election", "leader")
            if msg is not None and not msg.tombstone:
                body = json.loads(msg.data)
                entry["leader"] = body.get("node")
                entry["epoch"] = body.get("epoch") or msg.seq
            else:
                entry["leader"], entry["epoch"] = None, None
        return {"platform": platform, "nodes": nodes, "apps": sorted(apps.values(),
                                                                     key=lambda a: a["app"])}
    finally:
        await nc.close()


async def request_stepdown(nats_url: str, platform: str, app: str, successor: str | None,
                           cooldown: float | None) -> dict[str, Any]:
    """Ask the active instance of ``app`` to step down; returns its node and epoch."""
    subject = stepdown_subject(platform, app)
    if successor:
        validate_ident("successor", successor)
    nc = await _connect(nats_url, platform)
    try:
        body = json.dumps({"successor": successor, "cooldown": cooldown}).encode()
        try:
            msg = await nc.request(subject, body, timeout=15)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise NotLeaderError(app, None, None) from exc
        res: dict[str, Any] = json.loads(msg.data)
        return res
    except ValueError as exc:
        raise PyclusterError(f"bad reply: {exc}") from None
    finally:
        await nc.close()
