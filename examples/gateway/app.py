"""An HTTP gateway on every node calling another app over the API bus.

Two apps on each node:

* ``pricing`` (Singleton): answers the API method ``price`` on its active instance only;
* ``gateway`` (Spread): an HTTP server on every node (``GATEWAY_PORT``); ``GET /price?sku=X``
  calls ``pricing`` through the API bus, which finds the active instance wherever it is and
  retries across a failover until its timeout.

Run (see README.md)::

    PYCLUSTER_NODE_ID=n1 GATEWAY_PORT=8081 pycluster run app:platform
"""

from __future__ import annotations

import os
import zlib

from pydantic import BaseModel

from pycluster import App, Context, Platform, PyclusterError, Singleton, Spread
from pycluster.httpserver import HttpServer, Request, Response

PORT = int(os.environ.get("GATEWAY_PORT", "8081"))


class Quote(BaseModel):
    """What ``pricing.price`` answers."""

    sku: str
    price: float
    node: str
    epoch: int


pricing = App("pricing", Singleton())
gateway = App("gateway", Spread())
node: Platform | None = None
server: HttpServer | None = None


@pricing.handle("price")
async def price(body: dict[str, str]) -> Quote:
    """Runs on the active instance of ``pricing`` only."""
    assert node is not None
    sku = body.get("sku", "")
    return Quote(sku=sku, price=round(1 + zlib.crc32(sku.encode()) % 10_000 / 100, 2),
                 node=node.node_id, epoch=pricing.epoch or 0)


async def handle_price(request: Request) -> Response:
    assert node is not None
    sku = request.param("sku")
    if not sku:
        return Response.json({"error": "give ?sku=..."}, status=400)
    try:
        quote = await node.api("pricing", timeout=10).call("price", {"sku": sku},
                                                           response_model=Quote)
    except PyclusterError as exc:
        return Response.json({"error": str(exc), "gateway": node.node_id}, status=503)
    return Response.json({"gateway": node.node_id, **quote.model_dump()})


@gateway.on_start
async def start(ctx: Context) -> None:
    global server
    server = HttpServer(f"127.0.0.1:{PORT}", name="gateway")
    server.route("/price", handle_price)
    await server.start()
    print(f"{ctx.node_id}: gateway on {server.url}/price?sku=a1", flush=True)


@gateway.on_stop
async def stop(ctx: Context) -> None:
    if server is not None:
        await server.stop()


def platform() -> Platform:
    """The node: NATS URL, node id, lease and the rest from the ``PYCLUSTER_*`` environment."""
    global node
    node = Platform(os.environ.get("PYCLUSTER_NAME", "examples"))
    node.register(pricing)
    node.register(gateway)
    return node
