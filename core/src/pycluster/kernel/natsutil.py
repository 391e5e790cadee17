"""Low-level JetStream helpers shared by the election, membership, locks and app KV.

Facts these rely on (measured, see the design notes in docs/concepts.md):
- ``kv.update()``/``kv.put()`` drop a key's TTL, so leases are written by publishing to the key's
  subject with ``Nats-Expected-Last-Subject-Sequence`` (compare-and-set) and ``Nats-TTL``.
- With ``limit_marker_ttl`` an expired key leaves a marker message (``Nats-Marker-Reason``);
  ``kv.create()`` then fails, so a takeover is a conditional write against the marker's sequence.
- A conditional write is refused with err_code 10071 when the subject's last sequence differs,
  and on a replicated stream also with 10164 while another conditional write on the same subject
  is still being proposed (it cannot be decided yet). 10164 is retried with the same expectation
  for the rest of the caller's timeout: the competing write either lands (then the retry gets
  10071, a real conflict) or fails (then the retry succeeds).
- Direct gets are answered by any replica, also one that is behind (after a partition heals) or
  an isolated former stream leader. A *linearizable* read confirms what it read with a guard
  write (`confirm_read`): a replicated write that the stream accepts only if the key's last
  sequence is still the one read, so the value was current at a moment inside the read.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from .errors import PayloadTooLargeError

log = logging.getLogger("pycluster.natsutil")
T = TypeVar("T")

KV_OP = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
EXPECTED_LAST_SUBJECT_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
TTL_HEADER = "Nats-TTL"
WRONG_LAST_SEQUENCE = 10071
"""err_code: the subject's last sequence is not the expected one (a real conflict)."""
CAS_IN_FLIGHT = 10164
"""err_code: another conditional write on the subject is still in flight (R3 streams)."""
GUARD_KEY = "_pycluster.guard"
"""Reserved key that read guards are written to (`confirm_read`); never a user key."""
# Pause between attempts of a write refused with CAS_IN_FLIGHT (jittered, doubling).
_IN_FLIGHT_PAUSE = 0.001
_IN_FLIGHT_PAUSE_MAX = 0.01


STREAM_NOT_FOUND = 10059
"""err_code: the stream (a KV bucket's) does not exist (deleted, or a fresh server)."""


class CASConflict(Exception):
    """A compare-and-set write found a different last sequence on the subject."""


class StreamGoneError(nats.js.errors.NoStreamResponseError):
    """The stream behind a bucket does not exist (deleted while nodes run, or a fresh server).

    A subclass of ``NoStreamResponseError`` (what a publish to a subject no stream captures
    raises), so code that retries transient errors keeps doing so; code that can re-create the
    stream checks `stream_gone`.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(f"stream {stream} not found")
        self.stream = stream

    def __str__(self) -> str:
        return f"nats: stream {self.stream} not found"


def stream_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says that the stream may not exist: a publish nothing captured
    (``NoStreamResponseError``, also seen briefly while a new replicated stream elects its
    leader: callers re-create idempotently) or an API answer "stream not found"."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return True
    return isinstance(exc, nats.js.errors.NotFoundError) and exc.err_code == STREAM_NOT_FOUND


class Healer:
    """Re-creates a deleted stream (``ensure()``, idempotent), at most once per ``interval``.

    Example::

        healer = Healer("election prod_web_election", lambda: ensure_kv(js, bucket, ...))
        try:
            await cas_publish(...)
        except TRANSIENT_ERRORS as exc:
            if stream_gone(exc):
                await healer.heal()
    """

    def __init__(self, what: str, ensure: Callable[[], Awaitable[Any]], *,
                 interval: float = 1.0, timeout: float = 5.0) -> None:
        self.what = what
        self._ensure = ensure
        self.interval = interval
        self.timeout = timeout
        self._last = -math.inf
        self.healed = 0

    async def heal(self, timeout: float | None = None) -> bool:
        """Re-create the stream if it is missing; True when ``ensure()`` ran and succeeded.

        :param timeout: a shorter bound than the healer's own for this attempt (a lease holder
            passes the time its lease has left: healing must never delay its self-fence).
        """
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        limit = self.timeout if timeout is None else max(0.0, min(self.timeout, timeout))
        try:
            async with asyncio.timeout(limit):
                created = await self._ensure() is None
        except Exception as exc:
            log.warning("%s: re-creating the stream failed: %s", self.what, exc)
            return False
        if created:
            self.healed += 1
            log.warning("%s: the stream was missing (deleted?); re-created it", self.what)
        return True


def cas_error_code(exc: BaseException) -> int | None:
    """The JetStream err_code of a refused conditional write (10071 or 10164), else None."""
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.err_code
        if code in (WRONG_LAST_SEQUENCE, CAS_IN_FLIGHT):
            return int(code)
    return None


@dataclass
class LastMsg:
    """The last message stored on a KV subject."""

    seq: int
    data: bytes
    headers: dict[str, str]

    @property
    def tombstone(self) -> bool:
        """True for a delete, purge or server expiry marker (the key has no live value)."""
        h = self.headers
        return bool(h.get(MARKER_REASON)) or h.get(KV_OP) in ("DEL", "PURGE")


async def light_watch(
    js: JetStreamContext,
    subject: str,
    cb: Callable[[Any], Awaitable[None]],
    *,
    headers_only: bool = False,
    idle_heartbeat: float = 5.0,
) -> Any:
    """Watch new messages on ``subject``: an ephemeral push consumer (memory, no acks, no flow
    control) delivering to ``cb``; returns the subscription (``unsubscribe()`` to stop).

    Cheaper at rest than nats-py's ordered consumer, which polls for flow control four times a
    second per subscription (the largest cost of an idle node). It does not detect a gap or a
    consumer lost on the server by itself: callers notice silence their own way (membership:
    its own refreshes must come back; the election: its poll) and re-create it after a
    reconnect.
    """
    cfg = ConsumerConfig(
        deliver_policy=DeliverPolicy.NEW, ack_policy=AckPolicy.NONE, max_deliver=1,
        flow_control=False, headers_only=headers_only or None, mem_storage=True,
        num_replicas=1, inactive_threshold=max(30.0, 4 * idle_heartbeat),
    )
    return await js.subscribe(subject, cb=cb, config=cfg, idle_heartbeat=idle_heartbeat,
                              manual_ack=True)


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV key is stored on."""
    return f"$KV.{bucket}.{key}"


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def ttl_header(ttl: float) -> str:
    """Server TTLs are whole seconds, minimum 1; round up so the server never expires early."""
    return f"{max(1, math.ceil(ttl))}s"


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|µs|ns|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_ttl_header(value: str | None) -> float | None:
    """Seconds of a ``Nats-TTL`` header (``"10s"``, ``"1m30s"``, ``"5"``), None if absent or
    not a finite positive duration (``"never"`` included)."""
    if value is None:
        return None
    v = value.strip()
    if v.isdigit():
        seconds = float(v)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(v):
            if m.start() != pos:
                return None
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(v) or not v:
            return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


