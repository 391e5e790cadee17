"""The RPC wire protocol: subjects, headers, error codes and their encoding.

Shared by both sides of a call (see `pycluster.builtin.rpc.service` for the behaviour).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ...kernel.errors import ConfigError, RemoteError
from ...kernel.names import validate_ident

if TYPE_CHECKING:
    from ...middleware import Call

# -- protocol constants ------------------------------------------------------------------------

# One compact request header, "<request id> <timeout s> <source node> [<source app>]": every
# header costs parsing time in nats-py on both sides (per character of its name, in Python), so
# the call's metadata travels together and the two per-message headers have short names.
H_CALL = "Pc-Call"
H_CALL_OLD = "Pycluster-Call"  # still accepted from older callers
H_NODE = "Pc-Node"
H_ERROR = "Pycluster-Error"
# The call's metadata travels in the request's reply subject instead of a header, so the hot
# path carries no headers at all (nats-py builds and parses headers in Python, which costs
# about as much as the rest of a call): "<inbox>.<REPLY_MARK>.<request id>.<cancel token>.
# <timeout ms>.<source node>.<source app or NO_APP>". A header (H_CALL), when present, wins.
REPLY_MARK = "pcr1"
NO_APP = "-"  # never a valid app name (names start with a letter or digit)
# The largest timeout a request may announce (a year, in ms): a bigger one is clamped.
MAX_TIMEOUT_MS = 365 * 86400 * 1000
H_LEADER = "Pycluster-Leader"

LEADER_TARGET = "_leader"

HANDLER_ERROR = "handler_error"
UNKNOWN_METHOD = "unknown_method"
BAD_REQUEST = "bad_request"
INVALID_REQUEST = "invalid_request"
NOT_LEADER = "not_leader"
REPLY_TOO_LARGE = "reply_too_large"
BAD_REPLY = "bad_reply"
DEADLINE_EXCEEDED = "deadline_exceeded"
CANCELLED = "cancelled"
OVERLOADED = "overloaded"

DEFAULT_MAX_INFLIGHT = 256
# Pending limits of a serving subscription: enough to absorb bursts of max_inflight-sized
# waves, small enough that a flood is dropped here (cheaply, counted) rather than queued.
PENDING_MSGS_PER_INFLIGHT = 8
PENDING_MSGS_MIN = 1024
PENDING_BYTES_MIN = 64 * 1024 * 1024
# Pending limits of the cancel subscription (tiny messages).
CANCEL_PENDING_MSGS = 4096
CANCEL_PENDING_BYTES = 4 * 1024 * 1024
# At most one warning per this many seconds per app/kind about refused or dropped requests.
WARN_EVERY = 10.0

# Header bytes reserved when checking a request against the server's max_payload.
HEADER_SLACK = 512
# Bound of the per-name caches below (names come from callers).
CACHE_MAX = 4096
_valid_methods: set[str] = set()


def check_method(method: str) -> str:
    """Validate a method name (`validate_ident`), remembering names already seen valid: the
    check runs once per distinct name, not on every call."""
    if method not in _valid_methods:
        validate_ident("method", method)
        if len(_valid_methods) >= CACHE_MAX:
            _valid_methods.clear()
        _valid_methods.add(method)
    return method


_RUNNING_ROLES = frozenset({"passive", "active", "activating", "deactivating"})


def check_timeout(timeout: float) -> float:
    """Validate a call timeout (seconds, positive and finite)."""
    if not isinstance(timeout, int | float) or not 0 < timeout < 86400 * 365:
        raise ConfigError("timeout", timeout, "must be a positive number of seconds")
    return float(timeout)



class CallMeta:
    """What a request says about its call: cancel key (``<request id>/<cancel token>``, or the
    bare request id of an older caller), the remaining timeout in seconds (None: unknown), the
    source node and app, and whether the caller reads framed replies (`frame_reply`)."""

    __slots__ = ("framed", "key", "source_app", "source_node", "timeout")

    def __init__(self, key: str, timeout: float | None, source_node: str | None,
                 source_app: str | None, framed: bool) -> None:
        self.key = key
        self.timeout = timeout
        self.source_node = source_node
        self.source_app = source_app
        self.framed = framed

    @property
    def request_id(self) -> str:
        """The request id (the cancel token stays private)."""
        return self.key.partition("/")[0]


def reply_subject_meta(reply: str) -> CallMeta | None:
    """The metadata a caller put in the request's reply subject, or None when there is none
    (a caller that sent a header, or not pycluster at all). A subject that only looks like one
    is ignored rather than refused: the request is then served as one without metadata."""
    parts = reply.rsplit(".", 6)
    if len(parts) != 7 or parts[1] != REPLY_MARK:
        return None
    _, _, rid, token, ms, node, app = parts
    if not ms.isdigit() or len(ms) > 15:
        return None
    return CallMeta(f"{rid}/{token}", min(int(ms), MAX_TIMEOUT_MS) / 1000.0, node,
                    None if app == NO_APP else app, True)


def header_meta(value: str) -> CallMeta:
    """The metadata of an ``H_CALL`` header, ``"<key> <timeout s> <source node> [<source
    app>]"``; `Reject` (bad_request) when malformed."""
    parts = value.split(" ")
    try:
        timeout = max(0.0, float(parts[1]))
        if not timeout < MAX_TIMEOUT_MS:  # also NaN and inf
            timeout = MAX_TIMEOUT_MS / 1000.0
        return CallMeta(parts[0], timeout, parts[2], parts[3] if len(parts) > 3 else None, False)
    except (IndexError, ValueError):
        raise Reject(BAD_REQUEST, "ValueError", f"bad {H_CALL} header {value[:64]!r}") from None


