"""The app's own key/value data (``app.kv``): a NATS KV bucket ``{platform}_{app}``.

`AppKV` is a thin, typed layer over JetStream: every key and pattern is validated and every value
size checked *before* anything is sent, conditional writes raise pycluster's errors
(`KeyExistsError`, `RevisionMismatchError`), and reads treat deletes, purges and server expiry
markers alike as "no value". An `AppKV` only ever reads or writes its own bucket.

Consistency. On a replicated bucket (``stream_replicas`` > 1) reads are **linearizable** by
default: `AppKV.get`, `AppKV.get_entry` and `AppKV.keys` read (from any replica, then from the
stream leader after a miss) and confirm what they read with a guard write
(`pycluster.kernel.natsutil.confirm_read`) that the stream's quorum accepts only while the key
still has
the revision read. A read that cannot be confirmed raises `ReadNotConfirmedError` rather than
return a value that may be stale (a reader whose server is cut off from the majority, or a
stream electing its leader). ``stale_ok=True`` skips the guard: one round trip to any replica,
possibly behind. On a single-replica bucket every read is answered by the one copy and needs no
guard. Conditional writes (`create`, `update`, `delete(revision=)`, `transform`) are
compare-and-set on the key's last revision, which is what makes a read-modify-write safe against
a delayed write of a former lock holder; see ``docs/concepts.md`` (locks and fencing).

Behaviour under connection loss (kazoo style):

- Reads and writes are single JetStream requests. While NATS is unreachable they fail with the
  nats-py error (one of `pycluster.kernel.natsutil.TRANSIENT_ERRORS`); nothing is retried for you,
  because a write that timed out may or may not have been applied: re-read, then decide.
- A `KVWatcher` outlives disconnects. Its JetStream watcher is re-created after every reconnect
  and whenever a poll (every ``poll_interval``, default 0.5 s) finds the server-side consumer
  gone, stalled or behind; the new watcher replays the latest revision of every key and events
  already delivered are dropped by comparing revisions. So after an outage a watch delivers the
  *latest* state of each changed key exactly once, in revision order per key; intermediate values
  written during the outage may be skipped (KV watches are state-, not log-based).

Size: `AppKV` and `KVWatcher` share the key validation and read-confirmation logic; together
they are the whole app-data API, so they stay in one module.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from . import names, natsutil
from .aio import cancel_and_wait, supervise
from .errors import (
    InvalidNameError,
    KeyExistsError,
    PayloadTooLargeError,
    ReadNotConfirmedError,
    RevisionMismatchError,
)

if TYPE_CHECKING:
    from .locks import Lock

log = logging.getLogger(__name__)
T = TypeVar("T")

RESERVED_PREFIX = "_pycluster."
"""Keys under this prefix belong to pycluster (read guards); user keys may not use it."""

Op = Literal["PUT", "DEL", "PURGE", "EXPIRED"]

# Server marker reasons (nats-server 2.11+) and what a watcher reports for them.
_MARKER_OPS: dict[str, Op] = {"MaxAge": "EXPIRED", "Purge": "PURGE", "Remove": "DEL"}
# Ephemeral watch consumers left behind by a vanished client are removed after this long.
_WATCH_INACTIVE_THRESHOLD = 30.0
# A conditional create can lose to concurrent writers; after this many rounds it reports the
# key as existing (someone else keeps recreating it).
_CREATE_ATTEMPTS = 10
# `AppKV.transform` gives up with RevisionMismatchError after this many lost races.
_TRANSFORM_ATTEMPTS = 100

Value = bytes | str
Transform = Callable[[bytes | None], "Value | Awaitable[Value | None] | None"]


@dataclass(frozen=True)
class Entry:
    """A live value of a key: its bytes, the stream revision that wrote it, and when."""

    key: str
    value: bytes
    revision: int
    created: datetime | None


@dataclass(frozen=True)
class WatchEvent:
    """One change seen by a watch.

    ``op`` is ``"PUT"`` (``value`` holds the new bytes), ``"DEL"``, ``"PURGE"`` or ``"EXPIRED"``
    (a server expiry marker; only written when the bucket has ``limit_marker_ttl``); ``value`` is
    None for all but ``"PUT"``.
    """

    key: str
    value: bytes | None
    revision: int
    op: Op
    created: datetime | None = None


def check_key(key: object) -> str:
    """`names.validate_key`, plus: keys under `RESERVED_PREFIX` are pycluster's own."""
    names.validate_key(key)
    assert isinstance(key, str)
    if key.startswith(RESERVED_PREFIX):
        raise InvalidNameError("key", key, f"keys starting with {RESERVED_PREFIX!r} are reserved")
    return key


