"""Zones joined by NATS leaf nodes: the ``hub`` and ``leaf`` settings and the nats-server
configuration they stand for.

One platform runs per zone. The hub zone's server listens for leaf connections
(`HubListen`); every other zone's server connects to it (`LeafOf`). Each server gets its own
JetStream domain (`zone_domain`: the ``jetstream_domain`` setting, else the ``zone``, else the
platform name), so a zone's buckets and streams stay in that zone while plain subjects (API
calls, live events, pings) cross the leaf link.

The same text configures the platform's embedded server (``Platform(hub=...)`` /
``Platform(leaf=...)`` without ``nats_url``) and an operator-run one
(``pycluster nats-config --hub/--leaf``): `leafnode_config`.

Example::

    Platform("prod", zone="eu", hub=HubListen(port=7422, user="leaf", password="..."))
    Platform("edge", zone="paris",
             leaf=LeafOf("nats-leaf://hub.example:7422", user="leaf", password="..."))
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

if TYPE_CHECKING:
    from .settings import PlatformSettings

__all__ = [
    "HUB_SUBJECT",
    "LEAF_URL_SCHEMES",
    "ZONES_SUBJECT",
    "HubListen",
    "LeafOf",
    "check_domain",
    "leafnode_config",
    "write_zone_config",
    "zone_domain",
]

ZONES_SUBJECT = "_pycluster.zones"
"""Every platform answers zone listings here (the ``leaf`` plugin)."""
HUB_SUBJECT = "_pycluster.hub"
"""The hub platform answers its leaves' link checks here (the ``leaf`` plugin)."""

LEAF_URL_SCHEMES = ("nats-leaf", "nats", "tls", "ws", "wss")
"""URL schemes a leaf remote accepts (``nats-leaf://`` is the conventional one)."""

# A JetStream domain becomes a token of "$JS.<domain>.API": no dots, spaces or wildcards.
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_domain(field: str, value: str) -> str:
    """Check a zone name or JetStream domain (``ValueError`` saying why)."""
    if not _DOMAIN.match(value):
        raise ValueError(f"{field} must be 1-64 letters, digits, '-' or '_', starting with a "
                         f"letter or digit (it becomes a token of $JS.<domain>.API); "
                         f"got {value!r}")
    return value