async def ensure_kv(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int = 1,
    marker_ttl: float | None = None,
    replicas: int = 1,
    max_value_size: int | None = None,
    memory: bool = False,
    wait: float = 30.0,
    first_seq: int | None = None,
) -> StreamInfo | None:
    """Create the bucket if it does not exist (idempotent; an existing bucket is kept as is).

    Returns the existing bucket's stream info, or None if it was created now. JetStream that is
    still electing its meta leader (a cluster starting up) answers with no responders or
    "unavailable": retried with back-off for up to ``wait`` seconds. ``first_seq`` (when
    re-creating a deleted bucket) starts its revisions above those seen before, so revisions
    used as fencing tokens keep increasing.
    """
    return await retry_transient(
        lambda: _ensure_kv_once(js, bucket, history=history, marker_ttl=marker_ttl,
                                replicas=replicas, max_value_size=max_value_size, memory=memory,
                                first_seq=first_seq),
        wait,
    )


async def _ensure_kv_once(
    js: JetStreamContext,
    bucket: str,
    *,
    history: int,
    marker_ttl: float | None,
    replicas: int,
    max_value_size: int | None,
    memory: bool,
    first_seq: int | None = None,
) -> StreamInfo | None:
    cfg = KeyValueConfig(
        bucket=bucket,
        history=history,
        replicas=replicas,
        limit_marker_ttl=marker_ttl,
        max_value_size=max_value_size,
        storage=StorageType.MEMORY if memory else None,
        direct=True,
    )

    async def create() -> Any:
        if not first_seq or first_seq <= 1:
            return await js.create_key_value(cfg)
        # The stream nats-py's create_key_value makes, plus a first sequence.
        return await js.add_stream(StreamConfig(
            name=kv_stream(bucket), subjects=[kv_subject(bucket, ">")], allow_direct=True,
            allow_rollup_hdrs=True, allow_msg_ttl=True, deny_delete=True,
            discard=DiscardPolicy.NEW, duplicate_window=120.0, max_consumers=-1, max_msgs=-1,
            max_msg_size=max_value_size, max_msgs_per_subject=history, num_replicas=replicas,
            storage=cfg.storage, subject_delete_marker_ttl=marker_ttl, first_seq=first_seq,
        ))

    info = await _ensure_stream_once(js, kv_stream(bucket), create)
    if info is None and replicas > 1:
        await wait_stream_leader(js, kv_stream(bucket))
    return info


