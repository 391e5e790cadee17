"""What the WAL bucket holds: Litestream's LTX files by level and TXID, and the writer record.

`WalIndex` keeps an in-memory view of the object store ``{platform}_{app}_wal`` from a watch
of its meta subjects (``$O.<bucket>.M.>``): name, level, TXID range, size, and Litestream's own
timestamp header of every LTX file. From it come the remote position, the lag of a replica
(age of the oldest LTX file it has not applied) and the latest Litestream snapshot.

The writer record (object ``pycluster/writer``, no content, the record in its description)
says which epoch last took the right to write the bucket. It is written with
compare-and-set (``Nats-Expected-Last-Subject-Sequence`` on its meta subject) by a new leader
before it catches up, and only when its epoch is newer; a replicating node watches it and
stops at once when a newer epoch appears (`FencedError`).

Under connection loss: a watch can go silent when its server dies, so the index is also
refreshed by polling (``refresh_interval``), re-created after reconnects, and the position used
for a promotion is read authoritatively (`head`: direct reads of the next LTX names) rather
than taken from the watch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StorageType

from pycluster.kernel import natsutil
from pycluster.kernel.aio import cancel_and_wait

from .errors import FencedError
from .litestream import SNAPSHOT_LEVEL, ltx_name, parse_ltx_name

log = logging.getLogger("pycluster.sqlite")

WRITER_OBJECT = "pycluster/writer"
FORGET_AFTER = 300.0  # seconds a deleted LTX file stays in the index (the janitor purges at 60)
_EMPTY_DIGEST = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(b"").digest()).decode()
TRANSIENT = (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
             nats.errors.NoRespondersError, nats.errors.ConnectionReconnectingError,
             nats.js.errors.ServiceUnavailableError, asyncio.TimeoutError, OSError)


def meta_subject(bucket: str, name: str) -> str:
    """The subject an object's meta message is stored on."""
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def stream_name(bucket: str) -> str:
    """The stream behind an object store."""
    return f"OBJ_{bucket}"


async def ensure_object_store(js: JetStreamContext, bucket: str, replicas: int = 1,
                              description: str = "") -> None:
    """Create the object store if it does not exist (an existing one is kept as is)."""
    from nats.js.api import ObjectStoreConfig

    cfg = ObjectStoreConfig(bucket=bucket, description=description or None, replicas=replicas,
                            storage=StorageType.FILE)
    await natsutil.ensure_stream(js, stream_name(bucket),
                                 lambda: js.create_object_store(bucket, cfg))


def _parse_time(value: Any) -> float | None:
    if not value:
        return None
    text = str(value[0] if isinstance(value, list) else value)
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class LtxEntry:
    """One LTX file in the bucket."""

    name: str
    level: int
    min_txid: int
    max_txid: int
    size: int
    created: float | None  # Litestream's timestamp header (UTC seconds), else the object mtime
    deleted: bool = False
    deleted_at: float = 0.0  # monotonic instant the index learned it was deleted
    nuid: str | None = None  # the object's chunk subject token (a delete marker keeps it)


@dataclass
class WriterRecord:
    """Who last took the right to write the bucket."""

    epoch: int
    node: str
    at: float
    seq: int = 0  # stream sequence of the record (for compare-and-set)

    def encode(self, bucket: str) -> bytes:
        """The object-store meta message of the record (an empty object)."""
        body = json.dumps({"epoch": self.epoch, "node": self.node, "at": self.at})
        meta = {
            "name": WRITER_OBJECT, "bucket": bucket, "nuid": os.urandom(11).hex(),
            "size": 0, "chunks": 0, "digest": _EMPTY_DIGEST,
            "mtime": dt.datetime.now(dt.UTC).isoformat(), "description": body,
            "headers": {"Pycluster-Epoch": [str(self.epoch)], "Pycluster-Node": [self.node]},
        }
        return json.dumps(meta).encode()

    @classmethod
    def decode(cls, data: bytes, seq: int) -> WriterRecord | None:
        """Parse a meta message (None for a deleted or foreign object)."""
        try:
            meta = json.loads(data)
            if meta.get("deleted"):
                return None
            body = json.loads(meta.get("description") or "{}")
            return cls(int(body["epoch"]), str(body.get("node", "")), float(body.get("at", 0)),
                       seq)
        except (ValueError, KeyError, TypeError):
            return None


