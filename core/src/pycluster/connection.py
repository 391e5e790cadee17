"""The NATS connection of a platform: URLs, credentials, TLS, reconnects, JetStream check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from .errors import ConfigError, NatsUnavailableError
from .settings import (
    DEFAULT_INBOX_PREFIX,
    PlatformSettings,
    redact_text,
    redact_url,
    secret_value,
    server_address,
)

log = logging.getLogger("pycluster.nats")


def connect_options(s: PlatformSettings) -> dict[str, Any]:
    """nats-py ``connect()`` keyword arguments for these settings."""
    opts: dict[str, Any] = {
        "servers": s.nats_url or [],
        "name": f"pycluster:{s.name}:{s.node_id}",
        "connect_timeout": s.connect_timeout,
        "reconnect_time_wait": s.reconnect_wait,
        "max_reconnect_attempts": -1,
        "allow_reconnect": True,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }
    if s.nats_user:
        opts["user"] = s.nats_user
        opts["password"] = secret_value(s.nats_password) or ""
    if s.nats_token:
        opts["token"] = secret_value(s.nats_token)
    if s.inbox_prefix != DEFAULT_INBOX_PREFIX:
        # Replies (and JetStream deliveries) come to subjects under this prefix only, so NATS
        # permissions can keep other users from subscribing to them (pycluster nats-config).
        opts["inbox_prefix"] = s.inbox_prefix
    if s.nats_nkey_seed:
        opts["nkeys_seed"] = s.nats_nkey_seed
    if s.nats_creds:
        opts["user_credentials"] = s.nats_creds
    if s.tls_ca or s.tls_cert:
        try:
            ctx = ssl.create_default_context(cafile=s.tls_ca)
            if s.tls_cert:
                ctx.load_cert_chain(s.tls_cert, s.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("tls", s.tls_cert or s.tls_ca, str(exc)) from None
        opts["tls"] = ctx
    return opts


async def connect(
    s: PlatformSettings,
    *,
    on_reconnect: Callable[[], Awaitable[None]] | None = None,
    on_disconnect: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect and check JetStream; `NatsUnavailableError` with the reason otherwise."""
    opts = connect_options(s)
    servers = [redact_url(u) for u in opts["servers"]]  # for messages: no passwords

    last_error: list[BaseException] = []

    auth_error: list[BaseException] = []
    connecting: list[asyncio.Task[None]] = []

    secrets = (secret_value(s.nats_password), secret_value(s.nats_token))

    async def error_cb(exc: Exception) -> None:
        last_error[:] = [exc]
        text = str(exc).lower()
        if "authorization" in text or "authentication" in text:
            auth_error[:] = [exc]
            if connecting and not nc.is_connected:
                connecting[0].cancel()  # bad credentials do not get better with retries
        if "permissions violation" in text:
            # The server refused a publish or subscription: a request would only time out,
            # so say which subject the NATS user may not use (see docs/security.md).
            log.error("nats: %s", redact_text(str(exc), secrets))
        else:
            log.debug("nats: %s", redact_text(str(exc), secrets))

    async def reconnected_cb() -> None:
        log.info("nats: reconnected to %s", server_address(nc.connected_url) or "?")
        if on_reconnect is not None:
            await on_reconnect()

    async def disconnected_cb() -> None:
        if nc.is_closed or nc.is_draining:
            return  # our own close, not a fault
        log.warning("nats: disconnected")
        if on_disconnect is not None:
            await on_disconnect()

    nc = NATS()
    # nats-py retries an unreachable server forever when reconnects are unlimited, so the
    # first connection is bounded here: every server gets a couple of attempts.
    budget = (s.connect_timeout + s.reconnect_wait) * 2 * max(1, len(servers))
    task = asyncio.ensure_future(
        nc.connect(**opts, error_cb=error_cb, reconnected_cb=reconnected_cb,
                   disconnected_cb=disconnected_cb)
    )
    connecting.append(task)
    try:
        await asyncio.wait_for(task, budget)
    except (OSError, TimeoutError, asyncio.CancelledError, nats.errors.Error) as exc:
        current = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and current and current.cancelling():
            raise  # our caller cancelled us
        with contextlib.suppress(Exception):
            await nc.close()
        cause = auth_error[0] if auth_error else (last_error[0] if last_error else exc)
        reason = redact_text(f"{type(cause).__name__}: {cause}".rstrip(": "), secrets)
        if auth_error:
            reason = f"authorization failed ({redact_text(str(cause), secrets)})"
        elif isinstance(exc, TimeoutError):
            reason = f"not reachable within {budget:.1f}s (last error: {reason})"
        raise NatsUnavailableError(servers, reason) from None
    try:
        await nc.jetstream(timeout=s.connect_timeout).account_info()
    except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError,
            nats.errors.TimeoutError, TimeoutError) as exc:
        await nc.close()
        raise NatsUnavailableError(
            servers, f"JetStream is not enabled or not reachable ({type(exc).__name__})"
        ) from None
    return nc


def jetstream_servers(nc: NATS) -> int | None:
    """How many servers the connected NATS cluster has, from the server's INFO: 1 for a
    server that is not part of a cluster, the number of its cluster's client URLs otherwise,
    None when it cannot tell (a cluster whose servers do not advertise their URLs)."""
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}  # nats-py: no public accessor
    if not info.get("cluster"):
        return 1
    urls = info.get("connect_urls") or []
    return len(set(urls)) or None


def check_stream_replicas(nc: NATS, replicas: int) -> None:
    """Refuse ``stream_replicas`` that the connected NATS cannot hold, before any bucket exists.

    A single server (no cluster) holds one replica only: a clear `ConfigError` instead of the
    server's "replicas > 1 not supported in non-clustered mode" from deep inside the start.
    A cluster is not checked here: its connected-server count drops during an outage, when
    existing R3 buckets still work (see `replicas_error` for a placement that fails).
    """
    if replicas > 1 and jetstream_servers(nc) == 1:
        url = nc.connected_url.geturl() if nc.connected_url else "the NATS server"
        raise ConfigError(
            "stream_replicas", replicas,
            f"the NATS server at {redact_url(url)} is a single server (not part of a cluster: "
            f"cluster size 1), which cannot keep {replicas} replicas of a bucket; use "
            f"stream_replicas=1, or a NATS cluster of at least {replicas} servers")


# JetStream API errors of a stream that cannot get the replicas it asks for.
_PLACEMENT_ERRORS = {10074: "replicas > 1 not supported in non-clustered mode",
                     10005: "no suitable peers for placement",
                     10023: "insufficient resources"}


def replicas_error(exc: BaseException, replicas: int, nc: NATS) -> ConfigError | None:
    """A `ConfigError` naming ``stream_replicas`` when ``exc`` is JetStream refusing to place a
    bucket's replicas (None for any other error)."""
    code = getattr(exc, "err_code", None)
    if replicas <= 1 or code not in _PLACEMENT_ERRORS:
        return None
    size = jetstream_servers(nc)
    seen = f"{size} server(s) connected in its cluster" if size else "cluster size unknown"
    description = getattr(exc, "description", None) or _PLACEMENT_ERRORS[code]
    return ConfigError(
        "stream_replicas", replicas,
        f"NATS cannot place {replicas} replicas of a bucket ({description}; {seen}): the "
        f"cluster needs at least {replicas} JetStream servers up; use a smaller "
        "stream_replicas or add servers")
