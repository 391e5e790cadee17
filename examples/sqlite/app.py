"""A small notes service on a replicated SQLite database.

One app, ``notes`` (Singleton), with a `SQLite` option: the active node owns ``notes.db`` and
streams its WAL to NATS; every standby keeps a replica and, on failover, promotes it before the
app becomes active. The active node serves HTTP on ``NOTES_PORT``:

* ``GET /add?text=...`` inserts a row and returns once it is stored in NATS
  (``db.wal.sync()``): a row acknowledged here survives any failover (GET: the built-in
  HTTP server of pycluster serves GET and HEAD only);
* ``GET /notes`` lists the rows (and which node and epoch answer).

Run (see README.md)::

    PYCLUSTER_NODE_ID=n1 NOTES_PORT=8091 pycluster run app:platform
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

from pycluster import App, Context, Platform, Singleton
from pycluster.httpserver import HttpServer, Request, Response
from pycluster_sqlite import SQLite

PORT = int(os.environ.get("NOTES_PORT", "8091"))
# One database per node (several nodes may share a machine while you try it).
DB = Path(os.environ.get("NOTES_DB") or
          f"data/{os.environ.get('PYCLUSTER_NODE_ID', 'node')}/notes.db").absolute()

db = SQLite(str(DB))
notes = App(os.environ.get("NOTES_APP", "notes"), Singleton(), db)
node: Platform | None = None
server: HttpServer | None = None
conn: sqlite3.Connection | None = None
lock = asyncio.Lock()  # one writer at a time on the one connection


def _insert(text: str) -> int:
    assert conn is not None
    with conn:
        cur = conn.execute("INSERT INTO notes (text) VALUES (?)", (text,))
    return int(cur.lastrowid or 0)


def _list() -> list[dict[str, object]]:
    assert conn is not None
    rows = conn.execute("SELECT id, text FROM notes ORDER BY id").fetchall()
    return [{"id": i, "text": t} for i, t in rows]


async def add_note(request: Request) -> Response:
    text = request.param("text")
    if not text:
        return Response.json({"error": "give ?text=..."}, status=400)
    async with lock:
        row = await asyncio.to_thread(_insert, text)
        await db.wal.sync()  # stored in NATS: no failover can lose it now
    return Response.json({"id": row, "synced": True, "node": notes_node(),
                          "epoch": notes.epoch})


async def list_notes(request: Request) -> Response:
    async with lock:
        rows = await asyncio.to_thread(_list)
    return Response.json({"node": notes_node(), "epoch": notes.epoch, "notes": rows})


def notes_node() -> str:
    return node.node_id if node is not None else "?"


@notes.on_active
async def active(ctx: Context) -> None:
    """The promoted database is in place at ``DB``: open it and serve."""
    global conn, server
    conn = sqlite3.connect(DB, check_same_thread=False)
    conn.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.commit()
    server = HttpServer(f"127.0.0.1:{PORT}", name="notes")
    server.route("/add", add_note)
    server.route("/notes", list_notes)
    await server.start()
    print(f"{ctx.node_id}: active (epoch {ctx.epoch}); notes on {server.url}/notes", flush=True)


@notes.on_passive
async def passive(ctx: Context) -> None:
    await close()  # after a step-down: the database is no longer ours to write
    print(f"{ctx.node_id}: standby (replica of {DB.name})", flush=True)


@notes.on_stop
async def stop(ctx: Context) -> None:
    await close()


async def close() -> None:
    global conn, server
    if server is not None:
        await server.stop()
        server = None
    if conn is not None:
        conn.close()
        conn = None


def platform() -> Platform:
    """The node: NATS URL, node id, lease and the rest from the ``PYCLUSTER_*`` environment."""
    global node
    DB.parent.mkdir(parents=True, exist_ok=True)
    config = os.environ.get("NOTES_CONFIG")  # a node config file (platform, NATS, TLS, ...)
    node = (Platform(config_file=config) if config
            else Platform(os.environ.get("PYCLUSTER_NAME", "examples")))
    node.register(notes)
    return node