class WalIndex:
    """The in-memory view of one WAL bucket (see the module docstring).

    :param js: a JetStream context.
    :param bucket: the object store name (``{platform}_{app}_wal``).
    :param refresh_interval: seconds between polls that catch what a silent watch missed.
    """

    def __init__(self, js: JetStreamContext, bucket: str, refresh_interval: float = 2.0) -> None:
        self.js = js
        self.bucket = bucket
        self.stream = stream_name(bucket)
        self.refresh_interval = refresh_interval
        self.entries: dict[str, LtxEntry] = {}
        self.writer: WriterRecord | None = None
        self.loaded = asyncio.Event()
        self._changed = asyncio.Event()
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._writer_listeners: list[Callable[[WriterRecord], None]] = []
        self._last_msg = 0.0
        self._floor = 0  # the highest TXID ever seen (entries may be purged later)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the bucket's current state and follow its changes."""
        if self._task is not None:
            return
        await self._subscribe()
        self._task = asyncio.create_task(self._refresher(), name=f"walindex:{self.bucket}")

    async def stop(self) -> None:
        """Stop watching."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._unsubscribe()

    async def reconnected(self) -> None:
        """Re-create the watch (a watch can go silent across a reconnect)."""
        await self._unsubscribe()
        with contextlib.suppress(*TRANSIENT, nats.js.errors.Error):
            await self._subscribe()

    async def _subscribe(self) -> None:
        async def on_msg(msg: Any) -> None:
            self._last_msg = time.monotonic()
            seq = msg.metadata.sequence.stream if msg.metadata else 0
            self._apply(msg.subject, msg.data, seq)
            if msg.metadata and msg.metadata.num_pending == 0:
                self.loaded.set()

        try:
            info = await self.js.stream_info(self.stream)
            empty = not info.state.messages
        except nats.js.errors.NotFoundError:
            empty = True
        # The stream is named: a mirror (a zone standby's copy) has no subjects to look up by.
        self._sub = await self.js.subscribe(
            f"$O.{self.bucket}.M.>", stream=self.stream, cb=on_msg, ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, idle_heartbeat=2.0,
        )
        if empty:
            self.loaded.set()

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                before = self.max_txid()
                await self.head()
                if self.max_txid() > before and time.monotonic() - self._last_msg > 2.0:
                    log.warning("wal index %s: the watch missed updates; re-creating it",
                                self.bucket)
                    await self.reconnected()
                rec = await self.read_writer()
                if rec is not None:
                    self._set_writer(rec)
                self.forget_deleted(FORGET_AFTER)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # transient: the next round retries
                log.debug("wal index %s: refresh failed: %s", self.bucket, exc)

    # -- applying meta messages --------------------------------------------------------------

    def _apply(self, subject: str, data: bytes, seq: int) -> None:
        try:
            name = base64.urlsafe_b64decode(subject.rsplit(".", 1)[-1]).decode()
        except (ValueError, UnicodeDecodeError):
            return
        if name == WRITER_OBJECT:
            rec = WriterRecord.decode(data, seq)
            if rec is not None:
                self._set_writer(rec)
            return
        parsed = parse_ltx_name(name)
        if parsed is None:
            return
        try:
            meta = json.loads(data)
        except ValueError:
            return
        level, lo, hi = parsed
        created = _parse_time((meta.get("headers") or {}).get("Litestream-Timestamp"))
        if created is None:
            created = _parse_time(meta.get("mtime"))
        old = self.entries.get(name)
        deleted = bool(meta.get("deleted"))
        deleted_at = 0.0
        if deleted:
            deleted_at = old.deleted_at if old is not None and old.deleted else time.monotonic()
            if old is not None and old.created is not None:
                created = old.created  # a delete marker carries no timestamp of its own
        nuid = meta.get("nuid")
        self.entries[name] = LtxEntry(name, level, lo, hi, int(meta.get("size") or 0), created,
                                      deleted, deleted_at,
                                      nuid if isinstance(nuid, str) and nuid else None)
        self._floor = max(self._floor, hi)
        self._changed.set()

    def _set_writer(self, rec: WriterRecord) -> None:
        old = self.writer
        if old is not None and rec.seq and old.seq and rec.seq < old.seq:
            return
        self.writer = rec
        if old is None or (rec.epoch, rec.node) != (old.epoch, old.node):
            for fn in list(self._writer_listeners):
                try:
                    fn(rec)
                except Exception:
                    log.exception("wal index %s: writer listener failed", self.bucket)

    # -- queries ------------------------------------------------------------------------------

    def max_txid(self, level: int | None = None) -> int:
        """The highest TXID known in the bucket (of one level, or of any)."""
        best = self._floor if level is None else 0
        for e in self.entries.values():
            if level is None or e.level == level:
                best = max(best, e.max_txid)
        return best

    def latest_snapshot(self) -> LtxEntry | None:
        """Litestream's newest snapshot (level 9) still in the bucket."""
        snaps = [e for e in self.entries.values() if e.level == SNAPSHOT_LEVEL and not e.deleted]
        return max(snaps, key=lambda e: e.max_txid, default=None)

    def has_data(self) -> bool:
        """Whether anything restorable is in the bucket."""
        return any(not e.deleted for e in self.entries.values())

    def oldest_after(self, txid: int) -> LtxEntry | None:
        """The earliest LTX file holding a transaction after ``txid`` (level 0 first)."""
        cands = [e for e in self.entries.values() if e.max_txid > txid]
        if not cands:
            return None
        return min(cands, key=lambda e: (e.min_txid, e.level))

    def lag(self, txid: int | None, now: float | None = None) -> float:
        """Seconds a copy at ``txid`` is behind the bucket: the age of the oldest LTX file it
        lacks (0.0 when it has everything the index knows)."""
        entry = self.oldest_after(txid or 0)
        if entry is None:
            return 0.0
        now = time.time() if now is None else now
        if entry.created is None:
            return 0.0
        return max(0.0, now - entry.created)

    async def wait_changed(self, timeout: float) -> None:
        """Wait until the index changes (or ``timeout`` passes)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def _get_meta(self, name: str) -> tuple[int, bytes] | None:
        try:
            raw = await self.js.get_last_msg(self.stream, meta_subject(self.bucket, name))
        except nats.js.errors.NotFoundError:
            return None
        return raw.seq or 0, raw.data or b""

    async def head(self, limit: int = 10_000) -> int:
        """The authoritative highest TXID of level 0: starts from what the index knows and reads
        the next LTX names directly until one is missing (level-0 files hold one TXID each)."""
        txid = self.max_txid()
        for _ in range(limit):
            nxt = txid + 1
            name = ltx_name(0, nxt, nxt)
            got = await self._get_meta(name)
            if got is None:
                break
            self._apply(meta_subject(self.bucket, name), got[1], got[0])
            txid = nxt
        return max(txid, self.max_txid())

    # -- the writer record ---------------------------------------------------------------------

    def on_writer(self, fn: Callable[[WriterRecord], None]) -> Callable[[], None]:
        """Call ``fn`` whenever the writer record changes; returns the function that stops it."""
        self._writer_listeners.append(fn)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._writer_listeners.remove(fn)

        return remove

    async def read_writer(self) -> WriterRecord | None:
        """The writer record as stored now."""
        got = await self._get_meta(WRITER_OBJECT)
        if got is None:
            return None
        return WriterRecord.decode(got[1], got[0])

    async def claim_writer(self, epoch: int, node: str, attempts: int = 10) -> WriterRecord:
        """Record ``epoch`` as the bucket's writer (compare-and-set), unless a newer epoch is
        recorded already (`FencedError`). Claiming the same epoch again is a no-op."""
        subject = meta_subject(self.bucket, WRITER_OBJECT)
        for _ in range(attempts):
            got = await self._get_meta(WRITER_OBJECT)
            current = WriterRecord.decode(got[1], got[0]) if got else None
            if current is not None:
                if current.epoch > epoch:
                    raise FencedError(self.bucket, epoch, current.epoch, current.node)
                if current.epoch == epoch and current.node == node:
                    self._set_writer(current)
                    return current
            rec = WriterRecord(epoch, node, time.time())
            try:
                ack = await self.js.publish(
                    subject, rec.encode(self.bucket), stream=self.stream,
                    headers={"Nats-Rollup": "sub",
                             "Nats-Expected-Last-Subject-Sequence": str(got[0] if got else 0)},
                )
            except nats.js.errors.BadRequestError as exc:
                if natsutil.cas_error_code(exc) is not None:
                    continue  # someone wrote in between (or is writing): read again
                raise
            rec.seq = ack.seq
            self._set_writer(rec)
            return rec
        raise FencedError(self.bucket, epoch, epoch, "unknown (record keeps changing)")

    # -- housekeeping --------------------------------------------------------------------------

    def forget_deleted(self, older_than: float) -> int:
        """Drop deleted LTX files from memory after ``older_than`` seconds (the highest TXID
        seen is kept); without this the index of a long-running standby grows without bound."""
        now = time.monotonic()
        gone = [n for n, e in self.entries.items() if e.deleted and now - e.deleted_at > older_than]
        for name in gone:
            del self.entries[name]
        return len(gone)

    async def purge_deleted(self, older_than: float = 60.0, batch: int = 5000,
                            chunks: bool = False) -> int:
        """Remove the meta markers of LTX files Litestream deleted more than ``older_than``
        seconds ago. Without this every LTX file ever written leaves a marker behind, and every
        follower poll (a full listing) grows without bound. Only the active node calls it (on
        the bucket it writes), and a zone standby's leader on its mirror with ``chunks=True``:
        a mirror does not copy the source's purges, so the deleted objects' chunks stay there
        until they are purged too."""
        now = time.monotonic()
        done = 0
        for e in list(self.entries.values()):
            if done >= batch:
                break
            if not e.deleted or now - e.deleted_at < older_than:
                continue
            if chunks and e.nuid:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.js.purge_stream(self.stream, subject=f"$O.{self.bucket}.C.{e.nuid}")
            try:
                await self.js.purge_stream(self.stream, subject=meta_subject(self.bucket, e.name))
            except nats.js.errors.NotFoundError:
                pass
            self.entries.pop(e.name, None)
            done += 1
        return done
