"""Zone standbys: a `SQLiteRuntime` whose app has a `StandbyOf` option follows another
platform's database (typically the hub zone's) instead of replicating its own.

Where the data comes from: the other platform's WAL bucket lives in its zone's JetStream domain,
and Litestream's NATS replica cannot name a domain. So this zone keeps a **JetStream mirror** of
that bucket's stream (``OBJ_{platform}_{app}_wal``, same name, in this zone's domain, sourced
through ``$JS.<domain>.API`` across the leaf link): the copy is made by the servers, survives
a cut link and resumes where it stopped when the link heals. Everything else is the standby
machinery unchanged: the WAL index watches the mirror, and the follower (``litestream restore
-f``) restores from it, here into ``SQLite.path`` itself, so the backend reads a read-only
replica. Every node of the zone follows; the local leader's stages (catch-up, promote,
replicate, snapshots) do nothing while the app is a zone standby; the leader purges the
mirror of LTX files the source deleted over a minute ago (a mirror does not copy purges, so
it would otherwise keep every file ever written).

Lag: the usual lag (age of the oldest LTX file the replica lacks), and while the link is down
at least the time since the last contact: a cut link shows as a growing lag and
``zone.link == "down"``. The link state is the mirror's (the server reports how long ago it
last heard from the source: it stays well under a second while connected, idle or not, and
grows while cut); before the mirror exists, whether the other platform's zone responder
answers. Both are probed every second.

Promotion and demotion (the ``pycluster_zone_promote`` / ``pycluster_zone_demote`` hooks):

* promote: stop following at the head of the local mirror (nothing else is reachable when the
  other zone is lost), switch to this platform's own WAL bucket; the node holding the app's
  local lease turns the replica into a WAL-mode database, claims the bucket and starts
  ``litestream replicate`` (its first LTX file is a full image: other zones can follow it);
  the other nodes follow that bucket as ordinary standbys.
* demote: stop ``litestream replicate`` first (Litestream does not fence), then follow the
  new primary's bucket through a mirror as above; the replaced database is kept as
  ``<path>.pre-demotion`` (its rows written after the last sync were never replicated).

A promotion or demotion is recorded in the app's KV (``sqlite.zone``: role, term, the
followed platform) by every node that runs it; a node that starts later reads it before
anything else, and it overrides the options (a restarted node of a promoted zone does not go
back to following the lost hub).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import ExternalStream, StorageType, StreamConfig, StreamSource

from pycluster.kernel import natsutil
from pycluster.kernel.aio import cancel_and_wait
from pycluster.kernel.context import Context
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.names import bucket
from pycluster.kernel.replication import ReplicationState

from . import dbfile
from .base import log
from .errors import SQLiteError
from .follower import Follower, FollowerState
from .options import StandbyOf
from .primary import PrimarySide
from .promotion import PromotionSide
from .snapshots import SnapshotStore
from .walindex import WalIndex, ensure_object_store, stream_name

PROBE_INTERVAL = 1.0  # seconds between probes of the followed platform (link state, mirror)
PROBE_TIMEOUT = 1.0
ZONE_KEY = "sqlite.zone"  # the app KV key recording a promotion or demotion
MIRROR_STALE = 3.0  # seconds without contact after which the mirror counts as cut off
JANITOR_EVERY = 10.0  # seconds between purges of deleted LTX files from the mirror
PURGE_AFTER = 60.0  # seconds a deleted LTX file stays in the mirror (as in the source)


@dataclass
class ZoneLink:
    """What this node knows of the followed platform and the mirror."""

    up: bool = False
    last_contact: float | None = None  # wall clock of the last contact with the source
    answers: bool = False  # the followed platform's zone responder answers
    domain: str | None = None
    mirror_lag: int | None = None  # messages the mirror is behind, as the server reports
    mirror_active: float | None = None  # seconds since the mirror last heard from the source
    error: str | None = None


class ZoneSide(PromotionSide, PrimarySide):
    """The zone standby mode of a runtime (see the module docstring)."""

    def __init__(self, option: Any, app: Any, platform: Any) -> None:
        super().__init__(option, app, platform)
        found = [o for o in app.options if isinstance(o, StandbyOf)]
        self.standby_of: StandbyOf | None = found[0] if found else None
        if self.standby_of is not None and self.standby_of.platform == platform.name:
            raise ConfigError(f"App({app.name!r}) StandbyOf.platform", self.standby_of.platform,
                              "names this platform: a zone standby follows another platform")
        self.zone = ZoneLink()
        self.zone_term: int | None = None
        self.zone_role: str | None = "standby" if self.standby_of is not None else None
        self._zone_lock = asyncio.Lock()
        self._zone_task: asyncio.Task[None] | None = None
        self._zone_loaded = False
        if self.standby_of is not None:
            self.wal_bucket = bucket(self.standby_of.platform, self.standby_of.app, "wal")

    @property
    def zone_mode(self) -> bool:
        """Whether this copy follows another platform's database (a zone standby)."""
        return self.standby_of is not None

    # -- start and following -------------------------------------------------------------------

    async def start(self) -> None:
        """Start as a standby; as a zone standby: the mirror, the index and the follower come up
        in the background (the followed platform may be unreachable now). A recorded promotion
        or demotion overrides the options."""
        if not self._zone_loaded:
            await self._load_zone_state()
        if not self.zone_mode:
            await super().start()
            return
        async with self._start_lock:
            if self._started:
                return
            js = self.platform.js
            if js is None:
                raise SQLiteError("the platform is not connected")
            await asyncio.to_thread(self.workdir.mkdir, mode=0o700, parents=True, exist_ok=True)
            self.store = SnapshotStore(js, self.snap_bucket, self.platform.settings.stream_replicas)
            await self.store.ensure()
            self.index = WalIndex(js, self.wal_bucket)
            self.follower = Follower(
                binary=self.binary, config=self._config, db_path=self.db_path,
                replica=self.option.path, interval=self.option.follow_interval,
                index=self.index, snapshots=None, app=self.app.name,
            )
            self._started = True
            self.role = ReplicationState.STANDBY
            self._zone_task = asyncio.create_task(self._zone_loop(),
                                                  name=f"sqlite-zone:{self.app.name}")
            self._tasks.append(asyncio.create_task(self._status_loop(),
                                                   name=f"sqlite-status:{self.app.name}"))
            log.info("app %s: zone standby of %s/%s (mirror of bucket %s)", self.app.name,
                     self.standby_of.platform if self.standby_of else "?",
                     self.standby_of.app if self.standby_of else "?", self.wal_bucket)

    async def _zone_loop(self) -> None:
        ready = False
        purged_at = time.monotonic()
        while True:
            try:
                if not ready:
                    await self._ensure_mirror()
                    assert self.index is not None and self.follower is not None
                    await self.index.start()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.index.loaded.wait(), 5.0)
                    if self.role is ReplicationState.STANDBY:
                        self.follower.start()
                    ready = True
                await self._probe()
                if self.app.is_active and time.monotonic() - purged_at > JANITOR_EVERY:
                    # A mirror keeps what the source purged: the zone's leader cleans it.
                    purged_at = time.monotonic()
                    assert self.index is not None
                    await self.index.purge_deleted(PURGE_AFTER, batch=500, chunks=True)
                self.zone.error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.zone.error = f"{type(exc).__name__}: {exc}"
                log.info("app %s: zone standby: %s", self.app.name, self.zone.error)
            await asyncio.sleep(PROBE_INTERVAL)

    async def _ensure_mirror(self) -> None:
        """The mirror of the followed bucket's stream in this zone (created once)."""
        js, so = self.platform.js, self.standby_of
        if js is None or so is None:
            raise SQLiteError("the platform is not connected")
        name = stream_name(self.wal_bucket)
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            if info.config.mirror is None:
                raise SQLiteError(f"stream {name} of this zone is not a mirror of platform "
                                  f"{so.platform}'s bucket (was the app replicated here "
                                  "under that platform name?)")
            return
        domain = so.domain or await self._domain_of(so.platform)
        self.zone.domain = domain
        cfg = StreamConfig(
            name=name, description=f"pycluster-sqlite zone standby: {so.platform}/{so.app}",
            mirror=StreamSource(name=name, external=ExternalStream(api=f"$JS.{domain}.API")),
            allow_rollup_hdrs=True, allow_direct=True, storage=StorageType.FILE,
            num_replicas=self.platform.settings.stream_replicas,
        )
        await natsutil.ensure_stream(js, name, lambda: js.add_stream(cfg))
        log.info("app %s: mirroring %s from domain %s", self.app.name, name, domain)

    async def _domain_of(self, platform: str) -> str:
        from pycluster.builtin.leaf.service import ping_zone

        doc = await ping_zone(self.platform.nc, platform, PROBE_TIMEOUT * 2)
        domain = doc.get("domain")
        if not isinstance(domain, str) or not domain:
            raise SQLiteError(f"platform {platform} did not say its JetStream domain")
        return domain

    async def _probe(self) -> None:
        """Is the followed platform reachable (its zone responder), how far is the mirror."""
        from pycluster.builtin.leaf.service import ping_zone

        so, z = self.standby_of, self.zone
        if so is None:
            return
        now = time.time()
        try:
            doc = await ping_zone(self.platform.nc, so.platform, PROBE_TIMEOUT)
            z.answers = True
            z.domain = doc.get("domain") or z.domain
        except (nats.errors.Error, TimeoutError, OSError):
            z.answers = False
        active: float | None = None
        js = self.platform.js
        if js is not None:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, TimeoutError):
                info = await js.stream_info(stream_name(self.wal_bucket))
                m = info.mirror
                if m is not None:
                    z.mirror_lag = m.lag
                    if m.active is not None and m.active >= 0:
                        active = m.active / 1e9
        z.mirror_active = active
        contact: float | None = None
        if active is not None:
            z.up = active < MIRROR_STALE
            contact = now - active
        else:
            z.up = z.answers
            contact = now if z.answers else None
        if contact is not None and (z.last_contact is None or contact > z.last_contact):
            z.last_contact = contact

    # -- the stages, as a zone standby: nothing to promote or replicate -------------------------

    async def catch_up(self, ctx: Context) -> None:
        """A zone standby keeps following (the leader serves the read-only replica)."""
        if not self.zone_mode:
            await super().catch_up(ctx)
            return
        await self.start()
        self.epoch = ctx.epoch

    async def promote(self, ctx: Context) -> None:
        """Nothing to promote for a zone standby."""
        if not self.zone_mode:
            await super().promote(ctx)

    async def replicate(self, ctx: Context) -> None:
        """A zone standby replicates nothing (its data is another platform's)."""
        if not self.zone_mode:
            await super().replicate(ctx)

    async def snapshots_on(self, ctx: Context) -> None:
        """No snapshots of another platform's database."""
        if not self.zone_mode:
            await super().snapshots_on(ctx)

    def lag(self) -> float:
        """The standby lag; for a zone standby whose source does not answer, at least the time
        since it last did (infinite if it never did and nothing was restored)."""
        base = super().lag()
        if not self.zone_mode or self.zone.up:
            return base
        if self.zone.last_contact is None:
            return base if self.replica_txid() is not None else float("inf")
        return max(base, time.time() - self.zone.last_contact)

    def zone_status(self) -> dict[str, Any] | None:
        """The zone part of the status (None for an app that never was in a zone role)."""
        if self.zone_role is None:
            return None
        z = self.zone
        so = self.standby_of
        return {
            "role": self.zone_role, "term": self.zone_term,
            "following": None if so is None else f"{so.platform}/{so.app}",
            "link": None if so is None else ("up" if z.up else "down"),
            "platform_answers": None if so is None else z.answers,
            "last_contact": z.last_contact, "domain": z.domain, "mirror_lag": z.mirror_lag,
            "mirror_active": None if z.mirror_active is None else round(z.mirror_active, 3),
            "error": z.error,
        }

    # -- promotion and demotion of the zone -----------------------------------------------------

    async def _load_zone_state(self) -> None:
        """Apply the promotion or demotion recorded in the app KV, if any."""
        self._zone_loaded = True
        try:
            raw = await self.app.kv.get(ZONE_KEY)
            st = json.loads(raw) if raw else None
        except Exception as exc:
            log.warning("app %s: the recorded zone state is unreadable (%s); starting from the "
                        "options", self.app.name, exc)
            return
        if not isinstance(st, dict):
            return
        term = int(st.get("term") or 0)
        if st.get("role") == "primary":
            self.standby_of = None
            self.wal_bucket = bucket(self.platform.name, self.app.name, "wal")
        elif st.get("role") == "standby" and st.get("following"):
            self.standby_of = StandbyOf(str(st["following"]), str(st.get("app") or
                                                                   self.app.name))
            self.wal_bucket = bucket(self.standby_of.platform, self.standby_of.app, "wal")
        else:
            return
        self.zone_role, self.zone_term = str(st["role"]), term
        log.info("app %s: recorded zone state: %s (term %d)", self.app.name, st["role"], term)

    async def _save_zone_state(self) -> None:
        so = self.standby_of
        doc = {"role": self.zone_role, "term": self.zone_term, "at": time.time(),
               "following": so.platform if so else None, "app": so.app if so else None,
               "node": self.platform.node_id}
        try:
            await self.app.kv.put(ZONE_KEY, json.dumps(doc))
        except Exception as exc:
            log.error("app %s: the zone state (%s) was not recorded: %s", self.app.name,
                      self.zone_role, exc)

    def zone_position(self) -> int | None:
        """The replicated position of this copy (the replica's TXID; the primary's own)."""
        if self.role in (ReplicationState.ACTIVE, ReplicationState.PROMOTING):
            return self.local_txid
        return self.replica_txid()

    async def _switch_to(self, wal_bucket: str, *, mirror: bool) -> None:
        """Stop the index, follower and zone loop; use ``wal_bucket`` from now on."""
        task, self._zone_task = self._zone_task, None
        await cancel_and_wait(task)
        if self.follower is not None:
            await self.follower.stop()
        if self.index is not None:
            await self.index.stop()
        for t in self._tasks:
            await cancel_and_wait(t)
        self._tasks = []
        self.wal_bucket = wal_bucket
        self._started = False
        if not mirror:
            self.standby_of = None

    async def zone_promote(self, term: int) -> None:
        """This zone is now primary for the app (see the module docstring)."""
        async with self._zone_lock:
            if not self.zone_mode:
                log.info("app %s: zone promotion (term %d): already primary here",
                         self.app.name, term)
                self.zone_term = max(term, self.zone_term or 0)
                return
            await self.start()
            index, _, follower = self._need()
            source = self.standby_of
            leader = self.app.is_active and self.lease_valid()
            # Final catch-up from what is local: the mirror is all this zone has.
            head = 0
            with contextlib.suppress(Exception):
                head = await index.head()
            if follower.state is FollowerState.FOLLOWING and head:
                await follower.wait_txid(head, min(self.option.promotion_timeout / 4, 15.0))
            await follower.stop()
            have = follower.txid()
            restored: Path | None = None
            if leader and head and (have is None or have < head):
                log.warning("app %s: replica at txid %s, mirror at %d: restoring the mirror",
                            self.app.name, have, head)
                restored = await self._restore_to_temp("zone-promote.db")
                have = head
            own = bucket(self.platform.name, self.app.name, "wal")
            await self._switch_to(own, mirror=False)
            self.zone_term, self.zone_role = term, "primary"
            await self._save_zone_state()
            js = self.platform.js
            if js is None:
                raise SQLiteError("the platform is not connected")
            await ensure_object_store(js, own, self.platform.settings.stream_replicas,
                                      f"pycluster-sqlite WAL of {self.app.name}")
            path = self.option.path
            if leader:
                if restored is not None:
                    await asyncio.to_thread(dbfile.swap_into, restored, path, False)
                await asyncio.to_thread(_make_primary_file, path)
                info = await asyncio.to_thread(dbfile.verify, path, self.option.verify)
            # Standby machinery on the own bucket (index, follower into replica_path).
            self.role = ReplicationState.PROMOTING if leader else ReplicationState.STANDBY
            await super().start()
            if leader:
                assert self.index is not None
                epoch = self.app.epoch
                ctx = Context(app=self.app, platform=self.platform,
                              node_id=self.platform.node_id, epoch=epoch,
                              reason=f"zone promoted (term {term})")
                await self.index.claim_writer(epoch or 0, self.platform.node_id)
                self.epoch, self.local_txid = epoch, have
                self.role = ReplicationState.ACTIVE
                await self.replicate(ctx)
                await self.snapshots_on(ctx)
                self.last_promotion = {"epoch": epoch, "term": term, "source": "zone replica",
                                       "txid": have, "at": time.time(), **info}
            self.audit("zone_promoted", {"term": term, "from": f"{source.platform}/{source.app}"
                                         if source else None, "txid": have, "writer": leader})
            log.warning("app %s: zone promoted (term %d): %s, txid %s", self.app.name, term,
                        "writing and replicating to " + own if leader else "following " + own,
                        have)

    async def zone_demote(self, primary_platform: str, term: int) -> None:
        """Another platform is primary (see the module docstring)."""
        async with self._zone_lock:
            ctx = Context(app=self.app, platform=self.platform, node_id=self.platform.node_id,
                          epoch=self.epoch, reason=f"zone demoted (term {term})")
            # Litestream does not fence: stop it before anything else.
            await self._stop_replicator(ctx)
            stopped_at = time.time()
            for t in self._active_tasks:
                await cancel_and_wait(t)
            self._active_tasks = []
            if self._unwatch is not None:
                self._unwatch()
                self._unwatch = None
            if not primary_platform:  # an operator's demotion: no primary to follow yet
                self.zone_term, self.zone_role = term, "fenced"
                await self._save_zone_state()
                self.audit("zone_demoted", {"term": term, "primary": None,
                                            "replication_stopped_at": stopped_at})
                log.warning("app %s: zone demoted (term %d) without a successor: replication "
                            "stopped, nothing followed yet", self.app.name, term)
                return
            so = StandbyOf(primary_platform, self.app.name)
            if so.platform == self.platform.name:
                raise ConfigError("pycluster_zone_demote primary_platform", primary_platform,
                                  "names this platform")
            was_primary = self.role in (ReplicationState.ACTIVE, ReplicationState.PROMOTING)
            self.role = ReplicationState.STANDBY
            await self._switch_to(bucket(so.platform, so.app, "wal"), mirror=True)
            self.standby_of = so
            self.zone = ZoneLink()
            self.zone_term, self.zone_role = term, "standby"
            await self._save_zone_state()
            path = self.option.path
            if was_primary and self.option.keep_previous and path.exists():
                kept = path.with_name(path.name + ".pre-demotion")
                await asyncio.to_thread(_move_with_sidecars, path, kept)
                log.warning("app %s: demoted database kept as %s", self.app.name, kept)
            await self.start()
            self.audit("zone_demoted", {"term": term, "primary": primary_platform,
                                        "replication_stopped_at": stopped_at,
                                        "was_primary": was_primary})
            log.warning("app %s: zone demoted (term %d): replication stopped, following %s",
                        self.app.name, term, primary_platform)


def _make_primary_file(path: Path) -> None:
    """A zone replica becomes a database Litestream can replicate: WAL mode, no follower or
    Litestream state left (Litestream then starts the own bucket with a full image)."""
    for suffix in ("-txid", ".tmp"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
    shutil.rmtree(dbfile.meta_dir(path), ignore_errors=True)
    con = sqlite3.connect(path)
    try:
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    finally:
        con.close()
    if str(mode).lower() != "wal":
        raise SQLiteError(f"{path}: could not switch the promoted zone replica to WAL mode "
                          f"(journal mode {mode})")


def _move_with_sidecars(src: Path, dst: Path) -> None:
    dbfile.remove_with_sidecars(dst)
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            Path(f"{src}{suffix}").rename(f"{dst}{suffix}")
    dbfile.remove_with_sidecars(src, extra=("-txid",))
