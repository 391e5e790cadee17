"""SQLite files on disk: journal mode, verification, the atomic swap of a promotion.

Everything here is blocking file work; the runtime calls it through ``asyncio.to_thread``.

Facts this relies on (measured with litestream 0.5.17):

* A follow-mode replica (``litestream restore -f``) is written page by page under an exclusive
  lock on the whole file, and Litestream marks it as a rollback-journal database (header bytes
  18-19 = 1) on its first update. A reader that opens it in WAL mode holds a shared lock for as
  long as it stays open and blocks the follower for that long, so the replica must never look
  like a WAL database to readers: `mark_rollback` fixes the header of a fresh restore.
* A stale ``-wal`` next to a database file would be replayed by SQLite on the next open, so the
  swap moves or removes sidecars together with the main file.
* Litestream keeps its local state in ``.<name>-litestream`` next to the database; a promoted
  file must start without it, so that Litestream continues the bucket's history instead of its
  own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from .errors import NotWALModeError, PathNotWritableError, ReplicaVerificationError

HEADER = b"SQLite format 3\x00"
SIDECARS = ("-wal", "-shm", "-journal")
VERIFY_MODES = ("quick", "full")
PREVIOUS_SUFFIX = ".pre-promotion"


def journal_mode_of(path: str | Path) -> str | None:
    """The journal mode recorded in the file header: ``"wal"``, ``"rollback"``, ``"empty"``
    (a zero-length file, which SQLite treats as a new database), or None when the file does not
    exist or is not a SQLite database."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except FileNotFoundError:
        return None
    if not head:
        return "empty"
    if len(head) < 20 or not head.startswith(HEADER):
        return None
    return "wal" if head[18] == 2 and head[19] == 2 else "rollback"


def check_wal_mode(path: str | Path) -> None:
    """Raise `NotWALModeError` if ``path`` exists and is a SQLite database not in WAL mode.

    A missing or empty file passes (it is created in WAL mode).
    """
    mode = journal_mode_of(path)
    if mode in (None, "empty", "wal"):
        if mode is None and Path(path).exists() and Path(path).stat().st_size > 0:
            raise NotWALModeError(str(path), "not a SQLite database")
        return
    raise NotWALModeError(str(path), _sqlite_mode_name(path))


def _sqlite_mode_name(path: str | Path) -> str:
    """The journal mode SQLite reports (read-only open; "delete" when it cannot tell)."""
    try:
        # as_uri(): a plain "file:" + path breaks on "%", "#" or "?" in a folder name.
        con = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            found = _query(con, "PRAGMA journal_mode")
        finally:
            con.close()
        return str(found[0][0]) if found else "delete"
    except sqlite3.Error:
        return "delete"


def check_writable(field: str, path: str | Path) -> None:
    """Raise `PathNotWritableError` unless ``path`` can be created or rewritten here.

    The file must be a regular file that this process can read and write, or not exist in a
    directory (or the nearest existing ancestor of one) that this process can write.
    """
    p = Path(path)
    if p.exists():
        if not p.is_file():
            raise PathNotWritableError(field, str(p), "exists and is not a regular file")
        if not os.access(p, os.R_OK | os.W_OK):
            raise PathNotWritableError(field, str(p), "is not readable and writable by this "
                                       f"process (uid {os.getuid()})")
    parent = p.parent
    while not parent.exists():
        if parent.parent == parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise PathNotWritableError(field, str(p), f"{parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PathNotWritableError(field, str(p), f"directory {parent} is not writable by this "
                                   f"process (uid {os.getuid()})")


def _query(con: sqlite3.Connection, sql: str) -> list[Any]:
    """Run one statement to completion and close its cursor: a statement left open (even an
    exhausted one, in Python's statement cache) makes a later checkpoint fail with "database
    table is locked"."""
    cur = con.cursor()
    try:
        return cur.execute(sql).fetchall()
    finally:
        cur.close()


