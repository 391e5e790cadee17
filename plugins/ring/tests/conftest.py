"""Fixtures of the ring plugin's tests: in-process nodes of one platform with the ring
plugin on the shared nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

import pycluster_ring.plugin as ring_plugin
from pycluster import App, Platform
from pycluster.plugins import create_plugin_manager


@pytest.fixture
async def make_node(nats_url: str, unique_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process platforms (lease 2 s, heartbeat 0.5 s) with the ring plugin; stopped
    at teardown in reverse order (unless the test stopped them)."""
    async with AsyncExitStack() as stack:

        async def make(node_id: str, *apps: App, url: str | None = None,
                       **kw: Any) -> Platform:
            kw.setdefault("lease_ttl", 2.0)
            kw.setdefault("heartbeat_interval", 0.5)
            kw.setdefault("hook_timeout", 5.0)
            pm = create_plugin_manager(load_entrypoints=False, extra=[("ring", ring_plugin)])
            p = Platform(unique_name, node_id=node_id, nats_url=url or nats_url,
                         plugin_manager=pm, **kw)
            for app in apps:
                p.register(app)
            await p.start()

            async def stop() -> None:
                if p._running:
                    await p.stop()

            stack.push_async_callback(stop)
            return p

        yield make
