"""The container image's demo app: a Singleton that exercises what the dashboard shows.

``demo`` runs on every node; one node holds it active (the leader). Every ``DEMO_INTERVAL``
seconds (default 2) each node takes the app's lock ``tick`` and increments a counter in the
app's key-value store, then calls ``whoami`` on the active instance over RPC: the lock and RPC
latency histograms of ``/metrics`` fill with real values, and the leader, epoch and failover
panels change when the active node is killed.

Run (the image's default command)::

    pycluster run demo:platform
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from pycluster import App, Context, Platform, PyclusterError, Singleton

log = logging.getLogger("demo")
INTERVAL = float(os.environ.get("DEMO_INTERVAL", "2"))

app = App("demo", Singleton())
_tasks: list[asyncio.Task[None]] = []
_node = {"id": ""}  # this node's id, known from the first hook


@app.rpc.handler("whoami")
async def whoami() -> dict[str, object]:
    """Answered by the active instance: its node id and epoch."""
    return {"node": _node["id"], "epoch": app.epoch}


async def _tick() -> None:
    while True:
        await asyncio.sleep(INTERVAL)
        try:
            async with app.lock("tick", ttl=5):
                entry = await app.kv.get("ticks")
                count = int(entry) if entry is not None else 0
                await app.kv.put("ticks", str(count + 1))
            await app.rpc.call_leader("whoami", timeout=2)
        except PyclusterError as exc:  # no leader yet, a failover in progress: try again later
            log.info("tick: %s", exc)


@app.on_start
async def start(ctx: Context) -> None:
    _node["id"] = ctx.node_id
    _tasks.append(asyncio.create_task(_tick()))


@app.on_stop
async def stop(ctx: Context) -> None:
    while _tasks:
        task = _tasks.pop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@app.on_active
async def active(ctx: Context) -> None:
    print(f"{ctx.node_id}: active (epoch {ctx.epoch})", flush=True)


@app.on_passive
async def passive(ctx: Context) -> None:
    print(f"{ctx.node_id}: standby", flush=True)


def platform() -> Platform:
    """The node: NATS URL, node id, health address and the rest from ``PYCLUSTER_*``."""
    p = Platform(os.environ.get("PYCLUSTER_NAME", "demo"))
    p.register(app)
    return p