def node_frame(node: str) -> bytes:
    """The head of the framed replies of ``node`` (see `frame_reply`)."""
    b = node.encode()
    return bytes((len(b),)) + b


_CT_FRAMES: dict[str | None, bytes] = {None: b"\x00"}


def frame_reply(head: bytes, content_type: str | None, body: bytes) -> bytes:
    """A success reply to a caller that sent its metadata in the reply subject: no headers;
    the body is prefixed by the answering node (``head``, from `node_frame`) and the content
    type, each as one length byte and its bytes (an empty content type: the raw-bytes
    default)."""
    ct = _CT_FRAMES.get(content_type)
    if ct is None:
        b = content_type.encode()[:255] if content_type else b""
        ct = bytes((len(b),)) + b
        if len(_CT_FRAMES) < CACHE_MAX:
            _CT_FRAMES[content_type] = ct
    return head + ct + body


_NODES: dict[bytes, str] = {}


def unframe_reply(data: bytes) -> tuple[str, str | None, bytes]:
    """``(node, content type or None, body)`` of a framed reply; ValueError when malformed."""
    n = data[0] if data else 0
    if not n or len(data) < n + 2:
        raise ValueError("truncated reply frame")
    raw = data[1:n + 1]
    node = _NODES.get(raw)
    if node is None:
        node = raw.decode()  # UnicodeDecodeError is a ValueError
        if len(_NODES) >= CACHE_MAX:
            _NODES.clear()
        _NODES[raw] = node
    m = data[n + 1]
    end = n + 2 + m
    if len(data) < end:
        raise ValueError("truncated reply frame")
    ct = data[n + 2:end].decode() if m else None
    return node, ct, data[end:]


class Reject(Exception):
    """A request refused by the server side before or instead of the handler."""

    def __init__(self, code: str, type_: str, message: str, details: Any = None) -> None:
        self.code = code
        self.type = type_
        self.message = message
        self.details = details
        super().__init__(message)



def running_nodes(members: dict[str, dict[str, Any]], app: str) -> list[str]:
    """Nodes whose membership record says they run ``app`` (sorted)."""
    out = []
    for node, rec in members.items():
        a = (rec.get("apps") or {}).get(app)
        if a and a.get("eligible") and a.get("role") in _RUNNING_ROLES:
            out.append(node)
    return sorted(out)


def remote_error(call: Call, code: str, data: bytes) -> RemoteError:
    """The `RemoteError` of an error reply (``code`` from its header, the JSON body)."""
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError
    except ValueError:
        body = {"type": "RemoteError", "message": data[:200].decode("utf-8", "replace")}
    return RemoteError(
        call.app, call.method, str(body.get("type") or "RemoteError"),
        str(body.get("message") or ""), code, call.node, body.get("details"),
    )
