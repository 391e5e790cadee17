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
H_LEADER = "Pycluster-Leader"

LEADER_TARGET = "_leader"

HANDLER_ERROR = "handler_error"
UNKNOWN_METHOD = "unknown_method"
BAD_REQUEST = "bad_request"
INVALID_REQUEST = "invalid_request"
NOT_LEADER = "not_leader"
REPLY_TOO_LARGE = "reply_too_large"
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
