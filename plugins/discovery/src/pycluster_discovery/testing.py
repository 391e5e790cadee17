"""Test helper: the node program's ``--setup`` hook.

``python -m pycluster.testing.node --setup pycluster_discovery.testing:setup --setup-arg
service=http --setup-arg port=8080 [--setup-arg dns=127.0.0.1:8600]`` gives the test node's
app a `Service` (host 127.0.0.1) and, with ``dns``, starts the discovery DNS server there.
"""

from __future__ import annotations

import argparse
import os

from .options import Service
from .service import DNS_ADDR_ENV


def setup(ns: argparse.Namespace) -> list[object]:
    """``--setup`` hook of ``pycluster.testing.node``: one `Service` from ``--setup-arg``."""
    args: dict[str, str] = getattr(ns, "setup_args", {})
    if args.get("dns"):
        os.environ[DNS_ADDR_ENV] = args["dns"]  # read when the platform builds the service
    return [Service(args.get("service", "http"), port=int(args.get("port", "8080")),
                    host=args.get("host", "127.0.0.1"))]
