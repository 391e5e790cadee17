"""``--setup docker_fence_node:options`` for test nodes: a `Docker` option from --setup-arg."""

from __future__ import annotations

import argparse
from typing import Any

from pycluster_docker import Docker


def options(ns: argparse.Namespace) -> list[Any]:
    """One long-running busybox container (``image=``, ``base_url=`` from --setup-arg)."""
    args = ns.setup_args
    if args.get("slow_start"):
        # Runs at once but is healthy only after ``slow_start`` seconds: the BACKEND stage
        # waits meanwhile (a node killed then dies in the middle of its activation).
        return [Docker(args["image"], base_url=args["base_url"],
                       command=["sh", "-c", f"sleep {args['slow_start']}; touch /tmp/ready; "
                                "exec sleep 3600"],
                       healthcheck="test -f /tmp/ready", health_interval=0.3,
                       health_exec=True, health_start_period=30, start_timeout=60,
                       labels={"pycluster.test": "docker"}, check_interval=0.3, stop_timeout=2)]
    return [Docker(args["image"], base_url=args["base_url"], command=["sleep", "3600"],
                   labels={"pycluster.test": "docker"}, check_interval=0.3, stop_timeout=2)]
