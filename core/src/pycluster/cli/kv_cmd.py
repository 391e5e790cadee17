"""``pycluster kv APP get|put|ls``: inspect (and repair) an app's KV bucket ``{platform}_{app}``.

Reads are linearizable on a replicated bucket, like ``app.kv.get`` (``--stale-ok`` for a fast
read from any replica). The app must run on a live node of the platform, so a typo in a
platform or app name is an error that says so, not an empty answer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import nats.js.errors

from ..kernel import natsutil as nu
from ..kernel.errors import NoSuchAppError, PyclusterError
from ..kernel.kv import AppKV
from ..kernel.names import bucket, validate_ident, validate_key
from .options import connection_options

T = TypeVar("T")
OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output format.")


async def with_app_kv(conn: dict[str, Any], app: str, fn: Callable[[AppKV], Awaitable[T]]) -> T:
    """Run ``fn`` with the KV of ``app`` once a live node of the platform is known to run it."""
    from .inspect import _nodes_or_fail, _open

    platform = conn["platform"]
    validate_ident("app", app)
    nc, servers = await _open(conn["nats_url"], platform, conn["data_dir"], conn["config"])
    try:
        js = nc.jetstream()
        nodes = await _nodes_or_fail(js, platform, servers)
        if not any(app in (n.get("apps") or {}) for n in nodes):
            known = sorted({a for n in nodes for a in (n.get("apps") or {})})
            raise NoSuchAppError(platform, app, known)
        kv = AppKV(js, bucket(platform, app), timeout=10)
        try:
            return await fn(kv)
        except nu.StreamGoneError:
            raise PyclusterError(f"app {app!r} on platform {platform!r} has no KV bucket yet "
                                 f"({bucket(platform, app)})") from None
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code == nu.STREAM_NOT_FOUND:
                raise PyclusterError(f"app {app!r} on platform {platform!r} has no KV bucket "
                                     f"yet ({bucket(platform, app)})") from None
            raise
    finally:
        await nc.close()


def _run(conn: dict[str, Any], app: str, fn: Callable[[AppKV], Awaitable[T]],
         key: str | None = None) -> T:
    try:
        if key is not None:
            validate_key(key)
        return asyncio.run(with_app_kv(conn, app, fn))
    except PyclusterError as exc:
        from .common import _fail

        _fail(exc)
        raise  # not reached: _fail exits


def _conn(config: str | None, nats_url: str | None, data_dir: str | None,
          platform: str) -> dict[str, Any]:
    return {"config": config, "nats_url": nats_url, "data_dir": data_dir, "platform": platform}


@click.group("kv")
@click.argument("app")
@click.pass_context
def kv_group(ctx: click.Context, app: str) -> None:
    """Inspect APP's KV bucket ({platform}_{app}): get, put, ls.

    \b
    Examples:
      pycluster kv orders ls --config /etc/pycluster/node.yaml
      pycluster kv orders get leader -p prod --nats-url nats://nats-1:4222
      pycluster kv orders put maintenance on --config /etc/pycluster/node.yaml
    """
    ctx.meta["pycluster.kv.app"] = app


def _app() -> str:
    return str(click.get_current_context().meta["pycluster.kv.app"])


@kv_group.command("get")
@click.argument("key")
@click.option("--stale-ok", is_flag=True, help="A fast read from any replica (may be stale).")
@connection_options
@OUTPUT
def get_cmd(key: str, stale_ok: bool, config: str | None, nats_url: str | None,
            data_dir: str | None, platform: str, output: str) -> None:
    """Print the value of KEY in the app's KV (exit 1 if the key is missing).

    Example: ``pycluster kv orders get leader --config /etc/pycluster/node.yaml``
    """
    app = _app()
    entry = _run(_conn(config, nats_url, data_dir, platform), app,
                 lambda kv: kv.get_entry(key, stale_ok=stale_ok), key)
    if entry is None:
        click.echo(f"{key}: no such key in {app}'s KV", err=True)
        sys.exit(1)
    if output == "json":
        click.echo(json.dumps({"key": key, "value": entry.value.decode(errors="replace"),
                               "revision": entry.revision,
                               "created": entry.created.isoformat() if entry.created else None}))
    else:
        click.echo(entry.value.decode(errors="replace"))


@kv_group.command("put")
@click.argument("key")
@click.argument("value")
@connection_options
@OUTPUT
def put_cmd(key: str, value: str, config: str | None, nats_url: str | None,
            data_dir: str | None, platform: str, output: str) -> None:
    """Set KEY to VALUE in the app's KV (an unconditional write: the app's own code may overwrite
    it; prefer the app's API for values it manages).

    Example: ``pycluster kv orders put maintenance on -p prod --nats-url nats://nats-1:4222``
    """
    app = _app()
    rev = _run(_conn(config, nats_url, data_dir, platform), app, lambda kv: kv.put(key, value),
               key)
    if output == "json":
        click.echo(json.dumps({"key": key, "revision": rev}))
    else:
        click.echo(f"{key} = {value!r} (revision {rev})")


@kv_group.command("ls")
@click.argument("pattern", default=">")
@connection_options
@OUTPUT
def ls_cmd(pattern: str, config: str | None, nats_url: str | None,
           data_dir: str | None, platform: str, output: str) -> None:
    """List the keys of the app's KV (PATTERN: a NATS subject pattern such as 'user.*' or '>').

    Example: ``pycluster kv orders ls 'user.>' --config /etc/pycluster/node.yaml -o json``
    """
    app = _app()
    keys = _run(_conn(config, nats_url, data_dir, platform), app, lambda kv: kv.keys(pattern))
    if output == "json":
        click.echo(json.dumps(sorted(keys)))
    else:
        for k in sorted(keys):
            click.echo(k)
