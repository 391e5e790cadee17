"""``pycluster services list | show NAME | watch NAME | export --format ...``."""

from __future__ import annotations

import click

services_group = click.Group("services", help="Service discovery: list, show, watch, export.")
