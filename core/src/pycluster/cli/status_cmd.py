"""``pycluster status`` (the operator's one screen) and ``pycluster health [NODE]``.

Both read the platform's records in NATS and ask every live node for its ``/status``
document over NATS (`pycluster.cli.inspect.request_node_status`): backend state, replication
lag, VIPs and checks are known only to the node that runs them.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from ..kernel.errors import PyclusterError
from .common import OUTPUT, _fail, _table
from .options import connection_options


def sign_options(fn: Any) -> Any:
    """``--sign-as`` / ``--seed``: sign the status requests (nodes that use SignedAuth for
    control requests refuse unsigned ones)."""
    fn = click.option("--seed", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                      help="The NKey seed file of --sign-as.")(fn)
    return click.option("--sign-as", metavar="IDENTITY",
                        help="Sign the requests to the nodes as IDENTITY (for nodes whose "
                             "SignedAuth covers control requests); needs --seed.")(fn)


def _signer(sign_as: str | None, seed: str | None) -> Any:
    if sign_as is None and seed is None:
        return None
    from ..middleware import SignedAuth

    return SignedAuth(sign_as, seed, kinds=("rpc",))


TIMEOUT = click.option("--timeout", type=click.FloatRange(0.1, 60), default=2.0,
                       show_default=True, metavar="SECONDS",
                       help="How long to wait for each node's answer.")


def _node_state(n: dict[str, Any], maintenance: bool) -> str:
    states = [s for s, on in (("cordoned", n.get("cordoned")),
                              ("maintenance", maintenance)) if on]
    d = n.get("detail")
    if n.get("status_error"):
        states.append("unreachable")
    elif d is not None:
        if d.get("failing_checks"):
            states.append("unhealthy:" + ",".join(d["failing_checks"]))
        elif d.get("ready") is False:
            states.append("not-ready")
    return " ".join(states) or "ok"


def _backend(a: dict[str, Any]) -> str:
    """The leader's backends (``kind=state``), else every node's."""
    per_node = a.get("backends") or {}
    nodes = [a["leader"]] if a.get("leader") in per_node else sorted(per_node)
    return ",".join(f"{b['kind']}={b['state']}" for n in nodes for b in per_node[n]) or "-"


def _lag(a: dict[str, Any]) -> str:
    """The largest replication lag among the standbys (seconds), with the replicator state."""
    lags = [r.get("lag") for node, reps in (a.get("replication") or {}).items()
            if node != a.get("leader") for r in reps.values()]
    known = [x for x in lags if x is not None]
    if not lags:
        return "-"
    return f"{max(known):g}s" if known else "?"


def _vip(a: dict[str, Any]) -> str:
    held = [f"{v['address']}@{node}" for node, vs in (a.get("vips") or {}).items() for v in vs
            if v.get("held")]
    return ",".join(held) or ("not held" if a.get("vips") else "-")


def render_status(st: dict[str, Any]) -> str:
    """The text form of ``pycluster status``."""
    ops = st.get("operations") or {}
    lines = [f"platform {st['platform']}: {len(st['nodes'])} node(s), {len(st['apps'])} app(s)"]
    rows = []
    for n in st["nodes"]:
        apps = ",".join(f"{name}:{a.get('role')}" for name, a in
                        sorted((n.get("apps") or {}).items()) if isinstance(a, dict)) or "-"
        rows.append([n["node_id"],
                     ",".join(f"{k}={v}" for k, v in (n.get("labels") or {}).items()) or "-",
                     _node_state(n, bool(ops.get("maintenance"))), apps,
                     n.get("version", ""), n.get("host", ""), n.get("pid", "")])
    lines.append(_table(rows, ["NODE", "LABELS", "STATE", "APPS", "VERSION", "HOST", "PID"]))
    lines.append("")
    rows = []
    for a in st["apps"]:
        age = a.get("lease_age")
        rows.append([a["app"], a.get("mode", ""), a.get("leader") or "-", a.get("epoch") or "-",
                     f"{age:g}s" if isinstance(age, int | float) else "-", _backend(a),
                     _lag(a), _vip(a), ",".join(a.get("active_on", [])) or "-",
                     ",".join(a.get("standby_on", [])) or "-",
                     ",".join(s for s, on in (("maintenance", a.get("maintenance")),
                                              ("pending", a.get("pending"))) if on) or "-"])
    lines.append(_table(rows, ["APP", "MODE", "LEADER", "EPOCH", "LEASE AGE", "BACKEND",
                               "LAG", "VIP", "ACTIVE ON", "STANDBY ON", "STATE"]))
    for n in st["nodes"]:
        if n.get("status_error"):
            lines.append(f"\nnode {n['node_id']}: {n['status_error']}")
    for a in st["apps"]:
        if a.get("maintenance") and not a.get("leader"):
            lines.append(f"\n{a['app']}: no leader, and maintenance mode withholds failover "
                         "(pycluster maintenance off)")
    return "\n".join(lines)


@click.command("status")
@connection_options
@TIMEOUT
@click.option("--no-detail", is_flag=True,
              help="Only the records in NATS: do not ask the nodes (backend state, lag, VIP).")
@sign_options
@OUTPUT
def status_cmd(config: str | None, nats_url: str | None, data_dir: str | None, platform: str,
               timeout: float, no_detail: bool, sign_as: str | None, seed: str | None,
               output: str) -> None:
    """Show nodes (labels, cordon and maintenance state, apps and roles, health) and apps
    (mode, leader, epoch, lease age, backend state, replication lag, VIP, pending).

    Each live node is asked for its status over NATS (no health_addr needed); a node that
    does not answer within --timeout is shown as unreachable, one that refuses (SignedAuth on
    control requests: sign with --sign-as and --seed) with the reason.

    \b
    Examples:
      pycluster status --config /etc/pycluster/node.yaml
      pycluster status -p prod --nats-url nats://nats-1:4222 -o json
    """
    from .inspect import read_status

    try:
        st = asyncio.run(read_status(nats_url, platform, data_dir, config,
                                     detail=not no_detail, timeout=timeout,
                                     signer=_signer(sign_as, seed)))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(st, indent=2, default=str))
    else:
        click.echo(render_status(st))


def critical_problems(health: dict[str, dict[str, Any]]) -> list[str]:
    """What makes ``pycluster health`` exit 1: a node that did not answer, is not ready, or
    has an unhealthy critical check."""
    out = []
    for node, h in sorted(health.items()):
        if "error" in h:
            out.append(f"{node}: {h['error']}")
            continue
        out += [f"{node}: critical check {name} is unhealthy ({c.get('error')})"
                for name, c in sorted(h["checks"].items())
                if c.get("critical") and c.get("status") == "unhealthy"]
        if h.get("ready") is False:
            out.append(f"{node}: not ready ({'; '.join(h.get('not_ready') or [])})")
    return out


@click.command("health")
@click.argument("node", required=False)
@connection_options
@TIMEOUT
@sign_options
@OUTPUT
def health_cmd(node: str | None, config: str | None, nats_url: str | None,
               data_dir: str | None, platform: str, timeout: float, sign_as: str | None,
               seed: str | None, output: str) -> None:
    """The health checks of NODE (default: every live node): status, latency, last error.

    \b
    Exit codes: 0 nothing critical (an unhealthy non-critical check is shown, not fatal);
    1 a node did not answer, is not ready, or has an unhealthy critical check;
    2 usage, configuration or connection error (no such node or platform).

    \b
    Examples:
      pycluster health --config /etc/pycluster/node.yaml
      pycluster health node-2 -p prod --nats-url nats://nats-1:4222 -o json
    """
    from .inspect import read_health

    try:
        health = asyncio.run(read_health(nats_url, platform, node, data_dir, config,
                                         timeout=timeout, signer=_signer(sign_as, seed)))
    except PyclusterError as exc:
        _fail(exc)
        return
    problems = critical_problems(health)
    if output == "json":
        click.echo(json.dumps({"platform": platform, "ok": not problems, "problems": problems,
                               "nodes": health}, indent=2, default=str))
    else:
        rows = []
        for n, h in sorted(health.items()):
            if "error" in h:
                rows.append([n, "-", "unreachable", "-", "-", h["error"]])
                continue
            for name, c in sorted(h["checks"].items()):
                lat = c.get("latency")
                rows.append([n, name + (" (critical)" if c.get("critical") else ""),
                             c.get("status"), f"{lat * 1000:.1f}ms" if lat is not None else "-",
                             c.get("app") or "-", c.get("error") or "-"])
        click.echo(_table(rows, ["NODE", "CHECK", "STATUS", "LATENCY", "APP", "LAST ERROR"]))
        for p in problems:
            click.echo(f"CRITICAL {p}")
    if problems:
        sys.exit(1)
