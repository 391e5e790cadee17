"""Two zones joined by a NATS leaf-node link: a hub platform and an edge platform calling it.

* ``hub()``: platform ``prod`` in zone ``eu``; its embedded nats-server also listens for leaf
  connections (``HUB_LEAF_PORT``). App ``convex`` (Singleton) answers the API method ``where``.
* ``edge()``: platform ``edge`` in zone ``paris``; its embedded nats-server connects to the hub
  (``HUB_LEAF_URL``). App ``shop`` (Singleton) serves ``GET /where`` on ``SHOP_PORT``, which
  calls ``convex`` in the other platform over the link (``platform.remote("prod")``).

Each zone elects, locks and stores in its own JetStream domain; only the call crosses.

Run (see README.md)::

    HUB_LEAF_PORT=7422 pycluster run app:hub
    HUB_LEAF_URL=nats-leaf://127.0.0.1:7422 SHOP_PORT=8090 pycluster run app:edge
"""

from __future__ import annotations

import os
from typing import Any

from pycluster import App, Context, HubListen, LeafOf, Platform, PyclusterError, Singleton
from pycluster.httpserver import HttpServer, Request, Response

# The leaf link's credentials (both sides must agree; use your own).
LINK_USER = os.environ.get("LEAF_USER", "leaf")
LINK_PASSWORD = os.environ.get("LEAF_PASSWORD", "change-me")

convex = App("convex", Singleton())
shop = App("shop", Singleton())
node: Platform | None = None
server: HttpServer | None = None


@convex.handle("where")
async def where(body: dict[str, Any]) -> dict[str, Any]:
    """Runs on the hub's active ``convex`` instance."""
    assert node is not None
    return {"asked_by": body.get("from"), "platform": node.name, "zone": node.settings.zone,
            "node": node.node_id, "epoch": convex.epoch or 0}


async def handle_where(request: Request) -> Response:
    assert node is not None
    try:
        reply = await node.remote("prod").api("convex", timeout=10).call_detailed(
            "where", {"from": node.name})
    except PyclusterError as exc:
        return Response.json({"error": str(exc), "edge": node.node_id}, status=503)
    return Response.json({"edge": node.node_id, "edge_zone": node.settings.zone,
                          "answer": reply.value, "answered_from_zone": reply.zone,
                          "ms": round(reply.seconds * 1000, 2)})


@shop.on_start
async def start(ctx: Context) -> None:
    global server
    server = HttpServer(f"127.0.0.1:{int(os.environ.get('SHOP_PORT', '8090'))}", name="shop")
    server.route("/where", handle_where)
    await server.start()
    print(f"{ctx.node_id}: shop on {server.url}/where", flush=True)


@shop.on_stop
async def stop(ctx: Context) -> None:
    if server is not None:
        await server.stop()


def hub() -> Platform:
    """The hub zone's node (an embedded nats-server that accepts leaf links)."""
    global node
    node = Platform("prod", zone="eu",
                    hub=HubListen(host="127.0.0.1",
                                  port=int(os.environ.get("HUB_LEAF_PORT", "7422")),
                                  user=LINK_USER, password=LINK_PASSWORD))
    node.register(convex)
    return node


def edge() -> Platform:
    """The edge zone's node (an embedded nats-server linked to the hub)."""
    global node
    node = Platform("edge", zone="paris",
                    leaf=LeafOf(os.environ.get("HUB_LEAF_URL", "nats-leaf://127.0.0.1:7422"),
                                user=LINK_USER, password=LINK_PASSWORD))
    node.register(shop)
    return node