async def ensure_stream(
    js: JetStreamContext,
    stream: str,
    create: Callable[[], Awaitable[Any]],
    wait: float = 30.0,
) -> StreamInfo | None:
    """The info of ``stream`` if it exists; otherwise call ``create()`` and return None.

    Idempotent across nodes (losing a creation race to another node is fine) and retried while
    JetStream answers with `TRANSIENT_ERRORS` (a cluster still electing), for up to ``wait`` s.
    ``create`` makes the stream (``js.add_stream``, ``js.create_key_value``, an object store).
    A stream created now is returned only once it has a leader: writes right after the
    creation of a replicated stream otherwise fail with "no response from stream".
    """
    info = await retry_transient(lambda: _ensure_stream_once(js, stream, create), wait)
    if info is None:
        await wait_stream_leader(js, stream, wait)
    return info


async def wait_stream_leader(js: JetStreamContext, stream: str, wait: float = 30.0) -> None:
    """Return once the just created ``stream`` has a leader (at once for a single server);
    bounded by ``wait``. Until its creation has reached the server asked, "stream not found"
    means "not yet"."""
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is None or info.cluster.leader:
                return
        except TRANSIENT_ERRORS:
            pass
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
        if time.monotonic() + delay > deadline:
            raise TimeoutError(f"stream {stream} has no leader after {wait:g}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


async def _ensure_stream_once(
    js: JetStreamContext, stream: str, create: Callable[[], Awaitable[Any]]
) -> StreamInfo | None:
    try:
        return await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        pass
    try:
        await create()
        return None
    except nats.js.errors.BadRequestError as exc:
        # Lost a creation race against another node: fine if it now exists.
        try:
            return await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise exc from None


async def last_msg(
    js: JetStreamContext, bucket: str, key: str, *, direct: bool = True
) -> LastMsg | None:
    """The last message on a key's subject (a value, a delete or a marker), or None.

    ``direct`` asks any replica (fast, possibly behind); otherwise the stream leader answers.
    Neither alone is linearizable on a replicated stream: see `confirm_read`.
    """
    stream, subject = kv_stream(bucket), kv_subject(bucket, key)
    try:
        try:
            raw = await js.get_last_msg(stream, subject, direct=direct)
        except nats.errors.NoRespondersError:
            if not direct:
                raise
            # A new replicated stream's direct-get responders may not be known to our server
            # yet: ask the stream leader through the API instead.
            raw = await js.get_last_msg(stream, subject, direct=False)
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise StreamGoneError(stream) from None
        return None
    headers = {k: str(v) for k, v in (raw.headers or {}).items()}
    return LastMsg(seq=raw.seq or 0, data=raw.data or b"", headers=headers)


async def retry_transient(
    fn: Callable[[], Awaitable[T]], wait: float = 30.0, first_delay: float = 0.05
) -> T:
    """Call ``fn`` until it succeeds, retrying `TRANSIENT_ERRORS` with back-off for ``wait`` s.

    For start-up steps: a NATS cluster that is still electing stream leaders answers with
    timeouts or no responders for a few seconds, and one whose meta leader has not heard from a
    (re)joined server yet refuses to place replicas with "peer offline".
    """
    delay = first_delay
    deadline = time.monotonic() + wait
    while True:
        try:
            return await fn()
        except Exception as exc:  # transient ones and a placement refused for an offline peer
            if not isinstance(exc, TRANSIENT_ERRORS) and not placement_offline(exc):
                raise
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


def placement_offline(exc: BaseException) -> bool:
    """True for JetStream refusing to place replicas because a peer is offline (err_code
    10005 with "offline" in its description): a passing state of a cluster whose servers are
    (re)joining, unlike a cluster with too few servers, which says no "offline"."""
    return (getattr(exc, "err_code", None) == 10005
            and "offline" in str(getattr(exc, "description", "") or ""))


async def live_msgs(js: JetStreamContext, bucket: str, prefix: str) -> dict[str, LastMsg]:
    """The last message of every live key under ``prefix`` (tombstones and markers skipped).

    Raises `StreamGoneError` when the bucket does not exist.
    """
    try:
        info = await js.stream_info(kv_stream(bucket),
                                    subjects_filter=kv_subject(bucket, prefix + ">"))
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            raise StreamGoneError(kv_stream(bucket)) from None
        raise
    out: dict[str, LastMsg] = {}
    base = len(kv_subject(bucket, ""))
    for subject in (info.state.subjects or {}):
        key = subject[base:]
        msg = await last_msg(js, bucket, key)
        if msg is not None and not msg.tombstone:
            out[key] = msg
    return out


async def live_values(js: JetStreamContext, bucket: str, prefix: str) -> dict[str, Any]:
    """JSON values of every live key under ``prefix`` (tombstones, markers and values that
    are not JSON skipped). A missing bucket raises ``NotFoundError`` (err_code 10059)."""
    import json

    try:
        msgs = await live_msgs(js, bucket, prefix)
    except StreamGoneError:
        raise nats.js.errors.NotFoundError(code=404, err_code=STREAM_NOT_FOUND,
                                           description="stream not found") from None
    out: dict[str, Any] = {}
    for key, msg in msgs.items():
        try:
            out[key] = json.loads(msg.data)
        except ValueError:
            continue
    return out


async def cas_publish(
    js: JetStreamContext,
    bucket: str,
    key: str,
    payload: bytes,
    *,
    expected_seq: int | None,
    ttl: float | None = None,
    timeout: float = 2.0,
    extra_headers: dict[str, str] | None = None,
    max_payload: int | None = None,
) -> int:
    """Write ``payload`` to a KV key if its last sequence is ``expected_seq`` (0: no message).

    Returns the new revision. Raises `CASConflict` when someone else wrote first (also when a
    competing conditional write was still in flight for the whole ``timeout``); NATS timeouts
    and connection errors propagate (the caller decides whether to retry).
    """
    if max_payload is not None and len(payload) > max_payload:
        raise PayloadTooLargeError(len(payload), max_payload, "value")
    headers: dict[str, str] = dict(extra_headers or {})
    if expected_seq is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_seq)
    if ttl is not None:
        headers[TTL_HEADER] = ttl_header(ttl)
    seq = await conditional_publish(js, kv_subject(bucket, key), payload, headers, timeout)
    if seq is None:
        raise CASConflict(f"{bucket}/{key}: last sequence is not {expected_seq}")
    return seq