def to_bytes(value: object) -> bytes:
    """Values are bytes (or bytearray), or str encoded as UTF-8; anything else is a TypeError."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"KV values must be bytes or str, not {type(value).__name__}")


def parse_timestamp(raw: str | None) -> datetime | None:
    """Parse a ``Nats-Time-Stamp`` header (RFC 3339 with nanoseconds) to an aware datetime."""
    if not raw:
        return None
    text = raw.rstrip("Z")
    if "." in text:
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"  # datetime has microseconds, the server sends nanoseconds
    try:
        return datetime.fromisoformat(text).replace(tzinfo=UTC)
    except ValueError:
        return None


def headers_size(headers: dict[str, str]) -> int:
    """Bytes the NATS header block adds to a message (the server counts it in max_payload)."""
    if not headers:
        return 0
    return len("NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())


def op_of(headers: dict[str, str] | None) -> Op | None:
    """The KV operation a stored message stands for; None for an unknown server marker."""
    if not headers:
        return "PUT"
    op = headers.get(natsutil.KV_OP)
    if op == "DEL":
        return "DEL"
    if op == "PURGE":
        return "PURGE"
    reason = headers.get(natsutil.MARKER_REASON)
    if reason:
        return _MARKER_OPS.get(reason)
    return "PUT"


class AppKV:
    """Key/value data of one app, stored in the NATS KV bucket ``bucket``.

    Call `ensure` once (it creates the bucket or binds an existing one). Keys follow
    `pycluster.kernel.names.validate_key`; values are bytes or str.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        *,
        max_value_size: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._js = js
        self.bucket = bucket
        self.max_value_size = max_value_size
        self.timeout = timeout
        self._replicas: int | None = None  # the bucket's replica count, once known
        self._healer: natsutil.Healer | None = None  # set by ensure()
        # Confirmed reads per key: the one in flight and the one that queued callers share.
        self._reads: dict[str, _ReadBatch] = {}

    async def ensure(self, history: int = 1, replicas: int = 1) -> None:
        """Create the bucket if it is missing (idempotent; an existing bucket is kept as is).

        After it, an operation that finds the bucket deleted re-creates it (with the same
        settings) and is tried once more.
        """
        info = await natsutil.ensure_kv(
            self._js,
            self.bucket,
            history=history,
            replicas=replicas,
            max_value_size=self.max_value_size,
        )
        self._replicas = replicas if info is None else int(info.config.num_replicas or 1)
        self._healer = natsutil.Healer(
            f"kv {self.bucket}",
            lambda: natsutil.ensure_kv(self._js, self.bucket, history=history,
                                       replicas=replicas, max_value_size=self.max_value_size,
                                       wait=2.0),
            interval=0.2,
        )

    async def _healing(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run ``op``; if the bucket is gone, re-create it (once `ensure` ran) and retry once.
        Nothing was stored by the failed attempt: no stream captured it."""
        try:
            return await op()
        except Exception as exc:
            healer = self._healer
            if healer is None or not natsutil.stream_gone(exc) or not await healer.heal():
                raise
        return await op()

    async def _replication(self) -> int:
        """The bucket's replica count (read once: an existing bucket keeps its own)."""
        if self._replicas is None:
            info = await self._js.stream_info(natsutil.kv_stream(self.bucket))
            self._replicas = int(info.config.num_replicas or 1)
        return self._replicas

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, key: str, *, stale_ok: bool = False) -> bytes | None:
        """The key's value, or None if it is missing, deleted, purged or expired.

        Linearizable unless ``stale_ok`` (see the module docstring); raises
        `ReadNotConfirmedError` when the read cannot be confirmed within ``timeout``.
        """
        entry = await self.get_entry(key, stale_ok=stale_ok)
        return None if entry is None else entry.value

    async def get_entry(self, key: str, *, stale_ok: bool = False) -> Entry | None:
        """The key's live `Entry` (value, revision, created), or None as for `get`."""
        check_key(key)
        last = await self._healing(lambda: self._read(key, stale_ok))
        if last is None or last.tombstone:
            return None
        created = parse_timestamp(last.headers.get("Nats-Time-Stamp"))
        return Entry(key=key, value=last.data, revision=last.seq, created=created)

    async def _read(self, key: str, stale_ok: bool) -> natsutil.LastMsg | None:
        """The key's last message; confirmed by a guard write unless stale reads are fine.

        Concurrent confirmed reads of one key share work: a caller that arrives while a read is
        in flight waits for the *next* one, which starts after it arrived (so its answer is
        linearizable for every caller sharing it); all callers arriving meanwhile share that
        one. Guards of one key are decided one at a time by the stream, so this turns N
        concurrent readers into one guard per round instead of N contending ones.
        """
        if stale_ok or await self._replication() <= 1:
            return await natsutil.last_msg(self._js, self.bucket, key)
        batch = self._reads.get(key)
        if batch is None or batch.started:
            batch = _ReadBatch(batch)
            self._reads[key] = batch
            batch.task = asyncio.ensure_future(self._run_batch(key, batch))
        assert batch.task is not None
        return await asyncio.shield(batch.task)

    async def _run_batch(self, key: str, batch: _ReadBatch) -> natsutil.LastMsg | None:
        previous, batch.previous = batch.previous, None
        if previous is not None and previous.task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous.task)  # one confirmed read of a key at a time
        batch.started = True
        try:
            return await self._confirmed_read(key)
        finally:
            if self._reads.get(key) is batch:
                del self._reads[key]

    async def _confirmed_read(self, key: str) -> natsutil.LastMsg | None:
        deadline = time.monotonic() + self.timeout
        direct = True
        while True:
            try:
                last = await natsutil.last_msg(self._js, self.bucket, key, direct=direct)
                seq = 0 if last is None else last.seq
                remaining = deadline - time.monotonic()
                if remaining > 0 and await natsutil.confirm_read(
                    self._js, self.bucket, key, seq, timeout=remaining
                ):
                    return last
            except natsutil.TRANSIENT_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise ReadNotConfirmedError(self.bucket, key, self.timeout) from exc
                await asyncio.sleep(0.05)
            if time.monotonic() >= deadline:
                raise ReadNotConfirmedError(self.bucket, key, self.timeout)
            direct = False  # the replica that answered was behind: ask the stream leader

    async def keys(self, pattern: str = ">", *, stale_ok: bool = False) -> list[str]:
        """Sorted keys with a live value that match ``pattern`` (``*``/``>`` wildcards).

        Linearizable unless ``stale_ok``, like `get`: the listing is confirmed by a guard write
        against the last revision of every matching key (under many concurrent writes to
        matching keys it may take several attempts, bounded by ``timeout``).
        """
        names.validate_pattern(pattern)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                found, last_seq = await self._scan(pattern)
                if stale_ok or await self._replication() <= 1:
                    return found
                remaining = deadline - time.monotonic()
                if remaining > 0 and await natsutil.confirm_read(
                    self._js, self.bucket, pattern, last_seq, timeout=remaining
                ):
                    return found
            except natsutil.TRANSIENT_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise ReadNotConfirmedError(self.bucket, pattern, self.timeout) from exc
                await asyncio.sleep(0.05)
            if time.monotonic() >= deadline:
                raise ReadNotConfirmedError(self.bucket, pattern, self.timeout)

    async def _scan(self, pattern: str) -> tuple[list[str], int]:
        """Live user keys matching ``pattern`` and the highest revision of any matching
        message (deletes, markers and guards included: the guard checks against it)."""
        # An ordered consumer over the last message per subject, headers only. nats-py's own
        # watcher skips unknown server markers, which would hide the true last revision.
        done = asyncio.get_running_loop().create_future()
        live: dict[str, bool] = {}
        last_seq = 0
        prefix = len(natsutil.kv_subject(self.bucket, ""))

        async def on_msg(msg: Msg) -> None:
            nonlocal last_seq
            meta = msg.metadata
            last_seq = max(last_seq, int(meta.sequence.stream))
            key = msg.subject[prefix:]
            live[key] = op_of(dict(msg.headers or {})) == "PUT"
            if meta.num_pending == 0 and not done.done():
                done.set_result(None)

        sub: Any = await self._js.subscribe(
            natsutil.kv_subject(self.bucket, pattern),
            stream=natsutil.kv_stream(self.bucket),
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            headers_only=True,
            inactive_threshold=_WATCH_INACTIVE_THRESHOLD,
        )
        try:
            info = await sub.consumer_info()
            if int(info.num_pending or 0) > 0 or int(info.delivered.stream_seq or 0) > 0:
                async with asyncio.timeout(self.timeout):
                    await done
        finally:
            with contextlib.suppress(*natsutil.TRANSIENT_ERRORS, nats.errors.Error):
                await sub.unsubscribe()
        keys = sorted(k for k, ok in live.items() if ok and not k.startswith(RESERVED_PREFIX))
        return keys, last_seq

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes | str) -> int:
        """Write ``value`` unconditionally; return the new revision.

        Not fenced: under a lock use `update` or `transform`, so that a delayed write of a
        former holder cannot land on top of a later one.
        """
        check_key(key)
        data = self._checked(value, {})
        ack = await self._healing(lambda: self._js.publish(
            natsutil.kv_subject(self.bucket, key), data, timeout=self.timeout
        ))
        return int(ack.seq)

    async def create(self, key: str, value: bytes | str) -> int:
        """Write ``value`` only if the key has no live value; return the new revision.

        Raises `KeyExistsError` if it has one. A deleted, purged or expired key can be created
        again (the write is made conditional on the tombstone's revision).
        """
        check_key(key)
        # Size check against the longest expected-sequence header a retry could carry.
        data = self._checked(value, {natsutil.EXPECTED_LAST_SUBJECT_SEQ: "9" * 20})
        expected = 0
        for _ in range(_CREATE_ATTEMPTS):
            try:
                return await self._cas(key, data, expected)
            except natsutil.CASConflict:
                pass
            last = await natsutil.last_msg(self._js, self.bucket, key)
            if last is not None and not last.tombstone:
                break
            # Missing (purged away meanwhile) or a tombstone/marker: retry against it.
            expected = 0 if last is None else last.seq
        raise KeyExistsError(self.bucket, key)

    async def update(
        self, key: str, value: bytes | str, revision: int, *, lock: Lock | None = None
    ) -> int:
        """Write ``value`` only if the key's last revision is ``revision``; return the new one.

        Raises `RevisionMismatchError` if the key changed (or was deleted) since. With ``lock``
        the write is refused with `LockLostError` once that lock is no longer held.
        """
        check_key(key)
        data = self._checked(value, {natsutil.EXPECTED_LAST_SUBJECT_SEQ: str(revision)})
        if lock is not None:
            lock.check()
        try:
            return await self._cas(key, data, revision)
        except natsutil.CASConflict:
            raise RevisionMismatchError(self.bucket, key, revision) from None

    async def delete(self, key: str, revision: int | None = None) -> int:
        """Delete the key (a DEL tombstone); return the tombstone's revision.

        With ``revision`` the delete is conditional and raises `RevisionMismatchError` if the
        key's last revision differs. Deleting a missing key is not an error.
        """
        check_key(key)
        try:
            if revision is None:
                return await self._healing(lambda: natsutil.cas_publish(
                    self._js,
                    self.bucket,
                    key,
                    b"",
                    expected_seq=None,
                    timeout=self.timeout,
                    extra_headers={natsutil.KV_OP: "DEL"},
                ))
            return await natsutil.cas_delete(
                self._js, self.bucket, key, expected_seq=revision, timeout=self.timeout
            )
        except natsutil.CASConflict:
            raise RevisionMismatchError(self.bucket, key, revision or 0) from None

    async def transform(
        self,
        key: str,
        fn: Transform,
        *,
        lock: Lock | None = None,
        attempts: int = _TRANSFORM_ATTEMPTS,
    ) -> Entry | None:
        """Atomically replace the key's value with ``fn(old)`` (old: bytes, or None if absent).

        A read-modify-write as one compare-and-set: read the last revision, compute, write only
        if the key still has that revision, else read again and call ``fn`` again (so ``fn`` may
        run several times and must have no side effects). ``fn`` may be async; returning None
        deletes the key. With ``lock`` each write is refused with `LockLostError` once the lock
        is no longer held. Returns the new `Entry` (None after a delete). Raises
        `RevisionMismatchError` after ``attempts`` lost races.

        No write of a former lock holder can be lost or land on top of a later one: a delayed
        write carries the revision its writer read, which no longer matches.
        """
        check_key(key)
        direct = True
        for _ in range(max(1, attempts)):
            # A replica's answer is enough here: a stale read only makes the write's
            # compare-and-set fail, and the next read asks the stream leader.
            last = await natsutil.last_msg(self._js, self.bucket, key, direct=direct)
            old = None if last is None or last.tombstone else last.data
            new = fn(old)
            if inspect.isawaitable(new):
                new = await new
            expected = 0 if last is None else last.seq
            headers = {natsutil.EXPECTED_LAST_SUBJECT_SEQ: str(expected)}
            data = None if new is None else self._checked(new, headers)
            if lock is not None:
                lock.check()
            try:
                if data is None:
                    if old is None:
                        return None  # nothing to delete
                    await natsutil.cas_delete(
                        self._js, self.bucket, key, expected_seq=expected, timeout=self.timeout
                    )
                    return None
                revision = await self._cas(key, data, expected)
                return Entry(key=key, value=data, revision=revision, created=None)
            except natsutil.CASConflict:
                direct = False
        raise RevisionMismatchError(self.bucket, key, 0)

    # -- watch ---------------------------------------------------------------------------------

    def watch(
        self, pattern: str = ">", *, initial: bool = True, poll_interval: float = 0.5
    ) -> KVWatcher:
        """Watch keys matching ``pattern``: an async iterator (and context manager) of events.

        With ``initial`` the current value of every matching key is delivered first (as PUTs),
        as NATS KV watchers do; otherwise only changes after the start. Use it as
        ``async with kv.watch("cfg.>") as w: async for ev in w: ...`` so the watcher stops on
        exit (or call `KVWatcher.stop`). See the module docstring for behaviour on reconnects.
        """
        names.validate_pattern(pattern)
        return KVWatcher(
            self._js, self.bucket, pattern, initial=initial, poll_interval=poll_interval
        )

    # -- helpers -------------------------------------------------------------------------------

    def _checked(self, value: bytes | str, headers: dict[str, str]) -> bytes:
        data = to_bytes(value)
        limit = self._limit(headers)
        if limit is not None and len(data) > limit:
            raise PayloadTooLargeError(len(data), limit, "value")
        return data

    def _limit(self, headers: dict[str, str]) -> int | None:
        nc = getattr(self._js, "_nc", None)  # nats-py keeps the connection private
        server_max = getattr(nc, "max_payload", None)
        limits: list[int] = []
        if isinstance(server_max, int) and server_max > 0:
            # The server counts headers in max_payload and *disconnects* a client that exceeds
            # it, so the value must leave room for the headers this write carries.
            limits.append(server_max - headers_size(headers))
        if self.max_value_size is not None:
            limits.append(self.max_value_size)
        return min(limits) if limits else None

    async def _cas(self, key: str, data: bytes, expected: int) -> int:
        return await self._healing(lambda: natsutil.cas_publish(
            self._js, self.bucket, key, data, expected_seq=expected, timeout=self.timeout
        ))


