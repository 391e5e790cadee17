"""Fair distributed locks with fencing tokens, on one NATS KV bucket (``app.lock(name)``).

Protocol. A lock is one JSON value at key ``{prefix}{name}``::

    {"holder": id | null, "claimed": bool, "token": int | null, "beat": int, "ttl": float,
     "since": unix-seconds, "waiters": [[id, ttl], ...]}

Every write is a compare-and-set against the key's last revision
(``Nats-Expected-Last-Subject-Sequence``) and carries a server TTL (``Nats-TTL``), so a lock
whose holder and waiters all die expires on its own. Ids are ``{owner}#{random}{counter}``
(random per `LockService`), fresh for every `Lock.acquire`, so several tasks of one process can
contend too.

- Acquire, free lock: one CAS writing ``holder=me, claimed=true`` against the revision cached
  from the last release/observation (0 if unknown; after a conflict the key is read once). The
  fencing token is the stream revision of that write: unique and strictly increasing, also
  across expiry (a marker has a higher revision than anything before it).
- Acquire, held lock: one CAS appending ``[id, ttl]`` to ``waiters``, then wait on a KV watch of
  the key (plus a direct read every ``poll_interval`` without events). A newcomer that finds a
  handoff pending first waits up to 20 ms for the claim, so it does not make the claim (the
  critical path) lose a CAS race. A CAS conflict anywhere: read the key, decide again.
- Release: one CAS handing the lock straight to ``waiters[0]`` (``claimed=false``) or writing a
  free state. The direct handoff is what makes the lock first-come first-served: the releaser
  cannot win again, it queues behind everyone already waiting.
- The waiter handed the lock *claims* it with one CAS (``claimed=true, beat+1``); the revision
  of the claim is its token and the moment it was sent starts its lease. A waiter that died
  never claims: it is skipped (see below) and the next one is served.
- Renewal: every ``ttl/3`` the holder CASes ``beat+1``; a conflict (a waiter appended) is
  resolved by re-reading and retrying while the state still names it with the same token.
- Takeover: a waiter that sees the holder's (holder, claimed, beat, token) unchanged for
  ``ttl`` plus a margin on its own monotonic clock grants the lock to the head of the queue,
  dropping the holder. When the key instead expired (a server marker), a waiter rebuilds the
  queue from the last state it saw, so waiters keep their relative order. Both are CAS writes,
  so exactly one of the racing waiters succeeds.

Safety: the holder's lease ends at (send time of its last successful CAS) + ``ttl`` on its
monotonic clock; a takeover needs ``ttl`` + margin measured from *observing* that write, and the
server TTL (rounded up to whole seconds) also counts from the write, so no waiter can take the
lock before the holder's lease has ended. Use the fencing token with the protected resource to
also stop a holder that was paused past its lease (GC, swapped out).

Behaviour under connection loss (kazoo style):

- A held lock is a lease. If renewals fail, `Lock.held` turns False as soon as the lease time
  has passed (local monotonic time, so it also flips while NATS is unreachable); the lock is then
  *lost*: `Lock.lost` is True and `Lock.release` raises `LockLostError`. Another process can get
  the lock only after the lease ended. Check ``lock.held`` (or use the fencing token) before
  side effects in long critical sections.
- A waiter keeps waiting through disconnects (the watch is re-created after a reconnect and the
  key is polled); `Lock.acquire`'s timeout still applies. On timeout or cancellation it removes
  itself from the queue (best effort: if NATS is unreachable it stays listed, is handed the lock
  eventually, never claims it and is skipped after ``ttl``).
- `Lock.release` that cannot reach NATS before the lease ends logs a warning and returns: the
  lock frees itself by TTL and the critical section was protected until release was called.

Size: one protocol (acquire, queue, handoff, claim, renew, takeover) whose safety argument
spans all of it, kept in one module to be read top to bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from . import names, natsutil
from .aio import cancel_and_wait, supervise
from .errors import ConfigError, LockLostError, LockTimeoutError
from .kv import KVWatcher

log = logging.getLogger(__name__)

# A takeover waits ttl * (1 + _MARGIN_FACTOR) + _MARGIN_FIXED after the holder's last write was
# observed: slack for clock-rate differences and for the holder's event loop being a bit late.
_MARGIN_FACTOR = 0.1
_MARGIN_FIXED = 0.25
# How long a per-key watch stays up after its last local waiter: keeps handoffs cheap when the
# same process contends again soon (the watch costs a consumer create per start).
_OBSERVER_LINGER = 5.0
# Pause after a transient NATS error before the next attempt.
_RETRY_PAUSE = 0.05

# Before appending behind a pending handoff, wait this long for the new holder's claim.
_CLAIM_GRACE = 0.02

MIN_TTL = 1.0
"""Shortest lock lease: the server's TTLs are whole seconds (minimum 1 s) and a holder renews
every ttl/3, so a shorter lease would be lost before its first renewal could land."""

_Waiter = tuple[str, float]  # (waiter id, ttl it asked for)

_json_str: Callable[[str], str] = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _json_float(x: float) -> str:
    x = float(x)
    return repr(x) if math.isfinite(x) else json.dumps(x)


@dataclass(frozen=True)
class _State:
    """The JSON value of a lock key."""

    holder: str | None = None
    claimed: bool = False
    token: int | None = None  # None in a claimed state: the revision of this very message
    beat: int = 0
    ttl: float = 0.0
    since: float = 0.0
    waiters: tuple[_Waiter, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        # Formatted directly (twice per acquire+release): the same bytes as
        # json.dumps(..., separators=(",", ":")) of the dict, at a fraction of the cost.
        holder = "null" if self.holder is None else _json_str(self.holder)
        token = "null" if self.token is None else str(int(self.token))
        waiters = ",".join(f"[{_json_str(w)},{_json_float(t)}]"
                           for w, t in self.waiters) if self.waiters else ""
        return (
            f'{{"holder":{holder},"claimed":{"true" if self.claimed else "false"},'
            f'"token":{token},"beat":{int(self.beat)},"ttl":{_json_float(self.ttl)},'
            f'"since":{_json_float(self.since)},"waiters":[{waiters}]}}'
        ).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> _State | None:
        """Parse a stored value; None for an empty or unreadable one (treated as free)."""
        if not data:
            return None
        try:
            raw = json.loads(data)
            holder, token = raw.get("holder"), raw.get("token")
            return cls(
                holder=None if holder is None else str(holder),
                claimed=bool(raw.get("claimed", False)),
                token=None if token is None else int(token),
                beat=int(raw.get("beat", 0)),
                ttl=float(raw.get("ttl", 0.0)),
                since=float(raw.get("since", 0.0)),
                waiters=tuple((str(w[0]), float(w[1])) for w in raw.get("waiters", [])),
            )
        except (ValueError, TypeError, AttributeError, IndexError, KeyError):
            log.warning("unreadable lock state %r; treating the lock as free", data[:100])
            return None

    def token_at(self, revision: int) -> int | None:
        """The holder's fencing token, given the revision this state was read at."""
        if self.holder is None or not self.claimed:
            return None
        return self.token if self.token is not None else revision

    def waiter_ids(self) -> list[str]:
        return [w[0] for w in self.waiters]

    def carried(self, revision: int) -> _State:
        """This state as written on top of ``revision`` by someone else than the holder."""
        return replace(self, token=self.token_at(revision))


