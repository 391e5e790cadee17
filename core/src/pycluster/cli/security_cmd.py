"""``pycluster nats-config`` (NATS users and permissions per node or app) and
``pycluster provision`` (create the platform's buckets and streams as the operator)."""

from __future__ import annotations

import asyncio
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..kernel.errors import ConfigError, PyclusterError
from ..kernel.names import validate_ident
from ..kernel.settings import PlatformSettings, load_settings
from ..natsauth import generate, provision
from ..plugins import PluginManager
from .common import pass_plugins

SQLITE_PLUGIN = "sqlite"


@dataclass
class PlatformApps:
    """What a platform's NATS users are made of: nodes (with their apps) and apps."""

    platform: str | None = None
    nodes: dict[str, list[str]] = field(default_factory=dict)
    apps: list[str] = field(default_factory=list)
    sqlite_apps: list[str] = field(default_factory=list)
    settings: PlatformSettings | None = None

    def set_platform(self, name: str, where: str) -> None:
        """Every source must name the same platform."""
        validate_ident("platform", name)
        if self.platform is not None and self.platform != name:
            raise ConfigError("platform", name, f"{where} names another platform than "
                              f"{self.platform!r}: generate one platform at a time")
        self.platform = name

    @property
    def every_app(self) -> list[str]:
        """Every app, once."""
        return list(dict.fromkeys([*self.apps, *(a for v in self.nodes.values() for a in v)]))


def collect(pm: PluginManager, target: str | None, configs: tuple[str, ...],
            platform: str | None, apps: tuple[str, ...], nodes: tuple[str, ...],
            sqlite_apps: tuple[str, ...]) -> PlatformApps:
    """Nodes and apps from a ``module:platform`` target, node config files and options."""
    out = PlatformApps()
    if target:
        from .main import _load_target

        p = _load_target(target)
        out.set_platform(p.name, target)
        out.nodes[p.node_id] = list(p.apps)
        out.settings = p.settings
        for app in p.apps.values():
            if any(p.options.plugin_for(o) == SQLITE_PLUGIN for o in app.options):
                out.sqlite_apps.append(app.name)
    for path in configs:
        s = load_settings(path)
        out.set_platform(s.name, path)
        out.nodes.setdefault(s.node_id, []).extend(a.name for a in s.apps)
        out.settings = out.settings or s
        out.sqlite_apps += [a.name for a in s.apps if SQLITE_PLUGIN in (a.model_extra or {})]
    if platform:
        out.set_platform(platform, "--platform")
    for spec in nodes:
        node, eq, names = spec.partition("=")
        if not eq or not node:
            raise ConfigError("--node", spec, "expected NODE=APP[,APP...]")
        validate_ident("node id", node)
        out.nodes.setdefault(node, []).extend(n for n in names.split(",") if n)
    out.apps += list(apps)
    out.sqlite_apps += list(sqlite_apps)
    if out.platform is None:
        raise ConfigError("platform", None, "give a TARGET, --config FILE or --platform NAME")
    if not out.every_app:
        raise ConfigError("apps", None, "no apps: give --app/--node, or a TARGET or config "
                          "file that declares apps")
    out.sqlite_apps = list(dict.fromkeys(out.sqlite_apps))
    return out


_SOURCES = [
    click.argument("target", required=False),
    click.option("--config", "-c", "configs", multiple=True, type=click.Path(dir_okay=False),
                 help="A node's config file (repeatable): its platform, node id and apps."),
    click.option("--platform", "-p", help="The platform (when no TARGET or config names it)."),
    click.option("--app", "apps", multiple=True,
                 help="An app that gets a user of its own, usable on any node (repeatable)."),
    click.option("--node", "nodes", multiple=True, metavar="NODE=APP[,APP]",
                 help="A node and the apps it runs: a user kept to that node (repeatable)."),
    click.option("--sqlite-app", "sqlite_apps", multiple=True,
                 help="An app with a SQLite database (adds its object stores)."),
]


def _sources(fn: Any) -> Any:
    for deco in reversed(_SOURCES):
        fn = deco(fn)
    return fn


@click.command("nats-config")
@_sources
@click.option("--auth", type=click.Choice(["nkey", "password"]), default="nkey",
              show_default=True, help="NKeys (the server config holds public keys only) or "
                                      "passwords.")
