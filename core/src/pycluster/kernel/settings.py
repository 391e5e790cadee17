"""Settings: keyword arguments > ``PYCLUSTER_*`` environment > a YAML or TOML file > defaults.

Invalid settings fail at start with `ConfigError` naming the field (or the environment variable),
the value and why; secrets (passwords, tokens, the password part of a URL) are never echoed. An
environment variable ``PYCLUSTER_*`` that names no setting is a typo until proven otherwise: it
is reported with the closest valid name (once per process).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from .errors import ConfigError
from .leaf import HubListen, LeafOf, check_domain
from .names import validate_ident
from .options import check_timing

log = logging.getLogger("pycluster.settings")

ENV_PREFIX = "PYCLUSTER_"
URL_SCHEMES = ("nats", "tls", "ws", "wss")  # what nats-py connects with

# ``PYCLUSTER_*`` variables that are not settings but are read (or set) elsewhere; an unknown
# name outside these and the settings is reported as a probable typo.
OTHER_ENV_VARS: dict[str, str] = {
    "PYCLUSTER_NATS_SERVER": "the nats-server binary of the embedded server and the tests",
    "PYCLUSTER_LITESTREAM": "the litestream binary (sqlite plugin)",
    "PYCLUSTER_SYSTEMD_PREFIX": "command prefix reaching systemctl (systemd plugin)",
    "PYCLUSTER_DISCOVERY_DNS_ADDR": "host:port of the discovery DNS server (discovery plugin)",
    "PYCLUSTER_DISCOVERY_ADVERTISE": "default address of registered services (discovery plugin)",
    "PYCLUSTER_DISCOVERY_HTTP_ADDR": "host:port of the discovery HTTP exports (discovery plugin)",
    "PYCLUSTER_DISCOVERY_FILE_SD": "Prometheus file-SD file kept by the discovery plugin",
    "PYCLUSTER_DISABLE_PLUGINS": "plugin names not to load",
    "PYCLUSTER_TRACE_HOOKS": "log every hook call",
    "PYCLUSTER_STRICT": "tests: a skipped test fails",
    "PYCLUSTER_CACHE_DIR": "tests: cached container images",
    "PYCLUSTER_DEBIAN_MIRROR": "tests: the mirror of the systemd test image",
    "PYCLUSTER_CHAOS_WITNESS": "tests: the chaos harness's witness socket",
    "PYCLUSTER_CHAOS_FAULTS": "tests: faults injected by the chaos test",
    "PYCLUSTER_CHAOS_SEED": "tests: seed of the chaos test's faults",
    "PYCLUSTER_COMPLETE": "CLI: shell completion (click reads _PYCLUSTER_COMPLETE)",
    "PYCLUSTER_DEV_DIR": "CLI: the directory of `pycluster dev up/down`",
    "PYCLUSTER_CONFIG": "CLI: the node's config file (--config of the commands that connect)",
    # Set by pycluster for backends (a process, a unit, a container):
    "PYCLUSTER_EPOCH": "backends: the fencing token",
    "PYCLUSTER_APP": "backends: the app name",
    "PYCLUSTER_NODE": "backends: the node id",
    "PYCLUSTER_PLATFORM": "backends: the platform name",
}
_SECRET_FIELDS = ("nats_password", "nats_token")
_warned_env: set[str] = set()
DEFAULT_INBOX_PREFIX = "_INBOX"
_INBOX_TOKEN = re.compile(r"^[A-Za-z0-9_$-]+$")
# ``scheme://[user[:password]@]host``, anywhere in a text (for messages built from URLs).
_URL_AUTH = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<auth>[^/@\s'\",]*)@")


def redact_url(url: str) -> str:
    """``url`` with the password (or a token given as the user part) replaced by ``***``.

    The one helper behind every place a NATS URL may be shown: errors, logs, ``/status``,
    the CLI (`redact_text` applies it to URLs inside a longer text).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    auth, _, host = parts.netloc.rpartition("@")
    user, colon, _ = auth.partition(":")
    masked = f"{user}:***" if colon else "***"
    return SplitResult(parts.scheme, f"{masked}@{host}", parts.path, parts.query,
                       parts.fragment).geturl()