_Write = tuple["_State", float, bool]  # (new state, its TTL, whether it makes us the holder)


@dataclass(frozen=True)
class _Snap:
    """What a lock key held at a revision (0: no message); ``state`` None: no live value."""

    revision: int
    state: _State | None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, for visibility (`LockService.holder`).

    ``token`` is None while a handoff to ``id`` is pending (the waiter has not claimed it yet);
    ``acquired`` is the holder's wall-clock time (unix seconds) of the acquisition or handoff;
    ``waiters`` lists the queued waiter ids (``{owner}#{suffix}``) in the order they are served.
    """

    owner: str
    id: str
    token: int | None
    acquired: float
    ttl: float
    waiters: tuple[str, ...]

    @property
    def waiting(self) -> int:
        """Number of queued waiters."""
        return len(self.waiters)


def _owner_of(waiter_id: str) -> str:
    return waiter_id.rsplit("#", 1)[0]


class _KeyState:
    """Everything this process knows about one lock key, shared by its `Lock` objects.

    Holds the latest snapshot (from our own writes, direct reads and a watch), the last live
    state (to rebuild the queue after an expiry) and when the holder last showed life.
    """

    def __init__(self, svc: LockService, key: str) -> None:
        self._svc = svc
        self.key = key
        self.subject = natsutil.kv_subject(svc.bucket, key)
        self.snap: _Snap | None = None
        self.prev: _State | None = None  # last live state seen
        self._sig: tuple[Any, ...] | None = None
        self.sig_since = time.monotonic()
        self._changed = asyncio.Event()
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self._linger: asyncio.TimerHandle | None = None

    def note(self, revision: int, state: _State | None, *, force: bool = False) -> None:
        """Record an observation; older ones are ignored unless ``force`` (a direct read)."""
        if self.snap is not None and revision <= self.snap.revision and not force:
            return
        if self.snap is not None and revision == self.snap.revision and state == self.snap.state:
            return
        self.snap = _Snap(revision, state)
        if state is not None:
            self.prev = state
        sig = None
        if state is not None and state.holder is not None:
            sig = (state.holder, state.claimed, state.beat, state.token_at(revision))
        if sig != self._sig:
            # The holder wrote (or changed): restart the takeover timer from *now*, which is no
            # earlier than the write, hence no earlier than the start of the holder's lease.
            self._sig = sig
            self.sig_since = time.monotonic()
        # Wake the current waiters (their futures are resolved by set) and re-arm for the next.
        self._changed.set()
        self._changed.clear()

    async def read(self) -> _Snap:
        """Read the key's last message directly (authoritative) and record it."""
        last = await natsutil.last_msg(self._svc._js, self._svc.bucket, self.key)
        if last is None:
            self.note(0, None, force=True)
        else:
            state = None if last.tombstone else _State.decode(last.data)
            self.note(last.seq, state, force=True)
        assert self.snap is not None
        return self.snap

    async def wait_change(self, revision: int, timeout: float) -> None:
        """Return when the snapshot moves past ``revision`` or after ``timeout`` seconds."""
        if self.snap is not None and self.snap.revision != revision:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):  # not wait_for: see KVWatcher.next
                await self._changed.wait()

    def use(self) -> None:
        """A local waiter needs change notifications: run the watch (until unused + linger)."""
        self._users += 1
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._task is None or self._task.done():
            self._task = supervise(f"lock-observer:{self.key}", self._observe)

    def unuse(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._task is not None:
            loop = asyncio.get_running_loop()
            self._linger = loop.call_later(_OBSERVER_LINGER, self._stop_observer)

    def _stop_observer(self) -> None:
        self._linger = None
        if self._users <= 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)

    async def _observe(self) -> None:
        svc = self._svc
        watcher: KVWatcher | None = None
        try:
            while True:
                try:
                    watcher = await self._observe_step(watcher)
                except Exception:  # never leave the waiters blind
                    log.exception("lock watch on %s failed; continuing", self.key)
                    await asyncio.sleep(svc.poll_interval)
        finally:
            if watcher is not None:
                with contextlib.suppress(Exception):
                    await watcher.stop()

    async def _observe_step(self, watcher: KVWatcher | None) -> KVWatcher | None:
        """One round of the watch: an event, or a direct read after a quiet interval."""
        svc = self._svc
        if watcher is None:
            try:
                watcher = await KVWatcher(
                    svc._js, svc.bucket, self.key, poll_interval=svc.poll_interval
                ).start()
            except nats.errors.Error as exc:
                log.warning("lock watch on %s failed to start: %s", self.key, exc)
        if watcher is not None:
            event = await watcher.next(timeout=svc.poll_interval)
        else:
            await asyncio.sleep(svc.poll_interval)
            event = None
        if event is not None:
            state = _State.decode(event.value) if event.op == "PUT" else None
            self.note(event.revision, state)
        elif self._users > 0:
            # Polling fallback: a JetStream watcher can go silent; a direct read per
            # interval without events bounds how long a change can go unnoticed.
            with contextlib.suppress(*natsutil.TRANSIENT_ERRORS, nats.errors.Error):
                await self.read()
        return watcher


