"""NATS users and permissions for a platform: what ``pycluster nats-config`` generates.

Every NATS user gets exactly what its apps need, and nothing of another app:

* its apps' buckets (``$KV.{p}_{app}.>``, ``_election``, ``_locks``; the object stores
  ``_wal`` and ``_snapshots`` of SQLite apps), their streams' JetStream API (info, direct and
  message gets, consumers, acks: ``$JS.API.STREAM.INFO.<stream>``,
  ``$JS.API.DIRECT.GET.<stream>.>``, ``$JS.API.CONSUMER.CREATE.<stream>.>``,
  ``$JS.ACK.<stream>.>``, ...), its apps' events stream (``{p}_{app}_events``) and subjects
  (``{p}.{app}.>``: RPC, events, the step-down request);
* the platform's shared parts, as narrowly as NATS subjects allow: its own node record in
  ``{p}_platform`` (``$KV.{p}_platform.nodes.<node>``; a user not bound to a node may write
  any node record), platform locks (``$KV.{p}_platform.locks.>``, shared by design), reads of
  the platform bucket (membership), audit entries about its apps and its node only
  (``{p}._.audit.*.<app|_>.<node>``), platform events published as its apps only
  (``{p}._.events.<app>.>``) and read from all, calls to any app's API (``{p}._.api.>``; who
  may call what is `pycluster.SignedAuth`'s job) but serving only its own apps' API
  (``{p}._.api.<app>.>``), the RPC cancellation, its node's liveness ping and label
  requests; the operations state (cordons, maintenance mode) is read-only to nodes;
* replies only through its own inbox prefix (``_INBOX_{p}.<kind>.<name>``, the setting
  ``inbox_prefix``): no other user may subscribe there, and nobody may publish there except
  as the answer to a request that user sent (``allow_responses``);
* no stream or consumer administration beyond its own consumers: creating or changing a
  stream would let a user capture another app's subjects (a stream listening on
  ``{p}.{other}.rpc.>`` would store its requests), so the operator creates every bucket and
  stream up front (`provision`, ``pycluster provision``).

The operator user (the CLI: status, step-down, audit, provisioning) may use everything of the
platform and the account's JetStream API. See docs/security.md for the threat model.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .kernel.discovery import LOOKUP_SUBJECT
from .kernel.errors import ConfigError
from .kernel.leaf import HUB_SUBJECT, ZONES_SUBJECT
from .kernel.names import bucket, validate_ident
from .signing import SigningKey, generate_keypair

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from .kernel.settings import PlatformSettings

__all__ = [
    "Credential",
    "GeneratedAuth",
    "NatsUser",
    "generate",
    "permissions",
    "provision",
    "render_server_config",
]

AuthKind = Literal["nkey", "password"]


@dataclass(frozen=True)
class NatsUser:
    """One NATS user of a platform.

    :param platform: the platform.
    :param kind: ``"node"`` (one node, running ``apps``), ``"app"`` (any node running
        ``apps``; cannot be kept to one node record) or ``"operator"`` (everything).
    :param name: the node id, the app name, or ``"operator"``.
    :param apps: the apps this user's connection serves.
    :param sqlite_apps: those of ``apps`` that replicate a SQLite database (object stores).
    """

    platform: str
    kind: Literal["node", "app", "operator"]
    name: str
    apps: tuple[str, ...] = ()
    sqlite_apps: tuple[str, ...] = ()

    @property
    def user(self) -> str:
        """The NATS user name: ``{platform}:{kind}:{name}`` (':' never occurs in names)."""
        return f"{self.platform}:{self.kind}:{self.name}" if self.kind != "operator" \
            else f"{self.platform}:operator"

    @property
    def node(self) -> str | None:
        """The node this user is bound to (None: any)."""
        return self.name if self.kind == "node" else None

    @property
    def inbox_prefix(self) -> str:
        """The user's inbox prefix (the node's ``inbox_prefix`` setting)."""
        if self.kind == "operator":
            return f"_INBOX_{self.platform}.operator"
        return f"_INBOX_{self.platform}.{self.kind}.{self.name}"

    @property
    def file_stem(self) -> str:
        """Base name of this user's credential files."""
        return "operator" if self.kind == "operator" else f"{self.kind}-{self.name}"


