"""``pycluster audit``: read or follow a platform's audit trail (stream ``{platform}_audit``).

Examples::

    pycluster audit -p prod --since 1h --category election
    pycluster audit -p prod --app convex --limit 20 --output json
    pycluster audit -p prod --follow --category membership --category lock
    pycluster audit --categories
    pycluster audit --config /etc/pycluster/node.yaml --since 10m
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import time

import click
import nats.js.errors

from ..builtin.audit.log import CORE_CATEGORIES, AuditCategoryRegistry
from ..builtin.audit.query import AuditEntry, AuditFilter, AuditReader
from ..kernel.errors import ConfigError, PyclusterError
from ..kernel.registry import BackendRegistry
from .common import plugin_manager
from .options import connection_options

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: str | None, now: float | None = None) -> float | None:
    """``10m``/``2h``/``1d`` ago, a unix time, or an ISO 8601 time (UTC if no zone) → unix time.

    Raises `ConfigError` with the accepted forms.
    """
    if value is None or value == "":
        return None
    now = time.time() if now is None else now
    v = value.strip()
    m = _DURATION.match(v)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise ConfigError("time", value, "expected e.g. 30s, 10m, 2h, 1d, a unix time or "
                          "2025-01-31T12:00:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def format_entry(e: AuditEntry) -> str:
    """One line: time, category/action, app, node, data."""
    when = dt.datetime.fromtimestamp(e.time, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    data = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in e.data.items()
                    if v is not None)
    extra = f" trace={e.trace_id}" if e.trace_id else ""
    extra += f" corr={e.correlation_id}" if e.correlation_id else ""
    return (f"{when}Z  {e.category + '/' + e.action:<28} app={e.app or '-':<12} "
            f"node={e.node:<10} {data}{extra}")


async def _run(nats_url: str | None, platform: str, f: AuditFilter, follow: bool,
               limit: int | None, output: str, data_dir: str | None = None,
               config: str | None = None) -> None:
    from .inspect import _connect

    nc = await _connect(nats_url, platform, data_dir, config)
    try:
        reader = AuditReader(nc.jetstream(), platform)
        before = await reader.last_seq()
        entries = await reader.query(f, limit=limit)
        for e in entries:
            _print(e, output)
        if follow:
            if before == 0 and not entries and await reader.last_seq() == 0:
                try:
                    await nc.jetstream().stream_info(reader.stream_name)
                except nats.js.errors.NotFoundError:
                    raise ConfigError("platform", platform, f"has no audit trail yet (no "
                                      f"stream {reader.stream_name})") from None
            # From the last entry the query saw (or the stream's end before it): no gap.
            after = entries[-1].seq if entries and entries[-1].seq else before
            f.since = None
            async for e in reader.stream(f, after_seq=after):
                _print(e, output)
    finally:
        await nc.close()


def _print(e: AuditEntry, output: str) -> None:
    if output == "json":
        click.echo(json.dumps(e.as_dict(), default=str))
    else:
        click.echo(format_entry(e))
    sys.stdout.flush()


@click.command("audit")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new entries as they come.")
@click.option("--category", "-c", "categories", multiple=True,
              help="Only this category (repeatable), e.g. election, membership, lock.")
@click.option("--app", "-a", help="Only entries about this app.")
@click.option("--node", "-n", help="Only entries written by this node.")
@click.option("--action", help="Only this action, e.g. leader_acquired.")
@click.option("--since", help="From: 30s, 10m, 2h, 1d ago, a unix time or an ISO time.")
@click.option("--until", help="To (same forms as --since).")
@click.option("--limit", type=int, default=100, show_default=True,
              help="The newest N matching entries (0: all).")
@click.option("--categories", "list_categories", is_flag=True,
              help="List the known categories and actions (core and plugins), then exit.")
@connection_options
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format (json: one entry per line).")
def audit_cmd(follow: bool, categories: tuple[str, ...], app: str | None, node: str | None,
              action: str | None, since: str | None, until: str | None, limit: int,
              list_categories: bool, config: str | None, nats_url: str | None,
              data_dir: str | None, platform: str, output: str) -> None:
    """Show a platform's audit trail (oldest first), optionally following new entries.

    \b
    Examples:
      pycluster audit --config /etc/pycluster/node.yaml --since 10m
      pycluster audit -p prod --since 1h --category election --app orders -o json
      pycluster audit -p prod --follow --category membership --category lock
      pycluster audit --categories
    """
    if list_categories:
        reg = AuditCategoryRegistry()
        for cat, acts in CORE_CATEGORIES.items():
            reg.add(cat, acts, "core")
        pm = plugin_manager()  # the plugins' categories
        pm.hook.pycluster_audit_categories(registry=reg)
        backends = BackendRegistry()
        pm.hook.pycluster_register_backends(registry=backends)
        for kind in backends.all():  # written by the backends' shared supervisor
            if kind.audit is not None:
                reg.add(kind.kind, kind.audit, kind.plugin)
        if output == "json":
            click.echo(json.dumps(reg.categories, indent=2))
        else:
            for cat, actions in reg.categories.items():
                for act, desc in actions.items():
                    click.echo(f"{cat + '/' + act:<30} {desc}")
        return
    try:
        if limit < 0:
            raise ConfigError("--limit", limit, "must be >= 0")
        f = AuditFilter(since=parse_time(since), until=parse_time(until),
                        category=list(categories) or None, app=app, node=node, action=action)
        f.subjects(platform)  # validate names before connecting
        asyncio.run(_run(nats_url, platform, f, follow, limit or None, output, data_dir,
                         config))
    except PyclusterError as exc:
        from .common import _fail

        _fail(exc)
    except KeyboardInterrupt:
        pass