class _ReadBatch:
    """One confirmed read of a key, shared by the callers that arrived before it started."""

    def __init__(self, previous: _ReadBatch | None) -> None:
        self.previous = previous
        self.started = False
        self.task: asyncio.Future[natsutil.LastMsg | None] | None = None


class KVWatcher:
    """Events for the keys of one bucket matching a pattern (see `AppKV.watch`).

    Deduplicates by revision, so re-creating the underlying JetStream watcher (after a
    reconnect, or when a poll finds it silent) never repeats an event. Events are buffered
    without bound until read.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        pattern: str,
        *,
        initial: bool = True,
        poll_interval: float = 0.5,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._js = js
        self.bucket = bucket
        self.pattern = pattern
        self.initial = initial
        self.poll_interval = poll_interval
        self._stream = natsutil.kv_stream(bucket)
        self._prefix = natsutil.kv_subject(bucket, "")
        self._queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        self._revs: dict[str, int] = {}  # last revision seen per key
        self._start_seq: int | None = None  # stream's last sequence when the watch started
        self._sub: Any = None  # nats-py PushSubscription of the current watcher
        self._gen = 0  # generation of the current watcher; stale callbacks are ignored
        self._processed = 0  # stream sequence of the last message the current watcher handled
        self._stall: tuple[int, int] | None = None  # (processed, pending) seen by the last poll
        self._reconnects = 0
        self._poller: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self.recreations = 0
        """How often the underlying watcher was re-created (visible for tests and metrics)."""

    async def start(self) -> KVWatcher:
        """Start watching (idempotent). Only non-transient errors (e.g. no bucket) raise."""
        if self._started:
            return self
        self._started = True
        self._reconnects = self._reconnect_count()
        try:
            await self._create()
        except natsutil.TRANSIENT_ERRORS as exc:
            log.info("watch %s/%s: starting later (%s)", self.bucket, self.pattern, exc)
        self._poller = supervise(f"kv-watch:{self.bucket}", self._poll_loop)
        return self

    async def stop(self) -> None:
        """Stop watching; a pending iteration ends with StopAsyncIteration."""
        if self._stopped:
            return
        self._stopped = True
        if self._poller is not None:
            await cancel_and_wait(self._poller)
        await self._drop_sub()
        self._queue.put_nowait(None)

    async def __aenter__(self) -> KVWatcher:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        if not self._started:
            await self.start()
        if self._stopped and self._queue.empty():
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # keep later calls ending too
            raise StopAsyncIteration
        return event

    async def next(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event, or None if none arrives within ``timeout`` seconds."""
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with the result, leaving the caller's task uncancellable.
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except TimeoutError:
            return None

    # -- internals -----------------------------------------------------------------------------

    def _reconnect_count(self) -> int:
        nc = getattr(self._js, "_nc", None)
        stats = getattr(nc, "stats", None)
        return int(stats.get("reconnects", 0)) if isinstance(stats, dict) else 0

    async def _create(self) -> None:
        if self._start_seq is None:
            info = await self._js.stream_info(self._stream)
            self._start_seq = int(info.state.last_seq)
        self._gen += 1
        gen = self._gen
        self._processed = 0
        self._stall = None

        async def on_msg(msg: Msg) -> None:
            if gen == self._gen:
                self._on_msg(msg)

        # Ordered consumer starting at the latest revision of each key: on (re-)creation it
        # replays the current state, which the revision map turns into only the missed changes.
        self._sub = await self._js.subscribe(
            natsutil.kv_subject(self.bucket, self.pattern),
            stream=self._stream,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=_WATCH_INACTIVE_THRESHOLD,
        )

    def _on_msg(self, msg: Msg) -> None:
        try:
            meta = msg.metadata
        except nats.errors.Error:
            return
        seq = int(meta.sequence.stream)
        self._processed = max(self._processed, seq)
        op = op_of(dict(msg.headers or {}))
        if op is None:
            return
        key = msg.subject[len(self._prefix) :]
        if key.startswith(RESERVED_PREFIX):
            return  # read guards, not user data
        known = self._revs.get(key)
        if known is not None and seq <= known:
            return  # already delivered (a re-created watcher replays the latest revisions)
        self._revs[key] = seq
        in_snapshot = known is None and self._start_seq is not None and seq <= self._start_seq
        if in_snapshot and (not self.initial or op != "PUT"):
            return  # state before the watch started: only live values, and only if asked
        value = msg.data if op == "PUT" else None
        self._queue.put_nowait(WatchEvent(key, value, seq, op, meta.timestamp))

    async def _drop_sub(self) -> None:
        sub, self._sub = self._sub, None
        self._gen += 1
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _recreate(self, why: str) -> None:
        log.debug("watch %s/%s: re-creating watcher (%s)", self.bucket, self.pattern, why)
        await self._drop_sub()
        await self._create()
        self.recreations += 1

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self._poll_once()
            except natsutil.TRANSIENT_ERRORS as exc:
                log.debug("watch %s/%s: poll failed: %s", self.bucket, self.pattern, exc)
            except Exception as exc:  # keep polling: this loop is the watch's safety net
                log.warning("watch %s/%s: poll failed: %r", self.bucket, self.pattern, exc)

    async def _poll_once(self) -> None:
        nc = getattr(self._js, "_nc", None)
        if nc is not None and not nc.is_connected:
            return  # nothing to do until the client is back; the reconnect count will tell
        reconnects = self._reconnect_count()
        if self._sub is None or reconnects != self._reconnects:
            self._reconnects = reconnects
            await self._recreate("reconnected" if self._sub is not None else "not running")
            return
        try:
            async with asyncio.timeout(max(1.0, 4 * self.poll_interval)):
                info = await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            await self._recreate("consumer gone")
            return
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        pending = int(info.num_pending or 0)
        if pending == 0 and delivered <= self._processed:
            self._stall = None
            return
        # Behind: fine while it makes progress; silent for a whole poll interval: re-create.
        state = (self._processed, pending)
        if self._stall == state:
            await self._recreate(f"stalled (pending={pending}, delivered={delivered})")
        else:
            self._stall = state
