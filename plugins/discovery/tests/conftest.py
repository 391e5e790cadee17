"""Fixtures of the discovery plugin's tests: in-process nodes on the shared nats-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import pycluster_discovery.plugin as discovery_plugin
from pycluster import App, Platform, Singleton
from pycluster_discovery import Service


@pytest.fixture
def make_node(make_platform: Callable[..., Any]) -> Callable[..., Any]:
    """``await make_node(node_id, *apps, **platform_kw)``: a started platform with the
    discovery plugin; ``apps`` default to a Singleton ``orders`` with service ``http``."""

    async def make(node_id: str, *apps: App, **kw: Any) -> Platform:
        if not apps:
            apps = (App("orders", Singleton(),
                        Service("http", port=8080, host="127.0.0.1", tags=["v2"],
                                metadata={"path": "/api"})),)
        kw.setdefault("extra_plugins", (("discovery", discovery_plugin),))
        p: Platform = await make_platform(node_id, *apps, **kw)
        return p

    return make

