"""Run the ``pycluster`` command line in-process against a platform of the test.

Example::

    out = cli_output(platform, "partition", "status", "-p", platform.name, "-o", "json")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from click.testing import CliRunner, Result

if TYPE_CHECKING:
    from pluggy import PluginManager

    from pycluster.kernel.platform import Platform

__all__ = ["cli_env", "cli_output", "cli_result"]


def cli_env(platform: Platform) -> dict[str, str]:
    """``PYCLUSTER_NATS_*`` variables that connect the command line to ``platform``'s
    embedded server (its URL and the credentials from its data dir)."""
    assert platform.embedded is not None, "the platform runs no embedded server"
    s = platform.settings
    return {"PYCLUSTER_NATS_URL": platform.embedded.url,
            "PYCLUSTER_NATS_USER": s.nats_user or "",
            "PYCLUSTER_NATS_PASSWORD": s.nats_password.get_secret_value()
            if s.nats_password else ""}


def cli_result(platform: Platform, *args: str, plugins: PluginManager | None = None) -> Result:
    """``pycluster ARGS`` against ``platform`` with ``plugins`` (default: the core's own,
    without entry points), as click's `Result`."""
    from pycluster.cli.main import cli
    from pycluster.plugins import create_plugin_manager

    pm = plugins if plugins is not None else create_plugin_manager(load_entrypoints=False)
    return CliRunner().invoke(cli, list(args), obj=pm, env=cli_env(platform))


def cli_output(platform: Platform, *args: str, plugins: PluginManager | None = None) -> Any:
    """The output of a successful ``pycluster ARGS`` (an assertion error shows the output of
    a failed one)."""
    res = cli_result(platform, *args, plugins=plugins)
    assert res.exit_code == 0, res.output
    return res.stdout
