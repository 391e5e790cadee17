"""A partitioned cache on the ring plugin: every node owns a share of 16 partitions.

One app, ``cache`` (Spread, with `Ring`): each key belongs to one partition and each partition
to exactly one live node at a time. The owner keeps its partitions' entries in memory, loaded
from the app's KV bucket when it gains them (``on_own``) and dropped when it gives them up
(``on_release``); writes go to the owner, which stores them in the bucket first (write-through),
so a node that dies loses no entry: its partitions move to the others, which load them.

Every node serves HTTP on ``CACHE_PORT`` and routes each request to the key's owner over the
API bus (``ForKey``):

* ``GET /put?key=K&value=V``  -> ``{"key", "node", "partition", "epoch"}``
* ``GET /get?key=K``          -> ``{"key", "value", "node", "partition"}`` (404 when unknown)
* ``GET /ring``               -> this node's view: partitions per node, moves

Run (see README.md)::

    PYCLUSTER_NODE_ID=n1 CACHE_PORT=8101 pycluster run app:platform
"""

from __future__ import annotations

import os
import re
from typing import Any

from pycluster import App, Context, ForKey, Platform, PyclusterError, Spread
from pycluster.httpserver import HttpServer, Request, Response
from pycluster_ring import Ring, RingContext, ring_of

PORT = int(os.environ.get("CACHE_PORT", "8101"))
KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # usable as part of a KV key

cache = App("cache", Spread(), Ring(partitions=16))
node: Platform | None = None
server: HttpServer | None = None
local: dict[int, dict[str, str]] = {}  # partition -> entries, for the partitions owned here


@cache.on_own
async def own(ctx: RingContext) -> None:
    """Load the partitions this node just gained from the bucket."""
    for p in ctx.partitions:
        entries = {}
        for k in await cache.kv.keys(f"p{p}.>"):
            value = await cache.kv.get(k)
            if value is not None:
                entries[k.split(".", 1)[1]] = value.decode()
        local[p] = entries
    print(f"{ctx.node_id}: owns {sorted(ctx.partitions)}", flush=True)


@cache.on_release
async def release(ctx: RingContext) -> None:
    """Drop what this node gives up (the bucket has everything already)."""
    for p in ctx.partitions:
        local.pop(p, None)
    print(f"{ctx.node_id}: released {sorted(ctx.partitions)} (lost: {ctx.lost})", flush=True)


@cache.handle("put")
async def put(body: dict[str, str]) -> dict[str, Any]:
    """On the key's owner only: store, then keep in memory."""
    ring = ring_of(cache)
    key, value = body["key"], body["value"]
    epoch = ring.require_owner(key)  # not the owner (any more): refused, the caller retries
    p = ring.partition(key)
    await cache.kv.put(f"p{p}.{key}", value)
    local.setdefault(p, {})[key] = value
    return {"key": key, "node": this_node(), "partition": p, "epoch": epoch}


@cache.handle("get")
async def get(body: dict[str, str]) -> dict[str, Any]:
    """On the key's owner only: answer from memory."""
    ring = ring_of(cache)
    key = body["key"]
    ring.require_owner(key)
    p = ring.partition(key)
    return {"key": key, "value": local.get(p, {}).get(key), "node": this_node(),
            "partition": p}


def this_node() -> str:
    return node.node_id if node is not None else "?"


async def call(method: str, body: dict[str, str]) -> Response:
    assert node is not None
    key = body.get("key") or ""
    if not KEY.match(key):
        return Response.json({"error": "give ?key=... (letters, digits, - and _)"}, 400)
    try:
        res = await node.api("cache", timeout=15).call(method, body, route=ForKey(key),
                                                       idempotent=True)
    except PyclusterError as exc:
        return Response.json({"error": str(exc), "via": this_node()}, 503)
    if method == "get" and res.get("value") is None:
        return Response.json({**res, "via": this_node()}, 404)
    return Response.json({**res, "via": this_node()})


async def http_put(request: Request) -> Response:
    return await call("put", {"key": request.param("key") or "",
                              "value": request.param("value") or ""})


async def http_get(request: Request) -> Response:
    return await call("get", {"key": request.param("key") or ""})


async def http_ring(request: Request) -> Response:
    return Response.json(ring_of(cache).stats())


@cache.on_active
async def start(ctx: Context) -> None:
    global server
    server = HttpServer(f"127.0.0.1:{PORT}", name="cache")
    server.route("/put", http_put)
    server.route("/get", http_get)
    server.route("/ring", http_ring)
    await server.start()
    print(f"{ctx.node_id}: cache on {server.url}/get?key=...", flush=True)


@cache.on_stop
async def stop(ctx: Context) -> None:
    global server
    if server is not None:
        await server.stop()
        server = None


def platform() -> Platform:
    """The node: NATS URL, node id, lease and the rest from the ``PYCLUSTER_*`` environment."""
    global node
    node = Platform(os.environ.get("PYCLUSTER_NAME", "examples"))
    node.register(cache)
    return node
