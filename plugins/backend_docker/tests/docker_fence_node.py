"""``--setup docker_fence_node:options`` for test nodes: a `Docker` option from --setup-arg."""

from __future__ import annotations

import argparse
from typing import Any

from pycluster_docker import Docker


def options(ns: argparse.Namespace) -> list[Any]:
    """One long-running busybox container (``image=``, ``base_url=`` from --setup-arg)."""
    args = ns.setup_args
    return [Docker(args["image"], base_url=args["base_url"], command=["sleep", "3600"],
                   labels={"pycluster.test": "docker"}, check_interval=0.3, stop_timeout=2)]
