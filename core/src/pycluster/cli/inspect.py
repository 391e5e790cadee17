"""Read-only views of a platform from NATS, and control requests (for the CLI).

A platform or app name that matches nothing is an error that says so (`NoLiveNodesError`,
`NoSuchAppError`), never an empty table or a misleading "not the leader".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..kernel import natsutil as nu
from ..kernel.connection import connect
from ..kernel.coordinator import check_step_down
from ..kernel.embedded import LocalCredentials, find_embedded
from ..kernel.errors import (
    ConfigError,
    NoInstanceError,
    NoLiveNodesError,
    NoSuchAppError,
    PyclusterError,
    UnauthorizedError,
)
from ..kernel.names import validate_ident
from ..kernel.placement import read_operations
from ..kernel.platform import stepdown_subject
from ..kernel.settings import PlatformSettings, load_settings, redact_url

if TYPE_CHECKING:
    from ..middleware import SignedAuth

class NoNatsUrlError(ConfigError):
    """A CLI command has no NATS URL and finds no local embedded server (no default URL)."""

    def __init__(self, message: str) -> None:
        PyclusterError.__init__(self, message)
        self.field, self.value, self.reason = "nats_url", None, message


def resolve_platform(platform: str | None, config: str | None = None) -> str:
    """The platform a CLI command is about: ``--platform`` / ``PYCLUSTER_NAME``, else the
    ``name`` of the ``--config`` file, else ``default``."""
    if platform:
        return validate_ident("platform", platform)
    if config:
        return read_settings(config).name
    return "default"


def read_settings(config: str) -> PlatformSettings:
    """A node's config file (with the ``PYCLUSTER_*`` environment on top), for the CLI."""
    return load_settings(config)


def cli_settings(nats_url: str | None, platform: str, data_dir: str | None = None,
                 config: str | None = None) -> PlatformSettings:
    """The settings a CLI command connects with.

    In order: an explicit ``nats_url`` (``--nats-url`` / ``PYCLUSTER_NATS_URL``); else the NATS
    URL of the node's config file ``config`` (``--config``: with its credentials and TLS
    files); else the local embedded server of ``platform``, looked up
    (`pycluster.kernel.embedded.find_embedded`) under the parent of the node's data directory
    (``data_dir``, the config file's ``data_dir``, or the default one) and reached with its
    URL and credentials file. Credentials not in the file come from the environment
    (``PYCLUSTER_NATS_USER`` / ``_PASSWORD`` / ``_TOKEN`` / ``_NKEY_SEED`` / ``_CREDS``,
    ``PYCLUSTER_TLS_*``, ``PYCLUSTER_INBOX_PREFIX``: what ``pycluster nats-config`` writes for
    its operator user).

    Nothing found is a `ConfigError` that says what to give: there is no default URL, so a
    command never answers for whatever cluster happens to listen on a well-known port.
    """
    over: dict[str, Any] = {"name": platform, "data_dir": data_dir}
    if nats_url:
        over["nats_url"] = nats_url
    base = load_settings(config, **over) if config else load_settings(node_id="cli", **over)
    if base.nats_url:
        return base.model_copy(update={"node_id": "cli"})
    node_dir = base.resolved_data_dir()
    for root in dict.fromkeys((node_dir.parent, node_dir)):
        found = find_embedded(platform, root)
        if found is None:
            continue
        extra: dict[str, Any] = {}
        path = found.get("credentials")
        if isinstance(path, str):
            try:
                extra = LocalCredentials.read(path).settings()
            except OSError as exc:
                raise ConfigError("credentials", path, f"the embedded server of platform "
                                  f"{platform!r} needs them, but they cannot be read "
                                  f"({exc.strerror or exc}); run as the node's user") from None
        return base.model_copy(update={"nats_url": [str(found["url"])], "node_id": "cli",
                                       **extra})
    where = f"the config file {config} names no nats_url and " if config else ""
    raise NoNatsUrlError(
        f"no NATS to ask: {where}no node of platform {platform!r} runs an embedded server "
        f"under {node_dir.parent}; give --config FILE (the node's config file), --nats-url "
        "URL or PYCLUSTER_NATS_URL")