class _Section(BaseModel):
    """A settings section that raises `ConfigError` (naming ``Class.field``) when built
    directly with bad values; passwords are never echoed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            field = f"{type(self).__name__}.{loc}" if loc else type(self).__name__
            value = ("..." if not loc else "***" if "password" in loc or "url" in loc
                     else err.get("input"))
            raise ConfigError(field, value, err["msg"].removeprefix("Value error, ")) from None


def _check_port(v: int) -> int:
    if not 1 <= v <= 65535:
        raise ValueError(f"must be a TCP port, 1-65535 (got {v})")
    return v


class HubListen(_Section):
    """This zone is the hub: its embedded nats-server accepts leaf connections on ``port``.

    :param port: the leaf-node port (7422 by convention).
    :param host: the address to listen on.
    :param user: the user leaf servers authenticate as (with ``password``); without both,
        leaf connections are not authenticated (refused unless ``allow_anonymous``).
    :param password: that user's password.
    :param tls_cert: the certificate (PEM file) served on the leaf port; with ``tls_key``.
    :param tls_key: its private key.
    :param tls_ca: a CA file: leaf servers must then present a certificate it signed.
    :param advertise: ``host:port`` told to leaf servers (behind NAT).
    :param allow_anonymous: accept leaf connections without credentials (tests, closed
        networks).
    :param no_advertise: do not tell leaf servers the hub's other leaf-node addresses (by
        default a leaf learns them and may reconnect to any: behind a proxy or a load
        balancer, only the address it was given should be used).

    Example: ``HubListen(port=7422, user="leaf", password=secret, tls_cert=..., tls_key=...)``
    """

    port: int = 7422
    host: str = "0.0.0.0"
    user: str | None = None
    password: SecretStr | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    advertise: str | None = None
    allow_anonymous: bool = False
    no_advertise: bool = False

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        return _check_port(v)

    @model_validator(mode="after")
    def _consistent(self) -> HubListen:
        if (self.user is None) != (self.password is None):
            raise ValueError("give both user and password (or neither, with allow_anonymous)")
        if self.user is None and not self.allow_anonymous:
            raise ValueError("leaf connections need credentials: set user and password "
                             "(or allow_anonymous=True on a closed network)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (verifying leaf certificates) needs tls_cert and tls_key")
        return self


class LeafOf(_Section):
    """This zone is a leaf: its embedded nats-server connects to the hub at ``url``.

    :param url: the hub's leaf-node URL (``nats-leaf://hub:7422``; ``tls://`` for TLS), or a
        list of them (several hub servers).
    :param user: the user of the hub's `HubListen` (with ``password``).
    :param password: its password.
    :param credentials: a NATS ``.creds`` file instead (a hub running with JWT accounts).
    :param tls_ca: the CA that signed the hub's certificate.
    :param tls_cert: a client certificate (with ``tls_key``) when the hub verifies leaves.
    :param tls_key: its key.
    :param reconnect: seconds between attempts to reach the hub while the link is down.

    Example: ``LeafOf("nats-leaf://hub.example:7422", user="leaf", password=secret)``
    """

    url: list[str] = Field(min_length=1)
    user: str | None = None
    password: SecretStr | None = None
    credentials: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    reconnect: float = 1.0

    def __init__(self, url: str | list[str] | None = None, /, **data: Any) -> None:
        if url is not None:
            data["url"] = url
        super().__init__(**data)

    @field_validator("url", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [u.strip() for u in v.split(",") if u.strip()]
        return v

    @field_validator("url")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in LEAF_URL_SCHEMES:
                raise ValueError(f"{parts.scheme or 'no scheme'}: the scheme must be one of "
                                 f"{', '.join(s + '://' for s in LEAF_URL_SCHEMES)} "
                                 "(the hub's leaf-node port, not its client port)")
            try:
                port = parts.port
            except ValueError:
                raise ValueError("not a valid port") from None
            if not parts.hostname or port is None:
                raise ValueError("give a host and the leaf-node port "
                                 "(nats-leaf://host:7422)")
            if parts.password:
                raise ValueError("put credentials in user/password, not the URL "
                                 "(URLs end up in logs)")
        return v

    @field_validator("reconnect")
    @classmethod
    def _reconnect(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("must be positive")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LeafOf:
        if (self.user is None) != (self.password is None):
            raise ValueError("give both user and password")
        if self.credentials is not None and self.user is not None:
            raise ValueError("give user/password or credentials, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key")
        return self


def zone_domain(name: str, zone: str | None, jetstream_domain: str | None) -> str:
    """The JetStream domain of a zone's server: ``jetstream_domain``, else ``zone``, else the
    platform name."""
    return jetstream_domain or zone or name


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid nats-server config string


def _tls_block(cert: str | None, key: str | None, ca: str | None, verify: bool,
               indent: str) -> list[str]:
    lines = [f"{indent}tls {{"]
    if cert is not None:
        lines.append(f"{indent}  cert_file: {_q(cert)}")
    if key is not None:
        lines.append(f"{indent}  key_file: {_q(key)}")
    if ca is not None:
        lines.append(f"{indent}  ca_file: {_q(ca)}")
    if verify:
        lines.append(f"{indent}  verify: true")
    lines.append(f"{indent}}}")
    return lines


def leafnode_config(domain: str, hub: HubListen | None = None,
                    leaf: LeafOf | None = None) -> str:
    """The nats-server configuration of a zone: its JetStream ``domain`` and the
    ``leafnodes`` block (a listener for `HubListen`, a remote for `LeafOf`).

    Contains the leaf link's password when one is set: write it to a private file. Add it to
    (or ``include`` it from) a server configuration that already has ``authorization``.
    """
    check_domain("jetstream_domain", domain)
    lines = ["# written by pycluster: this zone's JetStream domain and leaf-node links",
             f"jetstream {{\n  domain: {_q(domain)}\n}}"]
    if hub is None and leaf is None:
        return "\n".join(lines) + "\n"
    lines.append("leafnodes {")
    if hub is not None:
        lines += [f"  host: {_q(hub.host)}", f"  port: {hub.port}"]
        if hub.advertise:
            lines.append(f"  advertise: {_q(hub.advertise)}")
        if hub.no_advertise:
            lines.append("  no_advertise: true")
        if hub.user is not None and hub.password is not None:
            lines += ["  authorization {", f"    user: {_q(hub.user)}",
                      f"    password: {_q(hub.password.get_secret_value())}", "  }"]
        if hub.tls_cert is not None:
            lines += _tls_block(hub.tls_cert, hub.tls_key, hub.tls_ca, hub.tls_ca is not None,
                                "  ")
    if leaf is not None:
        urls = []
        for url in leaf.url:
            if leaf.user is not None and leaf.password is not None:
                parts = urlsplit(url)
                from urllib.parse import quote

                cred = (f"{quote(leaf.user, safe='')}:"
                        f"{quote(leaf.password.get_secret_value(), safe='')}@")
                url = parts._replace(netloc=cred + parts.netloc).geturl()
            urls.append(_q(url))
        remote = [f"      urls: [{', '.join(urls)}]"]
        if leaf.credentials is not None:
            remote.append(f"      credentials: {_q(leaf.credentials)}")
        if leaf.tls_ca is not None or leaf.tls_cert is not None:
            remote += _tls_block(leaf.tls_cert, leaf.tls_key, leaf.tls_ca, False, "      ")
        lines += [f"  reconnect: {_q(f'{leaf.reconnect:g}s')}", "  remotes: [", "    {",
                  *remote, "    }", "  ]"]
    lines.append("}")
    return "\n".join(lines) + "\n"


ZONE_CONFIG_FILE = "zone.conf"


def write_zone_config(auth_config: Path, settings: PlatformSettings) -> Path:
    """Write the embedded server's configuration of a zone next to ``auth_config`` (its
    ``authorization`` block, copied in) and return its path; private (0600): it may hold the
    leaf link's password."""
    from .embedded import _write_private

    domain = zone_domain(settings.name, settings.zone, settings.jetstream_domain)
    text = auth_config.read_text() + leafnode_config(domain, settings.hub, settings.leaf)
    path = auth_config.with_name(ZONE_CONFIG_FILE)
    _write_private(path, text)
    return path