def verify(path: str | Path, mode: str = "quick") -> dict[str, Any]:
    """Check a database before it becomes the primary: SQLite's ``quick_check`` (or
    ``integrity_check`` for ``mode="full"``) must answer "ok", and the file is switched to WAL
    mode and checkpointed (no ``-wal`` is left next to it).

    :returns: ``page_size``, ``page_count`` and ``bytes``.
    :raises ReplicaVerificationError: corrupt, not a database, or WAL mode refused.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {VERIFY_MODES}, not {mode!r}")
    p = Path(path)
    if journal_mode_of(p) is None:
        raise ReplicaVerificationError(str(p), "missing or not a SQLite database")
    pragma = "quick_check" if mode == "quick" else "integrity_check"
    try:
        con = sqlite3.connect(str(p), timeout=5.0, isolation_level=None)
        try:
            rows = [str(r[0]) for r in _query(con, f"PRAGMA {pragma}(20)")]
        finally:
            con.close()
        if rows != ["ok"]:
            raise ReplicaVerificationError(str(p), f"{pragma}: " + "; ".join(rows[:3]))
        # A fresh connection: after an integrity check, a checkpoint on the same connection
        # fails with "database table is locked" (SQLite 3.40).
        con = sqlite3.connect(str(p), timeout=5.0, isolation_level=None)
        try:
            jm = _query(con, "PRAGMA journal_mode=WAL")
            if not jm or str(jm[0][0]).lower() != "wal":
                raise ReplicaVerificationError(str(p), f"cannot switch to WAL mode ({jm})")
            _query(con, "PRAGMA wal_checkpoint(TRUNCATE)")
            page_size = int(_query(con, "PRAGMA page_size")[0][0])
            page_count = int(_query(con, "PRAGMA page_count")[0][0])
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise ReplicaVerificationError(str(p), f"{type(exc).__name__}: {exc}") from None
    return {"page_size": page_size, "page_count": page_count, "bytes": p.stat().st_size}


def create_empty(path: str | Path) -> None:
    """Create a new, empty database in WAL mode at ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(p), isolation_level=None)
    try:
        _query(con, "PRAGMA journal_mode=WAL")
        # A database with no page yet has no header: write one so that Litestream sees a file.
        _query(con, "CREATE TABLE IF NOT EXISTS _pycluster_init(x)")
        _query(con, "DROP TABLE _pycluster_init")
        _query(con, "PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()


def mark_rollback(path: str | Path) -> bool:
    """Set a restored replica's header to rollback-journal mode (bytes 18-19 = 1), as
    Litestream's follower does on its first update, so that readers never open it in WAL mode.
    Returns True when the header was changed."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        head = os.pread(fd, 20, 0)
        if len(head) == 20 and head.startswith(HEADER) and head[18:20] == b"\x02\x02":
            os.pwrite(fd, b"\x01\x01", 18)
            os.fsync(fd)
            return True
        return False
    finally:
        os.close(fd)


def bump_change_counter(path: str | Path, timeout: float = 1.0) -> None:
    """Make every open reader of a follow-mode replica see Litestream's latest update.

    Litestream writes pages into the replica directly; when page 1 is not among them, the file
    change counter stays the same and a reader that keeps its connection open keeps serving
    pages from its cache (measured: a persistent connection saw none of 50 updates). A write
    transaction that rewrites ``user_version`` with its own value changes nothing but the
    counter, through SQLite's own locking (so it never races Litestream's page writes, which
    take the same locks, nor releases the locks of readers in this process).
    """
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    try:
        _query(con, "PRAGMA synchronous=OFF")  # the replica is rebuilt after any crash
        _query(con, "PRAGMA journal_mode=MEMORY")  # no -journal file, header untouched
        _query(con, "BEGIN IMMEDIATE")
        try:
            version = int(_query(con, "PRAGMA user_version")[0][0])
            _query(con, f"PRAGMA user_version={version}")
            _query(con, "COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                _query(con, "ROLLBACK")
            raise
    finally:
        con.close()


def meta_dir(path: str | Path) -> Path:
    """Litestream's local state directory of a database (``.<name>-litestream``)."""
    p = Path(path)
    return p.parent / f".{p.name}-litestream"


def remove_with_sidecars(path: str | Path, extra: tuple[str, ...] = ()) -> None:
    """Remove a database file with its ``-wal``/``-shm``/``-journal`` (and ``extra``) files."""
    for suffix in ("", *SIDECARS, *extra):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}{suffix}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def swap_into(src: str | Path, dst: str | Path, keep_previous: bool = True) -> Path | None:
    """Make the verified database ``src`` the database at ``dst``, atomically.

    The old ``dst`` (if any) is kept as ``dst.pre-promotion`` together with its ``-wal``
    (``keep_previous``) or removed; its other sidecars and Litestream's local state are removed;
    then ``src`` is renamed onto ``dst`` (copied first when on another filesystem). Returns the
    path of the kept previous database, if any.
    """
    s, d = Path(src), Path(dst)
    d.parent.mkdir(parents=True, exist_ok=True)
    kept: Path | None = None
    if d.exists() and keep_previous:
        kept = d.with_name(d.name + PREVIOUS_SUFFIX)
        remove_with_sidecars(kept)
        os.replace(d, kept)
        if Path(f"{d}-wal").exists():
            os.replace(f"{d}-wal", f"{kept}-wal")  # the kept copy stays complete
    remove_with_sidecars(d)
    shutil.rmtree(meta_dir(d), ignore_errors=True)
    if s.stat().st_dev == d.parent.stat().st_dev:
        os.replace(s, d)
    else:
        tmp = d.with_name(d.name + ".promote-tmp")
        shutil.copyfile(s, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, d)
        remove_with_sidecars(s)
    _fsync_dir(d.parent)
    return kept
