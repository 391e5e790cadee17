"""Migration safety: maintenance windows, per-app cooldowns and the platform-wide limits on
migrations (how many may run at once, how many may start per minute).

The limits hold cluster-wide: they are one JSON object in the ``{platform}_platform`` bucket
under `MIGRATIONS_KEY`, changed by compare-and-set only, so two nodes that race for the last
slot cannot both win (the loser re-reads and is refused). Each running migration holds a
*lease* there with an expiry: a migrator that crashes frees its slot when the lease expires.
The object also remembers when each app last migrated (its cooldown counts from there, on
whichever node it now runs) and the start times of the last minute (the rate limit). Expiries
and cooldowns are wall-clock times: nodes' clocks are assumed to agree within a few seconds.

Maintenance windows (`Window`) say when *automatic* rebalancing may run; operator moves and
drains are not limited by them.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext

from . import natsutil as nu
from .errors import ConfigError, PyclusterError

MIGRATIONS_KEY = "placement.migrations"
"""The key of the migration slots (`MigrationSlots`) in the ``{platform}_platform`` bucket."""

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^(?:(?P<days>[a-z,\-]+)\s+)?(?P<h1>\d{1,2}):(?P<m1>\d{2})\s*-\s*"
                     r"(?P<h2>\d{1,2}):(?P<m2>\d{2})(?:\s+utc)?$")


class MigrationWaiting(PyclusterError):
    """A migration may not start now (cooldown, limit of concurrent migrations, rate limit):
    it waits; the message says why and for how long at least."""

    code = "waiting"

    def __init__(self, reason: str, retry_after: float = 0.5) -> None:
        self.reason, self.retry_after = reason, retry_after
        super().__init__(reason)


@dataclass(frozen=True)
class Window:
    """A daily time window (UTC) on some days of the week, e.g. ``"mon-fri 02:00-04:30"``,
    ``"sat,sun 22:00-06:00"`` (crosses midnight: the days are the days it starts on) or
    ``"01:00-03:00 UTC"`` (every day).

    :ivar days: weekdays it starts on (0 = Monday).
    :ivar start: minutes after midnight.
    :ivar end: minutes after midnight (below ``start``: the window ends the next day).
    """

    days: frozenset[int]
    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> Window:
        """Read ``"[DAYS ]HH:MM-HH:MM[ UTC]"``; DAYS is a comma-separated list of ``mon`` ..
        ``sun`` or ranges (``mon-fri``). `ConfigError` for anything else."""
        m = _WINDOW.match(text.strip().lower()) if isinstance(text, str) else None
        if m is None:
            raise ConfigError("maintenance window", str(text)[:64],
                              'expected "[DAYS ]HH:MM-HH:MM[ UTC]", e.g. "mon-fri 02:00-04:00"')
        h1, m1, h2, m2 = (int(m[k]) for k in ("h1", "m1", "h2", "m2"))
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            raise ConfigError("maintenance window", text, "hours 00-23 (24:00 as an end), "
                              "minutes 00-59")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ConfigError("maintenance window", text, "start and end are the same time")
        return cls(_parse_days(m["days"], text), start, end)

    def contains(self, now: datetime) -> bool:
        """Whether ``now`` (aware or UTC) is inside the window."""
        now = now.astimezone(UTC) if now.tzinfo is not None else now
        minute = now.hour * 60 + now.minute
        day = now.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Crosses midnight: the evening part on its days, the morning part the day after.
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


def _parse_days(spec: str | None, text: str) -> frozenset[int]:
    if spec is None:
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ConfigError("maintenance window", text, f"unknown day in {part!r} (mon .. "
                              "sun, ranges like mon-fri)")
        a = _DAYS.index(first)
        b = _DAYS.index(last) if last else a
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def parse_windows(specs: Sequence[str]) -> tuple[Window, ...]:
    """Parse every window of ``specs`` (`Window.parse`)."""
    return tuple(Window.parse(s) for s in specs)


def in_windows(windows: Sequence[Window], now: datetime | None = None) -> bool:
    """Whether ``now`` (default: the current time) is inside one of ``windows``; no windows
    at all means always."""
    if not windows:
        return True
    now = now or datetime.now(UTC)
    return any(w.contains(now) for w in windows)


def clearly_better(own: float, best: float, threshold: float) -> bool:
    """Hysteresis of automatic rebalancing: move only when the best candidate's score beats
    this node's by at least ``threshold`` (small differences, such as one more instance
    elsewhere under ``spread``, never make instances move back and forth)."""
    return best - own >= threshold if threshold > 0 else best > own


@dataclass(frozen=True)
class SlotState:
    """The stored migration slots: running migrations' leases, each app's last migration and
    the start times of the last minute."""

    leases: dict[str, dict[str, Any]]
    last: dict[str, float]
    starts: list[float]

    @classmethod
    def parse(cls, data: bytes | None) -> SlotState:
        """A stored value; anything of the wrong shape counts as empty (a node could have
        written it, the worst it does is free slots early)."""
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        leases = body.get("leases")
        last = body.get("last")
        starts = body.get("starts")
        return cls(
            {k: v for k, v in leases.items() if isinstance(v, dict)
             and isinstance(v.get("expires"), int | float)}
            if isinstance(leases, dict) else {},
            {k: float(v) for k, v in last.items() if isinstance(v, int | float)}
            if isinstance(last, dict) else {},
            [float(t) for t in starts if isinstance(t, int | float)]
            if isinstance(starts, list) else [])

    def encode(self) -> bytes:
        """The JSON stored under `MIGRATIONS_KEY`."""
        return json.dumps({"leases": self.leases, "last": self.last, "starts": self.starts},
                          separators=(",", ":")).encode()


class MigrationSlots:
    """The platform-wide migration limits of one platform, in NATS (see the module).

    :param max_concurrent: migrations that may run at once on the whole platform.
    :param per_minute: migrations that may start within any 60 s.
    :param clock: wall time (tests).
    """

    def __init__(self, js: Callable[[], JetStreamContext | None], platform: str,
                 max_concurrent: int = 1, per_minute: int = 10,
                 clock: Callable[[], float] = time.time) -> None:
        self._js, self.platform = js, platform
        self.max_concurrent, self.per_minute, self.clock = max_concurrent, per_minute, clock

    async def read(self) -> tuple[SlotState, int]:
        """The stored state (expired leases dropped) and its revision (0: none)."""
        js = self._need_js()
        msg = await nu.last_msg(js, f"{self.platform}_platform", MIGRATIONS_KEY, direct=False)
        if msg is None:
            return SlotState({}, {}, []), 0
        state = SlotState.parse(None if msg.tombstone else msg.data)
        now = self.clock()
        return SlotState({k: v for k, v in state.leases.items() if v["expires"] > now},
                         state.last, [t for t in state.starts if t > now - 60]), msg.seq

    def _need_js(self) -> JetStreamContext:
        js = self._js()
        if js is None:
            raise RuntimeError("the platform is not started")
        return js

    async def acquire(self, app: str, node: str, ttl: float, cooldown: float,
                      reason: str) -> str:
        """Take a slot for a migration of ``app`` by ``node`` (held for at most ``ttl``
        seconds unless `release` d first); returns the lease id. `MigrationWaiting` when
        ``app`` migrated less than ``cooldown`` seconds ago, is migrating already, or the
        platform's limits are reached."""
        lease_id = secrets.token_hex(8)
        for _ in range(50):
            state, seq = await self.read()
            now = self.clock()
            since = now - state.last.get(app, float("-inf"))
            if since < cooldown:
                left = cooldown - since
                raise MigrationWaiting(f"app {app}: migrated {since:.0f}s ago, cooldown "
                                       f"{cooldown:g}s: {left:.0f}s left; waiting",
                                       min(left, 5.0))
            running = [v for v in state.leases.values() if v.get("app") == app]
            if running:
                raise MigrationWaiting(f"app {app}: a migration by {running[0].get('node')} "
                                       "is running; waiting")
            if len(state.leases) >= self.max_concurrent:
                apps = ", ".join(sorted(str(v.get("app")) for v in state.leases.values()))
                raise MigrationWaiting(f"{len(state.leases)} migration(s) running ({apps}), at "
                                       f"most {self.max_concurrent} at once; waiting")
            if len(state.starts) >= self.per_minute:
                left = 60 - (now - min(state.starts))
                raise MigrationWaiting(f"{len(state.starts)} migrations started in the last "
                                       f"minute, at most {self.per_minute}: {left:.0f}s left; "
                                       "waiting", min(max(left, 0.1), 5.0))
            leases = {**state.leases, lease_id: {"app": app, "node": node, "reason": reason,
                                                 "at": now, "expires": now + ttl}}
            new = SlotState(leases, state.last, [*state.starts, now])
            try:
                await nu.cas_publish(self._need_js(), f"{self.platform}_platform",
                                     MIGRATIONS_KEY, new.encode(), expected_seq=seq)
                return lease_id
            except nu.CASConflict:
                await asyncio.sleep(0.02 + 0.03 * secrets.randbelow(100) / 100)
        raise MigrationWaiting("the migration slots kept changing under this write; waiting")

    async def release(self, lease_id: str, app: str, moved: bool) -> None:
        """Free the slot ``lease_id``; ``moved``: the instance was handed over (the app's
        cooldown starts now)."""
        for _ in range(50):
            state, seq = await self.read()
            last = {**state.last, app: self.clock()} if moved else state.last
            leases = {k: v for k, v in state.leases.items() if k != lease_id}
            try:
                await nu.cas_publish(self._need_js(), f"{self.platform}_platform",
                                     MIGRATIONS_KEY,
                                     SlotState(leases, last, state.starts).encode(),
                                     expected_seq=seq)
                return
            except nu.CASConflict:
                await asyncio.sleep(0.02 + 0.03 * secrets.randbelow(100) / 100)


__all__ = ["MIGRATIONS_KEY", "MigrationSlots", "MigrationWaiting", "SlotState", "Window",
           "clearly_better", "in_windows", "parse_windows"]