def redact_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the credentials of every URL in it masked as `redact_url` does, and every
    value of ``secrets`` (passwords, tokens; None and very short values are skipped), as well
    as the URLs' passwords wherever the text repeats them, replaced by ``***``."""

    found: list[str] = []

    def mask(m: re.Match[str]) -> str:
        user, colon, password = m.group("auth").partition(":")
        found.append(password if colon else user)  # also masked where the text repeats it
        return f"{m.group('scheme')}{user}:***@" if colon else f"{m.group('scheme')}***@"

    out = _URL_AUTH.sub(mask, text)
    for secret in (*secrets, *found):
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return out


def server_address(url: Any) -> str | None:
    """``host:port`` of a server URL (a string or a parsed URL), never its credentials."""
    if url is None:
        return None
    try:
        parts = urlsplit(url) if isinstance(url, str) else url
        host, port = parts.hostname, parts.port
    except (ValueError, AttributeError):
        return redact_url(str(url))
    if host is None:
        return None
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def secret_value(value: SecretStr | str | None) -> str | None:
    """The plain text of a secret setting (None stays None)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value


def check_inbox_prefix(prefix: str) -> str:
    """Validate an inbox prefix: dot-separated tokens of ``[A-Za-z0-9_$-]``, no wildcards."""
    tokens = prefix.split(".") if isinstance(prefix, str) else [""]
    if not prefix or any(not _INBOX_TOKEN.match(t) for t in tokens):
        raise ValueError("must be a subject prefix of tokens of letters, digits, '_', '-', '$' "
                         "separated by '.' (no wildcards), e.g. _INBOX or _INBOX_prod.node-1")
    return prefix


def _redact(field: str, value: Any) -> Any:
    """A setting's value as it may appear in an error message."""
    if field in _SECRET_FIELDS and value is not None:
        return "***"
    if field == "nats_url":
        if isinstance(value, str):
            return ",".join(redact_url(u) for u in value.split(","))
        if isinstance(value, list | tuple):
            return [redact_url(str(u)) for u in value]
    if field in ("hub", "leaf", "url"):  # a leaf-link section, or one of its URLs
        if isinstance(value, dict):
            return {k: "***" if k == "password" and v is not None else _redact(k, v)
                    for k, v in value.items()}
        return _redact("nats_url", value)
    return value


