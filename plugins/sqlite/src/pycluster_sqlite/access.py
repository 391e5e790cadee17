"""How Litestream reaches NATS: the server this node is connected to, with its credentials."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycluster.kernel.settings import secret_value

from . import litestream as ls
from .errors import SQLiteError

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from pycluster.kernel.platform import Platform
    from pycluster.kernel.settings import PlatformSettings


def nats_access(platform: Platform) -> ls.NatsAccess:
    """How Litestream reaches the NATS server this node is connected to, with its credentials."""
    embedded = platform.embedded.url if platform.embedded is not None else None
    return access_for(platform.settings, platform.nc, embedded)


def access_for(s: PlatformSettings, nc: NATS | None, fallback: str | None = None
               ) -> ls.NatsAccess:
    """`NatsAccess` from settings and the connection in use (Litestream takes one server:
    the one ``nc`` is connected to, else ``fallback``, else the first configured URL)."""
    url = None
    if nc is not None and nc.connected_url is not None:
        u = nc.connected_url
        url = f"{u.scheme}://{u.hostname}:{u.port or 4222}"
    elif fallback:
        url = fallback
    elif s.nats_url:
        url = s.nats_url[0]
    if url is None:
        raise SQLiteError("no NATS URL known for litestream")
    if s.nats_nkey_seed:
        raise SQLiteError("litestream cannot authenticate with an nkey seed; use a creds file "
                          "(nats_creds) or user/password for platforms with SQLite apps")
    return ls.NatsAccess.from_url(
        url, username=s.nats_user, password=secret_value(s.nats_password),
        token=secret_value(s.nats_token),
        creds=s.nats_creds, tls=bool(s.tls_ca or s.tls_cert),
        root_cas=[s.tls_ca] if s.tls_ca else [], client_cert=s.tls_cert, client_key=s.tls_key,
    )
