"""Fixtures of the SQLite plugin's tests: in-process nodes with a `SQLite` app on the shared
nats-server (the pycluster pytest plugin's ``nats_url``), and helpers to read databases."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlite_testlib import Node

import pycluster_sqlite.plugin as sqlite_plugin
from pycluster import App, Platform, Singleton
from pycluster.plugins import create_plugin_manager
from pycluster.testing.pytest_plugin import require
from pycluster_sqlite import SQLite
from pycluster_sqlite.litestream import find_litestream


@pytest.fixture(scope="session")
def litestream_bin() -> str:
    """The litestream binary (skips, or fails in strict mode, when it is missing)."""
    try:
        return find_litestream()
    except Exception as exc:
        require("litestream", False, str(exc))
        raise




@pytest.fixture
async def make_node(nats_url: str, unique_name: str, tmp_path: Path,
                    litestream_bin: str) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process nodes of one platform running app ``db`` with a `SQLite` option whose
    files live under ``tmp_path/<node>``; all stopped at teardown, in reverse order."""
    async with AsyncExitStack() as stack:

        async def make(node_id: str, start: bool = True, app_name: str = "db",
                       extra_options: tuple[Any, ...] = (), **sqlite_kw: Any) -> Node:
            base = tmp_path / node_id
            base.mkdir(parents=True, exist_ok=True)
            db = SQLite(base / "data.db", replica_path=base / "replica.db", **sqlite_kw)
            app = App(app_name, Singleton(), db, *extra_options)
            pm = create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])
            p = Platform(unique_name, node_id=node_id, nats_url=nats_url, plugin_manager=pm,
                         lease_ttl=2.0, heartbeat_interval=0.5, hook_timeout=10.0)
            p.register(app)
            if start:
                await p.start()
                stack.push_async_callback(p.stop)
            return p, app, db

        yield make
