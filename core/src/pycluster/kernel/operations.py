"""The operator's state of a platform, shared in NATS, and node labels' validation.

`Operations` (maintenance mode, cordoned nodes, operators' moves in maintenance mode) is one
JSON object in the platform bucket under `OPS_KEY`, written by compare-and-set
(`update_operations`) by any node or the CLI and read by every node's placement
(`pycluster.kernel.placement`). A stored value of the wrong shape counts as the default state:
anyone who may write the bucket could have put it there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from nats.js import JetStreamContext

from . import natsutil as nu
from .errors import ConfigError

log = logging.getLogger("pycluster.placement")

OPS_KEY = "placement.ops"
"""The key of the operations state (`Operations`) in the ``{platform}_platform`` bucket."""
_LABEL_KEY = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")
MAX_LABEL_VALUE = 253
MAX_LABELS = 256


def validate_label(key: Any, value: Any) -> None:
    """Refuse a label that is not ``key=value`` of the accepted shape (`ConfigError`).

    A key is 1-63 characters of letters, digits, ``.``, ``_``, ``/`` and ``-``, starting and
    ending with a letter or digit; a value is a string of at most `MAX_LABEL_VALUE` printable
    characters (possibly empty).
    """
    if not isinstance(key, str) or not _LABEL_KEY.match(key):
        raise ConfigError("label", str(key)[:64], "a label key is 1-63 letters, digits, '.', "
                          "'_', '/' or '-', starting and ending with a letter or digit")
    if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE or not value.isprintable():
        raise ConfigError(f"label {key}", str(value)[:64],
                          f"a label value is a string of at most {MAX_LABEL_VALUE} printable "
                          "characters")


def merge_labels(labels: Mapping[str, str], changes: Mapping[str, str | None]) -> dict[str, str]:
    """``labels`` with ``changes`` applied (a None value removes the key), validated."""
    out = dict(labels)
    for key, value in changes.items():
        if value is None:
            validate_label(key, "")
            out.pop(key, None)
        else:
            validate_label(key, value)
            out[key] = value
    if len(out) > MAX_LABELS:
        raise ConfigError("labels", len(out), f"at most {MAX_LABELS} labels")
    return out


@dataclass(frozen=True)
class Operations:
    """The operator's state of a platform (maintenance mode, cordoned nodes), shared in NATS.

    :ivar maintenance: platform-wide maintenance mode (no automatic failover for any app).
    :ivar maintenance_apps: apps in maintenance mode on their own.
    :ivar cordoned: cordoned node ids -> ``{"at": wall time, "by": who}``.
    :ivar operator_moves: app -> the node an operator moves it to while it is in maintenance
        mode (that node alone may campaign for it; removed once it leads, and when
        maintenance ends).
    """

    maintenance: bool = False
    maintenance_apps: frozenset[str] = frozenset()
    cordoned: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    operator_moves: Mapping[str, str] = field(default_factory=dict)

    def in_maintenance(self, app: str) -> bool:
        """Whether automation is paused for ``app`` (platform-wide or for it alone)."""
        return self.maintenance or app in self.maintenance_apps

    def may_campaign(self, app: str, node: str) -> bool:
        """Whether ``node`` may campaign for ``app`` as far as maintenance mode goes: not in
        maintenance, or named by an operator's move (`operator_moves`)."""
        return not self.in_maintenance(app) or self.operator_moves.get(app) == node

    def without_stale_moves(self) -> Operations:
        """This state without operator moves of apps no longer in maintenance mode."""
        return replace(self, operator_moves={a: n for a, n in self.operator_moves.items()
                                             if self.in_maintenance(a)})

    def as_dict(self) -> dict[str, Any]:
        """The JSON object stored under `OPS_KEY` (and shown by the CLI)."""
        return {"maintenance": self.maintenance,
                "maintenance_apps": sorted(self.maintenance_apps),
                "cordoned": {n: dict(v) for n, v in sorted(self.cordoned.items())},
                "operator_moves": dict(sorted(self.operator_moves.items()))}

    @classmethod
    def parse(cls, data: bytes) -> Operations:
        """Read a stored value; `ValueError` saying why for one of the wrong shape."""
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        maint = body.get("maintenance", False)
        apps = body.get("maintenance_apps", [])
        cordoned = body.get("cordoned", {})
        moves = body.get("operator_moves", {})
        if not isinstance(maint, bool):
            raise ValueError("maintenance is not a boolean")
        if not isinstance(apps, list) or not all(isinstance(a, str) for a in apps):
            raise ValueError("maintenance_apps is not a list of app names")
        if not isinstance(cordoned, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in cordoned.items()):
            raise ValueError("cordoned is not a mapping of node ids to objects")
        if not isinstance(moves, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in moves.items()):
            raise ValueError("operator_moves is not a mapping of app names to node ids")
        return cls(maint, frozenset(apps), dict(cordoned), dict(moves))


async def read_operations(js: JetStreamContext, platform: str) -> tuple[Operations, int]:
    """The stored operations state of ``platform`` and its revision (0: none stored).

    A stored value of the wrong shape counts as the default state (logged): anyone who may
    write the bucket could have put it there.
    """
    msg = await nu.last_msg(js, f"{platform}_platform", OPS_KEY)
    if msg is None or msg.tombstone:
        return Operations(), msg.seq if msg is not None else 0
    try:
        return Operations.parse(msg.data), msg.seq
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("placement: ignoring the operations state at revision %d: %s", msg.seq, exc)
        return Operations(), msg.seq


async def update_operations(js: JetStreamContext, platform: str,
                            change: Callable[[Operations], Operations]) -> Operations:
    """Apply ``change`` to the stored operations state by compare-and-set (retried on a
    conflicting write by another node or operator); returns the new state."""
    for _ in range(20):
        current, seq = await read_operations(js, platform)
        new = change(current)
        payload = json.dumps(new.as_dict(), separators=(",", ":")).encode()
        try:
            await nu.cas_publish(js, f"{platform}_platform", OPS_KEY, payload, expected_seq=seq)
            return new
        except nu.CASConflict:
            await asyncio.sleep(0.05)
    raise ConfigError("operations", platform, "the operations state kept changing under "
                      "this write (20 conflicting attempts)")