class Lock:
    """One distributed lock handle (`LockService.lock`); reusable, not re-entrant.

    ``async with lock:`` acquires without timeout and releases on exit (also on exceptions).
    """

    def __init__(self, svc: LockService, name: str, key: str, ttl: float) -> None:
        self._svc = svc
        self._name = name
        self._key = key
        self.ttl = ttl
        self._id: str | None = None
        self._acquired = False
        self._lost = False
        self._token: int | None = None
        self._mine: _Snap | None = None  # our last successful write
        self._deadline = 0.0  # monotonic end of our lease
        self._renewer: asyncio.Task[None] | None = None
        # The first renewal is due ttl/3 after the grant: a timer until then, so a lock held
        # briefly (the common case) never creates and cancels a renewal task.
        self._renew_timer: asyncio.TimerHandle | None = None
        self._wait_started = self._held_since = 0.0  # for on_event (wait and hold times)
        self._expired_told = False

    @property
    def name(self) -> str:
        """The lock's name (without the service prefix)."""
        return self._name

    @property
    def token(self) -> int | None:
        """Fencing token of the current (or last) acquisition; strictly increasing per lock."""
        return self._token

    @property
    def held(self) -> bool:
        """True while acquired and the lease is valid (turns False when renewal fails)."""
        return self._acquired and not self._lost and time.monotonic() < self._deadline

    @property
    def lost(self) -> bool:
        """True once the lease ran out or another holder was seen while we held the lock."""
        return self._lost or (self._acquired and time.monotonic() >= self._deadline)

    def check(self) -> int:
        """Return the fencing token if the lock is held right now, else raise `LockLostError`.

        For a write under the lock: call it just before the write (`AppKV.update` and
        `AppKV.transform` do, given ``lock=``). It cannot stop a write already sent from landing
        late; the write's compare-and-set on the revision read under the lock does that.
        """
        if not self.held:
            raise LockLostError(self._name, self._token or 0)
        assert self._token is not None
        return self._token

    async def __aenter__(self) -> Lock:
        await self.acquire()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.release()
        except LockLostError:
            if exc is None:
                raise  # the block finished but was not protected until its end: say so
            log.warning("lock %r was lost while the block raised %r", self._name, exc)

    # -- acquire -------------------------------------------------------------------------------

    async def acquire(self, timeout: float | None = None) -> int:
        """Wait for the lock in arrival order and return the fencing token.

        Raises `LockTimeoutError` after ``timeout`` seconds (None: wait forever), having removed
        this waiter from the queue; on cancellation the waiter is removed too.
        """
        if self._acquired:
            if not self.lost:
                raise RuntimeError(f"lock {self._name!r} is already held by this Lock object")
            await self._stop_renewer()  # lost and never released: start over
            self._acquired = False
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        svc = self._svc
        ks = svc._key_state(self._key)
        me: _Waiter = (f"{svc._id_base}{next(svc._ids):x}", self.ttl)
        self._id, self._lost, self._token = me[0], False, None
        self._wait_started, self._expired_told = time.monotonic(), False
        self._emit("wait", ttl=self.ttl)
        deadline = None if timeout is None else time.monotonic() + timeout
        watching = False
        # Fast path: the cached snapshot (e.g. our own release) says free, or the key was never
        # seen (expect "no message"): one CAS, no read.
        snap = ks.snap if ks.snap is not None else _Snap(0, None)
        try:
            while True:
                if snap.state is not None and snap.state.holder not in (None, me[0]):
                    if not watching:
                        ks.use()
                        watching = True
                plan = self._plan(ks, snap, me)
                if (isinstance(plan, float) or not plan[2]) and deadline is not None:
                    # Out of time, unless this step makes us the holder (then take it).
                    if time.monotonic() >= deadline:
                        raise self._timeout_error(timeout, snap)
                if isinstance(plan, float):
                    wake = plan
                    if deadline is not None:
                        wake = min(wake, deadline)
                    await ks.wait_change(snap.revision, wake - time.monotonic())
                    assert ks.snap is not None
                    snap = ks.snap
                    continue
                new, ttl, mine = plan
                sent = time.monotonic()
                try:
                    revision = await svc._write(ks, new, snap.revision, ttl)
                except natsutil.CASConflict:
                    snap = await self._reread(ks, deadline, timeout)
                    continue
                except natsutil.TRANSIENT_ERRORS as exc:
                    if natsutil.stream_gone(exc):
                        await svc.healer.heal()  # the bucket was deleted: re-create it
                    await asyncio.sleep(_RETRY_PAUSE)
                    snap = await self._reread(ks, deadline, timeout)
                    continue
                if mine:
                    return self._granted(new, revision, sent)
                assert ks.snap is not None
                snap = ks.snap
        except BaseException as exc:
            if not self._acquired:
                # Timeout, cancellation or error: leave the queue (shielded from a second
                # cancellation, which would otherwise leave a stale waiter behind).
                await _shielded(self._withdraw(ks, me))
                self._emit("wait_failed", reason="timeout" if isinstance(exc, LockTimeoutError)
                           else "cancelled" if isinstance(exc, asyncio.CancelledError)
                           else type(exc).__name__)
            raise
        finally:
            if watching:
                ks.unuse()

    def _plan(self, ks: _KeyState, snap: _Snap, me: _Waiter) -> _Write | float:
        """The next write (new state, its TTL, whether it makes us the holder), or the
        monotonic time until which to wait for a change."""
        st = snap.state
        if st is None or st.holder is None:
            # Free, or expired: serve the queue we last knew (the expired holder is dropped).
            base = st if st is not None else ks.prev
            queue = list(base.waiters) if base is not None else []
            if st is None and base is not None and base.holder == me[0]:
                queue.insert(0, me)  # handed to us, but it expired before our claim
            if all(w[0] != me[0] for w in queue):
                queue.append(me)
            return self._grant(queue, me)
        if st.holder == me[0]:
            # Handed to us (or an earlier write of ours went through without an ack): claim.
            token = st.token_at(snap.revision)
            since = st.since if st.claimed else time.time()
            claim = replace(st, claimed=True, token=token, beat=st.beat + 1, ttl=me[1], since=since)
            return claim, me[1], True
        if me[0] not in st.waiter_ids():
            claim_due = ks.sig_since + _CLAIM_GRACE
            if not st.claimed and time.monotonic() < claim_due:
                # A handoff is pending: let the new holder's claim (the critical path) go
                # first instead of making it lose a CAS race against our append.
                return claim_due
            queued = replace(st.carried(snap.revision), waiters=(*st.waiters, me))
            return queued, st.ttl, False
        stale_at = self._stale_at(ks, snap)
        if time.monotonic() >= stale_at:
            # The holder (or a waiter that was handed the lock) showed no life for a whole
            # lease: serve the next waiter.
            log.info("lock %r: taking over from silent holder %s", self._name, st.holder)
            return self._grant(list(st.waiters), me)
        return stale_at

    def _grant(self, queue: list[_Waiter], me: _Waiter) -> _Write:
        head, rest = queue[0], tuple(queue[1:])
        mine = head[0] == me[0]
        state = _State(
            holder=head[0], claimed=mine, beat=0, ttl=head[1], since=time.time(), waiters=rest
        )
        return state, head[1], mine

    @staticmethod
    def _stale_at(ks: _KeyState, snap: _Snap) -> float:
        st = snap.state
        ttl = st.ttl if st is not None and st.ttl > 0 else 1.0
        return ks.sig_since + ttl * (1 + _MARGIN_FACTOR) + _MARGIN_FIXED

    async def _reread(self, ks: _KeyState, deadline: float | None, timeout: float | None) -> _Snap:
        """Read the key, retrying transient errors until ``deadline``."""
        while True:
            try:
                return await ks.read()
            except natsutil.TRANSIENT_ERRORS as exc:
                if natsutil.stream_gone(exc):
                    await self._svc.healer.heal()
                if deadline is not None and time.monotonic() >= deadline:
                    raise self._timeout_error(timeout, ks.snap) from None
                await asyncio.sleep(_RETRY_PAUSE)

    def _timeout_error(self, timeout: float | None, snap: _Snap | None) -> LockTimeoutError:
        holder = snap.state.holder if snap is not None and snap.state is not None else None
        return LockTimeoutError(self._name, timeout or 0.0, _owner_of(holder) if holder else None)

    def _granted(self, state: _State, revision: int, sent: float) -> int:
        token = state.token if state.token is not None else revision
        self._token = token
        self._mine = _Snap(revision, state)
        self._deadline = sent + self.ttl
        self._acquired = True
        if self._renew_timer is None:
            # A timer of an earlier hold may still be pending (a release leaves it: quick
            # repeated holds then share one timer instead of scheduling and cancelling one
            # each); `_renew_due` re-arms it for this hold.
            self._renew_timer = asyncio.get_running_loop().call_later(
                self.ttl / 3, self._renew_due)
        self._held_since = time.monotonic()
        self._emit("acquired", token=token, waited=self._held_since - self._wait_started)
        return token

    def _emit(self, event: str, **fields: Any) -> None:
        """Tell the service's observers of ``event`` and its ``on_event`` observer (never
        raises into lock code); nothing to do, and nothing computed, when nobody listens."""
        svc = self._svc
        fns = svc.observers.get(event)
        fn = svc.on_event
        if fns is None and fn is None:
            return
        if event in ("released", "expired"):
            if event == "expired":
                if self._expired_told:
                    return
                self._expired_told = True
            fields.setdefault("token", self._token)
            fields["held"] = time.monotonic() - self._held_since
        if fns is not None:
            for observer in fns:
                try:
                    observer(self, fields)
                except Exception:
                    log.exception("lock %r: %s observer %r failed", self._name, event, observer)
        if fn is not None:
            try:
                fn(event, self, fields)
            except Exception:
                log.exception("lock %r: event observer failed", self._name)

    async def _withdraw(self, ks: _KeyState, me: _Waiter) -> None:
        """Remove ``me`` from the queue, or pass the lock on if it was handed to us."""
        end = time.monotonic() + max(1.0, self._svc.op_timeout)
        while time.monotonic() < end:
            try:
                snap = await ks.read()
                st = snap.state
                if st is None:
                    return
                if st.holder == me[0]:
                    new, ttl = self._released(st)
                elif me[0] in st.waiter_ids():
                    rest = tuple(w for w in st.waiters if w[0] != me[0])
                    new, ttl = replace(st.carried(snap.revision), waiters=rest), st.ttl
                else:
                    return
                await self._svc._write(ks, new, snap.revision, ttl)
                return
            except natsutil.CASConflict:
                continue
            except natsutil.TRANSIENT_ERRORS:
                await asyncio.sleep(_RETRY_PAUSE)
        log.warning("lock %r: could not leave the queue; it will be skipped after ttl", self._name)

    # -- hold ----------------------------------------------------------------------------------

    def _is_mine(self, snap: _Snap | None) -> bool:
        if snap is None or snap.state is None:
            return False
        st = snap.state
        return st.holder == self._id and st.claimed and st.token_at(snap.revision) == self._token

    def _latest_mine(self) -> _Snap:
        """Our last write, or a newer snapshot that still names us (waiters appended)."""
        assert self._mine is not None
        ks = self._svc._key_state(self._key)
        newer = ks.snap
        if newer is not None and newer.revision > self._mine.revision and self._is_mine(newer):
            return newer
        return self._mine

    def _renew_due(self) -> None:
        """The renewal timer: start renewing when this hold's first renewal is due."""
        self._renew_timer = None
        if not self._acquired or self._lost or self._renewer is not None:
            return
        wait = self._deadline - self.ttl * 2 / 3 - time.monotonic()  # send time + ttl/3
        if wait > 0.001:
            self._renew_timer = asyncio.get_running_loop().call_later(wait, self._renew_due)
            return
        self._renewer = supervise(f"lock-renewer:{self.name}", self._renew_loop)

    async def _renew_loop(self) -> None:
        ks = self._svc._key_state(self._key)
        pause = 0.0  # the first renewal is due now (the timer waited ttl/3)
        while True:
            await asyncio.sleep(pause)
            if time.monotonic() >= self._deadline:
                break
            snap = self._latest_mine()
            assert snap.state is not None
            new = replace(snap.state, token=self._token, beat=snap.state.beat + 1)
            sent = time.monotonic()
            budget = max(0.1, min(self._svc.op_timeout, self._deadline - sent))
            try:
                revision = await self._svc._write(ks, new, snap.revision, self.ttl, budget)
                self._mine = _Snap(revision, new)
                self._deadline = sent + self.ttl
                pause = self.ttl / 3
                continue
            except natsutil.CASConflict:
                # Usually a waiter appended itself: retry on the fresh revision if still ours.
                try:
                    fresh = await ks.read()
                except natsutil.TRANSIENT_ERRORS:
                    pause = _RETRY_PAUSE
                    continue
                if not self._is_mine(fresh):
                    break
                self._mine = fresh
                pause = 0.0
            except natsutil.TRANSIENT_ERRORS as exc:
                log.debug("lock %r: renewal failed: %s", self._name, exc)
                pause = min(self.ttl / 10, 0.25)
        self._lost = True
        log.warning("lock %r (token %s) was lost", self._name, self._token)
        self._emit("expired")

    # -- release -------------------------------------------------------------------------------

    def _released(self, st: _State) -> tuple[_State, float]:
        """The state after we let go: handed to the first waiter, or free."""
        if st.waiters:
            head = st.waiters[0]
            new = _State(
                holder=head[0], ttl=head[1], since=time.time(), waiters=tuple(st.waiters[1:])
            )
            return new, head[1]
        return _State(ttl=self.ttl, since=time.time()), self.ttl

    async def release(self) -> None:
        """Release the lock, handing it to the first waiter if there is one.

        Raises `LockLostError` if the lease had already run out or someone else took the lock
        (the critical section was not protected to its end). Raises RuntimeError if not held.
        """
        if not self._acquired:
            raise RuntimeError(f"lock {self._name!r} is not held")
        if self._renewer is not None:  # a short hold never started renewing
            await self._stop_renewer(keep_timer=True)
        self._acquired = False
        token = self._token or 0
        if self._lost or time.monotonic() >= self._deadline:
            self._lost = True
            self._emit("expired")
            raise LockLostError(self._name, token)
        ks = self._svc._key_state(self._key)
        snap = self._latest_mine()
        while True:
            assert snap.state is not None
            new, ttl = self._released(snap.state)
            try:
                await self._svc._write(ks, new, snap.revision, ttl)
                self._emit("released")
                return
            except natsutil.CASConflict:
                error: BaseException | None = None  # a conflict: see who holds it now
            except natsutil.TRANSIENT_ERRORS as exc:
                error = exc
            if time.monotonic() >= self._deadline:
                # Our lease is over anyway: the key frees itself by TTL.
                log.warning("lock %r: release failed (%s); it expires by TTL", self._name, error)
                self._emit("released", clean=False)
                return
            if error is not None:
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            try:
                fresh = await ks.read()
            except natsutil.TRANSIENT_ERRORS:
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            if not self._is_mine(fresh):
                self._lost = True
                self._emit("expired")
                raise LockLostError(self._name, token)
            snap = fresh

    async def _stop_renewer(self, keep_timer: bool = False) -> None:
        """Stop renewing. ``keep_timer`` (a release): a pending renewal timer is left to fire,
        doing nothing unless the lock is held again, so quick repeated holds share it."""
        if not keep_timer:
            timer, self._renew_timer = self._renew_timer, None
            if timer is not None:
                timer.cancel()
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            await cancel_and_wait(renewer)


