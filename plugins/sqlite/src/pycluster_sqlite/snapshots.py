"""Snapshots: whole, verified SQLite files in the object store ``{platform}_{app}_snapshots``.

A snapshot is made from the WAL bucket, never from a live file: ``litestream restore`` (up to a
TXID, or everything) into a temporary file, verification (``quick_check``), then an upload of
the file as object ``snapshots/<id>.db``, where ``<id>`` is ``<UTC time>-<TXID in hex>``. The
object's description holds the metadata (TXID, creation time, node, writer epoch, size, where
it came from). Because the file is exactly the bucket's state at that TXID, a new node can start
from it and let Litestream apply the WAL after it (see `pycluster_sqlite.follower`).

The active node materialises each new Litestream snapshot (level 9) and prunes snapshots older
than ``retention`` (the newest is always kept); ``create()`` adds one on demand, from any node
or from the CLI.

Under connection loss every call fails with the NATS error after its timeout; nothing is left
half-written: an upload that fails is not listed (the object store publishes the meta message
last) and a download goes to a temporary file that is renamed only when complete.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions

from . import dbfile
from .errors import SnapshotNotFoundError, SQLiteError
from .walindex import ensure_object_store

PREFIX = "snapshots/"
CHUNK = 512 * 1024  # measured: 512 KiB chunks put about twice as fast as the 128 KiB default


@dataclass(frozen=True)
class Snapshot:
    """One snapshot in the snapshots bucket.

    :ivar id: ``<UTC time>-<TXID hex>``, sortable by time.
    :ivar txid: the Litestream TXID the file is at.
    :ivar created: creation time (UTC seconds).
    :ivar size: bytes of the SQLite file.
    :ivar node: the node that made it.
    :ivar epoch: the writer epoch recorded in the WAL bucket when it was made.
    :ivar source: ``"litestream-snapshot"`` (a materialised level-9 snapshot), ``"on-demand"``.
    """

    id: str
    txid: int
    created: float
    size: int
    node: str
    epoch: int | None
    source: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)

    @property
    def object_name(self) -> str:
        """The object's name in the bucket."""
        return f"{PREFIX}{self.id}.db"


def snapshot_id(txid: int, created: float) -> str:
    """The id of a snapshot made at ``created`` of TXID ``txid``."""
    stamp = dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{stamp}-{txid:016x}"


class SnapshotStore:
    """The snapshots bucket of one app.

    :param js: a JetStream context.
    :param bucket: ``{platform}_{app}_snapshots``.
    :param replicas: stream replicas when the bucket is created.
    """

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int = 1) -> None:
        self.js = js
        self.bucket = bucket
        self.replicas = replicas
        self.last: Snapshot | None = None  # the newest one seen by this process

    async def ensure(self) -> None:
        """Create the bucket if needed."""
        await ensure_object_store(self.js, self.bucket, self.replicas,
                                  "pycluster-sqlite snapshots")

    async def _store(self) -> Any:
        await self.ensure()
        return await self.js.object_store(self.bucket)

    async def list(self) -> builtins.list[Snapshot]:
        """Every snapshot, oldest first."""
        obs = await self._store()
        try:
            infos = await obs.list(ignore_deletes=True)
        except nats.js.errors.NotFoundError:
            return []
        out = []
        for info in infos:
            if not info.name.startswith(PREFIX) or info.deleted:
                continue
            snap = _decode(info.name, info.description, info.size or 0)
            if snap is not None:
                out.append(snap)
        out.sort(key=lambda s: (s.created, s.txid))
        if out:
            self.last = out[-1]
        return out

    async def latest(self) -> Snapshot | None:
        """The newest snapshot, or None."""
        snaps = await self.list()
        return snaps[-1] if snaps else None

    async def get(self, snapshot_id: str) -> Snapshot:
        """One snapshot by id (`SnapshotNotFoundError` when absent)."""
        obs = await self._store()
        name = f"{PREFIX}{snapshot_id}.db"
        try:
            info = await obs.get_info(name)
        except nats.js.errors.NotFoundError:
            raise SnapshotNotFoundError(self.bucket, snapshot_id) from None
        snap = _decode(info.name, info.description, info.size or 0)
        if snap is None:
            raise SnapshotNotFoundError(self.bucket, snapshot_id)
        return snap

    async def upload(self, file: Path, txid: int, *, node: str, epoch: int | None,
                     source: str) -> Snapshot:
        """Store a verified SQLite file as a snapshot of ``txid``."""
        created = time.time()
        size = file.stat().st_size
        snap = Snapshot(snapshot_id(txid, created), txid, created, size, node, epoch, source)
        obs = await self._store()
        meta = ObjectMeta(name=snap.object_name, description=json.dumps(snap.as_dict()),
                          headers={"Pycluster-Txid": str(txid)},
                          options=ObjectMetaOptions(max_chunk_size=CHUNK))
        with open(file, "rb") as fh:  # noqa: ASYNC230 (read in an executor by obs.put)
            await obs.put(snap.object_name, fh, meta=meta)
        self.last = snap
        return snap

    async def download(self, snapshot_id: str, dest: str | Path, *, overwrite: bool = False,
                       verify: str | None = "quick") -> Path:
        """Write snapshot ``snapshot_id`` to ``dest`` (atomically: a temporary file renamed when
        complete and verified). An existing ``dest`` is refused unless ``overwrite``."""
        d = Path(dest).expanduser().absolute()
        if d.exists() and not overwrite:
            raise SQLiteError(f"{d} exists; pass overwrite=True (or --force) to replace it")
        snap = await self.get(snapshot_id)
        obs = await self._store()
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = d.with_name(f".{d.name}.download-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:  # noqa: ASYNC230 (written in an executor by obs.get)
                await obs.get(snap.object_name, writeinto=fh)
            if verify:
                await asyncio.to_thread(dbfile.verify, tmp, verify)
            dbfile.remove_with_sidecars(d)
            os.replace(tmp, d)
        finally:
            dbfile.remove_with_sidecars(tmp)
        return d

    async def delete(self, snapshot_id: str) -> None:
        """Remove one snapshot."""
        obs = await self._store()
        try:
            await obs.delete(f"{PREFIX}{snapshot_id}.db")
        except nats.js.errors.NotFoundError:
            raise SnapshotNotFoundError(self.bucket, snapshot_id) from None

    async def prune(self, retention: float, keep: int = 1) -> builtins.list[str]:
        """Delete snapshots older than ``retention`` seconds, always keeping the newest
        ``keep``; returns the ids removed."""
        snaps = await self.list()
        cutoff = time.time() - retention
        removed = []
        for snap in snaps[: max(0, len(snaps) - keep)]:
            if snap.created < cutoff:
                with contextlib.suppress(SnapshotNotFoundError):
                    await self.delete(snap.id)
                removed.append(snap.id)
        return removed


def _decode(name: str, description: str | None, size: int) -> Snapshot | None:
    try:
        d = json.loads(description or "{}")
        return Snapshot(str(d["id"]), int(d["txid"]), float(d["created"]), int(d.get("size", size)),
                        str(d.get("node", "")), d.get("epoch"), str(d.get("source", "")))
    except (ValueError, KeyError, TypeError):
        return None
