"""A Singleton with a process backend: ``worker.py`` runs on exactly one node at a time.

Run (see README.md)::

    PYCLUSTER_NODE_ID=n1 pycluster run app:platform
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pycluster import App, Context, HealthCheck, Platform, Process, Singleton

HERE = Path(__file__).resolve().parent
PORT = int(os.environ.get("BASIC_PORT", "8000"))

app = App(
    "basic",
    Singleton(),
    # Started when this node becomes active, stopped (SIGTERM, then SIGKILL after 2 s) when it
    # stops being active; a fence guard stops it before the lease can expire elsewhere, even
    # if this node process is killed.
    Process([sys.executable, str(HERE / "worker.py"), str(PORT)], grace=2,
            health=HealthCheck(http=f"http://127.0.0.1:{PORT}/", start_timeout=15)),
)


@app.on_active
async def active(ctx: Context) -> None:
    print(f"{ctx.node_id}: active (epoch {ctx.epoch}); worker.py serves "
          f"http://127.0.0.1:{PORT}/", flush=True)


@app.on_passive
async def passive(ctx: Context) -> None:
    print(f"{ctx.node_id}: standby", flush=True)


def platform() -> Platform:
    """The node: NATS URL, node id, lease and the rest from the ``PYCLUSTER_*`` environment."""
    p = Platform(os.environ.get("PYCLUSTER_NAME", "examples"))
    p.register(app)
    return p
