"""Shared fixtures: the pycluster pytest plugin (NATS servers, clusters, strict mode) is
loaded through its ``pytest11`` entry point; helpers here build platforms quickly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest

from pycluster import Platform
from pycluster.plugins import create_plugin_manager


@pytest.fixture
async def make_platform(nats_url: str, unique_name: str) -> AsyncIterator[Callable[..., Any]]:
    """Build and start platforms on the shared server (stopped at teardown, in reverse)."""
    async with AsyncExitStack() as stack:

        async def make(node_id: str, *apps: Any, start: bool = True, **kw: Any) -> Platform:
            kw.setdefault("lease_ttl", 2.0)
            kw.setdefault("heartbeat_interval", 0.5)
            kw.setdefault("hook_timeout", 5.0)
            extra = kw.pop("extra_plugins", ())
            pm = create_plugin_manager(load_entrypoints=False, extra=extra)
            p = Platform(kw.pop("name", unique_name), node_id=node_id, nats_url=nats_url,
                         plugin_manager=pm, **kw)
            for app in apps:
                p.register(app)
            if start:
                await p.start()
                stack.push_async_callback(p.stop)
            return p

        yield make