async def _connect(nats_url: str | None, platform: str, data_dir: str | None = None,
                   config: str | None = None) -> NATS:
    return (await _open(nats_url, platform, data_dir, config))[0]


async def _open(nats_url: str | None, platform: str, data_dir: str | None = None,
                config: str | None = None) -> tuple[NATS, list[str]]:
    """A connection, and its server URLs for messages (passwords masked)."""
    s = cli_settings(nats_url, platform, data_dir, config)
    return await connect(s), [redact_url(u) for u in s.nats_url or []]


async def _live_nodes(js: JetStreamContext, platform: str) -> list[dict[str, Any]]:
    """The live node records of ``platform``, by node id."""
    try:
        records = await nu.live_values(js, f"{platform}_platform", "nodes.")
    except nats.js.errors.NotFoundError:
        records = {}
    return [records[k] for k in sorted(records)]


async def _platforms(js: JetStreamContext) -> list[str]:
    """Platforms that have a platform bucket on this NATS (to point at a typo)."""
    names: list[str] = []
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        offset = 0
        for _ in range(100):  # the server lists 256 streams a page; a busy NATS has more
            page = await js.streams_info(offset=offset)
            if not page:
                break
            offset += len(page)
            for info in page:
                name = info.config.name or ""
                if name.startswith("KV_") and name.endswith("_platform"):
                    names.append(name[len("KV_"):-len("_platform")])
    return sorted(names)


async def _nodes_or_fail(js: JetStreamContext, platform: str,
                         servers: list[str]) -> list[dict[str, Any]]:
    nodes = await _live_nodes(js, platform)
    if not nodes:
        raise NoLiveNodesError(platform, servers, await _platforms(js))
    return nodes


async def _lease(js: JetStreamContext, platform: str, app: str) -> tuple[str | None, int | None]:
    """The leader and epoch in ``app``'s election lease (None, None when vacant)."""
    try:
        msg = await nu.last_msg(js, f"{platform}_{app}_election", "leader")
    except (nats.js.errors.NotFoundError, nu.StreamGoneError):  # never started anywhere
        return None, None
    if msg is None or msg.tombstone:
        return None, None
    body = json.loads(msg.data)
    return body.get("node"), body.get("epoch") or msg.seq


async def request_node_status(nc: NATS, platform: str, nodes: list[str], timeout: float = 2.0,
                              history: bool = False, signer: SignedAuth | None = None,
                              ) -> dict[str, dict[str, Any]]:
    """Each node's ``/status`` document, asked over NATS (the health plugin answers on
    ``{platform}._.node.{node}.status``; no ``health_addr`` needed), all at once; signed by
    ``signer`` for nodes whose middleware requires signed control requests.

    A node that does not answer within ``timeout`` or refuses is ``{"error": reason}``.
    """
    from ..builtin.health.endpoints import node_status_subject

    body = json.dumps({"history": history}).encode()

    async def one(node: str) -> dict[str, Any]:
        subject = node_status_subject(platform, node)
        headers: dict[str, str] = {}
        if signer is not None:
            signer.sign_request(subject, body, headers)
        try:
            msg = await nc.request(subject, body, timeout=timeout, headers=headers or None)
        except nats.errors.NoRespondersError:
            return {"error": "no answer (health plugin disabled, or an older pycluster)"}
        except nats.errors.TimeoutError:
            return {"error": f"no answer within {timeout:g} s"}
        try:
            doc: dict[str, Any] = json.loads(msg.data)
        except ValueError as exc:
            return {"error": f"bad reply: {exc}"}
        err = doc.get("error")
        if isinstance(err, dict):
            hint = ("" if signer is not None or err.get("code") != "unauthorized"
                    else " (sign with --sign-as IDENTITY --seed FILE)")
            return {"error": f"refused: {err.get('reason')}{hint}"}
        return doc

    docs = await asyncio.gather(*(one(n) for n in nodes))
    return dict(zip(nodes, docs, strict=True))


