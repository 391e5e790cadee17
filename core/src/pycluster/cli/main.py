"""``pycluster``: run a node, inspect a platform, step a leader down, list plugins, demo.

The command line is assembled in `main()`: build the plugin manager, let plugins add their
commands (`pycluster.hookspecs.pycluster_add_cli_commands`), then parse.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..kernel.errors import PyclusterError
from ..plugins import PluginManager, create_plugin_manager
from .audit_cmd import audit_cmd
from .chaos_cmd import chaos_cmd
from .common import OUTPUT, _fail, _table
from .dev import dev_group
from .kv_cmd import kv_group
from .lock_cmd import lock_group
from .ops_cmd import doctor_cmd, init_cmd, version_cmd
from .options import connection_options
from .placement_cmd import app_cmd, maintenance_cmd, node_cmd
from .security_cmd import nats_config_cmd, provision_cmd
from .status_cmd import health_cmd, status_cmd

if TYPE_CHECKING:
    from ..kernel.platform import Platform

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


@click.group()
@click.version_option(package_name="pycluster-core", prog_name="pycluster")
def cli() -> None:
    """pycluster: highly available services on NATS JetStream."""


# -- plugins --------------------------------------------------------------------------------


@cli.command("plugins")
@OUTPUT
@click.pass_obj
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
@click.pass_obj
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
    from .demo import run_demo

    try:
        sys.exit(asyncio.run(run_demo(lease_ttl=lease_ttl, size=nodes)))
    except PyclusterError as exc:
        _fail(exc)


cli.add_command(status_cmd)
cli.add_command(health_cmd)
cli.add_command(audit_cmd)
cli.add_command(chaos_cmd)
cli.add_command(version_cmd)
cli.add_command(init_cmd)
cli.add_command(doctor_cmd)
cli.add_command(dev_group)
cli.add_command(kv_group)
cli.add_command(lock_group)
cli.add_command(nats_config_cmd)
cli.add_command(provision_cmd)


cli.add_command(node_cmd)
cli.add_command(app_cmd)
cli.add_command(maintenance_cmd)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``pycluster`` script."""
    pm = create_plugin_manager()
    pm.hook.pycluster_add_cli_commands(cli=cli)
    cli.main(args=argv, obj=pm, prog_name="pycluster")
