"""The standby's replica: a supervised ``litestream restore -f`` (follow mode).

A `Follower` keeps ``replica_path`` near-real-time while the node is a standby:

* **Bootstrap**: when the WAL bucket holds data, the replica is built from the newest snapshot of
  the snapshots bucket that Litestream can continue from (its TXID is at or before Litestream's
  latest level-9 snapshot) plus the WAL after it: the snapshot file is written as the replica
  with its TXID in ``<replica>-txid``, and follow mode resumes from there. Without such a
  snapshot (or when the resume is refused) Litestream restores from the bucket alone (its own
  latest snapshot plus the WAL after it). An empty bucket is waited for.
* **Following**: Litestream polls the bucket every ``follow_interval`` and applies new LTX files
  page by page; the position is in ``<replica>-txid``. A fresh restore's header is switched to
  rollback-journal mode so that readers never hold the long-lived WAL-mode lock that would stall
  the follower (see `pycluster_sqlite.dbfile`). After each update the file change counter is
  bumped (`pycluster_sqlite.dbfile.bump_change_counter`), so readers that keep their connection
  open see it too.
* **Supervision**: the process's output goes to the node log (``pycluster.sqlite``); when it
  exits, or makes no progress for ``stuck_after`` seconds while the bucket is ahead, or keeps
  failing to apply updates, it is restarted from scratch with doubling back-off (1 s to 30 s).
  Litestream 0.5.17 cannot resume a follower that is past the latest level-9 snapshot, so every
  restart rebuilds the replica.

Under connection loss Litestream keeps retrying by itself (errors are logged); the replica stays
readable at its last position, and `lag` grows.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pycluster.kernel.aio import cancel_and_wait

from . import dbfile
from . import litestream as ls

if TYPE_CHECKING:
    from .snapshots import Snapshot, SnapshotStore
    from .walindex import WalIndex

log = logging.getLogger("pycluster.sqlite")

_APPLIED = re.compile(r"to_txid=([0-9a-f]{16})")
_ERRORS = re.compile(r"consecutive_errors=(\d+)")
BACKOFF_MAX = 30.0
MAX_APPLY_ERRORS = 20


class FollowerState(enum.StrEnum):
    """Where the standby's follower is (``Follower.state``; a string in status documents)."""

    STOPPED = "stopped"
    STARTING = "starting"
    WAITING = "waiting"
    """The WAL bucket is empty: nothing to follow yet."""
    BOOTSTRAPPING = "bootstrapping"
    """Building the replica (from a snapshot and the WAL, or a full restore)."""
    FOLLOWING = "following"
    RESTARTING = "restarting"
    """The process failed or got stuck: restarting after a back-off."""


