"""Lease records of the KV lease election: what a valid record is, and what a node saw.

Any client that may write the election bucket can forge a record, so a record is trusted only
after `parse_lease` validated it (see `pycluster.builtin.election.lease` for how invalid and
stale records are taken over).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ...kernel import natsutil as nu
from ...kernel.names import validate_ident

SUCCESSOR_HEADER = "Pycluster-Successor"
LEASE_MARK_HEADER = "Pycluster-Lease"
"""Header on every lease write: ``<incarnation>:<write-no>`` of the writing election."""


@dataclass
class LeaseRecord:
    """A validated lease record (see `parse_lease`)."""

    node: str
    epoch: int
    ttl: float
    inc: str | None
    write_no: int | None


def parse_lease(msg: nu.LastMsg, max_ttl: float) -> LeaseRecord | str:
    """Validate the live KV message of a lease key: the record, or why it is not one.

    A valid record has a ``Nats-TTL`` header and a JSON object body with ``node`` (a node
    id), ``epoch`` (None: the write's own revision, or an int ``1 <= epoch <= revision``) and
    ``ttl`` (a positive finite number); neither TTL may exceed ``max_ttl``.
    """
    header = msg.headers.get(nu.TTL_HEADER)
    header_ttl = nu.parse_ttl_header(header)
    if header_ttl is None:
        return "no Nats-TTL header" if header is None else f"bad Nats-TTL header {header[:32]!r}"
    try:
        body = json.loads(msg.data)
    except (ValueError, UnicodeDecodeError):
        return "the body is not JSON"
    if not isinstance(body, dict):
        return f"the body is a JSON {type(body).__name__}, not an object"
    node = body.get("node")
    try:
        validate_ident("node", node)
    except Exception:
        return f"node {str(node)[:70]!r} is not a node id"
    epoch = body.get("epoch")
    if epoch is None:
        epoch = msg.seq
    elif isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= msg.seq:
        return f"epoch {str(epoch)[:32]!r} is not an int in 1..{msg.seq} (its revision)"
    ttl = body.get("ttl")
    if (isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl)
            or ttl <= 0):
        return f"ttl {str(ttl)[:32]!r} is not a positive number"
    longest = max(float(ttl), header_ttl)
    if longest > max_ttl:
        return f"TTL {longest:g}s exceeds the cap of {max_ttl:g}s"
    inc, w = body.get("inc"), body.get("w")
    return LeaseRecord(str(node), epoch, longest, inc if isinstance(inc, str) else None,
                       w if isinstance(w, int) and not isinstance(w, bool) else None)


@dataclass
class Seen:
    """What this node saw on a key: a live message, since when (monotonic), how long it may
    stay unchanged before it is stale, and the holder it named (None: invalid record)."""

    seq: int
    since: float
    limit: float
    leader: str | None
    epoch: int | None
    inc: str | None = None  # the holder's incarnation (from a valid record)
