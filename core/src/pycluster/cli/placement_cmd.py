"""``pycluster node ...`` and ``pycluster maintenance ...``: labels, cordons, maintenance mode.

Labels live in each node's membership record, which only that node writes: ``node label``
asks the node over NATS (a control request, validated and audited by the node). Cordons and
maintenance mode are the platform's operations state in NATS (`pycluster.kernel.placement`),
written here by compare-and-set; every node reads it within its poll interval.

Size: the node, app and maintenance command groups with their helps and examples; they share
the request and compare-and-set helpers at the top.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from typing import Any

import click
import nats.errors

from ..kernel.errors import ConfigError, NoInstanceError, PyclusterError
from ..kernel.names import platform_subject, validate_ident
from ..kernel.placement import Operations, read_operations, update_operations, validate_label
from .common import OUTPUT, _fail, _table
from .inspect import _nodes_or_fail, _open
from .options import connection_options


def parse_label_args(args: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """``k=v`` sets, ``k-`` removes (as ``kubectl label``); `ConfigError` for anything else."""
    set_: dict[str, str] = {}
    remove: list[str] = []
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            validate_label(key, value)
            set_[key] = value
        elif arg.endswith("-"):
            validate_label(arg[:-1], "")
            remove.append(arg[:-1])
        else:
            raise ConfigError("label", arg[:64], "expected key=value (set) or key- (remove)")
    if not set_ and not remove:
        raise ConfigError("label", "", "give at least one key=value or key-")
    return set_, remove


async def request_labels(nats_url: str | None, platform: str, node: str, set_: dict[str, str],
                         remove: list[str], data_dir: str | None = None,
                         config: str | None = None) -> dict[str, Any]:
    """Ask ``node`` to change its labels; returns its reply ``{"node", "labels"}``."""
    validate_ident("platform", platform)
    validate_ident("node", node)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        nodes = await _nodes_or_fail(nc.jetstream(), platform, servers)
        live = sorted(str(n.get("node_id")) for n in nodes)
        if node not in live:
            raise ConfigError("node", node, f"is not a live node of platform {platform!r} "
                              f"(live: {', '.join(live)})")
        body = json.dumps({"set": set_, "remove": remove}).encode()
        try:
            msg = await nc.request(platform_subject(platform, "node", node, "labels"), body,
                                   timeout=10)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise NoInstanceError("_", node, "the node did not answer the label request "
                                  "(is it running a pycluster with runtime labels?)") from exc
        res: dict[str, Any] = json.loads(msg.data)
        err = res.get("error")
        if isinstance(err, dict):
            raise ConfigError("labels", None, f"refused by node {node}: {err.get('reason')}")
        return res
    finally:
        await nc.close()


async def _request_move(nc: Any, platform: str, app: str, body: bytes,
                        timeout: float) -> dict[str, Any]:
    """Ask the active instance of ``app`` to move (drain, rebalance); no answer is an
    ``{"error": {"reason": ...}}`` like a refusal."""
    from ..kernel.platform import move_subject

    try:
        msg = await nc.request(move_subject(platform, app), body, timeout=timeout)
        res: dict[str, Any] = json.loads(msg.data)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ValueError):
        res = {"error": {"reason": "no answer from the instance"}}
    return res


async def change_operations(nats_url: str | None, platform: str, data_dir: str | None,
                            change: Any, node: str | None = None,
                            config: str | None = None) -> Operations:
    """Apply ``change`` to the operations state (``node``, if given, must be live)."""
    validate_ident("platform", platform)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        if node is not None:
            live = sorted(str(n.get("node_id")) for n in nodes)
            if node not in live:
                raise ConfigError("node", node, f"is not a live node of platform {platform!r} "
                                  f"(live: {', '.join(live)})")
        return await update_operations(js, platform, change)
    finally:
        await nc.close()


async def read_nodes(nats_url: str | None, platform: str, data_dir: str | None = None,
                     config: str | None = None) -> dict[str, Any]:
    """Live nodes with their labels, cordon state and apps, and the operations state."""
    validate_ident("platform", platform)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        ops, _ = await read_operations(js, platform)
        out = []
        for rec in nodes:
            node = str(rec.get("node_id"))
            apps = rec.get("apps") or {}
            out.append({
                "node_id": node,
                "labels": rec.get("labels") or {},
                "cordoned": node in ops.cordoned,
                "apps": {name: {"role": a.get("role"), "eligible": a.get("eligible")}
                         for name, a in sorted(apps.items()) if isinstance(a, dict)},
            })
        return {"platform": platform, "operations": ops.as_dict(), "nodes": out}
    finally:
        await nc.close()


@click.group("node")
def node_cmd() -> None:
    """Nodes: list, labels, cordon, uncordon and drain."""


@node_cmd.command("list")
@connection_options
@OUTPUT
def node_list_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                  output: str) -> None:
    """Live nodes with labels, cordon state and the apps on each.

    Example: ``pycluster node list -p prod --nats-url nats://nats-1:4222 -o json``
    """
    try:
        st = asyncio.run(read_nodes(nats_url, platform, data_dir, config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(st, indent=2))
        return
    rows = [[n["node_id"], ",".join(f"{k}={v}" for k, v in n["labels"].items()) or "-",
             "cordoned" if n["cordoned"] else "-",
             ",".join(f"{a}:{s['role']}" for a, s in n["apps"].items()) or "-"]
            for n in st["nodes"]]
    click.echo(_table(rows, ["NODE", "LABELS", "STATE", "APPS"]))
    ops = st["operations"]
    if ops["maintenance"] or ops["maintenance_apps"]:
        which = "all apps" if ops["maintenance"] else ", ".join(ops["maintenance_apps"])
        click.echo(f"\nmaintenance mode: {which}")


@node_cmd.command("label")
@click.argument("node")
@click.argument("labels", nargs=-1, required=True)
@connection_options
@OUTPUT
def node_label_cmd(node: str, labels: tuple[str, ...], config: str | None, nats_url: str | None,
                   data_dir: str | None, platform: str, output: str) -> None:
    """Set (``key=value``) or remove (``key-``) labels of NODE at runtime.

    Example: ``pycluster node label n2 zone=b disk-``
    """
    try:
        set_, remove = parse_label_args(labels)
        res = asyncio.run(request_labels(nats_url, platform, node, set_, remove, data_dir,
                                         config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(res))
    else:
        shown = ",".join(f"{k}={v}" for k, v in res["labels"].items()) or "(none)"
        click.echo(f"{node}: labels {shown}")


def _cordon(node: str, on: bool, nats_url: str | None, data_dir: str | None, platform: str,
            output: str, config: str | None) -> None:
    try:
        validate_ident("node", node)
        entry = {"at": time.time(), "by": "cli"}

        def change(o: Operations) -> Operations:
            if on:
                return replace(o, cordoned={**o.cordoned, node: entry})
            return replace(o, cordoned={k: v for k, v in o.cordoned.items() if k != node})

        ops = asyncio.run(change_operations(nats_url, platform, data_dir, change,
                                            node if on else None, config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps({"node": node, "cordoned": node in ops.cordoned}))
    else:
        click.echo(f"{node}: {'cordoned' if on else 'uncordoned'}")


@node_cmd.command("cordon")
@click.argument("node")
@connection_options
@OUTPUT
def node_cordon_cmd(node: str,
                    config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                    output: str) -> None:
    """Cordon NODE: no new instances are placed there (no new leadership, no new Spread
    instance); what runs there stays.

    Example: ``pycluster node cordon node-2 -p prod --nats-url nats://nats-1:4222``
    """
    _cordon(node, True, nats_url, data_dir, platform, output, config)


@node_cmd.command("uncordon")
@click.argument("node")
@connection_options
@OUTPUT
def node_uncordon_cmd(node: str,
                      config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                      output: str) -> None:
    """Undo ``cordon`` for NODE.

    Example: ``pycluster node uncordon node-2 -p prod --nats-url nats://nats-1:4222``
    """
    _cordon(node, False, nats_url, data_dir, platform, output, config)


@click.command("maintenance")
@click.argument("state", type=click.Choice(["on", "off", "show"]))
@click.argument("app", required=False)
@connection_options
@OUTPUT
def maintenance_cmd(state: str, app: str | None,
                    config: str | None, nats_url: str | None, data_dir: str | None,
                    platform: str, output: str) -> None:
    """Maintenance mode on or off, for the platform or for APP (or show it).

    While on, automation stops for the apps concerned: no standby campaigns, so no automatic
    failover and no automatic hand-over; a leader keeps its role as long as it lives. A leader
    that dies in maintenance mode is not replaced until maintenance is turned off, or until
    an operator moves it (``pycluster app move APP --to NODE``).

    Example: ``pycluster maintenance on --app orders -p prod --nats-url nats://nats-1:4222``
    """
    try:
        if app is not None:
            validate_ident("app", app)
        if state == "show":
            async def show() -> Operations:
                nc, servers = await _open(nats_url, platform, data_dir, config)
                try:
                    await _nodes_or_fail(nc.jetstream(), platform, servers)
                    return (await read_operations(nc.jetstream(), platform))[0]
                finally:
                    await nc.close()
            ops = asyncio.run(show())
        else:
            on = state == "on"

            def change(o: Operations) -> Operations:
                if app is None:
                    return replace(o, maintenance=on).without_stale_moves()
                apps = o.maintenance_apps | {app} if on else o.maintenance_apps - {app}
                return replace(o, maintenance_apps=apps).without_stale_moves()

            ops = asyncio.run(change_operations(nats_url, platform, data_dir, change,
                                                config=config))
    except PyclusterError as exc:
        _fail(exc)
        return
    d = ops.as_dict()
    if output == "json":
        click.echo(json.dumps({"maintenance": d["maintenance"],
                               "maintenance_apps": d["maintenance_apps"]}))
        return
    if d["maintenance"]:
        click.echo("maintenance mode: on for the whole platform")
    elif d["maintenance_apps"]:
        click.echo(f"maintenance mode: on for {', '.join(d['maintenance_apps'])}")
    else:
        click.echo("maintenance mode: off")


async def read_apps(nats_url: str | None, platform: str, data_dir: str | None = None,
                    config: str | None = None) -> list[dict[str, Any]]:
    """Every app of ``platform`` with mode, placement, leader, instances, standbys, pending
    and maintenance state, and per node its role, eligibility and priority."""
    from .inspect import read_status

    st = await read_status(nats_url, platform, data_dir, config)
    cordoned = set(st["operations"]["cordoned"])
    out = []
    for a in st["apps"]:
        nodes = {}
        placement: list[str] = []
        strategy = None
        for rec in st["nodes"]:
            entry = (rec.get("apps") or {}).get(a["app"])
            if not isinstance(entry, dict):
                continue
            placement = placement or list(entry.get("placement") or [])
            strategy = strategy or entry.get("strategy")
            nodes[str(rec["node_id"])] = {
                "role": entry.get("role"), "eligible": entry.get("eligible"),
                "priority": entry.get("priority"), "labels": rec.get("labels") or {},
                "cordoned": rec["node_id"] in cordoned}
        out.append({**a, "placement": placement, "strategy": strategy, "nodes": nodes})
    return out


@click.group("app")
def app_cmd() -> None:
    """Apps: list and show (placement, leader, instances, pending, maintenance)."""


@app_cmd.command("list")
@connection_options
@OUTPUT
def app_list_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                 output: str) -> None:
    """Apps with mode, placement, leader, instances and state (pending, maintenance).

    Example: ``pycluster app list -p prod --nats-url nats://nats-1:4222``
    """
    try:
        apps = asyncio.run(read_apps(nats_url, platform, data_dir, config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(apps, indent=2))
        return
    rows = [[a["app"], a.get("mode") or "-", "; ".join(a["placement"]) or "-",
             a.get("leader") or "-", ",".join(a["active_on"]) or "-",
             ",".join(s for s, on in (("maintenance", a["maintenance"]),
                                      ("pending", a["pending"])) if on) or "-"]
            for a in apps]
    click.echo(_table(rows, ["APP", "MODE", "PLACEMENT", "LEADER", "ACTIVE ON", "STATE"]))


@app_cmd.command("show")
@click.argument("app")
@connection_options
@OUTPUT
def app_show_cmd(app: str,
                 config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                 output: str) -> None:
    """APP in detail: placement, leader, epoch, and per node role, eligibility, priority.

    Example: ``pycluster app show orders -p prod --nats-url nats://nats-1:4222 -o json``
    """
    from ..kernel.errors import NoSuchAppError

    try:
        validate_ident("app", app)
        apps = asyncio.run(read_apps(nats_url, platform, data_dir, config))
        found = next((a for a in apps if a["app"] == app), None)
        if found is None:
            raise NoSuchAppError(platform, app, sorted(a["app"] for a in apps))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(found, indent=2))
        return
    click.echo(f"app {app}: mode {found.get('mode')}, strategy {found.get('strategy')}, "
               f"leader {found.get('leader') or '-'} (epoch {found.get('epoch') or '-'})")
    click.echo(f"placement: {'; '.join(found['placement']) or '(any node)'}")
    if found["maintenance"]:
        click.echo("maintenance mode: on (no automatic failover)")
    if found["pending"]:
        click.echo("pending: no live node may run it")
    rows = [[n, s["role"] or "-", "yes" if s["eligible"] else "no", s["priority"],
             "cordoned" if s["cordoned"] else "-",
             ",".join(f"{k}={v}" for k, v in s["labels"].items()) or "-"]
            for n, s in sorted(found["nodes"].items())]
    click.echo(_table(rows, ["NODE", "ROLE", "ELIGIBLE", "PRIORITY", "STATE", "LABELS"]))


async def request_move(nats_url: str | None, platform: str, app: str, to: str | None,
                       reason: str, data_dir: str | None = None,
                       source: str | None = None, force: bool = False,
                       config: str | None = None) -> dict[str, Any]:
    """Ask the active instance of ``app`` (on ``source``, if given) to migrate to node ``to``
    (None: the best eligible standby); returns the result. ``force`` skips the app's
    migration cooldown. In maintenance mode (``to`` required) ``to`` is recorded as the
    operator's choice first (``operator_moves``: that node alone may campaign); with no
    active instance, ``to`` then takes the vacant lease. The record is removed after."""
    from ..kernel.platform import move_subject

    if to is None and source is None:
        raise ConfigError("to", None, "give --to NODE, --from NODE, or both")
    for field, value in (("to", to), ("from", source)):
        if value is not None:
            validate_ident(field, value)
    subject = move_subject(platform, app)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    js = nc.jetstream()
    granted = False
    try:
        await _nodes_or_fail(js, platform, servers)
        ops, _ = await read_operations(js, platform)
        if ops.in_maintenance(app):
            if to is None:
                raise ConfigError("to", None, f"app {app} is in maintenance mode: name the "
                                  "node with --to")
            target = to
            await update_operations(js, platform, lambda o: replace(
                o, operator_moves={**o.operator_moves, app: target}))
            granted = True
        if granted and to is not None and source is None and not await _has_active(
                js, platform, app):
            # No leader: standbys do not answer a move, so do not wait for a reply.
            return await _place_leaderless(js, platform, app, to, reason)
        body = json.dumps({"to": to, "from": source, "reason": reason,
                           "force": force}).encode()
        try:
            msg = await nc.request(subject, body, timeout=60)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            if granted and to is not None and source is None:
                return await _place_leaderless(js, platform, app, to, reason)
            raise NoInstanceError(app, "leader", f"no active instance of {app!r} answered "
                                  "the move request") from exc
        res: dict[str, Any] = json.loads(msg.data)
        err = res.get("error")
        if isinstance(err, dict):
            raise ConfigError("move", to, f"refused by {res.get('node')}: {err.get('reason')}")
        return res
    finally:
        try:
            if granted:
                await update_operations(js, platform, lambda o: replace(o, operator_moves={
                    a: n for a, n in o.operator_moves.items() if a != app}))
        finally:
            await nc.close()


async def _has_active(js: Any, platform: str, app: str) -> bool:
    """Whether a live node's record shows ``app`` active."""
    from .inspect import _live_nodes

    return any(((n.get("apps") or {}).get(app) or {}).get("role") == "active"
               for n in await _live_nodes(js, platform))


