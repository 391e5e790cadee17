"""``pycluster``: run a node, inspect a platform, step a leader down, list plugins, demo.

The root group lists every command but imports one only when it runs (or shows its own
``--help``): the core's commands are `pycluster.cli.lazy.LazyCommand` declarations below,
plugins declare theirs with ``pycluster.cli`` entry points, so ``pycluster --help`` and
``pycluster status`` do not import every plugin. A plugin that adds commands through
``pycluster_add_cli_commands`` instead still works: a name no declaration knows builds the
plugin manager and calls that hook before giving up.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..kernel.errors import PyclusterError
from .common import OUTPUT, _fail, _table, pass_plugins, plugin_manager
from .lazy import LazyCommand, disabled_plugins, plugin_commands, third_party_plugins
from .options import connection_options

if TYPE_CHECKING:
    from ..kernel.platform import Platform
    from ..plugins import PluginManager

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


# The core's commands that live in modules of their own (their one-line help is the first
# sentence of their docstring: a test checks that they agree).
CORE_COMMANDS = (
    LazyCommand("app", "pycluster.cli.placement_cmd:app_cmd",
                "Apps: list and show (placement, leader, instances, pending, maintenance)."),
    LazyCommand("audit", "pycluster.cli.audit_cmd:audit_cmd",
                "Show a platform's audit trail (oldest first), optionally following new "
                "entries."),
    LazyCommand("chaos", "pycluster.cli.chaos_cmd:chaos_cmd",
                "Inject seeded random faults into a throwaway cluster and check safety from "
                "outside."),
    LazyCommand("dev", "pycluster.cli.dev:dev_group",
                "A local cluster of real nats-server and node processes that stays up, for "
                "trying apps and the CLI by hand."),
    LazyCommand("doctor", "pycluster.cli.ops_cmd:doctor_cmd",
                "Check this machine and its NATS for running a node, and say what to fix."),
    LazyCommand("health", "pycluster.cli.status_cmd:health_cmd",
                "The health checks of NODE (default: every live node): status, latency, last "
                "error."),
    LazyCommand("init", "pycluster.cli.ops_cmd:init_cmd",
                "Write a commented config file for this machine."),
    LazyCommand("kv", "pycluster.cli.kv_cmd:kv_group",
                "Inspect APP's KV bucket ({platform}_{app}): get, put, ls."),
    LazyCommand("leaf", "pycluster.builtin.leaf.cli:leaf_group",
                "Zones joined by NATS leaf nodes (plugin leaf).", plugin="leaf"),
    LazyCommand("lock", "pycluster.cli.lock_cmd:lock_group",
                "Inspect the platform's and its apps' fair locks."),
    LazyCommand("maintenance", "pycluster.cli.placement_cmd:maintenance_cmd",
                "Maintenance mode on or off, for the platform or for APP (or show it)."),
    LazyCommand("nats-config", "pycluster.cli.security_cmd:nats_config_cmd",
                "Generate NATS users with per-app permissions for a platform."),
    LazyCommand("node", "pycluster.cli.placement_cmd:node_cmd",
                "Nodes: list, labels, cordon, uncordon and drain."),
    LazyCommand("provision", "pycluster.cli.security_cmd:provision_cmd",
                "Create the platform's buckets and streams (as nodes would) with the "
                "operator's credentials, for nodes whose NATS users may not create streams "
                "(`pycluster nats-config`)."),
    LazyCommand("status", "pycluster.cli.status_cmd:status_cmd",
                "Show nodes (labels, cordon and maintenance state, apps and roles, health) "
                "and apps (mode, leader, epoch, lease age, backend state, replication lag, "
                "VIP, pending)."),
    LazyCommand("version", "pycluster.cli.ops_cmd:version_cmd",
                "Show the versions of pycluster, its installed distributions, Python and "
                "NATS."),
)


class PyclusterGroup(click.Group):
    """The root group: commands defined on it, `LazyCommand` declarations (the core's and the
    ``pycluster.cli`` entry points'), and, for a name none of them knows, the commands plugins
    add with ``pycluster_add_cli_commands``."""

    def __init__(self, *args: Any, lazy: tuple[LazyCommand, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._core = {c.name: c for c in lazy}
        self._declared: dict[str, LazyCommand] | None = None

    def declared(self) -> dict[str, LazyCommand]:
        """The declared commands not loaded yet, without those of disabled plugins."""
        if self._declared is None:
            self._declared = dict(self._core)
            for spec in plugin_commands():
                self._declared.setdefault(spec.name, spec)
        off = disabled_plugins()
        return {n: c for n, c in self._declared.items()
                if n not in self.commands and (c.plugin is None or c.plugin not in off)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Commands third-party plugins add through the hook are listed too; the plugin
        # manager (every plugin imported) is built for that only when such a plugin is
        # installed or a test passed its own.
        if ctx.find_root().obj is not None or third_party_plugins():
            self._hooked(ctx)
        return sorted({*self.commands, *self.declared()})

    def _hooked(self, ctx: click.Context) -> None:
        meta = ctx.find_root().meta
        if not meta.get("pycluster.cli.hooked"):
            meta["pycluster.cli.hooked"] = True
            plugin_manager(ctx).hook.pycluster_add_cli_commands(cli=self)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = self.commands.get(cmd_name)
        if cmd is not None:
            return cmd
        spec = self.declared().get(cmd_name)
        if spec is not None:
            cmd = spec.load()
            self.add_command(cmd, cmd_name)
            return cmd
        self._hooked(ctx)  # perhaps a command a plugin adds through the hook
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, with the declared one-line help of commands not loaded (click's
        own would import each of them for it)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        declared = self.declared()
        rows = []
        for name in names:
            cmd = self.commands.get(name)
            if cmd is None:
                stub = click.Command(name, help=declared[name].help)  # shortened as click does
                rows.append((name, stub.get_short_help_str(limit)))
            elif not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=PyclusterGroup, lazy=CORE_COMMANDS)
@click.version_option(package_name="pycluster-core", prog_name="pycluster")
def cli() -> None:
    """pycluster: highly available services on NATS JetStream."""


# -- plugins --------------------------------------------------------------------------------


@cli.command("plugins")
@OUTPUT
@pass_plugins
def plugins_cmd(pm: PluginManager, output: str) -> None:
    """List plugins: name, distribution, version, status and the hooks each implements.

    Example: ``PYCLUSTER_DISABLE_PLUGINS=tracing pycluster plugins -o json``
    """
    infos = sorted(pm.infos.values(), key=lambda i: (not i.builtin, i.name))
    if output == "json":
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    rows = [[i.name, i.distribution or "-", i.version or "-", i.status,
             ", ".join(h.removeprefix("pycluster_") for h in i.hooks) or (i.reason or "")]
            for i in infos]
    click.echo(_table(rows, ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"]))
    for i in infos:
        if i.reason:
            click.echo(f"\n{i.name} is {i.status}: {i.reason}")


# -- run ------------------------------------------------------------------------------------


def _load_target(target: str) -> Platform:
    """The Platform that ``module:attribute`` names (an attribute may be a function returning
    one); a clear usage error for a module, attribute or object that is not what it should."""
    from ..kernel.platform import Platform

    module, _, attr = target.partition(":")
    if not module or not attr:
        raise click.BadParameter(f"{target!r}: expected module:attribute, e.g. myapp:platform",
                                 param_hint="TARGET")
    sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if not exc.name or not (module == exc.name or module.startswith(exc.name + ".")):
            raise  # a module that the target imports is missing: its traceback says where
        raise click.BadParameter(
            f"{target!r}: no module named {exc.name!r} (looked in the current folder "
            f"{Path.cwd()} and on sys.path); run from the folder that contains it or add that "
            "folder to PYTHONPATH", param_hint="TARGET") from None
    where = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise click.BadParameter(f"{target!r}: {where!r} has no attribute {part!r}{hint}",
                                     param_hint="TARGET") from None
        where = f"{where}.{part}"
    if not isinstance(obj, Platform) and callable(obj) and not isinstance(obj, type):
        obj = obj()  # a factory function
    if not isinstance(obj, Platform):
        raise click.BadParameter(
            f"{target!r} is {type(obj).__name__} {obj!r:.60}, not a pycluster Platform (name "
            "the Platform object, or a function that returns one)", param_hint="TARGET")
    return obj


@cli.command("hooks")
@click.option("--output", "-o", type=click.Choice(["text", "json", "markdown"]), default="text",
              show_default=True, help="Output format.")
def hooks_cmd(output: str) -> None:
    """List the hook specifications (the whole extension surface).

    Example: ``pycluster hooks --output markdown > hooks.md``
    """
    from ..hookdoc import hook_specs, render_markdown

    if output == "markdown":
        click.echo(render_markdown(), nl=False)
    elif output == "json":
        click.echo(json.dumps(hook_specs(), indent=2))
    else:
        for s in hook_specs():
            first = "  (first result wins)" if s["firstresult"] else ""
            click.echo(f"{s['signature']}{first}\n    {s['doc'].splitlines()[0]}")


@cli.command("run")
@click.argument("target", required=False)
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False),
              help="YAML or TOML config file (platform settings and apps).")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              default="INFO", show_default=True, help="Log level (to stderr).")
@pass_plugins
def run_cmd(pm: PluginManager, target: str | None, config: str | None, log_level: str) -> None:
    """Run a node until SIGTERM/SIGINT (then leave gracefully, exit 0).

    TARGET is an import path ``module:platform`` of a Platform object (or a function returning
    one); --config gives a config file. With both, the file's apps are added to the target's.
    Under systemd (``Type=notify``) it reports READY, STATUS and WATCHDOG pings.

    \b
    Examples:
      pycluster run myservice:platform
      pycluster run --config /etc/pycluster/node.yaml

    \b
    Exit codes: 0 left after SIGTERM/SIGINT; 1 unexpected error (traceback);
    2 refused to start (configuration, NATS, duplicate node id);
    3 an internal task died and could not be restarted (the node left);
    4 another process took this node id over (confirmed; the node left).
    """
    import asyncio

    from .config_apps import apps_from_config, platform_from_config

    _setup_logging(log_level)
    if not target and not config:
        raise click.UsageError("give a TARGET (module:platform), --config FILE, or both")
    try:
        if target:
            platform = _load_target(target)
            if config:
                for app in apps_from_config(config, platform.pm):
                    platform.register(app)
        else:
            assert config is not None
            platform = platform_from_config(config, pm)
        asyncio.run(platform.run())
    except PyclusterError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


# -- stepdown -------------------------------------------------------------------------------


@cli.command("stepdown")
@click.argument("app")
@click.option("--successor", help="Node id that should take over first.")
@click.option("--cooldown", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Seconds the old leader stays out of elections (>= 0).")
@click.option("--sign-as", metavar="IDENTITY",
              help="Sign the request as IDENTITY (nodes that use SignedAuth for control "
                   "requests refuse unsigned ones); needs --seed.")
@click.option("--seed", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="The NKey seed file of --sign-as.")
@connection_options
@OUTPUT
def stepdown_cmd(app: str, successor: str | None, cooldown: float | None, sign_as: str | None,
                 seed: str | None, config: str | None, nats_url: str | None,
                 data_dir: str | None, platform: str, output: str) -> None:
    """Ask the active instance of APP to hand leadership over now.

    \b
    Examples:
      pycluster stepdown orders --config /etc/pycluster/node.yaml
      pycluster stepdown orders -p prod --successor node-2 --sign-as ops \\
          --seed /etc/pycluster/ops.nk
    """
    import asyncio

    from .inspect import request_stepdown

    try:
        signer = None
        if sign_as is not None or seed is not None:
            from ..middleware import SignedAuth

            signer = SignedAuth(sign_as, seed, kinds=("rpc",))
        res = asyncio.run(request_stepdown(nats_url, platform, app, successor, cooldown,
                                           data_dir, signer=signer, config=config))
    except PyclusterError as exc:
        _fail(exc)
        return
    if output == "json":
        click.echo(json.dumps(res))
    else:
        click.echo(f"{app}: {res['node']} stepped down (epoch {res['epoch']})")


# -- demo -----------------------------------------------------------------------------------


@cli.command("demo")
# The story needs a standby to fail over to, and a lease short enough to finish in a minute.
@click.option("--lease-ttl", type=click.FloatRange(1.0, 10.0), default=2.0, show_default=True,
              help="Lease of the demo's app in seconds (1 to 10).")
@click.option("--nodes", type=click.IntRange(2, 9), default=3, show_default=True,
              help="Node processes (2 to 9).")
def demo_cmd(lease_ttl: float, nodes: int) -> None:
    """A whole failover story on an embedded nats-server: election, SIGKILL of the leader,
    failover, graceful handover. Exits by itself.

    Example: ``pycluster demo --nodes 5 --lease-ttl 1``
    """
    import asyncio

    from .demo import run_demo

    try:
        sys.exit(asyncio.run(run_demo(lease_ttl=lease_ttl, size=nodes)))
    except PyclusterError as exc:
        _fail(exc)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pycluster`` script."""
    cli.main(args=argv, prog_name="pycluster")