def _check_url(url: str) -> None:
    """Raise ValueError (message without the password) unless ``url`` is a NATS server URL."""
    shown = redact_url(url)
    if "://" not in url:
        raise ValueError(f"{shown!r} is not a URL (expected e.g. nats://host:4222)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"{shown!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in URL_SCHEMES:
        accepted = ", ".join(f"{s}://" for s in URL_SCHEMES)
        raise ValueError(f"{shown!r} has the scheme {parts.scheme + '://'!r}; accepted: "
                         f"{accepted} (e.g. nats://host:4222)")
    if not parts.hostname:
        raise ValueError(f"{shown!r} names no host (expected e.g. nats://host:4222)")


class AppConfig(BaseModel):
    """An app declared in a config file (for ``pycluster run --config``)."""

    model_config = {"extra": "allow"}

    name: str
    mode: str = "singleton"  # singleton | spread | replicas
    replicas: int | None = None
    on_nodes: list[str] | None = None
    on_label: dict[str, str] | None = None
    avoid_label: dict[str, str] | None = None
    lease_ttl: float | None = None
    heartbeat_interval: float | None = None
    priority: int | None = None
    no_failover: bool | None = None
    hook_timeout: float | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_ident("app name", v)

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("singleton", "spread", "replicas"):
            raise ValueError("must be one of singleton, spread, replicas")
        return v


class PlatformSettings(BaseSettings):
    """Every setting of a node. See docs/configuration.md for each field."""

    model_config = SettingsConfigDict(env_prefix="PYCLUSTER_", extra="forbid")

    name: str = "default"
    node_id: str = Field(default_factory=lambda: os.uname().nodename.split(".")[0])
    nats_url: list[str] | None = None
    nats_user: str | None = None
    # Secrets: SecretStr never prints its value (repr, str, model dumps, tracebacks).
    nats_password: SecretStr | None = None
    nats_token: SecretStr | None = None
    nats_nkey_seed: str | None = None
    nats_creds: str | None = None
    inbox_prefix: str = DEFAULT_INBOX_PREFIX
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.5
    labels: dict[str, str] = Field(default_factory=dict)
    data_dir: str | None = None
    lease_ttl: float = 10.0
    heartbeat_interval: float = 3.0
    hook_timeout: float = 30.0
    cooldown: float | None = None
    priority: int = 0
    no_failover: bool = False
    stream_replicas: int = 1
    # Migrations (docs/placement.md): limits held cluster-wide in the platform bucket, and
    # automatic rebalancing (off by default: a node that scores better never takes over a
    # healthy leader by itself unless asked to).
    migration_cooldown: float = Field(default=60.0, ge=0)
    max_concurrent_migrations: int = Field(default=1, ge=1)
    migrations_per_minute: int = Field(default=10, ge=1)
    auto_rebalance: bool = False
    rebalance_threshold: float = Field(default=10.0, ge=0)
    maintenance_windows: list[str] = Field(default_factory=list)
    # Handlers running at once per app and kind (rpc, api) on this node; beyond: "overloaded".
    max_inflight: int = 256
    health_addr: str | None = None
    metrics_addr: str | None = None
    # Observability (docs/observability.md): everything runs in-process by default; the HTTP
    # endpoints open only where health_addr / metrics_addr name an address ("host:0": any port).
    health_interval: float = 5.0
    health_timeout: float = 2.0
    health_history: int = 10
    health_breaker_threshold: int = 5
    health_breaker_cooldown: float = 30.0
    health_step_down: bool = False
    audit: bool = True
    audit_retention: float = 30 * 86400.0
    audit_max_bytes: int = 0  # 0: no byte limit (a byte limit reserves JetStream storage)
    audit_max_msgs: int = 1_000_000
    audit_buffer: int = 10_000
    metrics: bool = True
    tracing: bool = True
    # Zones (docs/multizone.md): this platform's zone and JetStream domain; ``hub`` / ``leaf``
    # configure the embedded nats-server's leaf-node links.
    zone: str | None = None
    jetstream_domain: str | None = None
    hub: HubListen | None = None
    leaf: LeafOf | None = None
    # "hub" or "leaf" on an operator-run server (hub/leaf imply it for the embedded one).
    zone_role: Literal["hub", "leaf"] | None = None
    # The witness bus of zone votes (a nats-server every zone reaches without the hub):
    # the default of ``PromoteOnHubFailure(vote_url=...)``.
    zone_vote_url: str | None = None
    apps: list[AppConfig] = Field(default_factory=list)

    @field_validator("zone", "jetstream_domain")
    @classmethod
    def _domain(cls, v: str | None, info: Any) -> str | None:
        return v if v is None else check_domain(info.field_name, v)

    @field_validator("name", "node_id")
    @classmethod
    def _ident(cls, v: str, info: Any) -> str:
        return validate_ident(info.field_name, v)

    @field_validator("nats_url", mode="before")
    @classmethod
    def _urls(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()] or None
        return v

    @field_validator("nats_url")
    @classmethod
    def _url_scheme(cls, v: list[str] | None) -> list[str] | None:
        for url in v or []:
            _check_url(url)
        return v

    @field_validator("inbox_prefix")
    @classmethod
    def _inbox(cls, v: str) -> str:
        return check_inbox_prefix(v)

    @field_serializer("nats_url")
    def _dump_urls(self, v: list[str] | None) -> list[str] | None:
        # Dumps (JSON, dicts) mask a URL's password like SecretStr masks the others; the
        # connection reads the attribute itself.
        return [redact_url(u) for u in v] if v is not None else None

    def __repr_args__(self) -> Any:
        # nats_url may carry a password (nats://user:pass@host): shown masked.
        for name, value in super().__repr_args__():
            if name == "nats_url" and value is not None:
                value = [redact_url(u) for u in value]
            yield name, value

    @field_validator("maintenance_windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        from .migrations import parse_windows

        try:
            parse_windows(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("stream_replicas")
    @classmethod
    def _replicas(cls, v: int) -> int:
        if v not in (1, 3, 5):
            raise ValueError("must be 1, 3 or 5")
        return v

    @field_validator("health_addr", "metrics_addr")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is not None:
            from ..httpserver import parse_addr

            try:
                parse_addr(v)
            except ConfigError as exc:
                raise ValueError(exc.reason) from None
        return v

    @field_validator("health_history", "audit_buffer", "max_inflight")
    @classmethod
    def _at_least_one(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("health_breaker_threshold", "audit_max_bytes", "audit_max_msgs")
    @classmethod
    def _not_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0 (0: off / unlimited)")
        return v

    @field_validator("audit_retention")
    @classmethod
    def _retention(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0 seconds (0: keep until audit_max_bytes)")
        return v

    @field_validator("hook_timeout", "connect_timeout", "reconnect_wait", "health_interval",
                     "health_timeout", "health_breaker_cooldown")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive")
        return v

    def resolved_data_dir(self) -> Path:
        """The node's data directory (created on demand)."""
        if self.data_dir:
            return Path(self.data_dir)
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "pycluster" / self.name / self.node_id


class _DictSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError("config file", str(p), exc.strerror or str(exc)) from None
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError("config file", str(p), "must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config file", str(p), f"cannot be parsed: {_parse_error(exc)}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError("config file", str(p), "must contain a mapping at the top level")
    # A file may nest everything under "platform:" for readability.
    if "platform" in data and isinstance(data["platform"], dict):
        apps = data.get("apps")
        data = dict(data["platform"]) | ({"apps": apps} if apps is not None else {})
    return dict(data)


def _parse_error(exc: Exception) -> str:
    """A parse error without the source line it quotes (it may hold a password)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = []
        for what, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
            if what:
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                parts.append(f"{what}{where}")
        return "; ".join(parts) or type(exc).__name__
    return str(exc)


def load_settings(file: str | Path | None = None, **kwargs: Any) -> PlatformSettings:
    """Build settings from keyword arguments, the environment and an optional file."""
    data = read_config_file(file) if file else {}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    class _Settings(PlatformSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _DictSource(settings_cls, data))

    warn_unknown_env()
    try:
        settings = _Settings(**kwargs)
    except ValidationError as exc:
        err = exc.errors()[0]
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):  # a section that names its own field (HubListen)
            raise inner from None
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        field = str(err["loc"][0]) if err["loc"] else ""
        value = _redact(field, err.get("input"))
        msg = err["msg"].removeprefix("Value error, ")
        env = _env_name(field) if field and field not in kwargs else None
        if env is not None and loc == field:  # name what the user typed: the variable
            loc = env
        raise ConfigError(loc, value, msg) from None
    except SettingsError as exc:
        # pydantic-settings could not decode a variable (a dict or list that is not JSON).
        raise _settings_error(exc) from None
    check_timing(settings.lease_ttl, settings.heartbeat_interval)  # cross-field: clear error
    return settings


def _env_name(field: str) -> str | None:
    """The environment variable that set ``field`` (names are case-insensitive), if any."""
    wanted = ENV_PREFIX + field.upper()
    return next((k for k in os.environ if k.upper() == wanted), None)


def _settings_error(exc: SettingsError) -> ConfigError:
    found = re.search(r'field "([^"]+)"', str(exc))
    field = found.group(1) if found else ""
    env = _env_name(field) if field else None
    if env is None:
        return ConfigError(field or "settings", None, str(exc))
    examples = {"labels": '{"zone": "a", "tier": "app"}',
                "nats_url": "nats://a:4222,nats://b:4222"}
    example = examples.get(field, "a JSON value")
    return ConfigError(env, _redact(field, os.environ[env]),
                       f"cannot be parsed as the setting {field!r}: expected JSON, e.g. "
                       f"{env}='{example}'")


def warn_unknown_env(environ: dict[str, str] | None = None) -> list[str]:
    """Log a warning for each ``PYCLUSTER_*`` variable that names no setting and nothing else
    pycluster reads (a probable typo), with the closest valid name; once per name and process.

    Returns the unknown names (also those warned about before).
    """
    env = os.environ if environ is None else environ
    fields = {ENV_PREFIX + f.upper() for f in PlatformSettings.model_fields}
    known = fields | set(OTHER_ENV_VARS)
    unknown = sorted(k for k in env if k.upper().startswith(ENV_PREFIX)
                     and k.upper() not in known)
    for name in unknown:
        if name in _warned_env:
            continue
        _warned_env.add(name)
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see docs/configuration.md"
        log.warning("environment variable %s matches no pycluster setting and is ignored (%s)",
                    name, hint)
    return unknown