class Follower:
    """A supervised follow-mode restore into ``replica`` (see the module docstring).

    :param binary: the litestream binary.
    :param config: returns the path of a current litestream config file (rewritten with the
        NATS server this node is connected to).
    :param db_path: the database path named in that config.
    :param replica: the replica file.
    :param interval: Litestream's follow interval (seconds).
    :param index: the WAL bucket's index (emptiness, position, snapshots).
    :param snapshots: the snapshots bucket, to bootstrap from (None: never).
    :param app: the app name (logs).
    :param stuck_after: seconds without progress, while the bucket is ahead, before a restart.
    """

    def __init__(self, *, binary: str, config: Callable[[], Path], db_path: str, replica: Path,
                 interval: float, index: WalIndex, snapshots: SnapshotStore | None, app: str,
                 stuck_after: float = 30.0) -> None:
        self.binary = binary
        self.config = config
        self.db_path = db_path
        self.replica = replica
        self.interval = interval
        self.index = index
        self.snapshots = snapshots
        self.app = app
        self.stuck_after = stuck_after
        self.state: FollowerState = FollowerState.STOPPED
        self.restarts = 0
        self.last_error: str | None = None
        self.bootstrapped_from: str | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.following = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._progress = 0.0
        self._txid: int | None = None
        self._use_snapshot = True
        self._bump_task: asyncio.Task[None] | None = None
        self._bump_again = False

    # -- state -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the supervisor runs (following, bootstrapping or waiting)."""
        return self._task is not None and not self._task.done()

    @property
    def pid(self) -> int | None:
        """PID of the litestream process, if one runs."""
        p = self.proc
        return p.pid if p is not None and p.returncode is None else None

    def txid(self) -> int | None:
        """The replica's position (from ``<replica>-txid``), None before the first restore."""
        if self.state is not FollowerState.FOLLOWING:
            return self._txid
        t = ls.read_txid_file(self.replica)
        if t is not None:
            self._txid = t
        return self._txid

    # -- control -----------------------------------------------------------------------------

    def start(self) -> None:
        """Start following (idempotent; returns at once)."""
        if self.running:
            return
        self.state = FollowerState.STARTING
        self._task = asyncio.create_task(self._supervise(), name=f"sqlite-follow:{self.app}")

    async def stop(self, grace: float = 3.0) -> None:
        """Stop following; the replica stays at the position it reached."""
        task, self._task = self._task, None
        await cancel_and_wait(task)  # a single cancel can be swallowed by wait_for on 3.11
        proc, self.proc = self.proc, None
        if proc is not None:
            await ls.kill(proc, grace)
        bump, self._bump_task = self._bump_task, None
        if bump is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.shield(bump)
            await cancel_and_wait(bump)
        if self.state is FollowerState.FOLLOWING:
            self._txid = ls.read_txid_file(self.replica)
        self.following.clear()
        self.state = FollowerState.STOPPED

    async def wait_txid(self, target: int, timeout: float) -> bool:
        """Wait until the replica reached ``target`` (False on timeout or if it stops)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.txid()
            if t is not None and t >= target and self.state is FollowerState.FOLLOWING:
                return True
            if not self.running:
                return False
            await asyncio.sleep(0.01)
        return False

    def discard(self) -> None:
        """Forget the replica (after it was promoted, or found corrupt)."""
        dbfile.remove_with_sidecars(self.replica, extra=("-txid", ".tmp"))
        self._txid = None

    # -- supervision ---------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = 1.0
        while True:
            if not self.index.has_data():
                self.state = FollowerState.WAITING
                await self.index.wait_changed(2.0)
                continue
            self.state = FollowerState.BOOTSTRAPPING
            self.following.clear()
            started = time.monotonic()
            seeded: Snapshot | None = None
            try:
                await asyncio.to_thread(self.discard)
                if self._use_snapshot and self.snapshots is not None:
                    seeded = await self._seed()
                reason = await self._run_once(seeded)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            self.last_error = reason
            proc, self.proc = self.proc, None
            if proc is not None:
                await ls.kill(proc, 1.0)
            self.following.clear()
            if seeded is not None and time.monotonic() - started < 30.0:
                # Litestream refused to continue from the snapshot: restore from the bucket.
                self._use_snapshot = False
                log.warning("app %s: follower could not continue from snapshot %s (%s); "
                            "restoring from the WAL bucket instead", self.app, seeded.id, reason)
                continue
            if time.monotonic() - started > 60.0:
                backoff = 1.0
            self.restarts += 1
            self.state = FollowerState.RESTARTING
            log.warning("app %s: replica follower stopped (%s); restarting in %.1fs",
                        self.app, reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _seed(self) -> Snapshot | None:
        """Write the newest usable snapshot as the replica; None when there is none."""
        assert self.snapshots is not None
        l9 = self.index.latest_snapshot()
        if l9 is None:
            return None
        try:
            snaps = await self.snapshots.list()
        except Exception as exc:
            log.info("app %s: snapshots unavailable (%s); restoring from the WAL bucket",
                     self.app, exc)
            return None
        usable = [s for s in snaps if s.txid <= l9.max_txid]
        if not usable:
            return None
        snap = usable[-1]
        await self.snapshots.download(snap.id, self.replica, overwrite=True, verify="quick")
        await asyncio.to_thread(dbfile.mark_rollback, self.replica)
        ls.write_txid_file(self.replica, snap.txid)
        log.info("app %s: replica seeded from snapshot %s (txid %d); following the WAL after it",
                 self.app, snap.id, snap.txid)
        return snap

    async def _run_once(self, seeded: Snapshot | None) -> str:
        """Run one follow process until it exits or is judged stuck; returns why it ended."""
        cfg = self.config()
        argv = [self.binary, "restore", "-config", str(cfg), "-no-expand-env", "-f",
                "-follow-interval", ls.duration(self.interval), "-o", str(self.replica),
                self.db_path]
        proc = await ls.spawn(argv)
        self.proc = proc
        self._progress = time.monotonic()
        watchdog = asyncio.create_task(self._watch_progress(proc))
        reason = "exited"
        try:
            assert proc.stdout is not None
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").rstrip()
                if not self._line(line, seeded):
                    reason = f"too many apply errors: {line[-200:]}"
                    break
            code = await ls.kill(proc, 1.0)
            if reason == "exited":
                reason = f"exited with {code}" + (f": {self.last_error}" if self.last_error
                                                 else "")
        finally:
            await cancel_and_wait(watchdog)
        return reason

    def _line(self, line: str, seeded: Snapshot | None) -> bool:
        """Handle one output line; False when the process should be restarted."""
        if "level=ERROR" in line or line.startswith("Error"):
            log.warning("app %s: litestream follow: %s", self.app, line)
            self.last_error = line[-300:]
            m = _ERRORS.search(line)
            if m and int(m.group(1)) >= MAX_APPLY_ERRORS:
                return False
            return True
        log.debug("app %s: litestream follow: %s", self.app, line)
        if "entering follow mode" in line:
            if seeded is None:
                dbfile.mark_rollback(self.replica)
                self.bootstrapped_from = "wal bucket (litestream restore)"
            else:
                self.bootstrapped_from = f"snapshot {seeded.id} + WAL"
            self.state = FollowerState.FOLLOWING
            self._progress = time.monotonic()
            self.txid()
            self.following.set()
            log.info("app %s: replica %s following from txid %s (%s)", self.app, self.replica,
                     self._txid, self.bootstrapped_from)
        elif "follow: applied updates" in line:
            self._progress = time.monotonic()
            m = _APPLIED.search(line)
            if m:
                self._txid = int(m.group(1), 16)
            self._request_bump()
        return True

    def _request_bump(self) -> None:
        """Let open readers see the update (coalesced: one bump in flight at a time)."""
        if self._bump_task is not None and not self._bump_task.done():
            self._bump_again = True
            return
        self._bump_task = asyncio.create_task(self._bump())

    async def _bump(self) -> None:
        while True:
            self._bump_again = False
            try:
                await asyncio.to_thread(dbfile.bump_change_counter, self.replica)
            except Exception as exc:  # busy or being rebuilt: the next update bumps again
                log.debug("app %s: replica change counter not bumped: %s", self.app, exc)
            if not self._bump_again:
                return

    async def _watch_progress(self, proc: asyncio.subprocess.Process) -> None:
        """Restart a follower that makes no progress while the bucket is ahead of it."""
        while proc.returncode is None:
            await asyncio.sleep(min(2.0, self.stuck_after / 4))
            if self.state is not FollowerState.FOLLOWING:
                continue
            behind = self.index.max_txid() > (self.txid() or 0)
            if behind and time.monotonic() - self._progress > self.stuck_after:
                self.last_error = f"no progress for {self.stuck_after:.0f}s while behind"
                log.warning("app %s: replica follower stuck at txid %s (bucket at %d); "
                            "restarting it", self.app, self.txid(), self.index.max_txid())
                await ls.kill(proc, 1.0)
                return
