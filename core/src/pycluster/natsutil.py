"""Low-level JetStream helpers shared by the election, membership, locks and app KV.

Facts these rely on (measured, see the design notes in docs/concepts.md):
- ``kv.update()``/``kv.put()`` drop a key's TTL, so leases are written by publishing to the key's
  subject with ``Nats-Expected-Last-Subject-Sequence`` (compare-and-set) and ``Nats-TTL``.
- With ``limit_marker_ttl`` an expired key leaves a marker message (``Nats-Marker-Reason``);
  ``kv.create()`` then fails, so a takeover is a conditional write against the marker's sequence.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType

from .errors import PayloadTooLargeError

T = TypeVar("T")

KV_OP = "KV-Operation"
MARKER_REASON = "Nats-Marker-Reason"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
TTL_HEADER = "Nats-TTL"
WRONG_LAST_SEQUENCE = 10071


class CASConflict(Exception):
    """A compare-and-set write found a different last sequence on the subject."""


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


def kv_subject(bucket: str, key: str) -> str:
    """The subject a KV key is stored on."""
    return f"$KV.{bucket}.{key}"


def kv_stream(bucket: str) -> str:
    """The stream behind a KV bucket."""
    return f"KV_{bucket}"


def ttl_header(ttl: float) -> str:
    """Server TTLs are whole seconds, minimum 1; round up so the server never expires early."""
    return f"{max(1, math.ceil(ttl))}s"


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
) -> None:
    """Create the bucket if it does not exist (idempotent; an existing bucket is kept as is).

    JetStream that is still electing its meta leader (a cluster starting up) answers with no
    responders or "unavailable": retried with back-off for up to ``wait`` seconds.
    """
    await retry_transient(
        lambda: _ensure_kv_once(js, bucket, history=history, marker_ttl=marker_ttl,
                                replicas=replicas, max_value_size=max_value_size, memory=memory),
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
) -> None:
    try:
        await js.stream_info(kv_stream(bucket))
        return
    except nats.js.errors.NotFoundError:
        pass
    cfg = KeyValueConfig(
        bucket=bucket,
        history=history,
        replicas=replicas,
        limit_marker_ttl=marker_ttl,
        max_value_size=max_value_size,
        storage=StorageType.MEMORY if memory else None,
        direct=True,
    )
    try:
        await js.create_key_value(cfg)
    except nats.js.errors.BadRequestError as exc:
        # Lost a creation race against another node: fine if it now exists.
        try:
            await js.stream_info(kv_stream(bucket))
        except nats.js.errors.NotFoundError:
            raise exc from None


async def last_msg(js: JetStreamContext, bucket: str, key: str) -> LastMsg | None:
    """The last message on a key's subject (a value, a delete or a marker), or None."""
    stream, subject = kv_stream(bucket), kv_subject(bucket, key)
    try:
        try:
            raw = await js.get_last_msg(stream, subject, direct=True)
        except nats.errors.NoRespondersError:
            # A new replicated stream's direct-get responders may not be known to our server
            # yet: ask the stream leader through the API instead.
            raw = await js.get_last_msg(stream, subject, direct=False)
    except nats.js.errors.NotFoundError:
        return None
    headers = {k: str(v) for k, v in (raw.headers or {}).items()}
    return LastMsg(seq=raw.seq or 0, data=raw.data or b"", headers=headers)


async def retry_transient(
    fn: Callable[[], Awaitable[T]], wait: float = 30.0, first_delay: float = 0.05
) -> T:
    """Call ``fn`` until it succeeds, retrying `TRANSIENT_ERRORS` with back-off for ``wait`` s.

    For start-up steps: a NATS cluster that is still electing stream leaders answers with
    timeouts or no responders for a few seconds.
    """
    delay = first_delay
    deadline = time.monotonic() + wait
    while True:
        try:
            return await fn()
        except TRANSIENT_ERRORS:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def live_values(js: JetStreamContext, bucket: str, prefix: str) -> dict[str, Any]:
    """JSON values of every live key under ``prefix`` (tombstones and markers skipped)."""
    import json

    info = await js.stream_info(kv_stream(bucket), subjects_filter=kv_subject(bucket, prefix + ">"))
    out: dict[str, Any] = {}
    base = len(kv_subject(bucket, ""))
    for subject in (info.state.subjects or {}):
        key = subject[base:]
        msg = await last_msg(js, bucket, key)
        if msg is not None and not msg.tombstone:
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

    Returns the new revision. Raises `CASConflict` when someone else wrote first; NATS timeouts
    and connection errors propagate (the caller decides whether to retry).
    """
    if max_payload is not None and len(payload) > max_payload:
        raise PayloadTooLargeError(len(payload), max_payload, "value")
    headers: dict[str, str] = dict(extra_headers or {})
    if expected_seq is not None:
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(expected_seq)
    if ttl is not None:
        headers[TTL_HEADER] = ttl_header(ttl)
    try:
        ack = await js.publish(
            kv_subject(bucket, key), payload, timeout=timeout, headers=headers or None
        )
    except nats.js.errors.APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            raise CASConflict(str(exc)) from None
        raise
    return int(ack.seq)


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
