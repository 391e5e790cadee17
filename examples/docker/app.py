"""A container backend: a web server container runs on exactly one node at a time.

One app, ``web`` (Singleton), with a `Docker` option (plugin ``pycluster-docker``): the active
node runs the container ``pycluster-<platform>-web-<node>``; it serves on ``WEB_PORT`` a page
saying which node and epoch (fencing token) started it. On a failover the container of the old
node is stopped (by the node, or by its fence guard when the node died) before the new node
starts its own.

The engine is Docker or podman's Docker-compatible API (``DOCKER_HOST``, e.g.
``unix:///run/user/1000/podman/podman.sock``); the image any image with a shell and
``httpd`` (busybox) — ``WEB_IMAGE``, pulled when missing.

Run (see README.md)::

    PYCLUSTER_NODE_ID=n1 WEB_PORT=8111 pycluster run app:platform
"""

from __future__ import annotations

import os

from pycluster import App, Context, Platform, Singleton
from pycluster_docker import Docker

PORT = int(os.environ.get("WEB_PORT", "8111"))
IMAGE = os.environ.get("WEB_IMAGE", "docker.io/library/busybox:latest")
# The page names the node and the epoch the container was started with (its environment).
SERVE = ('mkdir -p /www && echo "node $PYCLUSTER_NODE epoch $PYCLUSTER_EPOCH" > /www/index.html'
         ' && exec httpd -f -p 8080 -h /www')

web = App(
    "web",
    Singleton(),
    Docker(IMAGE, command=["sh", "-c", SERVE], ports={8080: f"127.0.0.1:{PORT}"},
           healthcheck="wget -q -O /dev/null http://127.0.0.1:8080/", health_interval=1,
           labels={"pycluster.example": "docker"}, pull=True, stop_timeout=2),
)


@web.on_active
async def active(ctx: Context) -> None:
    print(f"{ctx.node_id}: active (epoch {ctx.epoch}); the container serves "
          f"http://127.0.0.1:{PORT}/", flush=True)


@web.on_passive
async def passive(ctx: Context) -> None:
    print(f"{ctx.node_id}: standby", flush=True)


def platform() -> Platform:
    """The node: NATS URL, node id, lease and the rest from the ``PYCLUSTER_*`` environment."""
    p = Platform(os.environ.get("PYCLUSTER_NAME", "examples"))
    p.register(web)
    return p