async def _place_leaderless(js: Any, platform: str, app: str, to: str,
                            reason: str) -> dict[str, Any]:
    """Maintenance mode, no active instance: wait (at most a minute) for ``to``, the only
    node allowed to campaign, to take the vacant lease."""
    from .inspect import _live_nodes

    rec = next((n for n in await _live_nodes(js, platform) if n.get("node_id") == to), None)
    entry = ((rec or {}).get("apps") or {}).get(app) or {}
    if entry.get("eligible") is not True or entry.get("no_failover") is True:
        raise ConfigError("to", to, f"is not a live node that may lead app {app!r} (not "
                          "running it, ineligible, cordoned or no_failover)")
    started = time.monotonic()
    while True:
        rec = next((n for n in await _live_nodes(js, platform) if n.get("node_id") == to), {})
        entry = (rec.get("apps") or {}).get(app) or {}
        if entry.get("role") == "active" or time.monotonic() - started > 60:
            break
        await asyncio.sleep(0.2)
    done = entry.get("role") == "active"
    return {"app": app, "from": None, "to": to, "reason": reason,
            "outcome": "completed" if done else "failed", "leader": to if done else None,
            "epoch": entry.get("epoch"), "seconds": round(time.monotonic() - started, 3)}


@app_cmd.command("move")
@click.argument("app")
@click.option("--to", "to", help="The node that should run APP's instance (default: the best "
              "eligible standby).")
