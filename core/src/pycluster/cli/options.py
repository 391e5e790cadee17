"""Options every command that talks to a running platform takes (plugins' commands too).

``@connection_options`` adds ``--config FILE`` (the node's own config file: platform name, NATS
URL, credentials, TLS), ``--nats-url``, ``--data-dir`` and ``--platform``, each also read from
its ``PYCLUSTER_*`` environment variable; `pycluster.cli.inspect.cli_settings` turns them into
connection settings (there is no default URL). A command receives ``config``, ``nats_url``,
``data_dir`` and ``platform`` (already resolved: never None)::

    @click.command("show")
    @connection_options
    def show(config, nats_url, data_dir, platform): ...
        nc = await cli_connect(config, nats_url, data_dir, platform)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

CONFIG_ENV = "PYCLUSTER_CONFIG"


async def cli_connect(config: str | None, nats_url: str | None, data_dir: str | None,
                      platform: str) -> Any:
    """A NATS connection for a command decorated with `connection_options` (its four values);
    the caller closes it. Raises `pycluster.kernel.errors.ConfigError` when there is no NATS to
    ask, `PyclusterError` when it cannot be reached."""
    from .inspect import _connect

    return await _connect(nats_url, platform, data_dir, config)


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config``, ``--nats-url``, ``--data-dir`` and ``--platform`` to a command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..kernel.errors import PyclusterError
        from .inspect import resolve_platform

        try:
            kwargs["platform"] = resolve_platform(kwargs.get("platform"), kwargs.get("config"))
        except PyclusterError as exc:
            from .common import _fail

            _fail(exc)
        return fn(*args, **kwargs)

    for opt in reversed([
        click.option(
            "--config", "config", envvar=CONFIG_ENV,
            type=click.Path(exists=True, dir_okay=False),
            help="The node's config file (YAML or TOML): its platform name, NATS URL, "
                 "credentials and TLS files are used (env: PYCLUSTER_CONFIG)."),
        click.option(
            "--nats-url", envvar="PYCLUSTER_NATS_URL", default=None,
            help="NATS URL(s), comma-separated; overrides the config file's (credentials: "
                 "PYCLUSTER_NATS_USER/_PASSWORD/_TOKEN/_CREDS). Without a URL: the local "
                 "embedded server of the platform, if a node runs one; else an error."),
        click.option(
            "--data-dir", envvar="PYCLUSTER_DATA_DIR", type=click.Path(file_okay=False),
            help="Data directory of a local node with an embedded server (default: the "
                 "config file's, else the platform's default): its URL and credentials are "
                 "read there."),
        click.option(
            "--platform", "-p", envvar="PYCLUSTER_NAME", default=None,
            help="Platform name (default: the config file's name, else 'default')."),
    ]):
        wrapper = opt(wrapper)
    return wrapper
