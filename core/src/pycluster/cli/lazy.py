"""Commands of the ``pycluster`` command line imported on first use.

``pycluster --help`` lists every command with its one-line help and ``pycluster status ...``
imports the status command's module only: a command is declared as a `LazyCommand` (its name,
where it lives, its one-line help) and loaded when it runs, when its own ``--help`` is asked
for or when the shell completes its name. The core's own commands are declared in
`pycluster.cli.main`; a plugin distribution declares its commands with an entry point in the
group ``pycluster.cli`` (the entry point's name is the plugin's name, its value a list of
`LazyCommand`), in a module that imports little (click, this module)::

    # pyproject.toml
    [project.entry-points."pycluster.cli"]
    discovery = "pycluster_discovery.commands:COMMANDS"

    # pycluster_discovery/commands.py
    COMMANDS = [LazyCommand("services", "pycluster_discovery.cli:services_group",
                            "Service discovery: the registry's instances (plugin discovery).")]

A command of a plugin listed in ``PYCLUSTER_DISABLE_PLUGINS`` is left out, as its plugin is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass, replace

import click

log = logging.getLogger("pycluster.cli")

ENTRY_POINT_GROUP = "pycluster.cli"


@dataclass(frozen=True)
class LazyCommand:
    """A command of the ``pycluster`` command line, imported on first use.

    :param name: the command's name (``services``).
    :param target: ``module:attribute`` of the click command or group.
    :param help: its one-line help, shown by ``pycluster --help`` without importing it (the
        first sentence of the command's docstring; a test of the core checks they agree).
    :param plugin: the plugin that provides it (left out when that plugin is disabled);
        an entry point fills in its own name.
    """

    name: str
    target: str
    help: str
    plugin: str | None = None

    def load(self) -> click.Command:
        """Import the command."""
        module, _, attr = self.target.partition(":")
        obj: object = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, click.Command):
            raise TypeError(f"{self.target} is {type(obj).__name__}, not a click command")
        return obj


def disabled_plugins() -> set[str]:
    """Plugin names in ``PYCLUSTER_DISABLE_PLUGINS`` (read the way
    `pycluster.plugins.disabled_from_env` reads it, without importing the plugin manager)."""
    raw = os.environ.get("PYCLUSTER_DISABLE_PLUGINS", "")
    return {p.strip() for p in raw.replace(",", " ").split() if p.strip()}


def plugin_commands() -> list[LazyCommand]:
    """The commands declared by installed distributions (entry point group ``pycluster.cli``);
    an entry point that fails to load is logged and skipped."""
    out: list[LazyCommand] = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            specs = list(ep.load())
            if not all(isinstance(s, LazyCommand) for s in specs):
                raise TypeError("expected a list of pycluster.cli.lazy.LazyCommand")
        except Exception as exc:
            log.warning("pycluster.cli entry point %s (%s): %s", ep.name, ep.value, exc)
            continue
        out += [replace(s, plugin=s.plugin or ep.name) for s in specs]
    return out


FIRST_PARTY = frozenset({"pycluster", "pycluster-discovery", "pycluster-docker", "pycluster-ring",
                         "pycluster-sqlite", "pycluster-systemd", "pycluster-vip"})
"""This project's distributions: their commands are all declared (``pycluster.cli``)."""


def third_party_plugins() -> list[str]:
    """Names of installed, enabled plugins (entry point group ``pycluster``) from other
    distributions: they may add commands through ``pycluster_add_cli_commands`` only, so
    listing the commands has to ask them."""
    off = disabled_plugins()
    return sorted(ep.name for ep in importlib.metadata.entry_points(group="pycluster")
                  if ep.dist is None or ep.dist.name not in FIRST_PARTY
                  if ep.name not in off)