@click.option("--from", "source", help="The node whose active instance moves (Replicas; "
              "default: the leader).")
@click.option("--reason", default="move", show_default=True, help="Why (audited).")
@click.option("--force", is_flag=True, help="Skip the app's migration cooldown (not the "
              "platform's limits on concurrent and per-minute migrations, nor the budget).")
@connection_options
@OUTPUT
def app_move_cmd(app: str, to: str | None, source: str | None, reason: str, force: bool,
                 config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
                 output: str) -> None:
    """Move APP's active instance to node --to (or away from --from): a planned, graceful
    migration (the instance runs on_migration_start, which may veto, steps down naming the
    target, and reports when the target is active). Refused when it would break the app's
    disruption budget, within the app's migration cooldown (--force skips it) or beyond the
    platform's migration limits. In maintenance mode it still works with --to: a leader
    hands over to that node; an app without a leader gets that node as its leader (no other
    node campaigns). Exits non-zero when refused or when the target did not take over.

    Example: ``pycluster app move orders --to node-3 -p prod --nats-url nats://nats-1:4222``
    """
    try:
        validate_ident("app", app)
        res = asyncio.run(request_move(nats_url, platform, app, to, reason, data_dir,
                                       source, force, config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(res))
    else:
        click.echo(f"{app}: {res['from'] or '(no leader)'} -> {res['to']}: {res['outcome']} "
                   f"in {res['seconds']}s (leader {res['leader']}, epoch {res['epoch']})")
    if res.get("outcome") != "completed":
        raise SystemExit(1)


async def drain(nats_url: str | None, platform: str, node: str, timeout: float,
                data_dir: str | None = None,
                progress: Any = None, config: str | None = None) -> dict[str, Any]:
    """Cordon ``node``, then move its active instances away one at a time (each move waits
    for the app's budget, the migration limits and for the previous move to complete);
    elected apps first, then its Spread instances stop (each within its app's budget).
    Returns ``{"node", "drained", "moved", "remaining", "spread"}``; ``progress(event)`` is
    called with each step (``{"app", "moved_to"}`` or ``{"app", "waiting"}``)."""
    from .inspect import _live_nodes

    validate_ident("node", node)
    report = progress or (lambda _event: None)
    nc, servers = await _open(nats_url, platform, data_dir, config)
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        if node not in {str(n.get("node_id")) for n in nodes}:
            raise ConfigError("node", node, f"is not a live node of platform {platform!r}")
        entry = {"at": time.time(), "by": "drain"}
        await update_operations(js, platform, lambda o: replace(
            o, cordoned={**o.cordoned, node: entry}))
        deadline = time.monotonic() + timeout
        moved: list[dict[str, Any]] = []
        last_wait: dict[str, str] = {}
        while True:
            rec = next((n for n in await _live_nodes(js, platform)
                        if n.get("node_id") == node), None)
            apps = (rec or {}).get("apps") or {}
            active = sorted(name for name, a in apps.items() if isinstance(a, dict)
                            and a.get("role") == "active" and a.get("mode") != "spread")
            spread = sorted(name for name, a in apps.items() if isinstance(a, dict)
                            and a.get("role") == "active" and a.get("mode") == "spread")
            if not (active or spread) or time.monotonic() >= deadline:
                return {"node": node, "drained": not (active or spread), "moved": moved,
                        "remaining": active + spread, "spread": spread}
            name = (active or spread)[0]
            body = json.dumps({"from": node, "reason": "drain"}).encode()
            left = max(1.0, deadline - time.monotonic())
            res = await _request_move(nc, platform, name, body, min(60.0, left))
            err = res.get("error")
            if isinstance(err, dict):
                reason = str(err.get("reason"))
                if last_wait.get(name) != reason:
                    last_wait[name] = reason
                    report({"app": name, "waiting": reason})
                await asyncio.sleep(0.5)
                continue
            last_wait.pop(name, None)
            moved.append(res)
            report({"app": name, "moved_to": res.get("to"), "outcome": res.get("outcome"),
                    "seconds": res.get("seconds")})
    finally:
        await nc.close()


@node_cmd.command("drain")
@click.argument("node")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for the node to be empty.")
@connection_options
@OUTPUT
def node_drain_cmd(node: str, timeout: float,
                   config: str | None, nats_url: str | None, data_dir: str | None,
                   platform: str, output: str) -> None:
    """Cordon NODE, then move every active instance (leaders, Replicas slots) away one at a
    time, then stop its Spread instances, respecting each app's disruption budget and the
    platform's migration limits (cooldown, concurrent migrations; waiting and saying why).
    Exits 0 when no instance is active there, 1 on timeout (listing what is left).

    Example: ``pycluster node drain node-2 -p prod --nats-url nats://nats-1:4222``
    """
    def progress(event: dict[str, Any]) -> None:
        if output == "json":
            click.echo(json.dumps(event))
        elif "waiting" in event:
            click.echo(f"{event['app']}: waiting: {event['waiting']}")
        else:
            click.echo(f"{event['app']}: moved to {event['moved_to'] or '(stopped)'} "
                       f"({event['outcome']}, {event['seconds']}s)")

    try:
        res = asyncio.run(drain(nats_url, platform, node, timeout, data_dir, progress,
                                   config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(res))
    elif res["drained"]:
        click.echo(f"{node}: drained ({len(res['moved'])} move(s))")
    else:
        click.echo(f"{node}: not drained after {timeout:g}s; still active: "
                   f"{', '.join(res['remaining'])}")
    if not res["drained"]:
        raise SystemExit(1)


async def rebalance(nats_url: str | None, platform: str, app: str | None, dry_run: bool,
                    data_dir: str | None = None,
                    config: str | None = None) -> list[dict[str, Any]]:
    """Ask each active instance of ``app`` (default: every elected app) what placement wants
    and, unless ``dry_run``, to move there; one result per instance."""
    from .inspect import read_status

    st = await read_status(nats_url, platform, data_dir, config)
    apps = [a for a in st["apps"] if a.get("mode") != "spread"
            and (app is None or a["app"] == app)]
    if app is not None and not apps:
        raise ConfigError("app", app, "no elected app of this name on the platform")
    out: list[dict[str, Any]] = []
    nc, _ = await _open(nats_url, platform, data_dir, config)
    try:
        for a in apps:
            for node in a["active_on"]:
                body = json.dumps({"from": node, "rebalance": True,
                                   "dry_run": dry_run}).encode()
                res = await _request_move(nc, platform, a["app"], body, 60.0)
                err = res.get("error")
                if isinstance(err, dict):
                    res = {"app": a["app"], "from": node, "outcome": "refused",
                           "error": err.get("reason")}
                out.append(res)
    finally:
        await nc.close()
    return out


@app_cmd.command("rebalance")
@click.argument("app", required=False)
@click.option("--dry-run", is_flag=True, help="Only show the moves placement wants.")
@connection_options
@OUTPUT
def app_rebalance_cmd(app: str | None, dry_run: bool, config: str | None, nats_url: str | None,
                      data_dir: str | None, platform: str, output: str) -> None:
    """Show (--dry-run) or perform the moves placement wants: each active instance of APP
    (default: every elected app) moves to the best-scored live eligible node when that node
    scores higher than its own (a migration: hooks, budget, audit). Operator-triggered:
    scores never move a healthy instance by themselves.

    Example: ``pycluster app rebalance --dry-run -p prod --nats-url nats://nats-1:4222``
    """
    try:
        if app is not None:
            validate_ident("app", app)
        results = asyncio.run(rebalance(nats_url, platform, app, dry_run, data_dir, config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(results))
        return
    rows = [[r.get("app", "-"), r.get("from", "-"), r.get("to", "-"), r.get("outcome", "-"),
             r.get("error") or ""] for r in results]
    click.echo(_table(rows, ["APP", "FROM", "TO", "OUTCOME", "WHY"]))