async def conditional_publish(
    js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str], timeout: float
) -> int | None:
    """Publish with expectation headers; the stored sequence, or None if the stream refused.

    A refusal because a competing conditional write is still in flight (`CAS_IN_FLIGHT`) is
    retried with the same headers until ``timeout`` has passed: only the stream can tell
    whether the competitor lands. Timeouts and connection errors propagate.
    """
    deadline = time.monotonic() + timeout
    pause = _IN_FLIGHT_PAUSE
    while True:
        remaining = max(0.05, deadline - time.monotonic())
        try:
            ack = await js.publish(subject, payload, timeout=remaining, headers=headers or None)
            return int(ack.seq)
        except nats.js.errors.APIError as exc:
            code = cas_error_code(exc)
            if code is None:
                raise
            if code == WRONG_LAST_SEQUENCE or time.monotonic() + pause >= deadline:
                return None
        await asyncio.sleep(pause * (0.5 + random.random()))
        pause = min(pause * 2, _IN_FLIGHT_PAUSE_MAX)


async def confirm_read(
    js: JetStreamContext, bucket: str, key: str, seq: int, *, timeout: float = 2.0
) -> bool:
    """Confirm that ``seq`` is still the last sequence of ``key`` (0: no message) by a write.

    The guard is a replicated write of an empty message to `GUARD_KEY` that the stream leader
    accepts only while the key's last sequence is ``seq``
    (``Nats-Expected-Last-Subject-Sequence-Subject``). Accepted means a quorum agreed at a
    moment after this call started, so what was read is current: the read is linearizable.
    False means the key changed (re-read from the leader and confirm again). A side cut off
    from the quorum never gets a guard accepted: the call times out instead.
    ``key`` may be a pattern (``>``/``*``): then ``seq`` is the last sequence of all matching
    keys.
    """
    headers = {
        EXPECTED_LAST_SUBJECT_SEQ: str(seq),
        EXPECTED_LAST_SUBJECT_SEQ_SUBJECT: kv_subject(bucket, key),
    }
    guard = kv_subject(bucket, GUARD_KEY)
    return await conditional_publish(js, guard, b"", headers, timeout) is not None


async def cas_delete(
    js: JetStreamContext, bucket: str, key: str, *, expected_seq: int, timeout: float = 2.0,
    extra_headers: dict[str, str] | None = None,
) -> int:
    """Delete a key (a DEL tombstone) if its last sequence is ``expected_seq``."""
    headers = {KV_OP: "DEL", **(extra_headers or {})}
    return await cas_publish(
        js, bucket, key, b"", expected_seq=expected_seq, timeout=timeout, extra_headers=headers
    )


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
    ConnectionError,
    OSError,
)
"""Errors after which a write may be retried (nothing is known to have been applied)."""


async def flush(nc: Any, timeout: float = 10.0) -> None:
    """``nc.flush(timeout)`` that a cancellation of the caller cannot break.

    nats-py answers a PONG by setting the result of the oldest ping future; if that future was
    cancelled (the awaiting task was cancelled), the read loop raises ``InvalidStateError`` and
    the connection stops delivering messages while it still counts as connected. Shielded, the
    ping future lives until its PONG (or nats-py's own timeout) whatever happens to the caller.
    """
    await asyncio.shield(nc.flush(timeout=timeout))