@click.option("--no-operator", is_flag=True, help="Do not add the operator user (the CLI).")
@click.option("--out", "-d", "out", required=True, type=click.Path(file_okay=False),
              help="Directory for nats-server.conf and the users' credential files (0600; "
                   "existing credentials there are kept).")
@click.option("--hub", "hub_port", type=int, default=None, metavar="PORT",
              help="This zone is the hub: listen for leaf servers on PORT (7422 by "
                   "convention); the leaf link's user and password go to OUT/leaf-link.json.")
@click.option("--hub-host", default="0.0.0.0", show_default=True,
              help="The address the hub's leaf-node port listens on.")
@click.option("--leaf", "leaf_url", default=None, metavar="URL",
              help="This zone is a leaf of the hub at URL (nats-leaf://hub:7422).")
@click.option("--leaf-credentials", type=click.Path(exists=True, dir_okay=False),
              help="The hub's leaf-link.json (user and password of the leaf link).")
@click.option("--zone", default=None, help="This platform's zone (its JetStream domain "
                                           "unless --jetstream-domain is given).")
@click.option("--jetstream-domain", default=None, help="This zone's JetStream domain.")
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format of the summary.")
@pass_plugins
def nats_config_cmd(pm: PluginManager, target: str | None, configs: tuple[str, ...],
                    platform: str | None, apps: tuple[str, ...], nodes: tuple[str, ...],
                    sqlite_apps: tuple[str, ...], auth: str, no_operator: bool, out: str,
                    hub_port: int | None, hub_host: str, leaf_url: str | None,
                    leaf_credentials: str | None, zone: str | None,
                    jetstream_domain: str | None, output: str) -> None:
    """Generate NATS users with per-app permissions for a platform.

    Each node (--node, a TARGET module:platform, a --config file) or app (--app) gets a user
    that may use only its apps' buckets, streams and subjects and the platform's shared parts
    it needs, with its own inbox prefix; the operator user may use everything of the platform.
    Writes OUT/nats-server.conf (an authorization block: `nats-server -c` or `include` it) and
    per user OUT/<user>.env (PYCLUSTER_* variables) and, with NKeys, OUT/<user>.nk (the seed).
    Create the buckets and streams first with `pycluster provision` (app users may not).

    Zones: --hub PORT (this platform's server accepts leaf servers) or --leaf URL (it
    connects to the hub), with --zone: adds the leafnodes block and the zone's JetStream
    domain, the same configuration `Platform(hub=...)` / `Platform(leaf=...)` give an
    embedded server.

    \b
    Examples:
      pycluster nats-config -p prod --node node-1=orders,billing --node node-2=orders --out nats/
      pycluster nats-config --config /etc/pycluster/node.yaml --auth nkey --out nats/
      pycluster nats-config -p prod --app convex --hub 7422 --zone eu --out hub/
      pycluster nats-config -p edge --app shop --leaf nats-leaf://hub:7422 \\
          --leaf-credentials hub/leaf-link.json --zone paris --out edge/
    """
    from .common import _fail, _table

    try:
        src = collect(pm, target, configs, platform, apps, nodes, sqlite_apps)
        assert src.platform is not None
        zone_text = _zone_config(src, out, hub_port, hub_host, leaf_url, leaf_credentials,
                                 zone, jetstream_domain)
        gen = generate(src.platform, apps=src.apps, nodes=src.nodes,
                       sqlite_apps=src.sqlite_apps, auth=auth,  # type: ignore[arg-type]
                       operator=not no_operator, existing=out)
        files = gen.write(out)
        if zone_text is not None:
            server = Path(files["server"][0])
            server.write_text(server.read_text() + "\n" + zone_text)
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        doc = {"platform": src.platform, "server_config": str(files["server"][0]),
               "users": [dict(u, files=[str(f) for f in files[u["user"]]])
                         for u in gen.describe()]}
        click.echo(json.dumps(doc, indent=2))
        return
    rows = [[u["user"], ",".join(u["apps"]) or "-", u["inbox_prefix"],
             ", ".join(f.name for f in files[u["user"]])] for u in gen.describe()]
    click.echo(f"nats-server configuration: {files['server'][0]}")
    click.echo(_table(rows, ["USER", "APPS", "INBOX PREFIX", "CREDENTIALS"]))
    click.echo("\nStart each node with its .env file (e.g. systemd EnvironmentFile=, or "
               "`set -a; . node-n1.env`); the CLI with operator.env.")