def _merge_detail(st: dict[str, Any], docs: dict[str, dict[str, Any]]) -> None:
    """Add what only the nodes know (lease age, backends, replication, VIPs, checks) to
    ``read_status``'s document, per node and per app."""
    for rec in st["nodes"]:
        doc = docs.get(str(rec["node_id"])) or {}
        if "error" in doc:
            rec["status_error"] = doc["error"]
            continue
        failing = sorted(n for n, c in (doc.get("checks") or {}).items()
                         if c.get("status") == "unhealthy")
        rec["detail"] = {"healthy": doc.get("healthy"), "ready": doc.get("ready"),
                         "not_ready": doc.get("not_ready") or [], "failing_checks": failing,
                         "uptime": doc.get("uptime"), "connected": doc.get("connected"),
                         "health_url": doc.get("health_url")}
    for entry in st["apps"]:
        name = entry["app"]
        backends: dict[str, Any] = {}
        replication: dict[str, Any] = {}
        vips: dict[str, Any] = {}
        lease_age = None
        for node, doc in docs.items():
            info = (doc.get("apps") or {}).get(name)
            if not isinstance(info, dict):
                continue
            if info.get("backends"):
                backends[node] = info["backends"]
            if info.get("replication"):
                replication[node] = info["replication"]
            if info.get("vips"):
                vips[node] = info["vips"]
            if node == entry.get("leader") and info.get("lease_age") is not None:
                lease_age = info["lease_age"]  # the leader's own: seconds since renewal
        entry.update({"lease_age": lease_age, "backends": backends,
                      "replication": replication, "vips": vips})


async def read_status(nats_url: str | None, platform: str,
                      data_dir: str | None = None, config: str | None = None, *,
                      detail: bool = False, timeout: float = 2.0,
                      signer: SignedAuth | None = None) -> dict[str, Any]:
    """Nodes (live records, cordon and maintenance state) and apps (leader lease, epoch, where
    active); with ``detail`` also what only the nodes know, asked of each
    (`request_node_status`): lease age, backend state, replication lag, VIPs, failing checks.

    Raises `NoLiveNodesError` when no node of ``platform`` is alive there. ``nats_url`` None:
    see `cli_settings`.
    """
    validate_ident("platform", platform)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        ops, _ = await read_operations(js, platform)
        apps: dict[str, dict[str, Any]] = {}
        for rec in nodes:
            rec["cordoned"] = str(rec.get("node_id")) in ops.cordoned
            for name, a in (rec.get("apps") or {}).items():
                entry = apps.setdefault(name, {"app": name, "mode": a.get("mode"),
                                               "active_on": [], "standby_on": []})
                if a.get("role") == "active":
                    entry["active_on"].append(rec["node_id"])
                elif a.get("role") == "passive":
                    entry["standby_on"].append(rec["node_id"])
        eligible = {name for rec in nodes for name, a in (rec.get("apps") or {}).items()
                    if isinstance(a, dict) and a.get("eligible") is True}
        for name, entry in apps.items():
            entry["leader"], entry["epoch"] = await _lease(js, platform, name)
            entry["maintenance"] = ops.in_maintenance(name)
            # No live node may place it and none runs it: see docs/placement.md.
            entry["pending"] = name not in eligible and not entry["active_on"]
        st = {"platform": platform, "nodes": nodes, "operations": ops.as_dict(),
              "apps": sorted(apps.values(), key=lambda a: a["app"])}
        if detail:
            ids = [str(n["node_id"]) for n in nodes]
            _merge_detail(st, await request_node_status(nc, platform, ids, timeout,
                                                        signer=signer))
        return st
    finally:
        await nc.close()