def _stream_api(stream: str, *, consumers: bool = True, purge: bool = False) -> list[str]:
    """The JetStream API subjects a client uses on its own stream (no create/update/delete)."""
    out = [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
    ]
    if purge:  # KV purge, object deletes
        out += [f"$JS.API.STREAM.PURGE.{stream}", f"$JS.API.STREAM.MSG.DELETE.{stream}"]
    if consumers:
        out += [
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.API.CONSUMER.NAMES.{stream}",
            f"$JS.API.CONSUMER.LIST.{stream}",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return out


def app_buckets(platform: str, app: str, sqlite: bool = False) -> dict[str, str]:
    """An app's KV buckets and object stores: bucket name → kind (``kv`` / ``obj``)."""
    out = {bucket(platform, app): "kv", bucket(platform, app, "election"): "kv",
           bucket(platform, app, "locks"): "kv"}
    if sqlite:
        out[bucket(platform, app, "wal")] = "obj"
        out[bucket(platform, app, "snapshots")] = "obj"
    return out


def _stream_of(name: str, kind: str) -> str:
    return f"KV_{name}" if kind == "kv" else f"OBJ_{name}"


def check_collisions(platform: str, apps: Iterable[str], sqlite_apps: Iterable[str] = ()
                     ) -> None:
    """Refuse app names whose buckets or streams would be another's (``web`` and
    ``web_locks``: the second's KV bucket is the first's locks bucket), or the platform's."""
    sqlite = set(sqlite_apps)
    owner: dict[str, str] = {bucket(platform, suffix=s): "the platform"
                             for s in ("platform", "services", "events", "audit")}
    for app in apps:
        names = [*app_buckets(platform, app, app in sqlite), bucket(platform, app, "events")]
        for name in names:
            if name in owner and owner[name] != f"app {app!r}":
                raise ConfigError("app", app, f"its resource {name!r} is also {owner[name]}'s: "
                                  "NATS permissions could not keep them apart; rename the app")
            owner[name] = f"app {app!r}"


def permissions(user: NatsUser) -> dict[str, Any]:
    """The nats-server permissions of ``user``: ``{"publish": {"allow": [...]},
    "subscribe": {"allow": [...]}, "allow_responses": True}``."""
    p = user.platform
    inbox = f"{user.inbox_prefix}.>"
    pub: list[str]
    sub: list[str]
    if user.kind == "operator":
        pub = [f"{p}.>", "$JS.API.>", "$JS.ACK.>", "$JS.FC.>"]
        for app in user.apps:
            pub += [f"$KV.{b}.>" if k == "kv" else f"$O.{b}.>"
                    for b, k in app_buckets(p, app, app in user.sqlite_apps).items()]
        pub += [f"$KV.{bucket(p, suffix='platform')}.>", f"$KV.{bucket(p, suffix='services')}.>"]
        # Zones (the leaf plugin): list every zone, ask the hub, ping any platform's zone.
        pub += [ZONES_SUBJECT, HUB_SUBJECT, "*._.zone.ping"]
        # Discovery: look services up across platforms (``services show --scope global``).
        pub.append(LOOKUP_SUBJECT)
        sub = [inbox, f"{p}.>"]
        return {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": _unique(sub)},
                "allow_responses": True}

    node = user.node or "*"
    platform_kv = bucket(p, suffix="platform")
    pub = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    sub = [inbox]
    for app in user.apps:
        for name, kind in app_buckets(p, app, app in user.sqlite_apps).items():
            pub += _stream_api(_stream_of(name, kind), purge=True)
            pub.append(f"$KV.{name}.>" if kind == "kv" else f"$O.{name}.>")
            if kind == "kv":  # core subscriptions to its own writes (metrics follow leases)
                sub.append(f"$KV.{name}.>")
        pub += _stream_api(bucket(p, app, "events"))
        pub += [f"{p}.{app}.>", f"{p}._.events.{app}.>", f"{p}._.audit.*.{app}.{node}"]
        sub += [f"{p}.{app}.>", f"{p}._.api.{app}.>"]
    if user.sqlite_apps:
        # Litestream (a Go client) has no inbox prefix setting: its replies come to _INBOX.
        sub.append("_INBOX.>")
    # The platform bucket: read (membership watch, lock holders), write own node record and
    # the shared platform locks, confirm reads (the reserved guard key).
    pub += _stream_api(f"KV_{platform_kv}")
    pub += [f"$KV.{platform_kv}.nodes.{node}", f"$KV.{platform_kv}.locks.>",
            f"$KV.{platform_kv}._pycluster.guard"]
    # The platform-wide migration slots (cooldowns, concurrent and per-minute limits), shared
    # by design like the locks: the worst a node can do there is hold up planned moves.
    pub.append(f"$KV.{platform_kv}.placement.migrations")
    # Platform events (publish as the platform or its own apps; durable subscriptions) and the
    # audit trail (write only: entries about its apps or itself, signed by its node id).
    pub += _stream_api(bucket(p, suffix="events"))
    pub += [f"{p}._.events._.>", f"$JS.API.STREAM.INFO.{bucket(p, suffix='audit')}",
            f"{p}._.audit.*._.{node}"]
    pub += [f"{p}._.api.>", f"{p}._.rpc.cancel", f"{p}._.node.{node}.ping"]
    # Its own label and status requests (``pycluster node label``, ``status``, ``health``).
    # The operations state (``placement.ops``: cordons, maintenance) is read through the
    # bucket; only the operator may change it (maintenance mode on every node would stop
    # all failover).
    sub += [f"{p}._.events.>", f"{p}._.rpc.cancel", f"{p}._.node.{node}.ping",
            f"{p}._.node.{node}.labels", f"{p}._.node.{node}.status"]
    # Zones (the leaf plugin): answer zone listings and pings, ask (a leaf) or answer (the
    # hub) hub-link checks. Calls to another platform's apps need grants of their own.
    pub += [HUB_SUBJECT]
    sub += [ZONES_SUBJECT, HUB_SUBJECT, f"{p}._.zone.ping"]
    # Discovery across platforms: ask the others (and the zones, to name the cut ones) and
    # answer them from this platform's registry.
    pub += [LOOKUP_SUBJECT, ZONES_SUBJECT]
    sub.append(LOOKUP_SUBJECT)
    return {"publish": {"allow": _unique(pub)}, "subscribe": {"allow": _unique(sub)},
            "allow_responses": True}


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- credentials and the server configuration ------------------------------------------------


@dataclass
class Credential:
    """How one user authenticates: an NKey seed (the server knows the public key) or a
    password (the server knows it too)."""

    user: NatsUser
    seed: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"Credential({self.user.user!r}, {'nkey' if self.seed else 'password'})"

    @property
    def public_key(self) -> str | None:
        """The NKey public key (``U...``), for NKey credentials."""
        return SigningKey(self.seed).public_key if self.seed else None

    def env(self, seed_path: str | None = None) -> dict[str, str]:
        """``PYCLUSTER_*`` variables a node (or the CLI) of this user needs."""
        out = {"PYCLUSTER_NAME": self.user.platform,
               "PYCLUSTER_INBOX_PREFIX": self.user.inbox_prefix}
        if self.user.kind == "node":
            out["PYCLUSTER_NODE_ID"] = self.user.name
        if self.seed:
            out["PYCLUSTER_NATS_NKEY_SEED"] = seed_path or "<path of the seed file>"
        else:
            out["PYCLUSTER_NATS_USER"] = self.user.user
            out["PYCLUSTER_NATS_PASSWORD"] = self.password or ""
        return out


@dataclass
class GeneratedAuth:
    """What `generate` produced: the users, their credentials, the server configuration."""

    platform: str
    credentials: list[Credential] = field(default_factory=list)

    def server_config(self) -> str:
        """The nats-server ``authorization`` block (see `render_server_config`)."""
        return render_server_config(self.credentials)

    def write(self, out: str | os.PathLike[str]) -> dict[str, list[Path]]:
        """Write ``nats-server.conf`` and, per user, ``<stem>.env`` (and ``<stem>.nk``, the
        seed) to ``out``, all mode 0600; returns the files per user name."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        written: dict[str, list[Path]] = {}
        conf = d / "nats-server.conf"
        _write_private(conf, self.server_config())
        written["server"] = [conf]
        for cred in self.credentials:
            files = []
            seed_path = None
            if cred.seed:
                seed_file = d / f"{cred.user.file_stem}.nk"
                _write_private(seed_file, cred.seed + "\n")
                seed_path = str(seed_file.resolve())
                files.append(seed_file)
            env_file = d / f"{cred.user.file_stem}.env"
            lines = [f"# pycluster NATS credentials of {cred.user.user} (keep secret)"]
            lines += [f"{k}={v}" for k, v in cred.env(seed_path).items()]
            _write_private(env_file, "\n".join(lines) + "\n")
            files.append(env_file)
            written[cred.user.user] = files
        return written

    def describe(self) -> list[dict[str, Any]]:
        """One dict per user (no secrets): user, kind, node, apps, inbox prefix, public key,
        permissions."""
        return [{"user": c.user.user, "kind": c.user.kind, "node": c.user.node,
                 "apps": list(c.user.apps), "inbox_prefix": c.user.inbox_prefix,
                 "auth": "nkey" if c.seed else "password", "public_key": c.public_key,
                 "permissions": permissions(c.user)} for c in self.credentials]


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _q(value: str) -> str:
    return json.dumps(value)  # a double-quoted string nats-server's parser reads as is


def render_server_config(credentials: Sequence[Credential]) -> str:
    """The ``authorization { users = [...] }`` block for ``credentials`` (include it in the
    server's configuration, or pass it as ``nats-server -c``). With NKeys it holds public keys
    only; with passwords it is as secret as they are."""
    lines = ["# NATS users of pycluster platform(s), written by `pycluster nats-config`.",
             "authorization {", "  users = ["]
    for cred in credentials:
        perms = permissions(cred.user)
        lines.append(f"    # {cred.user.user}: apps {', '.join(cred.user.apps) or '-'}")
        ident = (f"nkey: {_q(cred.public_key or '')}" if cred.seed else
                 f"user: {_q(cred.user.user)}, password: {_q(cred.password or '')}")
        lines.append(f"    {{ {ident}")
        lines.append("      permissions: {")
        for direction in ("publish", "subscribe"):
            allowed = ", ".join(_q(s) for s in perms[direction]["allow"])
            lines.append(f"        {direction}: {{ allow: [{allowed}] }}")
        lines.append("        allow_responses: true")
        lines.append("      }")
        lines.append("    }")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def generate(
    platform: str,
    *,
    apps: Iterable[str] = (),
    nodes: Mapping[str, Iterable[str]] | None = None,
    sqlite_apps: Iterable[str] = (),
    auth: AuthKind = "nkey",
    operator: bool = True,
    existing: str | os.PathLike[str] | None = None,
) -> GeneratedAuth:
    """Users and credentials for ``platform``.

    :param apps: apps that get a user of their own, usable on any node (``app:<name>``).
    :param nodes: node id → the apps it runs: one user per node (``node:<id>``), the one that
        can be kept to its own node record, audit entries and ping.
    :param sqlite_apps: apps with a SQLite database (their object stores are added).
    :param auth: ``"nkey"`` (the server configuration holds public keys only) or
        ``"password"``.
    :param operator: add the operator user (the CLI).
    :param existing: a directory written before: its seeds and passwords are kept (adding an
        app or a node does not rotate everyone's credentials).
    """
    validate_ident("platform", platform)
    node_map = {validate_ident("node id", n): tuple(dict.fromkeys(a))
                for n, a in (nodes or {}).items()}
    app_list = list(dict.fromkeys(apps))
    every: list[str] = list(dict.fromkeys(
        [*app_list, *(app for node_apps in node_map.values() for app in node_apps)]))
    for a in every:
        validate_ident("app", a)
    sqlite = tuple(dict.fromkeys(sqlite_apps))
    unknown = [a for a in sqlite if a not in every]
    if unknown:
        raise ConfigError("sqlite app", unknown, "not among the platform's apps")
    check_collisions(platform, every, sqlite)
    if auth not in ("nkey", "password"):
        raise ConfigError("auth", auth, "must be nkey or password")
    if sqlite and auth == "nkey":
        raise ConfigError("auth", auth, "Litestream (SQLite apps) cannot authenticate with an "
                          "NKey seed: use passwords (--auth password)")
    users = [NatsUser(platform, "node", n, a, tuple(x for x in a if x in sqlite))
             for n, a in node_map.items()]
    users += [NatsUser(platform, "app", a, (a,), (a,) if a in sqlite else ())
              for a in app_list]
    if operator:
        users.append(NatsUser(platform, "operator", "operator", tuple(every), sqlite))
    out = GeneratedAuth(platform)
    for u in users:
        out.credentials.append(_credential(u, auth, Path(existing) if existing else None))
    return out


def _credential(user: NatsUser, auth: AuthKind, existing: Path | None) -> Credential:
    """A new credential, or the one already written to ``existing`` for this user."""
    if existing is not None:
        if auth == "nkey":
            try:
                seed = (existing / f"{user.file_stem}.nk").read_text().strip()
                SigningKey(seed)  # still a valid seed
                return Credential(user, seed=seed)
            except (OSError, ConfigError):
                pass
        else:
            try:
                for line in (existing / f"{user.file_stem}.env").read_text().splitlines():
                    if line.startswith("PYCLUSTER_NATS_PASSWORD="):
                        return Credential(user, password=line.split("=", 1)[1])
            except OSError:
                pass
    if auth == "nkey":
        return Credential(user, seed=generate_keypair()[0])
    return Credential(user, password=secrets.token_urlsafe(32))


# -- provisioning: the operator creates what app users may not -------------------------------


async def provision(
    js: JetStreamContext,
    platform: str,
    apps: Iterable[str],
    *,
    settings: PlatformSettings | None = None,
    sqlite_apps: Iterable[str] = (),
) -> list[str]:
    """Create the platform's buckets and streams (those that do not exist yet) as the nodes
    would: the platform bucket, ``{p}_events``, ``{p}_audit``, and per app its KV, election
    and locks buckets and its events stream (object stores of SQLite apps need the sqlite
    plugin). Returns the names of the streams created. Run it with the operator's
    credentials before nodes whose users may not create streams start.
    """
    from .builtin.audit.query import audit_stream_config
    from .builtin.events.bus import events_stream_config
    from .kernel import natsutil as nu
    from .kernel.settings import load_settings

    s = settings or load_settings(name=platform, node_id="provision")
    r = s.stream_replicas
    created: list[str] = []

    async def kv(name: str, **kw: Any) -> None:
        if await nu.ensure_kv(js, name, replicas=r, **kw) is None:
            created.append(f"KV_{name}")

    async def stream(cfg: Any) -> None:
        if await nu.ensure_stream(js, cfg.name, lambda: js.add_stream(cfg)) is None:
            created.append(cfg.name)

    await kv(bucket(platform, suffix="platform"), history=1, marker_ttl=1)
    await stream(events_stream_config(platform, None, replicas=r))
    if s.audit:
        await stream(audit_stream_config(platform, retention=s.audit_retention,
                                         max_bytes=s.audit_max_bytes,
                                         max_msgs=s.audit_max_msgs, replicas=r))
    sqlite = set(sqlite_apps)
    for app in dict.fromkeys(apps):
        validate_ident("app", app)
        await kv(bucket(platform, app), history=1)
        await kv(bucket(platform, app, "election"), history=1, marker_ttl=1)
        await kv(bucket(platform, app, "locks"), history=1, marker_ttl=1)
        await stream(events_stream_config(platform, app, replicas=r))
        if app in sqlite:
            created += await _provision_sqlite(js, platform, app, r)
    return created


async def _provision_sqlite(js: JetStreamContext, platform: str, app: str,
                            replicas: int) -> list[str]:
    try:
        from pycluster_sqlite.walindex import ensure_object_store
    except ImportError:
        raise ConfigError("sqlite app", app, "provisioning its object stores needs the sqlite "
                          "plugin (pip install pycluster-sqlite)") from None
    created = []
    for suffix in ("wal", "snapshots"):
        name = bucket(platform, app, suffix)
        try:
            await js.stream_info(f"OBJ_{name}")
        except Exception:
            await ensure_object_store(js, name, replicas)
            created.append(f"OBJ_{name}")
    return created
