"""``pycluster lock ls``: the platform's and its apps' locks as stored (holder, token, queue).

Platform locks (``platform.lock(name)``) live in ``{platform}_platform`` under ``locks.``, an
app's locks (``app.lock(name)``) in ``{platform}_{app}_locks``; each is one JSON state (see
`pycluster.kernel.locks`). A lock whose holder and waiters all died expires by its server TTL.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click
import nats.js.errors

from ..kernel import natsutil as nu
from ..kernel.errors import NoSuchAppError, PyclusterError
from ..kernel.names import bucket, validate_ident
from .options import connection_options


def _row(scope: str, name: str, st: dict[str, Any], seq: int, now: float) -> dict[str, Any]:
    since = st.get("since")
    token = st.get("token")
    if token is None and st.get("holder") and st.get("claimed"):
        token = seq  # the claim itself is the last write: its revision is the token
    return {"scope": scope, "lock": name, "holder": st.get("holder"),
            "claimed": bool(st.get("claimed")), "token": token,
            "waiters": [w[0] for w in st.get("waiters") or [] if w],
            "ttl": st.get("ttl"),
            "held_for": round(now - float(since), 1) if since and st.get("holder") else None}


async def list_locks(conn: dict[str, Any], app: str | None) -> list[dict[str, Any]]:
    """Every lock of the platform (and of each app that runs on a live node), or of ``app``."""
    from .inspect import _nodes_or_fail, _open

    platform = conn["platform"]
    nc, servers = await _open(conn["nats_url"], platform, conn["data_dir"], conn["config"])
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        known = sorted({a for n in nodes for a in (n.get("apps") or {})})
        if app is not None:
            validate_ident("app", app)
            if app not in known:
                raise NoSuchAppError(platform, app, known)
        sources = [] if app else [("platform", bucket(platform, suffix="platform"), "locks.")]
        sources += [(a, bucket(platform, a, "locks"), "") for a in ([app] if app else known)]
        now = time.time()
        rows: list[dict[str, Any]] = []
        for scope, b, prefix in sources:
            try:
                msgs = await nu.live_msgs(js, b, prefix)
            except (nats.js.errors.NotFoundError, nu.StreamGoneError):
                continue  # no lock taken yet
            for key, msg in sorted(msgs.items()):
                try:
                    st = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(st, dict):
                    rows.append(_row(scope, key.removeprefix(prefix), st, msg.seq, now))
        return rows
    finally:
        await nc.close()


@click.group("lock")
def lock_group() -> None:
    """Inspect the platform's and its apps' fair locks."""


@lock_group.command("ls")
@click.option("--app", "-a", help="Only this app's locks (default: the platform's and every "
                                  "app's that runs on a live node).")
@click.option("--held", is_flag=True, help="Only locks that someone holds or waits for.")
@connection_options
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def ls_cmd(app: str | None, held: bool, config: str | None, nats_url: str | None,
           data_dir: str | None, platform: str, output: str) -> None:
    """List locks: holder, fencing token, waiters in order, TTL and how long it is held.

    \b
    Examples:
      pycluster lock ls --config /etc/pycluster/node.yaml
      pycluster lock ls --app orders --held -p prod --nats-url nats://nats-1:4222 -o json
    """
    conn = {"config": config, "nats_url": nats_url, "data_dir": data_dir, "platform": platform}
    try:
        rows = asyncio.run(list_locks(conn, app))
    except PyclusterError as exc:
        from .common import _fail

        _fail(exc)
        return
    if held:
        rows = [r for r in rows if r["holder"] or r["waiters"]]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no locks")
        return
    from .common import _table

    click.echo(_table([[r["scope"], r["lock"], r["holder"] or "-",
                        r["token"] if r["token"] is not None else "-",
                        ", ".join(r["waiters"]) or "-", r["ttl"],
                        f"{r['held_for']}s" if r["held_for"] is not None else "-"]
                       for r in rows],
                      ["SCOPE", "LOCK", "HOLDER", "TOKEN", "WAITERS", "TTL", "HELD FOR"]))