async def _shielded(coro: Any) -> None:
    """Run ``coro`` to completion even if the caller is cancelled meanwhile."""
    task = asyncio.ensure_future(coro)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(task)


class LockService:
    """Locks of one owner (a process) in one KV bucket, e.g. ``{platform}_{app}_locks``.

    ``owner`` identifies the process (node id plus a random suffix is fine); each acquisition
    gets its own waiter id ``{owner}#{suffix}``. ``prefix`` namespaces the lock keys.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: str,
        owner: str,
        *,
        prefix: str = "",
        replicas: int = 1,
        poll_interval: float = 0.5,
        op_timeout: float = 2.0,
    ) -> None:
        if not owner:
            raise ValueError("owner must be a non-empty string")
        if prefix:
            names.validate_key(prefix.rstrip("."), "lock prefix")
        self._js = js
        self.bucket = bucket
        self.owner = owner
        self.prefix = prefix
        self.replicas = replicas
        self.poll_interval = poll_interval
        self.op_timeout = op_timeout
        self._keys: dict[str, _KeyState] = {}
        self._ttl_headers: dict[float, str] = {}
        # Waiter ids: ``{owner}#{random}{counter}``, unique without a random draw per acquire.
        self._id_base = f"{owner}#{secrets.token_hex(4)}"
        self._ids = itertools.count(1)
        # Observability (audit, metrics, lock-wait spans), called synchronously on the events
        # "wait", "acquired", "wait_failed", "released", "expired": ``observers`` maps an event
        # to the functions (lock, fields) that asked for it (an event nobody asked for costs
        # nothing); ``on_event`` (event, lock, fields) is called for every event.
        self.observers: dict[str, tuple[Callable[[Lock, dict[str, Any]], None], ...]] = {}
        self.on_event: Callable[[str, Lock, dict[str, Any]], None] | None = None

    async def ensure(self) -> None:
        """Create the locks bucket if missing: history 1 and expiry markers (server TTL
        markers need ``limit_marker_ttl``)."""
        await natsutil.ensure_kv(
            self._js, self.bucket, history=1, marker_ttl=1, replicas=self.replicas
        )

    @property
    def healer(self) -> natsutil.Healer:
        """Re-creates the bucket when it was deleted while nodes run (rate-limited)."""
        h = self.__dict__.get("_healer")
        if h is None:
            h = self.__dict__["_healer"] = natsutil.Healer(
                f"locks {self.bucket}",
                lambda: natsutil.ensure_kv(self._js, self.bucket, history=1, marker_ttl=1,
                                           replicas=self.replicas, wait=2.0))
        return h

    def lock(self, name: str, ttl: float = 10.0) -> Lock:
        """A handle on lock ``name`` with a lease of ``ttl`` seconds (renewed every ttl/3).

        The server expires keys in whole seconds (minimum 1 s), rounded up; ``ttl`` must be at
        least `MIN_TTL` (1 s).
        """
        names.validate_key(name, "lock name")
        key = names.validate_key(f"{self.prefix}{name}", "lock key")
        if not (isinstance(ttl, int | float) and math.isfinite(ttl) and ttl >= MIN_TTL):
            raise ConfigError(
                "lock ttl", ttl, f"must be a number of seconds >= {MIN_TTL:g} (renewed every "
                "ttl/3; the server's expiry is whole seconds, minimum 1 s)"
            )
        return Lock(self, name, key, float(ttl))

    async def holder(self, name: str) -> LockHolder | None:
        """Who holds ``name`` right now (read from NATS), or None if it is free."""
        names.validate_key(name, "lock name")
        snap = await self._key_state(f"{self.prefix}{name}").read()
        st = snap.state
        if st is None or st.holder is None:
            return None
        return LockHolder(
            owner=_owner_of(st.holder),
            id=st.holder,
            token=st.token_at(snap.revision),
            acquired=st.since,
            ttl=st.ttl,
            waiters=tuple(st.waiter_ids()),
        )

    async def close(self) -> None:
        """Stop the background watches (held locks are not released; see `Lock.release`)."""
        for ks in list(self._keys.values()):
            await ks.close()

    def _key_state(self, key: str) -> _KeyState:
        ks = self._keys.get(key)
        if ks is None:
            ks = self._keys[key] = _KeyState(self, key)
        return ks

    async def _write(
        self,
        ks: _KeyState,
        state: _State,
        expected: int,
        ttl: float,
        timeout: float | None = None,
    ) -> int:
        """CAS ``state`` onto ``ks.key`` against revision ``expected``, with a server TTL."""
        # `natsutil.cas_publish` inlined (two writes per acquire+release): the subject and the
        # TTL header are formatted once per key and lease length.
        ttl_value = self._ttl_headers.get(ttl)
        if ttl_value is None:
            ttl_value = self._ttl_headers[ttl] = natsutil.ttl_header(ttl)
        headers = {natsutil.EXPECTED_LAST_SUBJECT_SEQ: str(expected),
                   natsutil.TTL_HEADER: ttl_value}
        revision = await natsutil.conditional_publish(
            self._js, ks.subject, state.encode(), headers, timeout or self.op_timeout)
        if revision is None:
            raise natsutil.CASConflict(f"{self.bucket}/{ks.key}: last sequence is not {expected}")
        ks.note(revision, state)
        return revision