LEAF_LINK_FILE = "leaf-link.json"


def _zone_config(src: PlatformApps, out: str, hub_port: int | None, hub_host: str,
                 leaf_url: str | None, leaf_credentials: str | None, zone: str | None,
                 domain: str | None) -> str | None:
    """The zone part of the server configuration (None when no zone option is given); with
    --hub, the leaf link's credentials are kept in OUT/leaf-link.json (reused when there)."""
    from ..kernel.embedded import _write_private
    from ..kernel.leaf import HubListen, LeafOf, check_domain, leafnode_config, zone_domain

    s = src.settings
    zone = zone or (s.zone if s else None)
    domain = domain or (s.jetstream_domain if s else None)
    if hub_port is None and leaf_url is None and zone is None and domain is None:
        return None
    for name, value in (("--zone", zone), ("--jetstream-domain", domain)):
        if value is not None:
            try:
                check_domain(name, value)
            except ValueError as exc:
                raise ConfigError(name, value, str(exc)) from None
    hub = leaf = None
    if hub_port is not None:
        link = Path(out) / LEAF_LINK_FILE
        try:
            creds = json.loads(link.read_text())
        except (OSError, ValueError):
            creds = {"user": "leaf", "password": secrets.token_urlsafe(32)}
            Path(out).mkdir(parents=True, exist_ok=True)
            _write_private(link, json.dumps(creds) + "\n")
        hub = HubListen(port=hub_port, host=hub_host, user=creds["user"],
                        password=creds["password"])
    if leaf_url is not None:
        extra: dict[str, Any] = {}
        if leaf_credentials is not None:
            try:
                creds = json.loads(Path(leaf_credentials).read_text())
                extra = {"user": creds["user"], "password": creds["password"]}
            except (OSError, ValueError, KeyError, TypeError):
                raise ConfigError("--leaf-credentials", leaf_credentials,
                                  "not a leaf-link.json of `nats-config --hub`") from None
        leaf = LeafOf(leaf_url, **extra)
    assert src.platform is not None
    return leafnode_config(zone_domain(src.platform, zone, domain), hub, leaf)


@click.command("provision")
@_sources
@click.option("--nats-url", envvar="PYCLUSTER_NATS_URL", required=True,
              help="NATS URL(s); credentials from PYCLUSTER_NATS_* (e.g. operator.env).")
@click.option("--stream-replicas", type=click.Choice(["1", "3", "5"]), default=None,
              help="Replicas of every bucket and stream (default: the config's, else 1).")
@pass_plugins
def provision_cmd(pm: PluginManager, target: str | None, configs: tuple[str, ...],
                  platform: str | None, apps: tuple[str, ...], nodes: tuple[str, ...],
                  sqlite_apps: tuple[str, ...], nats_url: str,
                  stream_replicas: str | None) -> None:
    """Create the platform's buckets and streams (as nodes would) with the operator's
    credentials, for nodes whose NATS users may not create streams (`pycluster nats-config`).
    Existing ones are kept as they are.

    \b
    Example:
      set -a; . nats/operator.env; set +a
      pycluster provision -p prod --app orders --app billing --nats-url nats://nats-1:4222
    """
    from ..kernel.connection import connect
    from .common import _fail

    try:
        src = collect(pm, target, configs, platform, apps, nodes, sqlite_apps)
        assert src.platform is not None
        # The node config's replicas and audit retention, so nodes find what they expect.
        extra: dict[str, Any] = {}
        if src.settings is not None:
            extra = {k: getattr(src.settings, k) for k in (
                "stream_replicas", "audit", "audit_retention", "audit_max_bytes",
                "audit_max_msgs")}
        if stream_replicas:
            extra["stream_replicas"] = int(stream_replicas)
        s = load_settings(name=src.platform, node_id="provision", nats_url=nats_url, **extra)

        async def go() -> list[str]:
            nc = await connect(s)
            try:
                return await provision(nc.jetstream(timeout=10), src.platform or "",
                                       src.every_app, settings=s, sqlite_apps=src.sqlite_apps)
            finally:
                await nc.close()

        created = asyncio.run(go())
    except PyclusterError as exc:
        _fail(exc)
        return
    click.echo(f"platform {src.platform}: created {len(created)} stream(s)"
               + (": " + ", ".join(created) if created else " (all existed)"))
