"""Fixtures of the SQLite plugin's tests: in-process nodes with a `SQLite` app on the shared
nats-server (the pycluster pytest plugin's ``nats_url``), and helpers to read databases."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest

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


Node = tuple[Platform, App, SQLite]


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


def rows(path: str | Path, table: str = "t") -> list[tuple[Any, ...]]:
    """Every row of ``table`` (read-only), sorted by id; [] when the table does not exist."""
    con = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=5.0)
    try:
        return con.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        con.close()


def checksum(items: list[tuple[Any, ...]]) -> str:
    """A digest of rows."""
    h = hashlib.sha256()
    for r in items:
        h.update(repr(r).encode())
    return h.hexdigest()


def insert(path: str | Path, n: int, tag: str) -> list[int]:
    """Insert ``n`` rows into ``t(id, v)`` of the database at ``path``; returns their ids."""
    con = sqlite3.connect(str(path), timeout=10.0, isolation_level=None)
    try:
        con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT)")
        ids = []
        for i in range(n):
            cur = con.execute("INSERT INTO t(v) VALUES (?)", (f"{tag}-{i}",))
            ids.append(int(cur.lastrowid or 0))
        return ids
    finally:
        con.close()
