"""Test-node setup (``--setup pycluster_sqlite.testing_node:options`` of pycluster.testing.node).

`options` adds a `SQLite` database under ``{state_dir}/sqlite/{node}/`` (``data.db`` and
``replica.db``); ``--setup-arg key=value`` sets its intervals (``snapshot_interval``,
``retention``, ``monitor_interval``, ``sync_interval``, ``follow_interval``, ``l0_retention``,
``max_promotion_lag``; ``compaction_levels=a,b,c``).

`attach` adds a writer that, while the app is active here, inserts batches of rows (table
``t(id, node, epoch, payload)``) and calls ``await db.wal.sync()`` after each; it records to
``{state_dir}/{node}.sqlite.jsonl``: ``written`` (rows committed locally), ``synced`` (rows
confirmed in NATS, with a digest of their content) or ``sync_failed``, ``leader`` when this node
wins the lease, ``active`` when the failover sequence completed, and every 0.25 s a
``status`` line (role, positions, lag, litestream pids, last promotion). Setup args: ``write=0``
turns the writer off, ``batch=N`` rows per batch, ``write_interval=S`` seconds between batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.app import App
from pycluster.kernel.context import Context
from pycluster.kernel.platform import Platform

from .options import SQLite

FLOATS = ("snapshot_interval", "retention", "monitor_interval", "sync_interval",
          "follow_interval", "l0_retention", "max_promotion_lag", "promotion_timeout")


def payload(row_id: int, node: str, epoch: int) -> str:
    """The deterministic content of a test row."""
    return f"{row_id}:{node}:{epoch}:" + hashlib.sha1(f"{row_id}{node}{epoch}".encode()).hexdigest()


def digest(rows: list[tuple[int, str]]) -> str:
    """Digest of ``(id, payload)`` rows (sorted by id)."""
    h = hashlib.sha256()
    for row_id, text in sorted(rows):
        h.update(f"{row_id}|{text}\n".encode())
    return h.hexdigest()


def options(ns: argparse.Namespace) -> list[object]:
    """The `SQLite` option of a test node."""
    args: dict[str, str] = getattr(ns, "setup_args", {}) or {}
    base = Path(ns.state_dir) / "sqlite" / ns.node_id
    base.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {k: float(args[k]) for k in FLOATS if k in args}
    if "compaction_levels" in args:
        kw["compaction_levels"] = tuple(float(x) for x in args["compaction_levels"].split(","))
    db = SQLite(base / "data.db", replica_path=base / "replica.db", **kw)
    ns.sqlite_db = db
    return [db]


class _Writer:
    def __init__(self, app: App, db: SQLite, ns: argparse.Namespace) -> None:
        args: dict[str, str] = getattr(ns, "setup_args", {}) or {}
        self.app = app
        self.db = db
        self.node = ns.node_id
        self.enabled = args.get("write", "1") != "0"
        self.batch = int(args.get("batch", "5"))
        self.interval = float(args.get("write_interval", "0.05"))
        self.fh = (Path(ns.state_dir) / f"{ns.node_id}.sqlite.jsonl").open("a", buffering=1)
        self.task: asyncio.Task[None] | None = None
        self.status_task: asyncio.Task[None] | None = None

    def log(self, **fields: Any) -> None:
        fields.setdefault("t", time.time())
        fields.setdefault("node", self.node)
        fields.setdefault("pid", os.getpid())
        self.fh.write(json.dumps(fields, default=str) + "\n")

    async def on_start(self, ctx: Context) -> None:
        self.status_task = asyncio.create_task(self._status())

    async def on_leader_change(self, ctx: Context) -> None:
        if ctx.leader == self.node:  # the lease was just won (before the failover stages ran)
            self.log(event="leader", epoch=ctx.epoch)

    async def on_active(self, ctx: Context) -> None:
        status = self.db.wal.status()
        self.log(event="active", epoch=ctx.epoch, promotion=status.get("last_promotion"))
        if self.enabled and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._write(ctx.epoch or 0))

    async def on_passive(self, ctx: Context) -> None:
        task, self.task = self.task, None
        if task is not None:
            await cancel_and_wait(task)

    async def on_stop(self, ctx: Context) -> None:
        await self.on_passive(ctx)
        if self.status_task is not None:
            self.status_task.cancel()

    def _insert(self, epoch: int) -> tuple[int, int, str]:
        con = sqlite3.connect(str(self.db.path), timeout=10.0, isolation_level=None)
        try:
            con.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, node TEXT, "
                        "epoch INTEGER, payload TEXT)")
            con.execute("BEGIN IMMEDIATE")
            first = int(con.execute("SELECT coalesce(max(id), 0) + 1 FROM t").fetchone()[0])
            rows = [(i, self.node, epoch, payload(i, self.node, epoch))
                    for i in range(first, first + self.batch)]
            con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", rows)
            con.execute("COMMIT")
        finally:
            con.close()
        return first, first + self.batch - 1, digest([(r[0], r[3]) for r in rows])

    async def _write(self, epoch: int) -> None:
        # on_active runs as the last step of activation, before the app counts as active.
        for _ in range(1000):
            if self.app.is_active:
                break
            await asyncio.sleep(0.01)
        while self.app.is_active:
            try:
                first, last, dg = await asyncio.to_thread(self._insert, epoch)
            except sqlite3.Error as exc:
                self.log(event="write_failed", error=str(exc))
                await asyncio.sleep(self.interval)
                continue
            self.log(event="written", first=first, last=last, epoch=epoch)
            try:
                pos = await self.db.wal.sync(timeout=10.0)
            except Exception as exc:
                self.log(event="sync_failed", first=first, last=last, epoch=epoch,
                         error=f"{type(exc).__name__}: {exc}")
            else:
                self.log(event="synced", first=first, last=last, epoch=epoch, digest=dg,
                         txid=pos.replicated_txid)
            await asyncio.sleep(self.interval)

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            with contextlib.suppress(Exception):
                st = self.db.wal.status()
                self.log(event="status", role=st["role"], lag=st["lag"],
                         replica_txid=st["replica_txid"], remote_txid=st["remote_txid"],
                         local_txid=st["local_txid"],
                         follower=(st["follower"] or {}).get("state"),
                         follower_pid=(st["follower"] or {}).get("pid"),
                         bootstrapped_from=(st["follower"] or {}).get("bootstrapped_from"),
                         replicate_pid=(st["replicate"] or {}).get("pid"),
                         last_promotion=st["last_promotion"])


def attach(app: App, platform: Platform, ns: argparse.Namespace) -> None:
    """Add the test writer and the status log to a test node's app."""
    writer = _Writer(app, ns.sqlite_db, ns)
    app.on_start(writer.on_start)
    app.on_leader_change(writer.on_leader_change)
    app.on_active(writer.on_active)
    app.on_passive(writer.on_passive)
    app.on_stop(writer.on_stop)
