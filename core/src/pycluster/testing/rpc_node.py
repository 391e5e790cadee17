"""Handlers for node processes in communication tests.

Use with the test node program: ``python -m pycluster.testing.node ... --setup
pycluster.testing.rpc_node:options`` (or ``NodeCluster(..., extra_args=[...])``). It adds:

* RPC and API methods ``whoami`` (node id, whether active, epoch), ``echo`` and ``sleep``
  (seconds), and ``fail`` (raises ``ValueError``);
* with ``--setup-arg durable=NAME``: a durable subscription to platform events ``test.>`` that
  appends each event to ``{state_dir}/{node_id}.events.jsonl`` (data, id, deliveries).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ..builtin.events.bus import Event
from ..kernel.app import App
from ..kernel.context import Context
from ..kernel.platform import Platform


def options(ns: argparse.Namespace) -> list[Any]:
    """No extra App options."""
    return []


def attach(app: App, platform: Platform, ns: argparse.Namespace) -> None:
    """Register the test handlers (and the durable subscriber) on ``app``."""

    async def whoami() -> dict[str, Any]:
        return {"node": platform.node_id, "active": app.is_active, "epoch": app.epoch}

    async def echo(data: Any) -> Any:
        return data

    async def sleep(seconds: float) -> str:
        await asyncio.sleep(float(seconds))
        return platform.node_id

    async def fail(message: str) -> None:
        raise ValueError(message)

    for name, fn in (("whoami", whoami), ("echo", echo), ("sleep", sleep), ("fail", fail)):
        app.rpc.register(name, fn)
        app.handle(name)(fn)

    durable = getattr(ns, "setup_args", {}).get("durable")
    if durable:
        path = Path(ns.state_dir) / f"{ns.node_id}.events.jsonl"

        async def record(ev: Event) -> None:
            with path.open("a") as fh:
                fh.write(json.dumps({"t": time.time(), "data": ev.data, "id": ev.id,
                                     "deliveries": ev.deliveries}) + "\n")

        @app.on_start
        async def subscribe(ctx: Context) -> None:
            await platform.events.subscribe_durable("test.>", durable, record)
