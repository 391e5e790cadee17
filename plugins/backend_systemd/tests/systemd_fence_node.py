"""``--setup systemd_fence_node:options`` for test nodes: a `Systemd` option from --setup-arg."""

from __future__ import annotations

import argparse
from typing import Any

from pycluster_systemd import Systemd


def options(ns: argparse.Namespace) -> list[Any]:
    """The test's ``main`` unit (and ``dep``), reached through ``prefix=`` from --setup-arg."""
    return [Systemd("main", requires=["dep"], prefix=ns.setup_args["prefix"],
                    check_interval=0.3)]
