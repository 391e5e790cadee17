"""The command line imports a command only when it runs: declarations agree with the
commands, ``pycluster --help`` and ``pycluster status --help`` import neither the plugin
manager nor a plugin, a disabled plugin's commands are gone, and a command a plugin adds
through ``pycluster_add_cli_commands`` still runs."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from pycluster import hookimpl
from pycluster.cli.lazy import LazyCommand, plugin_commands
from pycluster.cli.main import CORE_COMMANDS, cli
from pycluster.plugins import create_plugin_manager

pytestmark = pytest.mark.timeout(60)

# Imported by the plugin manager or the plugins, never by `pycluster --help`.
HEAVY = ("pycluster.plugins", "pycluster.kernel.platform", "pycluster.backend", "nats",
         "prometheus_client", "opentelemetry", "docker", "pyroute2", "pycluster_discovery.plugin",
         "pycluster_sqlite.plugin", "pycluster_ring.plugin", "pycluster_vip.plugin",
         "pycluster_docker.plugin", "pycluster_systemd.plugin")


def _imported_after(*args: str) -> set[str]:
    code = ("import sys, json, contextlib\n"
            "from pycluster.cli.main import main\n"
            "with contextlib.suppress(SystemExit):\n"
            f"    main({list(args)!r})\n"
            "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    return set(json.loads(res.stderr.strip().splitlines()[-1]))


def test_declared_commands_match_the_commands() -> None:
    """Each declaration (the core's and the plugins' entry points) loads a command of its
    name whose one-line help is the declared one, however click shortens it."""
    specs = [*CORE_COMMANDS, *plugin_commands()]
    assert {"services", "ring", "snapshot"} <= {s.name for s in specs}
    for spec in specs:
        cmd = spec.load()
        assert cmd.name == spec.name, spec
        for limit in (45, 60, 200):
            stub = click.Command(spec.name, help=spec.help)
            assert stub.get_short_help_str(limit) == cmd.get_short_help_str(limit), spec


def test_help_imports_no_plugin() -> None:
    for args in (["--help"], ["status", "--help"], ["services", "--help"]):
        mods = _imported_after(*args)
        heavy = [m for m in HEAVY if m in mods]
        if args[0] == "services":  # its own module only, not the plugin's hooks
            assert "pycluster_discovery.cli" in mods
            heavy = [m for m in heavy if m == "pycluster_discovery.plugin"]
        assert not heavy, (args, heavy)


def test_help_lists_every_command_with_its_help() -> None:
    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0, res.output
    listed = {line.split()[0] for line in res.output.split("Commands:")[1].splitlines()
              if line.strip()}
    assert {"status", "run", "plugins", "leaf", "services", "ring", "snapshot"} <= listed
    assert "Apps: list and show" in res.output


def test_disabled_plugin_commands_are_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYCLUSTER_DISABLE_PLUGINS", "discovery,leaf")
    res = subprocess.run([sys.executable, "-c", "from pycluster.cli.main import main; main()",
                          "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    names = {line.split()[0] for line in res.stdout.split("Commands:")[1].splitlines()
             if line.strip()}
    assert "services" not in names and "leaf" not in names and "status" in names


def test_hook_added_command_still_runs() -> None:
    """A plugin that adds its command through the hook (no declaration): the name is
    unknown to the declarations, so the plugin manager is asked."""

    @click.command("hello-hook")
    def hello() -> None:
        """Say hello.

        Example: ``pycluster hello-hook``
        """
        click.echo("hello from a hook")

    class Third:
        @hookimpl
        def pycluster_add_cli_commands(self, cli: click.Group) -> None:
            cli.add_command(hello)

    pm = create_plugin_manager(load_entrypoints=False, extra=[("third", Third())])
    try:
        res = CliRunner().invoke(cli, ["hello-hook"], obj=pm)
        assert res.exit_code == 0 and "hello from a hook" in res.output, res.output
        cli.commands.pop("hello-hook", None)
        res = CliRunner().invoke(cli, ["--help"], obj=pm)  # listed as well
        assert res.exit_code == 0 and "hello-hook" in res.output and "Say hello" in res.output
    finally:
        cli.commands.pop("hello-hook", None)


def test_lazy_command_rejects_a_target_that_is_no_command() -> None:
    with pytest.raises(TypeError, match="not a click command"):
        LazyCommand("x", "pycluster.cli.lazy:ENTRY_POINT_GROUP", "x").load()
