"""Options and helpers shared by the ``pycluster`` subcommands."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import click

if TYPE_CHECKING:
    from ..plugins import PluginManager

_P = ParamSpec("_P")
_R = TypeVar("_R")

OUTPUT = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                      show_default=True, help="Output format.")

def _fail(exc: BaseException) -> None:
    # Errors are built to hold no secrets; a URL's password or a secret from the environment
    # is masked here once more, whatever the error (docs/security.md).
    from ..kernel.settings import redact_text

    secrets = [os.environ.get(f"PYCLUSTER_{k}") for k in ("NATS_PASSWORD", "NATS_TOKEN")]
    click.echo(f"error: {redact_text(str(exc), secrets)}", err=True)
    sys.exit(getattr(exc, "exit_code", 2))


def plugin_manager(ctx: click.Context | None = None) -> PluginManager:
    """The plugin manager of this invocation: the one given as the root context's ``obj``
    (tests pass theirs), else built now, once (it imports every plugin, so only the commands
    that need it pay for it)."""
    root = (ctx or click.get_current_context()).find_root()
    if root.obj is None:
        from ..plugins import create_plugin_manager

        root.obj = create_plugin_manager()
    return root.obj  # type: ignore[no-any-return]


def pass_plugins(f: Callable[Concatenate[PluginManager, _P], _R]) -> Callable[_P, _R]:
    """Like ``click.pass_obj``, with the `plugin_manager` as first argument."""
    @functools.wraps(f)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return f(plugin_manager(), *args, **kwargs)
    return wrapper


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header)] + [fmt.format(*map(str, r)) for r in rows])


NATS_OPT = click.option(
    "--nats-url", envvar="PYCLUSTER_NATS_URL", default=None,
    help="NATS URL(s), comma-separated (credentials: PYCLUSTER_NATS_USER/_PASSWORD/_TOKEN/"
         "_CREDS). Default: the platform's local embedded server, if a node runs one (found "
         "through --data-dir), else an error (there is no default URL).")
DATA_DIR_OPT = click.option(
    "--data-dir", envvar="PYCLUSTER_DATA_DIR", type=click.Path(file_okay=False),
    help="Data directory of a local node with an embedded server (default: the default "
         "data directory of the platform): its URL and credentials are read there.")
PLATFORM_OPT = click.option("--platform", "-p", envvar="PYCLUSTER_NAME", default="default",
                            show_default=True, help="Platform name.")
