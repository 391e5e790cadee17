"""The node type and row helpers shared by the SQLite plugin's tests.

A module of its own: test modules import it by a name no other test directory uses, which
``from conftest import`` cannot promise when several test directories are collected."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from pycluster import App, Platform
from pycluster_sqlite import SQLite

Node = tuple[Platform, App, SQLite]
"""A node of the ``make_node`` fixture: its platform, the app and the SQLite option."""


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
