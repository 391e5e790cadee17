"""The plugin's commands of the ``pycluster`` command line, declared without importing them
(entry point ``pycluster.cli``: ``pycluster --help`` lists them without loading the plugin)."""

from __future__ import annotations

from pycluster.cli.lazy import LazyCommand

COMMANDS = [
    LazyCommand("services", "pycluster_discovery.cli:services_group",
                "Service discovery: the registry's instances (plugin discovery)."),
]