async def request_stepdown(nats_url: str | None, platform: str, app: str,
                           successor: str | None, cooldown: float | None,
                           data_dir: str | None = None,
                           signer: SignedAuth | None = None,
                           config: str | None = None) -> dict[str, Any]:
    """Ask the active instance of ``app`` to step down; returns its node and epoch.

    With ``signer`` (a `SignedAuth` holding an identity and its seed) the request is signed, for
    nodes whose middleware requires signed control requests.

    Checked first, each with its own error: the platform has live nodes (`NoLiveNodesError`),
    one of them runs ``app`` (`NoSuchAppError`), ``successor`` is a live node that can lead it
    and not the leader, ``cooldown`` is not negative (`ConfigError`, as `App.step_down`); then
    an active instance must answer (`NoInstanceError`). The leader checks the request again.
    """
    subject = stepdown_subject(platform, app)
    check_step_down(app, "", {}, None, cooldown)  # before connecting
    if successor is not None:
        validate_ident("successor", successor)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        if not any(app in (n.get("apps") or {}) for n in nodes):
            known = sorted({a for n in nodes for a in (n.get("apps") or {})})
            raise NoSuchAppError(platform, app, known)
        states = {str(n["node_id"]): (n.get("apps") or {}).get(app) or {} for n in nodes}
        modes = {st.get("mode") for st in states.values()} - {None}
        if modes == {"spread"}:
            raise NoInstanceError(app, "leader", "a Spread app has no leader to step down")
        leader, _ = await _lease(js, platform, app)
        members = {str(n["node_id"]): n for n in nodes}
        check_step_down(app, leader or "", members, successor, cooldown)
        standby = ", ".join(sorted(n for n, st in states.items()
                                   if st.get("role") == "passive")) or "none"
        if leader is None and not any(st.get("role") == "active" for st in states.values()):
            # Every node listens on the control subject, so asking would only time out.
            raise NoInstanceError(app, "leader", f"no active instance on platform {platform!r} "
                                  f"right now (standby on: {standby})")
        body = json.dumps({"successor": successor, "cooldown": cooldown}).encode()
        headers: dict[str, str] = {}
        if signer is not None:
            signer.sign_request(subject, body, headers)
        try:
            msg = await nc.request(subject, body, timeout=15, headers=headers or None)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise NoInstanceError(
                app, "leader", f"no active instance on platform {platform!r} answered "
                f"(leader in the lease: {leader}; standby on: {standby})") from exc
        try:
            res: dict[str, Any] = json.loads(msg.data)
        except ValueError as exc:
            raise PyclusterError(f"bad reply to a step-down request: {exc}") from None
        err = res.get("error")
        if isinstance(err, dict) and err.get("code") == "unauthorized":
            hint = ("" if signer is not None else "; sign it with --sign-as IDENTITY --seed FILE "
                    "(an identity the nodes trust for control.stepdown)")
            raise UnauthorizedError(f"the leader {res.get('node')} refused the request: "
                                    f"{err.get('reason')}{hint}")
        if isinstance(err, dict):
            raise ConfigError(str(err.get("field")), err.get("value"),
                              f"refused by the leader {res.get('node')}: {err.get('reason')}")
        return res
    finally:
        await nc.close()


async def read_health(nats_url: str | None, platform: str, node: str | None = None,
                      data_dir: str | None = None, config: str | None = None, *,
                      timeout: float = 2.0,
                      signer: SignedAuth | None = None) -> dict[str, dict[str, Any]]:
    """The checks of ``node`` (default: every live node), by node: ``healthy``, ``ready``,
    ``not_ready`` and ``checks`` (each check's status, latency, last error), or ``error`` for a
    node that did not answer. ``node`` must be live (`ConfigError`)."""
    validate_ident("platform", platform)
    if node is not None:
        validate_ident("node", node)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        live = sorted(str(n["node_id"]) for n in await _nodes_or_fail(nc.jetstream(), platform,
                                                                      servers))
        if node is not None and node not in live:
            raise ConfigError("node", node, f"is not a live node of platform {platform!r} "
                              f"(live: {', '.join(live)})")
        docs = await request_node_status(nc, platform, [node] if node else live, timeout,
                                         signer=signer)
    finally:
        await nc.close()
    out: dict[str, dict[str, Any]] = {}
    for n, doc in docs.items():
        if "error" in doc:
            out[n] = {"error": doc["error"]}
            continue
        out[n] = {"healthy": doc.get("healthy"), "ready": doc.get("ready"),
                  "not_ready": doc.get("not_ready") or [], "checks": doc.get("checks") or {}}
    return out
